"""Specificity (Sec. 5.3 of the paper, after Davies et al.): are random samples faces of the training set's kind?

For each of n samples, the minimum mean vertex distance to every training mesh; the metric is the
mean of the n minima (mm, lower is better; the paper uses n = 1000). The minimum is exact (the
bound-pruned search of :mod:`facegan.metrics.distances`), not an approximate nearest neighbour.

A model can also score well by *copying* training meshes. ``memorization_threshold`` (mm) reports
the fraction of samples whose nearest training mesh is closer than it: choose it near the
encode/decode round-trip error of real meshes (a generated mesh that close to a training mesh is
indistinguishable from a reproduction of it).
"""

from __future__ import annotations

import numpy as np

from facegan.metrics import register
from facegan.metrics.distances import NearestMeshIndex, as_meshes

__all__ = ["specificity"]


@register("specificity")
def specificity(
    samples,
    train,
    chunk: int = 1024,
    memorization_threshold: float | None = None,
    index: NearestMeshIndex | None = None,
    progress: bool = False,
) -> dict:
    """Specificity of generated ``samples`` (n, V, 3) against ``train`` (M, V, 3), float32 mm.

    chunk: samples per search batch (memory ~ chunk x M x 4 bytes);
    memorization_threshold: mm, optional (see the module doc);
    index: a prebuilt :class:`NearestMeshIndex` of ``train`` to reuse across calls.
    Returns mean and std (mm) of the per-sample minima, per_sample_min (n,) float64 mm,
    nearest_index (n,) int64 into ``train``, exact_pairs (distances computed), and with a
    threshold ``memorized_fraction`` in [0, 1].
    """
    samples = as_meshes(samples)
    if len(samples) == 0:
        raise ValueError("specificity needs at least one sample")
    index = index or NearestMeshIndex(train, progress=progress)
    found = index.query(samples, block=chunk)
    out = {
        "mean": float(found.distance.mean()),
        "std": float(found.distance.std()),
        "per_sample_min": found.distance,
        "nearest_index": found.index,
        "exact_pairs": found.exact_pairs,
    }
    if memorization_threshold is not None:
        out["memorization_threshold"] = float(memorization_threshold)
        out["memorized_fraction"] = float(np.mean(found.distance < memorization_threshold))
    return out
