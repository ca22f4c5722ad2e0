"""Differential operators on the template mesh (libigl does the geometry)."""

from __future__ import annotations

import igl
import numpy as np
import scipy.sparse as sp


def cotangent_laplacian(vertices: np.ndarray, triangles: np.ndarray) -> sp.csr_matrix:
    """Cotangent Laplacian C (V, V), not mass-normalized: (C x)_i = sum_j w_ij (x_j - x_i).

    w_ij = (cot a_ij + cot b_ij) / 2, so C is symmetric, negative semi-definite, with rows
    summing to zero. Being unnormalized, its weights are dimensionless: a Laplacian penalty
    ``alpha * |C x|^2`` compares to squared distances without a mesh-size factor.
    vertices: (V, 3) float; triangles: (F, 3) int.
    """
    C = igl.cotmatrix(np.asarray(vertices, dtype=np.float64), np.asarray(triangles, dtype=np.int64))
    return sp.csr_matrix(C)


def triangle_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Areas (F,) of triangles (F, 3) on vertices (V, 3)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def uv_signed_areas(uv: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Signed areas (F,) of triangles in the UV plane; positive = counter-clockwise."""
    a, b, c = (uv[triangles[:, k]] for k in range(3))
    e1, e2 = b - a, c - a
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
