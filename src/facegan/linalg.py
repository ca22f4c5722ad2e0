"""Sparse least squares with a system matrix that is factored once and reused for many solves."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla


class FactoredSystem:
    """A sparse square system A x = b, factored once (SuperLU), solved for whole batches.

    A: (n, n) sparse, non-singular (typically the normal matrix of a least-squares problem).
    ``solve(b)`` takes b of shape (n,) or (n, k) and returns x of the same shape, so k meshes
    (or k = 3 N coordinate columns) cost one forward/backward substitution pass each.
    """

    def __init__(self, A: sp.spmatrix):
        self.n = A.shape[0]
        self._lu = spla.splu(sp.csc_matrix(A, dtype=np.float64), permc_spec="MMD_AT_PLUS_A")

    def solve(self, b: np.ndarray) -> np.ndarray:
        return self._lu.solve(np.asarray(b, dtype=np.float64))


def least_squares_normal(blocks: list[tuple[sp.spmatrix, float]]) -> sp.csr_matrix:
    """Normal matrix sum_k w_k A_k^T A_k of a stacked weighted least-squares problem."""
    return sum(w * (A.T @ A) for A, w in blocks).tocsr()
