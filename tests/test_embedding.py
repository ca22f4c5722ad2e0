"""Embedding networks, triplet training, thresholds and the decoupling score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facegan.metrics import compute
from facegan.metrics.decoupling import calibrate_threshold
from facegan.metrics.embedding import (
    EmbeddingConfig,
    EmbeddingNet,
    MeshEmbedder,
    batch_hard_triplet_loss,
    embed_images,
    fixed_view,
    load_embedding,
    make_validation_pairs,
    pk_batches,
    select_threshold,
    train_embedding,
)

from conftest import sphere_cap


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread avoids synchronisation stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resnet18_shape_and_size():
    net = EmbeddingNet(128, width=1.0)
    trunk = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("head"))
    assert trunk == 11_176_512  # torchvision's resnet18 without its classifier
    assert sum(len(stage) for stage in net.stages) == 8  # BasicBlocks [2, 2, 2, 2]
    small = EmbeddingNet(128, width=0.25).eval()
    with torch.no_grad():
        out = small(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 128)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_batch_hard_loss_matches_a_loop():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 5), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4])  # label 3 has no positive
    loss, stats = batch_hard_triplet_loss(emb, labels, margin=0.3)
    terms = []
    for a in range(12):
        pos = [torch.dist(emb[a], emb[p]) for p in range(12) if p != a and labels[p] == labels[a]]
        neg = [torch.dist(emb[a], emb[n]) for n in range(12) if labels[n] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, 0.3 + float(max(pos)) - float(min(neg))))
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
    assert 0 <= stats["active"] <= 1


def test_pk_batches_have_positives():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [-1] * 4 + [3] * 6)
    batches = list(pk_batches(labels, classes_per_batch=2, per_class=3, rng=np.random.default_rng(0)))
    assert batches and all(len(b) == 6 for b in batches)
    for b in batches:
        assert np.all(labels[b] >= 0) and not np.any(labels[b] == 2)  # singletons have no positive
        assert all(np.sum(labels[b] == c) == 3 for c in np.unique(labels[b]))


def test_select_threshold_hand_made():
    # same pairs at 0.1, 0.2, 0.3, 0.6; different pairs at 0.25, 0.5, 0.7, 0.8, 0.9, 1.0
    d = np.array([0.1, 0.2, 0.3, 0.6, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    # tau 0.3: TP 3, FP 1 -> acc 8/10, FAR 1/6 (too high with 10%); tau 0.2: acc 8/10, FAR 0
    tau, acc, far = select_threshold(d, same, max_far=0.10)
    assert (tau, acc, far) == (0.2, 0.8, 0.0)
    # allowing FAR 1/6 still prefers the lower FAR at equal accuracy; at 2/6, tau 0.6 gives 8/10 too
    assert select_threshold(d, same, max_far=0.2) == (0.2, 0.8, 0.0)
    # a set where accepting one false pair pays off: tau 0.65 -> TP 5, FP 1: acc 9/10, FAR 1/5
    d2 = np.array([0.1, 0.2, 0.3, 0.6, 0.65, 0.5, 0.7, 0.8, 0.9, 1.0])
    same2 = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    assert select_threshold(d2, same2, max_far=0.2) == (0.65, 0.9, 0.2)
    assert select_threshold(d2, same2, max_far=0.1) == (0.3, 0.8, 0.0)
    # nothing separable within FAR 0: accept nothing
    tau, acc, far = select_threshold(np.array([0.5, 0.1]), np.array([True, False]), max_far=0.0)
    assert tau == -np.inf and acc == 0.5 and far == 0.0


def test_validation_pairs_are_balanced_and_valid():
    labels = np.array([0, 0, 1, 1, 1, -1, 2, 2])
    first, second, same = make_validation_pairs(labels, 400, rng=0)
    assert len(first) == 400 and same.sum() == 200
    assert np.all(labels[first] >= 0) and np.all(labels[second] >= 0) and np.all(first != second)
    np.testing.assert_array_equal(labels[first] == labels[second], same)


def test_decoupling_score_with_a_known_embedding():
    # embedding = mean x coordinate: a group member is "same" when its mean x is within tau
    anchors = np.zeros((2, 4, 3), np.float32)
    groups = np.zeros((2, 5, 4, 3), np.float32)
    groups[0, :, :, 0] = np.array([0.0, 0.05, 0.2, 0.09, 1.0])[:, None]  # 3 of 5 within 0.1
    groups[1, :, :, 0] = np.array([0.0, 0.0, 0.0, 0.0, 0.5])[:, None]  # 4 of 5
    embed = lambda m: np.asarray(m)[:, :, 0].mean(1, keepdims=True)  # noqa: E731
    result = compute("decoupling", embed_fn=embed, anchors=anchors, groups=groups, tau=0.1)
    assert result["percent"] == pytest.approx(70.0)
    assert result["same"].shape == (2, 5)
    calib = calibrate_threshold(embed, groups.reshape(10, 4, 3), labels=np.repeat([0, 1], 5), n_pairs=200, rng=0)
    assert 0 <= calib["far"] <= 0.10 and calib["accuracy"] >= 0.5


def _toy_images(n_per_class: int = 12, size: int = 32, seed: int = 0):
    """Four classes of images: a bright square in one quadrant, plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(4):
        for _ in range(n_per_class):
            im = rng.integers(0, 60, (size, size, 3))
            r, q = divmod(c, 2)
            im[r * size // 2 : (r + 1) * size // 2, q * size // 2 : (q + 1) * size // 2] += 150
            images.append(im)
            labels.append(c)
    return np.clip(images, 0, 255).astype(np.uint8), np.array(labels)


def test_train_embedding_learns_and_resumes(tmp_path):
    images, labels = _toy_images()
    cfg = lambda: EmbeddingConfig(width=0.125, size=32, classes_per_batch=4, per_class=4, lr=3e-3)  # noqa: E731
    ckpt = tmp_path / "id.safetensors"
    net_a, info = train_embedding(labels, images=images, config=cfg(), epochs=1, checkpoint=ckpt, seed=1, progress=False)
    assert ckpt.exists() and len(info["history"]) == 1
    net_b, info_b = train_embedding(labels, images=images, config=cfg(), epochs=3, checkpoint=ckpt, seed=1, progress=False)
    assert [h["epoch"] for h in info_b["history"]] == [1, 2, 3]
    net_c, info_c = train_embedding(labels, images=images, config=cfg(), epochs=3, seed=1, progress=False)
    for (name, p), q in zip(net_b.state_dict().items(), net_c.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)  # resumed == uninterrupted
    loaded, config, meta = load_embedding(ckpt)
    assert meta["epoch"] == 3 and config.width == 0.125
    emb = embed_images(loaded, images)
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    same = labels[:, None] == labels[None]
    assert d[same].mean() < d[~same].mean()  # learned something about the classes


def test_mesh_embedder_renders_with_a_fixed_view():
    v, f, _ = sphere_cap(rings=4, segments=12)
    meshes = np.stack([v, v * 0.8]).astype(np.float32)
    config = EmbeddingConfig(width=0.125, size=32, view=fixed_view(meshes))
    embedder = MeshEmbedder(EmbeddingNet(128, 0.125), f, config)
    out = embedder(meshes)
    assert out.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    images = embedder.renderer(meshes)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
    covered = (images.float().sum(-1) > 0).sum(dim=(1, 2))
    assert covered[1] < 0.8 * covered[0]  # one framing for both: the smaller face covers fewer pixels
