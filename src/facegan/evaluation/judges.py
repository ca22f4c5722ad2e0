"""The judges of the decoupling metric: per-dataset identity and expression embedding networks.

The paper's decoupling protocol (Sec. 5.3 and the supplementary "Decoupling Evaluation") needs,
for each factor, a network that maps a mesh to a 128-d embedding and a threshold tau: two meshes
share the factor when their embeddings are at most tau apart. :func:`dataset_judges` makes both
for a dataset, the paper's way:

- each network (:mod:`facegan.metrics.embedding`, ResNet-18 on the orthographic normal image,
  batch-hard triplet loss) trains on the *train* split's meshes that carry the factor's label;
- tau maximises accuracy with FAR <= ``max_far`` on ``n_pairs`` balanced validation pairs from
  the *test* split (``make_validation_pairs(test labels, n_pairs, rng=seed)``), as the paper
  does. data/ict-small's test split has 4 identities (175 meshes) and 55 expression-labeled
  meshes in 7 classes: enough for positive and negative pairs of both factors (the paper's own
  test split is 9 identities), so no training identity is held out. A split without the pairs
  it needs is refused with a :class:`FaceganError`.

Training length is a number of optimizer steps (PK batches) per network, not epochs: the
expression labels are sparse (ict-small: 164 labeled training meshes against 2,742 with an
identity), so equal epochs would give the expression net 17 times fewer updates.

Cache (``cache_dir``)::

    judges.json              profile, seed, dataset fingerprint, the render framing ("view"),
                             and per finished factor: tau, accuracy, far, epochs, counts, seconds
    identity.safetensors     embedding checkpoints (facegan.metrics.embedding.save_embedding),
    expression.safetensors   written after every epoch: an interrupted call resumes training

``judges.json`` is written first, with the framing fixed once from the training meshes, so both
nets and every resumed run render alike. A cache made for other data (mesh count, labels, split
or a sample of the geometry differ), another profile or another seed is refused, not retrained:
the networks cost minutes to hours, and judges silently replaced under a report would make its
numbers incomparable. Use another ``cache_dir`` or delete the old one.

Choosing the "small" profile (data/ict-small, 2,917 meshes; one torch thread on a machine
running a GAN training in the background)::

    python benchmarks/bench_judges.py --data data/ict-small --threads 1

MEASUREMENTS
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facegan.data.dataset import RegisteredDataset
from facegan.errors import FaceganError, lookup
from facegan.fileio import read_json, write_json
from facegan.metrics.decoupling import calibrate_threshold
from facegan.metrics.embedding import EmbeddingConfig, MeshEmbedder, fixed_view, load_embedding, pk_batches, train_embedding

__all__ = ["JudgeProfile", "JUDGE_PROFILES", "FactorJudge", "dataset_judges", "dataset_fingerprint", "distinct_rows"]

FACTORS = ("identity", "expression")
CACHE_VERSION = 1


@dataclass(frozen=True)
class JudgeProfile:
    """How to train and calibrate the judges.

    width/size: ResNet-18 channel scale and input image size (paper: 1 and 224); steps: optimizer
    steps (PK batches of classes_per_batch x per_class meshes) per network, rounded up to whole
    epochs; n_pairs: validation pairs (half positive); max_far: the false acceptance rate bound.
    """

    name: str
    width: float
    size: int
    steps: int
    n_pairs: int = 2000
    max_far: float = 0.10
    classes_per_batch: int = 8
    per_class: int = 4


JUDGE_PROFILES: dict[str, JudgeProfile] = {
    # CPU: see the measurements above.
    "small": JudgeProfile("small", width=0.25, size=64, steps=2000),
    # The paper's network and input; the step count is ours (the paper does not give one):
    # 20 epochs of the identity net on a 30,000-mesh dataset. For a GPU.
    "paper": JudgeProfile("paper", width=1.0, size=224, steps=20000),
}


@dataclass
class FactorJudge:
    """One factor's judge: meshes share the factor when their embeddings are at most tau apart.

    embedder: meshes (B, V, 3) mm -> (B, d) unit embeddings; tau, accuracy, far: the threshold and
    its validation accuracy and false acceptance rate (test-split pairs).
    """

    factor: str
    embedder: MeshEmbedder
    tau: float
    accuracy: float
    far: float

    def same(self, a, b) -> np.ndarray:
        """(K,) bool: whether each pair of meshes a[k], b[k] (K, V, 3) is judged to share the factor."""
        return np.linalg.norm(self.embedder(a) - self.embedder(b), axis=1) <= self.tau


def get_judge_profile(profile: str | JudgeProfile) -> JudgeProfile:
    if isinstance(profile, JudgeProfile):
        return profile
    return lookup(JUDGE_PROFILES, profile, "judge profile")


def dataset_fingerprint(dataset: RegisteredDataset, n_sample: int = 16) -> dict:
    """What the judges depend on: mesh count and size, the labels and split, a sample of the geometry.

    The geometry hash covers ``n_sample`` evenly spaced meshes (hashing 30,000 meshes would cost
    more than it protects against).
    """
    labels = hashlib.sha256()
    for column in ("identity", "expression", "split"):
        labels.update("\n".join(dataset.labels[column]).encode() + b"\0")
    meshes = dataset.meshes
    pick = np.linspace(0, len(meshes) - 1, min(n_sample, len(meshes))).astype(np.int64)
    return {
        "n_meshes": int(len(meshes)),
        "n_vertices": int(meshes.shape[1]),
        "labels_sha256": labels.hexdigest(),
        "meshes_sha256": hashlib.sha256(np.ascontiguousarray(meshes[pick]).tobytes()).hexdigest(),
    }


def distinct_rows(meshes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows (K,) of ``rows`` whose mesh (V, 3) is not an exact copy of an earlier one."""
    flat = np.asarray(meshes[rows]).reshape(len(rows), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return rows[np.sort(first)]


def dataset_judges(
    dataset: RegisteredDataset,
    cache_dir: str | Path,
    profile: str | JudgeProfile = "small",
    progress: bool = True,
    seed: int = 0,
) -> dict[str, FactorJudge]:
    """The identity and expression judges of ``dataset``: loaded from ``cache_dir``, else trained there.

    Returns {"identity": FactorJudge, "expression": FactorJudge}. Raises :class:`FaceganError` when
    the cache was made for other data, another profile or seed, or when a split lacks the labels
    training (train) or calibration (test) needs.
    """
    profile = get_judge_profile(profile)
    cache = Path(cache_dir)
    manifest_path = cache / "judges.json"
    expected = {"version": CACHE_VERSION, "profile": asdict(profile), "seed": seed, "dataset": dataset_fingerprint(dataset)}
    train = dataset.split("train")
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        _check_manifest(manifest, expected, manifest_path)
    else:
        stray = [f"{f}.safetensors" for f in FACTORS if (cache / f"{f}.safetensors").exists()]
        if stray:  # without a manifest nothing says what these were trained on
            raise FaceganError(f"{cache}: holds {', '.join(stray)} but no judges.json; delete them or use another cache directory")
        manifest = expected | {"view": list(fixed_view(dataset.meshes[train])), "judges": {}}
        write_json(manifest_path, manifest)
    triangles = dataset.template.triangles
    validation = distinct_rows(dataset.meshes, dataset.split("test"))
    judges = {}
    for factor in FACTORS:
        path = cache / f"{factor}.safetensors"
        labels = dataset.labels.class_indices(factor)
        entry = manifest["judges"].get(factor)
        if entry is None:
            start = time.perf_counter()
            net, config, epochs, n_train = _train(factor, dataset, train, labels, profile, tuple(manifest["view"]), path, progress, seed)
            embedder = MeshEmbedder(net, triangles, config)
            try:
                found = calibrate_threshold(embedder, dataset.meshes[validation], labels[validation], profile.n_pairs, profile.max_far, rng=seed)
            except ValueError as exc:
                raise FaceganError(f"{dataset.root}: the test split cannot calibrate the {factor} judge ({exc})") from None
            entry = {
                "tau": found["tau"],
                "accuracy": found["accuracy"],
                "far": found["far"],
                "epochs": epochs,
                "train_meshes": n_train,
                "validation_meshes": int(np.count_nonzero(labels[validation] >= 0)),
                "validation_pairs": len(found["same"]),
                "seconds": round(time.perf_counter() - start, 1),
            }
            manifest["judges"][factor] = entry
            write_json(manifest_path, manifest)
        else:
            net, config, _ = load_embedding(path)
            embedder = MeshEmbedder(net, triangles, config)
        judges[factor] = FactorJudge(factor, embedder, entry["tau"], entry["accuracy"], entry["far"])
    return judges


def _check_manifest(manifest: dict, expected: dict, path: Path) -> None:
    """Refuse a cache whose profile, seed or data differ from this call's, naming what differs."""
    for key in ("version", "profile", "seed", "dataset"):
        if manifest.get(key) == expected[key]:
            continue
        have, want = manifest.get(key), expected[key]
        if isinstance(have, dict) and isinstance(want, dict):
            diff = ", ".join(f"{k} {have.get(k)!r} (now {want.get(k)!r})" for k in want if have.get(k) != want.get(k))
        else:
            diff = f"{have!r} (now {want!r})"
        raise FaceganError(f"{path}: judges made for another {key}: {diff}; use another cache directory or delete this one")


def _train(factor: str, dataset: RegisteredDataset, train: np.ndarray, labels: np.ndarray, profile: JudgeProfile,
           view: tuple[float, float, float, float], path: Path, progress: bool, seed: int):
    """Train (or resume) one factor's net on the labeled training meshes -> (net, config, epochs, n_meshes)."""
    rows = train[labels[train] >= 0]
    config = EmbeddingConfig(width=profile.width, size=profile.size, classes_per_batch=profile.classes_per_batch,
                             per_class=profile.per_class, view=view)
    try:  # count the batches of one epoch the way training draws them
        per_epoch = sum(1 for _ in pk_batches(labels[rows], profile.classes_per_batch, profile.per_class, np.random.default_rng(seed)))
    except ValueError as exc:
        raise FaceganError(f"{dataset.root}: the train split cannot train the {factor} judge ({exc})") from None
    epochs = math.ceil(profile.steps / per_epoch)
    if progress:
        tqdm.write(f"judges: training the {factor} network on {len(rows)} meshes, {epochs} epochs of {per_epoch} batches -> {path}")
    net, info = train_embedding(labels[rows], meshes=dataset.meshes[rows], triangles=dataset.template.triangles,
                                config=config, epochs=epochs, checkpoint=path, seed=seed, progress=progress)
    return net, info["config"], epochs, len(rows)
