"""Embedding networks for the decoupling metric (paper Sec. 5.3 and supplementary "Decoupling Evaluation").

Two networks (one for identity, one for expression) map an image of a mesh to a 128-d unit
vector, trained with a triplet loss; two meshes "share" the factor when their embeddings are
closer than a threshold tau (Euclidean distance between unit vectors, in [0, 2]).

- Input: the orthographic front view of the mesh, RGB = unit normal (n + 1) / 2, 224 x 224
  (``facegan.render.render_meshes(mode="normals")``), rendered with one fixed framing for all
  meshes (:func:`fixed_view`) so that the image scale carries the face's size.
- Network: ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 64-128-256-512) in plain torch, a linear
  layer to 128-d, L2 normalisation. ``width`` scales the channels (0.25 = a 16-32-64-128 net) and
  ``size`` the input for tests and quick CPU runs; the paper setting is width 1, size 224.
- Loss: batch-hard triplet loss (Hermans et al. 2017) with margin 0.2 on PK batches (P labels x K
  meshes each): for every anchor, the farthest same-label and the nearest other-label mesh of the
  batch, loss = mean(max(0, margin + d(a, p) - d(a, n))).
- Threshold (:func:`select_threshold`): maximise accuracy on a balanced validation pair set from
  the test split (:func:`make_validation_pairs`) subject to FAR <= 10%.

Checkpoints are safetensors files (``facegan.train.checkpoint``): weights, the optimizer state
and the JSON config/epoch/history, written atomically after every epoch; ``train_embedding``
resumes from an existing file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

__all__ = [
    "EmbeddingConfig",
    "EmbeddingNet",
    "fixed_view",
    "MeshRenderer",
    "images_to_input",
    "batch_hard_triplet_loss",
    "pk_batches",
    "train_embedding",
    "save_embedding",
    "load_embedding",
    "embed_images",
    "MeshEmbedder",
    "make_validation_pairs",
    "select_threshold",
    "pair_distances",
]

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)  # ResNet-18


@dataclass
class EmbeddingConfig:
    """Network and training settings (paper defaults: width 1, size 224, 128-d).

    margin: triplet margin (distance between unit vectors); classes_per_batch x per_class = PK
    batch; lr: Adam learning rate; weight_decay: L2 on the weights; view: (xmin, xmax, ymin, ymax)
    mm framing of the renders (None = fitted to the training meshes).
    """

    embedding_dim: int = 128
    width: float = 1.0
    size: int = 224
    margin: float = 0.2
    classes_per_batch: int = 8
    per_class: int = 4
    lr: float = 3e-4
    weight_decay: float = 5e-4
    view: tuple[float, float, float, float] | None = None


# --------------------------------------------------------------------------- network


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class EmbeddingNet(nn.Module):
    """ResNet-18 trunk -> linear -> L2-normalised embedding.

    Input (B, 3, H, W) float in [-1, 1] (see :func:`images_to_input`), any H, W >= 32;
    output (B, embedding_dim) unit vectors.
    """

    def __init__(self, embedding_dim: int = 128, width: float = 1.0):
        super().__init__()
        widths = [max(8, int(round(w * width))) for w in STAGE_WIDTHS]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], widths[0]
        for i, (cout, blocks) in enumerate(zip(widths, BLOCKS_PER_STAGE)):
            layers = [BasicBlock(cin, cout, 1 if i == 0 else 2)] + [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, embedding_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x)).mean(dim=(2, 3))
        return F.normalize(self.head(features), dim=1)


def images_to_input(images) -> Tensor:
    """uint8 images (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- rendering


def fixed_view(meshes, margin: float = 0.05, max_meshes: int = 256) -> tuple[float, float, float, float]:
    """One framing (xmin, xmax, ymin, ymax) mm that fits (an even subset of) meshes (N, V, 3)."""
    from facegan.render import fit_view

    meshes = np.asarray(meshes) if not isinstance(meshes, Tensor) else meshes.numpy()
    pick = np.linspace(0, len(meshes) - 1, min(max_meshes, len(meshes))).astype(np.int64)
    return tuple(float(v) for v in fit_view(torch.as_tensor(np.asarray(meshes[pick], np.float32)), margin))


class MeshRenderer:
    """Meshes (B, V, 3) mm -> uint8 normal images (B, size, size, 3), one fixed orthographic framing."""

    def __init__(self, triangles, size: int, view: Sequence[float], batch: int = 32):
        self.triangles = torch.as_tensor(np.asarray(triangles), dtype=torch.int64)
        self.size, self.view, self.batch = int(size), tuple(float(v) for v in view), batch

    def __call__(self, meshes) -> Tensor:
        from facegan.render import render_meshes

        meshes = np.asarray(meshes) if not isinstance(meshes, Tensor) else meshes.detach().cpu().numpy()
        out = [
            render_meshes(torch.as_tensor(np.array(meshes[s : s + self.batch], np.float32)), self.triangles, self.size, mode="normals", view=self.view)
            for s in range(0, len(meshes), self.batch)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.size, self.size, 3, dtype=torch.uint8)


class _ImageSource:
    """Training images by index: given uint8 images, or meshes rendered (all at once if ``cache``)."""

    def __init__(self, images=None, meshes=None, renderer: MeshRenderer | None = None, cache: bool = True, progress: bool = True):
        self.images, self.meshes, self.renderer = images, meshes, renderer
        if images is None and cache:
            n = len(meshes)
            self.images = torch.empty(n, renderer.size, renderer.size, 3, dtype=torch.uint8)
            step = 64
            for s in tqdm(range(0, n, step), desc="rendering", disable=not progress, leave=False):
                self.images[s : s + step] = renderer(meshes[s : s + step])

    def __getitem__(self, index: np.ndarray) -> Tensor:
        if self.images is not None:
            return torch.as_tensor(np.asarray(self.images[np.sort(index)]))[np.argsort(np.argsort(index))]
        order = np.argsort(index)
        rendered = self.renderer(self.meshes[index[order]])
        return rendered[np.argsort(order)]


# --------------------------------------------------------------------------- loss and batches


def pair_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distances (B, B) between rows of (B, d), numerically safe at 0."""
    sq = (embeddings[:, None] - embeddings[None]).square().sum(-1)
    return torch.sqrt(sq.clamp_min(1e-12)) * (sq > 0)


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.2) -> tuple[Tensor, dict]:
    """Batch-hard triplet loss of embeddings (B, d) with integer labels (B,).

    Anchors without a positive or a negative in the batch are left out. Returns the loss and
    stats: fraction of active triplets, mean hardest positive / negative distance.
    """
    d = pair_distances(embeddings)
    same = labels[:, None] == labels[None]
    eye = torch.eye(len(labels), dtype=torch.bool)
    positive = same & ~eye
    hardest_pos = torch.where(positive, d, torch.zeros_like(d)).amax(1)
    hardest_neg = torch.where(~same, d, torch.full_like(d, math.inf)).amin(1)
    valid = positive.any(1) & (~same).any(1)
    if not valid.any():
        zero = embeddings.sum() * 0
        return zero, {"active": 0.0, "d_pos": 0.0, "d_neg": 0.0}
    losses = F.relu(margin + hardest_pos - hardest_neg)[valid]
    stats = {
        "active": float((losses > 0).float().mean()),
        "d_pos": float(hardest_pos[valid].detach().mean()),
        "d_neg": float(hardest_neg[valid].detach().mean()),
    }
    return losses.mean(), stats


def pk_batches(labels: np.ndarray, classes_per_batch: int, per_class: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch of PK batches: index arrays of P labels x K members (drawn with replacement for
    classes smaller than K). Labels < 0 are skipped; classes with one member too (no positive).
    About (labeled meshes) / (P K) batches per epoch.
    """
    labels = np.asarray(labels)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    classes = [m for m in classes if len(m) >= 2]
    if len(classes) < 2:
        raise ValueError("triplet training needs at least two labels with two meshes each")
    p = min(classes_per_batch, len(classes))
    n_batches = max(1, sum(len(m) for m in classes) // (p * per_class))
    for _ in range(n_batches):
        chosen = rng.choice(len(classes), p, replace=False)
        yield np.concatenate(
            [rng.choice(classes[c], per_class, replace=len(classes[c]) < per_class) for c in chosen]
        )


# --------------------------------------------------------------------------- checkpoints


def save_embedding(path, net: EmbeddingNet, config: EmbeddingConfig, optimizer=None, epoch: int = 0, history=None) -> None:
    """Write weights (+ optimizer state) and config/epoch/history to a safetensors checkpoint."""
    from facegan.train.checkpoint import save_checkpoint

    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    meta = {"kind": "embedding", "config": asdict(config), "epoch": epoch, "history": history or []}
    if optimizer is not None:
        for i, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(value)
        meta["optimizer"] = optimizer.state_dict()["param_groups"]
    save_checkpoint(path, tensors, meta)


def load_embedding(path, optimizer_for: EmbeddingNet | None = None) -> tuple[EmbeddingNet, EmbeddingConfig, dict]:
    """Read a checkpoint -> (net in eval mode, config, meta). meta["optimizer_state"] holds the
    optimizer state dict when the file has one (pass it to ``Adam.load_state_dict``)."""
    from facegan.errors import FaceganError
    from facegan.train.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "embedding":
        raise FaceganError(f"{path}: not an embedding-network checkpoint")
    cfg = dict(meta["config"])
    if cfg.get("view") is not None:
        cfg["view"] = tuple(cfg["view"])
    config = EmbeddingConfig(**cfg)
    net = EmbeddingNet(config.embedding_dim, config.width)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    net.eval()
    if "optimizer" in meta:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        meta["optimizer_state"] = {"state": state, "param_groups": meta["optimizer"]}
    return net, config, meta


# --------------------------------------------------------------------------- training


def train_embedding(
    labels,
    images=None,
    meshes=None,
    triangles=None,
    config: EmbeddingConfig | None = None,
    epochs: int = 10,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    cache_images: bool = True,
    progress: bool = True,
) -> tuple[EmbeddingNet, dict]:
    """Train an embedding network with the batch-hard triplet loss.

    labels: (N,) int (-1 = unlabeled, skipped); images: (N, size, size, 3) uint8, or meshes
    (N, V, 3) mm + triangles (F, 3) rendered as normal images (all at once when
    ``cache_images``, else per batch). checkpoint: a .safetensors path written after every
    epoch; if it exists, training resumes from it (same config) up to ``epochs`` in total.
    Returns the net (eval mode) and {"config", "history": [per-epoch mean loss and stats]}.
    """
    config = config or EmbeddingConfig()
    labels = np.asarray(labels, np.int64)
    if images is None and (meshes is None or triangles is None):
        raise ValueError("train_embedding needs images, or meshes and triangles")
    if images is None and config.view is None:
        config.view = fixed_view(meshes)
    torch.manual_seed(seed)  # the initial weights
    net = EmbeddingNet(config.embedding_dim, config.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        loaded, loaded_config, meta = load_embedding(checkpoint)
        net.load_state_dict(loaded.state_dict())
        if "optimizer_state" in meta:
            optimizer.load_state_dict(meta["optimizer_state"])
        start, history, config = int(meta["epoch"]), list(meta["history"]), loaded_config
    renderer = None if images is not None else MeshRenderer(triangles, config.size, config.view)
    source = _ImageSource(images, meshes, renderer, cache_images, progress)
    for epoch in range(start, epochs):
        net.train()
        rng = np.random.default_rng([seed, epoch])  # per-epoch stream: resuming replays the same batches
        torch.manual_seed(seed * 100003 + epoch)
        totals = {"loss": 0.0, "active": 0.0, "d_pos": 0.0, "d_neg": 0.0}
        batches = list(pk_batches(labels, config.classes_per_batch, config.per_class, rng))
        bar = tqdm(batches, desc=f"embedding epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for index in bar:
            x = images_to_input(source[index])
            loss, stats = batch_hard_triplet_loss(net(x), torch.as_tensor(labels[index]), config.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["loss"] += float(loss.detach())
            for k in ("active", "d_pos", "d_neg"):
                totals[k] += stats[k]
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", active=f"{stats['active']:.2f}")
        history.append({k: v / len(batches) for k, v in totals.items()} | {"epoch": epoch + 1})
        if checkpoint is not None:
            save_embedding(checkpoint, net, config, optimizer, epoch + 1, history)
    net.eval()
    return net, {"config": config, "history": history}


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def embed_images(net: EmbeddingNet, images, batch: int = 64) -> np.ndarray:
    """Embeddings (N, d) float32 of uint8 images (N, H, W, 3), in eval mode."""
    net.eval()
    out = [net(images_to_input(images[s : s + batch])).numpy() for s in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, net.head.out_features), np.float32)


class MeshEmbedder:
    """Callable meshes (B, V, 3) mm -> embeddings (B, d) float32: render, then the network."""

    def __init__(self, net: EmbeddingNet, triangles, config: EmbeddingConfig, batch: int = 64):
        if config.view is None:
            raise ValueError("the embedding config has no view (framing) to render with")
        self.net, self.batch = net.eval(), batch
        self.renderer = MeshRenderer(triangles, config.size, config.view)

    def __call__(self, meshes) -> np.ndarray:
        return np.concatenate(
            [embed_images(self.net, self.renderer(meshes[s : s + self.batch]), self.batch) for s in range(0, len(meshes), self.batch)]
        ) if len(meshes) else np.zeros((0, self.net.head.out_features), np.float32)


# --------------------------------------------------------------------------- thresholds


def make_validation_pairs(labels, n_pairs: int, rng=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A balanced validation set: n_pairs // 2 same-label pairs and as many different-label pairs.

    labels: (N,) int, -1 = missing (never used). Pairs are distinct meshes, drawn uniformly with
    replacement (positives uniform over same-label pairs). Returns first (K,), second (K,) int64
    and same (K,) bool, shuffled.
    """
    from facegan.metrics.diversity import sample_pairs

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    labels = np.asarray(labels)
    half = n_pairs // 2
    pos_a, pos_b = sample_pairs(len(labels), half, groups=labels, rng=rng)
    labeled = np.flatnonzero(labels >= 0)
    if len(np.unique(labels[labeled])) < 2:
        raise ValueError("negative pairs need at least two labels")
    neg_a, neg_b = np.zeros(0, np.int64), np.zeros(0, np.int64)
    while len(neg_a) < half:  # rejection sampling: draw pairs, keep those with different labels
        a, b = rng.choice(labeled, 2 * half), rng.choice(labeled, 2 * half)
        keep = labels[a] != labels[b]
        neg_a, neg_b = np.r_[neg_a, a[keep]], np.r_[neg_b, b[keep]]
    first = np.r_[pos_a, neg_a[:half]]
    second = np.r_[pos_b, neg_b[:half]]
    same = np.r_[np.ones(half, bool), np.zeros(half, bool)]
    order = rng.permutation(len(first))
    return first[order], second[order], same[order]


def select_threshold(distances, same, max_far: float = 0.10) -> tuple[float, float, float]:
    """Threshold tau maximising accuracy with false acceptance rate <= max_far.

    distances: (K,) embedding distances of validation pairs; same: (K,) bool ground truth. A pair
    is judged "same" when distance <= tau. FAR = accepted different pairs / different pairs.
    Candidates are -inf (accept nothing) and every distinct distance; ties in accuracy go to
    the lower FAR, then the lower tau. Returns (tau, accuracy, far).
    """
    d = np.asarray(distances, np.float64)
    same = np.asarray(same, bool)
    if d.shape != same.shape or d.ndim != 1 or len(d) == 0:
        raise ValueError("distances and same must be equal-length non-empty vectors")
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    order = np.argsort(d, kind="stable")
    d, s = d[order], same[order]
    last = np.r_[d[1:] != d[:-1], True]  # last position of each distinct value
    tp = np.cumsum(s)[last]
    fp = np.cumsum(~s)[last]
    taus = np.r_[-np.inf, d[last]]
    tp, fp = np.r_[0, tp], np.r_[0, fp]
    accuracy = (tp + (n_neg - fp)) / len(d)
    far = fp / n_neg if n_neg else np.zeros_like(accuracy)
    ok = far <= max_far + 1e-12
    # lexicographic: max accuracy, then min FAR, then min tau (taus ascend, so the first index)
    key = np.where(ok, accuracy, -np.inf)
    best = np.flatnonzero(key == key.max())
    best = best[far[best] == far[best].min()][0]
    return float(taus[best]), float(accuracy[best]), float(far[best])
