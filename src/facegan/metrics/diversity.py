"""Diversity (Sec. 5.3): mean vertex distance between random pairs of meshes (mm, higher = more diverse).

Three variants, as in the paper's Table 1 (10,000 pairs each):

- *global*: pairs drawn among all meshes;
- *identity*: pairs that share an identity (same z_id for a generator, same identity label for data);
- *expression*: pairs that share an expression (code or label).

A generator is best measured with :func:`paired_diversity` on pairs it generates directly (e.g.
G(z_id, z_exp1, n1) and G(z_id, z_exp2, n2) for identity diversity); :func:`diversity` draws the
pairs from a fixed set of meshes, optionally within groups (group ids = the shared code's index
or the label). Training data: :func:`training_diversity` with its labels, missing labels (-1) skipped.
"""

from __future__ import annotations

import numpy as np

from facegan.metrics import register
from facegan.metrics.distances import as_meshes, paired_mean_vertex_distance

__all__ = ["sample_pairs", "diversity", "paired_diversity", "training_diversity", "dataset_diversity"]


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_pairs(n: int, pairs: int, groups=None, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs (first (p,), second (p,)) of distinct indices into n items.

    Without groups, uniform over ordered pairs i != j. With groups ((n,) int, -1 = no group),
    uniform over pairs within one group: a group is drawn with probability proportional to its
    number of pairs n_g (n_g - 1), then two distinct members. Pairs are drawn with replacement.
    """
    rng = _rng(rng)
    if groups is None:
        if n < 2:
            raise ValueError("diversity needs at least two meshes")
        first = rng.integers(0, n, pairs)
        second = (first + rng.integers(1, n, pairs)) % n  # any other index, uniformly
        return first, second
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    labeled = np.flatnonzero(groups >= 0)
    names, inverse = np.unique(groups[labeled], return_inverse=True)
    members = [labeled[inverse == g] for g in range(len(names))]
    weights = np.array([len(m) * (len(m) - 1) for m in members], np.float64)
    if weights.sum() == 0:
        raise ValueError("no group has two meshes: no pairs to draw")
    chosen = rng.choice(len(members), size=pairs, p=weights / weights.sum())
    first, second = np.empty(pairs, np.int64), np.empty(pairs, np.int64)
    for g in np.unique(chosen):
        at = np.flatnonzero(chosen == g)
        m = members[g]
        i = rng.integers(0, len(m), len(at))
        j = (i + rng.integers(1, len(m), len(at))) % len(m)
        first[at], second[at] = m[i], m[j]
    return first, second


def _summary(d: np.ndarray) -> dict:
    return {"mean": float(d.mean()), "std": float(d.std()), "pairs": int(len(d))}


@register("diversity")
def diversity(meshes, pairs: int = 10000, groups=None, rng=None) -> dict:
    """Mean vertex distance (mm) over ``pairs`` random pairs of ``meshes`` (N, V, 3).

    groups: optional (N,) ids; pairs are then drawn within a group (see :func:`sample_pairs`).
    Returns mean, std (mm) and pairs.
    """
    meshes = as_meshes(meshes)
    first, second = sample_pairs(len(meshes), pairs, groups, rng)
    order = np.argsort(second)  # sequential reads when meshes is a memory map
    return _summary(paired_mean_vertex_distance(meshes, meshes, first[order], second[order]))


@register("paired_diversity")
def paired_diversity(first, second) -> dict:
    """Mean vertex distance (mm) between aligned pairs first[k], second[k], each (p, V, 3)."""
    return _summary(paired_mean_vertex_distance(first, second))


@register("training_diversity")
def training_diversity(meshes, identity=None, expression=None, pairs: int = 10000, rng=None) -> dict:
    """The paper's three diversities of a labeled set: {"global", "identity", "expression"} -> dict.

    meshes: (N, V, 3); identity, expression: (N,) int class indices, -1 = missing (skipped).
    Each entry is the :func:`diversity` result; a factor without labels is left out.
    """
    rng = _rng(rng)
    out = {"global": diversity(meshes, pairs, rng=rng)}
    for name, labels in (("identity", identity), ("expression", expression)):
        if labels is not None and np.any(np.asarray(labels) >= 0):
            out[name] = diversity(meshes, pairs, groups=labels, rng=rng)
    return out


def dataset_diversity(dataset, split: str = "train", pairs: int = 10000, rng=None) -> dict:
    """:func:`training_diversity` of a :class:`~facegan.data.dataset.RegisteredDataset` split,
    with its identity and expression labels."""
    rows = dataset.split(split)
    meshes = dataset.meshes[rows] if len(rows) < len(dataset) else dataset.meshes
    labels = {f: dataset.labels.class_indices(f)[rows] for f in ("identity", "expression")}
    return training_diversity(meshes, labels["identity"], labels["expression"], pairs, rng)
