"""How far new faces lie from the span of the training faces: what the training set lets a model reach.

Generalization (Sec. 5.3) fits a model to held-out people. The encode/decode round trip bounds it from
below for the representation; the training set bounds it too, and two references measure how:

- **The training people's span.** A model whose faces are blends of its I training people spans at most
  their affine hull (I - 1 dimensions), so a new person's neutral face comes back at best to its distance
  from the hull of the training people's neutral faces. A model can go below it only by spending other
  directions (an expression code) on the identity.
- **Principal components** (the classic generalization-vs-components curve of statistical shape models,
  Styner et al. 2003): the test faces projected on the first k principal directions of the training
  faces, the best k-dimensional linear model of them; at k = a model's code size it says what a linear
  model of the same size, built from the same faces, reaches.

A nonlinear model can leave both, but only by extrapolating from its training data. Measured on
``data/ict-small`` in docs/evaluation.md, "What the training set allows".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from facegan.metrics import register
from facegan.metrics.distances import as_meshes

__all__ = ["affine_span_residual"]


@register("affine_span_residual")
def affine_span_residual(faces, basis_faces, components: Sequence[int] = (), rtol: float = 1e-6) -> dict:
    """Each face's mean vertex distance (mm) to its least-squares projection on the affine hull of ``basis_faces``.

    faces: (T, V, 3) float mm, the faces to reproduce; basis_faces: (N, V, 3) float mm, N >= 1, spanning the
    hull {mean + sum_k c_k (b_k - mean)}; components: also project on the hull's first k principal directions
    only, for each k; rtol: singular values below rtol x the largest count as zero (repeated or dependent
    basis faces add no direction; the Gram matrix squares them, so rtol cannot go far below 1e-7).
    Returns per_face (T,) float64 mm, mean (mm), rank (the hull's dimension) and, with ``components``,
    by_components {k: mean (mm)} (k above the rank is the whole hull).
    """
    faces, basis_faces = as_meshes(faces).astype(np.float64), as_meshes(basis_faces).astype(np.float64)
    if len(basis_faces) == 0:
        raise ValueError("affine_span_residual needs at least one basis face")
    if faces.shape[1:] != basis_faces.shape[1:]:
        raise ValueError(f"faces {faces.shape[1:]} and basis faces {basis_faces.shape[1:]} differ in vertices")
    mean = basis_faces.mean(axis=0).reshape(-1)
    directions = basis_faces.reshape(len(basis_faces), -1) - mean  # (N, 3V)
    # the principal axes from the N x N Gram matrix: N << 3V, so far cheaper than an SVD of the directions
    eigenvalues, vectors = np.linalg.eigh(directions @ directions.T)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]  # largest first
    singular = np.sqrt(np.clip(eigenvalues, 0.0, None))
    keep = singular > rtol * singular[0]
    axes = (vectors[:, keep].T @ directions) / singular[keep, None]  # (r, 3V), orthonormal rows
    offsets = faces.reshape(len(faces), -1) - mean  # (T, 3V)
    coefficients = offsets @ axes.T  # (T, r)

    def residual(k: int) -> np.ndarray:  # (T,) mm on the first k directions
        rest = offsets - coefficients[:, :k] @ axes[:k]
        return np.linalg.norm(rest.reshape(faces.shape), axis=-1).mean(axis=1)

    per_face = residual(len(axes))
    out = {"per_face": per_face, "mean": float(per_face.mean()) if len(per_face) else float("nan"), "rank": len(axes)}
    if components:
        out["by_components"] = {int(k): float(residual(k).mean()) for k in components}
    return out
