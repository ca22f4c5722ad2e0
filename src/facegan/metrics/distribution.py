"""Distances between the distribution of generated meshes S and of reference meshes R.

All mesh metrics use the exact mean vertex distance d (mm) and exact nearest neighbours
(:mod:`facegan.metrics.distances`); meshes in correspondence need no Chamfer or EMD matching.
Following Achlioptas et al. (2018) and Yang et al. (PointFlow, 2019):

- **MMD**, minimum matching distance (fidelity, mm, lower is better): the mean over reference
  meshes of the distance to the nearest sample, ``(1/|R|) sum_{r in R} min_{s in S} d(r, s)``
  (Achlioptas' "MMD-CD" with d in place of the Chamfer distance; not a kernel MMD).
- **COV**, coverage (in [0, 1], higher is better): the fraction of reference meshes that are the
  nearest reference mesh of at least one sample.
- **1-NNA**, 1-nearest-neighbour accuracy (in [0, 1]; 0.5 is ideal): leave-one-out 1-NN
  classification of S u R labelled by origin, ``[#{s: N(s) in S} + #{r: N(r) in R}] / (|S|+|R|)``
  with N(x) the nearest mesh of S u R other than x. Near 1: the sets are separable; near 0.5:
  indistinguishable; below 0.5: the samples copy reference meshes (each sample's nearest neighbour
  is a reference mesh). Ties go to the lower index in the order [S; R].

**KID** (Binkowski et al. 2018) compares feature vectors (e.g. the embedding networks'): the
unbiased estimator of the squared MMD with the polynomial kernel k(x, y) = (x.y / d + 1)^3,
averaged over random subsets (the stylegan2-ada / clean-fid estimator).
"""

from __future__ import annotations

import numpy as np

from facegan.metrics import register
from facegan.metrics.distances import NearestMeshIndex, as_meshes

__all__ = [
    "minimum_matching_distance",
    "coverage",
    "one_nearest_neighbor_accuracy",
    "distribution_metrics",
    "kernel_inception_distance",
]


@register("mmd")
def minimum_matching_distance(samples, reference) -> dict:
    """MMD (mm): mean over reference meshes (m, V, 3) of the distance to the nearest sample (n, V, 3).

    Returns mmd (mm) and per_reference (m,) distances.
    """
    found = NearestMeshIndex(samples).query(reference)
    return {"mmd": float(found.distance.mean()), "per_reference": found.distance}


@register("coverage")
def coverage(samples, reference) -> dict:
    """COV in [0, 1]: fraction of reference meshes (m, V, 3) that are some sample's nearest reference mesh.

    Returns coverage and matched (m,) bool.
    """
    found = NearestMeshIndex(reference).query(samples)
    matched = np.zeros(len(as_meshes(reference)), bool)
    matched[found.index[found.index >= 0]] = True
    return {"coverage": float(matched.mean()), "matched": matched}


@register("1-nna")
def one_nearest_neighbor_accuracy(samples, reference) -> dict:
    """1-NNA in [0, 1] of samples (n, V, 3) against reference (m, V, 3); 0.5 is ideal.

    Returns accuracy, accuracy_samples (fraction of samples whose nearest neighbour is a sample)
    and accuracy_reference (likewise for reference meshes).
    """
    samples, reference = as_meshes(samples), as_meshes(reference)
    n, m = len(samples), len(reference)
    if n < 2 or m < 2:
        raise ValueError("1-NNA needs at least two meshes in each set")
    union = np.concatenate([samples, reference])
    found = NearestMeshIndex(union).query(union, exclude=np.arange(n + m))
    from_samples = found.index < n
    correct_s = from_samples[:n]
    correct_r = ~from_samples[n:]
    return {
        "accuracy": float((correct_s.sum() + correct_r.sum()) / (n + m)),
        "accuracy_samples": float(correct_s.mean()),
        "accuracy_reference": float(correct_r.mean()),
    }


@register("distribution")
def distribution_metrics(samples, reference) -> dict:
    """MMD (mm), COV and 1-NNA of samples (n, V, 3) against reference (m, V, 3) in one call."""
    return {
        "mmd": minimum_matching_distance(samples, reference)["mmd"],
        "coverage": coverage(samples, reference)["coverage"],
        "1-nna": one_nearest_neighbor_accuracy(samples, reference)["accuracy"],
    }


@register("kid")
def kernel_inception_distance(
    features_a, features_b, num_subsets: int = 100, max_subset_size: int = 1000, rng=None
) -> dict:
    """KID between feature sets (n, d) and (m, d): unbiased polynomial-kernel MMD^2, subset-averaged.

    Each subset draws min(n, m, max_subset_size) rows of each set without replacement. Returns
    kid (mean over subsets) and kid_std. Identical distributions give ~0 (it can be slightly negative).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) and (m, d), got {a.shape} and {b.shape}")
    d = a.shape[1]
    size = min(len(a), len(b), max_subset_size)
    if size < 2:
        raise ValueError("KID needs at least two feature vectors in each set")
    values = np.empty(num_subsets)
    for t in range(num_subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        values[t] = within - 2 * kxy.mean()
    return {"kid": float(values.mean()), "kid_std": float(values.std())}
