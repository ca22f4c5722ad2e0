"""Oracle decoupling (beyond the paper, synthesized data only): read identity and expression off
the ICT model that made the data, instead of off learned embedding networks.

A mesh x (V, 3) is projected onto the ICT bases by least squares (jointly, one solve):

    min_{a, b} || x - neutral - sum_k a_k I_k - sum_l b_l E_l ||^2

a (100,) identity coefficients (~N(0, 1) in the model), b (53,) expression blend weights (in
[0, 1] in the model). ``bounded=False`` (default) solves it unconstrained with a precomputed
pseudo-inverse (one matrix product per batch); ``bounded=True`` constrains b to [0, 1] (a
box-constrained least squares per mesh on the 153 x 153 reduced system: slower, and closer to how
the data was made). The synthesized expressions use deformation transfer, not the linear blend,
so even real data does not project exactly: ``residual`` (mean vertex distance of the fit, mm)
tells how much geometry the oracle cannot explain - measure it on the real data and report it.

Decoupling: for groups of generated meshes that share a fixed code (e.g. the same z_id), the
within-group variance of the projected identity geometry, relative to the total identity variance
of the training distribution, is 0 when the identity is perfectly fixed. Variances are measured
in geometry (mm^2 per vertex: Var(a . I) = trace(G_I Cov(a)) / V with G_I the modes' Gram
matrix), so modes count by how much they move the surface, not by their index. The same ratio
for expression tells whether expressions still vary within the group (near 1: as much as in the
data; 0: collapsed).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from facegan.metrics import register
from facegan.metrics.distances import as_meshes

__all__ = ["OracleProjector", "oracle_decoupling", "coefficient_variance_mm2"]


class OracleProjector:
    """Least-squares projection of meshes onto the narrow ICT identity and expression bases.

    narrow: a :class:`~facegan.data.ict.NarrowICT` (neutral (V, 3), identity_modes (100, V, 3),
    expression_modes (53, V, 3), mm) or anything with those attributes.
    """

    def __init__(self, narrow, bounded: bool = False):
        self.neutral = np.asarray(narrow.neutral, np.float64).reshape(-1)  # (3V,)
        self.identity_modes = np.asarray(narrow.identity_modes, np.float64).reshape(len(narrow.identity_modes), -1)
        self.expression_modes = np.asarray(narrow.expression_modes, np.float64).reshape(len(narrow.expression_modes), -1)
        self.n_identity, self.n_expression = len(self.identity_modes), len(self.expression_modes)
        self.n_vertices = len(self.neutral) // 3
        self.bounded = bounded
        basis = np.concatenate([self.identity_modes, self.expression_modes])  # (K, 3V)
        # Thin QR of the basis columns: pinv = R^-1 Q^T, and the reduced system for the bounded solve.
        self._q, self._r = np.linalg.qr(basis.T)  # (3V, K), (K, K)
        self._pinv = np.linalg.solve(self._r, self._q.T)  # (K, 3V)
        self.identity_gram = self.identity_modes @ self.identity_modes.T  # (100, 100) mm^2
        self.expression_gram = self.expression_modes @ self.expression_modes.T  # (53, 53) mm^2

    def project(self, meshes, batch: int = 512) -> dict:
        """Coefficients of meshes (N, V, 3) mm.

        Returns identity (N, 100), expression (N, 53) float64, residual (N,) mm (mean vertex
        distance between each mesh and its fit) and residual_rms (N,) mm.
        """
        meshes = as_meshes(meshes)
        n = len(meshes)
        coeffs = np.empty((n, self.n_identity + self.n_expression))
        residual, rms = np.empty(n), np.empty(n)
        for s in range(0, n, batch):
            y = np.asarray(meshes[s : s + batch], np.float64).reshape(-1, 3 * self.n_vertices) - self.neutral
            c = y @ self._pinv.T
            if self.bounded:
                c = self._bounded(y, c)
            fit = c[:, : self.n_identity] @ self.identity_modes + c[:, self.n_identity :] @ self.expression_modes
            err = (y - fit).reshape(len(y), self.n_vertices, 3)
            per_vertex = np.linalg.norm(err, axis=-1)
            coeffs[s : s + len(y)] = c
            residual[s : s + len(y)] = per_vertex.mean(axis=1)
            rms[s : s + len(y)] = np.sqrt((per_vertex**2).mean(axis=1))
        return {
            "identity": coeffs[:, : self.n_identity],
            "expression": coeffs[:, self.n_identity :],
            "residual": residual,
            "residual_rms": rms,
        }

    def _bounded(self, y: np.ndarray, unconstrained: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Re-solve with expression weights b in [0, 1] where the unconstrained b leaves the box.

        With basis^T = Q R, R = [[R11, R12], [0, R22]] (identity columns first), the problem is
        min ||R c - Q^T y||: the identity coefficients a = R11^-1 (t1 - R12 b) zero the first block,
        leaving the 53-variable box-constrained least squares min ||R22 b - t2||.
        """
        from scipy.linalg import solve_triangular
        from scipy.optimize import lsq_linear

        k = self.n_identity
        r11, r12, r22 = self._r[:k, :k], self._r[:k, k:], self._r[k:, k:]
        target = y @ self._q  # (b, K)
        out = unconstrained.copy()
        weights = unconstrained[:, k:]
        outside = np.flatnonzero(np.any((weights < -tol) | (weights > 1 + tol), axis=1))
        for i in outside:
            b = lsq_linear(r22, target[i, k:], bounds=(0.0, 1.0), method="bvls").x
            out[i, k:] = b
            out[i, :k] = solve_triangular(r11, target[i, :k] - r12 @ b)
        out[:, k:] = np.clip(out[:, k:], 0.0, 1.0)  # within tol of the box: snap onto it
        return out


def coefficient_variance_mm2(coeffs: np.ndarray, gram: np.ndarray, n_vertices: int) -> float:
    """Geometric variance (mm^2 per vertex) of coefficient vectors (n, k) with modes' Gram (k, k):
    trace(G Cov) / V, the mean squared distance of the displacement sum_k c_k mode_k from its mean."""
    c = np.asarray(coeffs, np.float64)
    if len(c) < 2:
        return 0.0
    cov = np.cov(c, rowvar=False, ddof=1).reshape(c.shape[1], c.shape[1])
    return float(np.trace(gram @ cov) / n_vertices)


@register("oracle_decoupling")
def oracle_decoupling(
    projector: OracleProjector,
    groups: Iterable,
    reference: dict,
    fixed: str = "identity",
) -> dict:
    """Within-group variance of identity and expression, relative to the reference distribution.

    groups: (G, m, V, 3) or an iterable of (m, V, 3) mesh groups sharing one fixed code;
    reference: coefficients of the training distribution, {"identity": (K, 100), "expression":
    (K, 53)} (e.g. ``projector.project(train_meshes)`` or the ground-truth factors);
    fixed: which factor the groups share ("identity" or "expression"), for the summary keys.
    Returns identity_ratio and expression_ratio (within-group variance / reference variance, in
    geometry), identity_within_rms_mm and expression_within_rms_mm (sqrt of the within-group
    variance), fixed_ratio (0 = perfectly fixed) and free_ratio (near 1 = the other factor varies
    as in the data), and residual_mm (mean projection residual of the groups).
    """
    if fixed not in ("identity", "expression"):
        raise ValueError(f"fixed must be 'identity' or 'expression', got {fixed!r}")
    grams = {"identity": projector.identity_gram, "expression": projector.expression_gram}
    within = {"identity": [], "expression": []}
    residuals = []
    for group in groups:
        coeffs = projector.project(group)
        residuals.append(coeffs["residual"])
        for factor in within:
            within[factor].append(coefficient_variance_mm2(coeffs[factor], grams[factor], projector.n_vertices))
    if not residuals:
        raise ValueError("no groups given")
    out = {}
    for factor in within:
        total = coefficient_variance_mm2(reference[factor], grams[factor], projector.n_vertices)
        mean_within = float(np.mean(within[factor]))
        out[f"{factor}_ratio"] = mean_within / total if total > 0 else float("nan")
        out[f"{factor}_within_rms_mm"] = float(np.sqrt(mean_within))
        out[f"{factor}_reference_rms_mm"] = float(np.sqrt(total))
    free = "expression" if fixed == "identity" else "identity"
    out["fixed"] = fixed
    out["fixed_ratio"] = out[f"{fixed}_ratio"]
    out["free_ratio"] = out[f"{free}_ratio"]
    out["residual_mm"] = float(np.concatenate(residuals).mean())
    return out
