"""Deformation transfer (Sumner & Popovic 2004) between meshes of one topology.

A source expression is described per triangle by its deformation gradient Q_t (3x3) relative to
the source neutral, computed from the triangle's two edges and a fourth "normal" vertex
(v4 = v1 + n / sqrt(|n|)). The target identity's expression is the mesh x whose per-triangle
gradients, measured on the target neutral, best match Q_t in the area-weighted least-squares
sense (the Poisson form of Botsch et al. 2006):

    min_x  sum_t A_t || G_t x - Q_t^T ||_F^2  +  eps || x - x_add ||^2

G (3F x V) is the target neutral's gradient operator, A_t its triangle areas, and the tiny eps
term only fixes the free translation (it puts the result's centroid on the additive result
x_add = target neutral + source displacement). The normal matrix G^T A G + eps I depends only on
the target neutral: it is factored once, and all of that identity's frames are solved as one batch
of right-hand sides.

Same-topology additive transfer (``method="additive"``: target neutral + source displacement) is
provided for comparison; it ignores that the target's local frames differ from the source's.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from facegan.data.ict import NarrowICT
from facegan.linalg import FactoredSystem

METHODS = ("transfer", "additive")
# eps relative to the mean diagonal of G^T A G: far below its smallest non-zero eigenvalue
# (~4e-4 relative on the ICT face), so it fixes translation without biasing the shape
# (~1e-5 relative), yet keeps the matrix well enough conditioned for Cholesky.
_DEFAULT_REGULARIZATION = 1e-8
_CHUNK = 64  # frames per batch: bounds the (F, 3, chunk) float64 temporaries to ~20 MB each


def gradient_operator(vertices: np.ndarray, triangles: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Per-triangle gradient of piecewise-linear functions: (G (3F, V) csr, areas (F,)).

    Row 3t + c of ``G @ f`` is component c (x, y, z) of the gradient of f (V,) on triangle t, a
    vector in the triangle's plane. ``G.T @ diag(repeat(areas, 3)) @ G`` equals minus libigl's
    cotangent Laplacian. vertices: (V, 3); triangles: (F, 3) int.
    """
    v = np.asarray(vertices, np.float64)
    p0, p1, p2 = (v[triangles[:, k]] for k in range(3))
    normal = np.cross(p1 - p0, p2 - p0)
    double_area = np.linalg.norm(normal, axis=1)
    unit = normal / double_area[:, None]
    # grad phi_i = n x (edge opposite i, counter-clockwise) / (2A)
    grads = np.stack([np.cross(unit, p2 - p1), np.cross(unit, p0 - p2), np.cross(unit, p1 - p0)], axis=1)
    grads /= double_area[:, None, None]  # (F, 3 corners, 3 components)
    n_tri = len(triangles)
    rows = (3 * np.arange(n_tri)[:, None, None] + np.arange(3)[None, None, :]).repeat(3, axis=1)
    cols = np.broadcast_to(triangles[:, :, None], (n_tri, 3, 3))
    G = sp.csr_matrix((grads.ravel(), (rows.ravel(), cols.ravel())), shape=(3 * n_tri, len(v)))
    return G, 0.5 * double_area


def triangle_frames(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Frames (..., F, 3, 3) float64 with columns [v2 - v1, v3 - v1, n / sqrt(|n|)] (Sumner &
    Popovic's fourth vertex, scaled so the frame deforms like a length). vertices: (..., V, 3)."""
    v = np.asarray(vertices, np.float64)
    p0, p1, p2 = (v[..., triangles[:, k], :] for k in range(3))
    e1, e2 = p1 - p0, p2 - p0
    n = np.cross(e1, e2)
    n /= np.sqrt(np.linalg.norm(n, axis=-1, keepdims=True))
    return np.stack([e1, e2, n], axis=-1)


class DeformationTransfer:
    """Transfers deformations of a fixed source neutral (V, 3) onto target neutrals.

    source_neutral: (V, 3) (any unit; results come back in the same unit); triangles: (F, 3).
    """

    def __init__(
        self, source_neutral: np.ndarray, triangles: np.ndarray, regularization: float = _DEFAULT_REGULARIZATION
    ):
        self.source_neutral = np.asarray(source_neutral, np.float64)
        self.triangles = np.asarray(triangles, np.int64)
        self.regularization = regularization
        self._inv_frames = np.linalg.inv(triangle_frames(self.source_neutral, self.triangles))

    def gradients(self, source_deformed: np.ndarray) -> np.ndarray:
        """Deformation gradients Q (n, F, 3, 3) of deformed sources (n, V, 3) w.r.t. the neutral."""
        return triangle_frames(source_deformed, self.triangles) @ self._inv_frames

    def to(self, target_neutral: np.ndarray) -> "TargetTransfer":
        """Factor the least-squares system of one target neutral (V, 3), for many transfers."""
        return TargetTransfer(self, target_neutral)

    def transfer(self, source_deformed: np.ndarray, target_neutral: np.ndarray) -> np.ndarray:
        """One-shot: deformed sources (n, V, 3) -> deformed targets (n, V, 3) float64."""
        return self.to(target_neutral).apply(source_deformed)


class TargetTransfer:
    """The factored system of one target neutral; :meth:`apply` solves batches of frames.

    The right-hand side sum_t A_t G_t^T Q_t^T is assembled without forming Q: with
    Q_t = [e1~ e2~ n4~] V_t^-1, it is K @ [e1~ e2~ n4~] for the sparse K = G^T A blockdiag(V_t^-T)
    (V x 3F), whose edge columns act linearly on the vertices (M = K E, V x V) and whose normal
    columns K_n (V x F) multiply the deformed fourth vertices, the only non-linear part.
    """

    def __init__(self, dt: DeformationTransfer, target_neutral: np.ndarray):
        self.dt = dt
        self.target_neutral = np.asarray(target_neutral, np.float64)
        tri, n_tri = dt.triangles, len(dt.triangles)
        G, areas = gradient_operator(self.target_neutral, tri)
        gt_w = (G.T @ sp.diags(np.repeat(areas, 3))).tocsr()  # (V, 3F)
        normal = gt_w @ G
        self.eps = dt.regularization * float(normal.diagonal().mean())
        self._system = FactoredSystem(normal + self.eps * sp.identity(normal.shape[0], format="csr"))
        # blockdiag(V_t^-T): entry (3t + c, 3t + c') = inv_frames[t, c', c]
        base = 3 * np.arange(n_tri)[:, None, None]
        rows = np.broadcast_to(base + np.arange(3)[None, :, None], (n_tri, 3, 3))
        cols = np.broadcast_to(base + np.arange(3)[None, None, :], (n_tri, 3, 3))
        values = dt._inv_frames.transpose(0, 2, 1)
        block = sp.csr_matrix((values.ravel(), (rows.ravel(), cols.ravel())), shape=(3 * n_tri, 3 * n_tri))
        K = (gt_w @ block).tocsc()  # (V, 3F), column 3t + c' pairs with frame column c'
        self._edges_op = (K @ _edge_operator(tri, len(self.target_neutral))).tocsr()  # (V, V)
        self._normals_op = K[:, 2::3].tocsr()  # (V, F)

    def apply(self, source_deformed: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
        """Deformed targets (n, V, 3) float64 for deformed sources (n, V, 3) (or (V, 3) -> (V, 3))."""
        src = np.asarray(source_deformed)
        if src.ndim == 2:
            return self.apply(src[None], chunk)[0]
        out = np.empty(src.shape, np.float64)
        for start in range(0, len(src), chunk):
            out[start : start + chunk] = self._solve(src[start : start + chunk])
        return out

    def _solve(self, src: np.ndarray) -> np.ndarray:
        n, n_v = len(src), len(self.target_neutral)
        # Layout (V, 3, n): column d * n + k of the (V, 3n) view is coordinate d of frame k, so
        # each coordinate of all frames is one contiguous run (fast gathers and cross products).
        src_t = np.ascontiguousarray(np.asarray(src, np.float64).transpose(1, 2, 0))
        normal_cols = _fourth_vertices(src_t, self.dt.triangles).reshape(-1, 3 * n)
        anchor = src_t + (self.target_neutral - self.dt.source_neutral)[:, :, None]  # additive result
        src_cols = src_t.reshape(n_v, 3 * n)
        rhs = self._edges_op @ src_cols + self._normals_op @ normal_cols + self.eps * anchor.reshape(n_v, 3 * n)
        x = self._system.solve(rhs)  # (V, 3n)
        return x.reshape(n_v, 3, n).transpose(2, 0, 1)


def _fourth_vertices(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """n / sqrt(|n|) (F, 3, n) for points (V, 3, n) (n frames); n = (v2 - v1) x (v3 - v1).

    Same as ``triangle_frames(...)[..., 2]`` but in the layout the solver needs.
    """
    p0 = points[triangles[:, 0]]
    e1 = points[triangles[:, 1]] - p0
    e2 = points[triangles[:, 2]] - p0
    n = np.empty_like(e1)
    n[:, 0] = e1[:, 1] * e2[:, 2] - e1[:, 2] * e2[:, 1]
    n[:, 1] = e1[:, 2] * e2[:, 0] - e1[:, 0] * e2[:, 2]
    n[:, 2] = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    n /= np.sqrt(np.sqrt((n * n).sum(axis=1, keepdims=True)))
    return n


def _edge_operator(triangles: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    """E (3F, V): row 3t = v2 - v1, row 3t + 1 = v3 - v1, row 3t + 2 = 0 (frame columns)."""
    n_tri = len(triangles)
    rows = np.repeat(np.stack([3 * np.arange(n_tri), 3 * np.arange(n_tri) + 1], axis=1), 2, axis=1)
    cols = np.stack([triangles[:, 1], triangles[:, 0], triangles[:, 2], triangles[:, 0]], axis=1)
    vals = np.tile([1.0, -1.0, 1.0, -1.0], (n_tri, 1))
    return sp.csr_matrix((vals.ravel(), (rows.ravel(), cols.ravel())), shape=(3 * n_tri, n_vertices))


def expressions_for_identity(
    narrow: NarrowICT,
    identity_coeffs: np.ndarray,
    expression_weights: np.ndarray,
    method: str = "transfer",
    dt: DeformationTransfer | None = None,
) -> np.ndarray:
    """Faces (n, V, 3) float32 mm of one identity (100,) showing n expressions (n, 53).

    ``transfer``: the ICT expression (built on the ICT neutral) is deformation-transferred to the
    identity's neutral; ``additive``: identity neutral + the ICT expression displacement.
    ``dt`` (built from ``narrow.neutral`` and the template triangles) is required for transfer.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}, expected one of {METHODS}")
    target = narrow.identity_neutral(identity_coeffs)
    offsets = narrow.expression_offsets(expression_weights)
    if method == "additive":
        return (target[None] + offsets).astype(np.float32)
    if dt is None:
        raise ValueError("method='transfer' needs a DeformationTransfer built on narrow.neutral")
    return dt.to(target).apply(narrow.neutral[None] + offsets).astype(np.float32)


def transfer_vs_additive(
    narrow: NarrowICT,
    triangles: np.ndarray,
    identity_coeffs: np.ndarray,
    expression_weights: np.ndarray,
) -> dict[str, float]:
    """How much deformation transfer and additive transfer differ, per vertex, in mm.

    identity_coeffs: (k, 100); expression_weights: (m, 53). Every identity gets every expression.
    Returns mean, median, p95 and max Euclidean vertex distance, and the mean displacement of the
    additive expressions themselves (``mean_expression``) for scale.
    """
    dt = DeformationTransfer(narrow.neutral, triangles)
    dists, disp = [], []
    offsets = narrow.expression_offsets(expression_weights)
    for a in np.atleast_2d(identity_coeffs):
        add = expressions_for_identity(narrow, a, expression_weights, "additive")
        tr = expressions_for_identity(narrow, a, expression_weights, "transfer", dt)
        dists.append(np.linalg.norm(tr - add, axis=-1).ravel())
        disp.append(np.linalg.norm(offsets, axis=-1).ravel())
    d = np.concatenate(dists)
    return {
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "p95": float(np.percentile(d, 95)),
        "max": float(d.max()),
        "mean_expression": float(np.concatenate(disp).mean()),
        "n_identities": int(len(np.atleast_2d(identity_coeffs))),
        "n_expressions": int(len(np.atleast_2d(expression_weights))),
    }
