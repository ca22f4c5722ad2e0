"""Sparse symmetric positive-definite systems factored once and solved for whole batches."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from cholespy import CholeskySolverD, MatrixType


class FactoredSystem:
    """A x = b for a sparse SPD matrix A (n, n), Cholesky-factored once (cholespy/CHOLMOD).

    ``solve(b)`` takes b of shape (n,) or (n, k) and returns x of the same shape: k right-hand
    sides (k meshes, or 3 N coordinate columns) share one factorization and one pass.
    """

    def __init__(self, A: sp.spmatrix):
        A = sp.coo_matrix(A, dtype=np.float64)
        self.n = A.shape[0]
        self._solver = CholeskySolverD(
            self.n, A.row.astype(np.int32), A.col.astype(np.int32), A.data, MatrixType.COO
        )

    def solve(self, b: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(b, dtype=np.float64)
        x = np.empty_like(b)
        self._solver.solve(b, x)
        return x

