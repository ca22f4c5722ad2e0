"""The template: the one topology and UV chart that every registered face shares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import igl
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import connected_components

from facegan.errors import FaceganError
from facegan.mesh.io import read_obj, triangulate, write_mesh
from facegan.mesh.operators import uv_signed_areas

# Seam vertices must carry identical UVs up to this tolerance to be merged.
_UV_MERGE_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class Template:
    """Registered-face topology.

    vertices: (V, 3) float64, millimetres (the reference shape; datasets store their own mean);
    triangles: (F, 3) int64, counter-clockwise in UV; uv: (V, 2) float64, one chart;
    landmarks: (K,) int64 vertex indices (may be empty).
    """

    vertices: np.ndarray
    triangles: np.ndarray
    uv: np.ndarray
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_vertices(self) -> int:
        return len(self.vertices)

    def validate(self, source: str = "template") -> "Template":
        """Check one connected chart with no flipped UV triangles; returns self."""
        validate_chart(self.uv, self.triangles, len(self.vertices), source)
        if len(self.landmarks) and (self.landmarks.min() < 0 or self.landmarks.max() >= self.n_vertices):
            raise FaceganError(f"{source}: landmark index out of range")
        return self

    def save_obj(self, path: str | os.PathLike) -> None:
        """Write the template as an OBJ with one ``vt`` per vertex."""
        write_mesh(path, self.vertices, self.triangles, uv=self.uv)


def validate_chart(uv: np.ndarray, triangles: np.ndarray, n_vertices: int, source: str) -> None:
    """Raise :class:`FaceganError` unless triangles form one connected chart, consistently oriented in UV."""
    used = np.unique(triangles)
    if len(used) != n_vertices:
        raise FaceganError(f"{source}: {n_vertices - len(used)} vertices belong to no triangle")
    n_comp = _n_components(triangles, n_vertices)
    if n_comp != 1:
        raise FaceganError(f"{source}: the mesh has {n_comp} connected pieces, a template must be one chart")
    if not np.isfinite(uv).all():
        raise FaceganError(f"{source}: UV coordinates contain NaN or infinity")
    areas = uv_signed_areas(uv, triangles)
    flipped = int((areas <= 0).sum())
    if flipped:
        raise FaceganError(f"{source}: {flipped} of {len(areas)} triangles are flipped or degenerate in UV")


def _n_components(triangles: np.ndarray, n_vertices: int) -> int:
    rows = np.concatenate([triangles[:, 0], triangles[:, 1], triangles[:, 2]])
    cols = np.concatenate([triangles[:, 1], triangles[:, 2], triangles[:, 0]])
    adj = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_vertices, n_vertices))
    return connected_components(adj, directed=False)[0]


def load_template(
    path: str | os.PathLike,
    landmarks: np.ndarray | None = None,
    keep_vertices: int | None = None,
) -> Template:
    """Load a template OBJ (quads are split into triangles).

    With ``vt``: seam vertices carrying several ``vt`` with identical coordinates are merged into
    one UV per vertex; different UVs on one vertex (a cut chart) are an error. Without ``vt``:
    the UV chart is computed by :func:`parameterize`. ``keep_vertices`` keeps only the first N
    vertices and the faces made of them (e.g. the ICT narrow face area, N = 6706).
    """
    path = Path(path)
    obj = read_obj(path)
    if not obj.polygons:
        raise FaceganError(f"{path}: no faces, a template needs its triangles")
    corners = triangulate(obj.polygons)  # (F, 3, 2): (vertex, vt) per corner
    vertices = obj.vertices
    if keep_vertices is not None:
        corners = corners[(corners[:, :, 0] < keep_vertices).all(axis=1)]
        vertices = vertices[:keep_vertices]
    triangles = corners[:, :, 0]
    has_uv = len(obj.uv) > 0 and (corners[:, :, 1] >= 0).all()
    if has_uv:
        uv = _per_vertex_uv(corners, obj.uv, len(vertices), path)
    else:
        uv = parameterize(vertices, triangles, source=str(path))
    if has_uv and np.median(uv_signed_areas(uv, triangles)) < 0:
        triangles = triangles[:, [0, 2, 1]]  # faces wound clockwise in UV: make them counter-clockwise
    lm = np.zeros(0, np.int64) if landmarks is None else np.asarray(landmarks, dtype=np.int64)
    return Template(vertices.astype(np.float64), triangles.astype(np.int64), uv, lm).validate(str(path))


def _per_vertex_uv(corners: np.ndarray, vt: np.ndarray, n_vertices: int, path: Path) -> np.ndarray:
    v_idx = corners[:, :, 0].ravel()
    t_idx = corners[:, :, 1].ravel()
    corner_uv = vt[t_idx]
    uv = np.full((n_vertices, 2), np.nan)
    uv[v_idx] = corner_uv
    spread = np.abs(corner_uv - uv[v_idx]).max(axis=1)
    seams = np.unique(v_idx[spread > _UV_MERGE_TOL])
    if len(seams):
        raise FaceganError(
            f"{path}: {len(seams)} vertices have several different UVs (e.g. vertex {seams[0]}): "
            "the UV map is cut; a template needs one chart"
        )
    return uv


def parameterize(vertices: np.ndarray, triangles: np.ndarray, source: str = "template") -> np.ndarray:
    """UV chart (V, 2) in [0, 1]^2 for a disk-topology mesh (holes allowed), by LSCM (libigl).

    The mesh must be connected, manifold, of genus 0 and have a boundary (a disk, possibly with
    holes such as the eyes and the mouth).
    """
    n_vertices = len(vertices)
    if _n_components(triangles, n_vertices) != 1:
        raise FaceganError(f"{source}: no UVs and not disk-shaped (several connected pieces)")
    if not igl.is_edge_manifold(triangles)[0]:
        raise FaceganError(f"{source}: no UVs and not disk-shaped (non-manifold edges)")
    loops = igl.boundary_loop_all(triangles)
    if not loops:
        raise FaceganError(f"{source}: no UVs and not disk-shaped (closed surface, no boundary)")
    n_edges = len(igl.edges(triangles))
    euler = n_vertices - n_edges + len(triangles)
    genus = (2 - len(loops) - euler) // 2
    if genus != 0:
        raise FaceganError(f"{source}: no UVs and not disk-shaped (genus {genus})")
    outer = max(loops, key=len)
    # Pin two far-apart outer-boundary vertices; LSCM leaves the holes free.
    pins = np.array([outer[0], outer[len(outer) // 2]], dtype=np.int64)
    pin_uv = np.array([[0.0, 0.0], [1.0, 0.0]])
    uv, _ = igl.lscm(np.asarray(vertices, np.float64), np.asarray(triangles, np.int64), pins, pin_uv)
    uv = np.asarray(uv, dtype=np.float64)
    if np.median(uv_signed_areas(uv, triangles)) < 0:
        uv[:, 1] = -uv[:, 1]
    if not np.isfinite(uv).all() or (uv_signed_areas(uv, triangles) <= 0).any():
        # LSCM is conformal but may fold thin regions; Tutte's embedding never folds.
        uv = _tutte_embedding(vertices, triangles, loops, outer)
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    return (uv - lo) / (hi - lo).max()


def _tutte_embedding(vertices: np.ndarray, triangles: np.ndarray, loops: list, outer) -> np.ndarray:
    """Uniform-weight harmonic map with the outer boundary on a circle (holes capped by fans)."""
    n = len(vertices)
    tris = [triangles]
    for loop in loops:
        if loop is outer:
            continue
        tris.append(np.stack([loop, np.roll(loop, -1), np.full(len(loop), n)], axis=1))
        n += 1
    all_tris = np.concatenate(tris)
    edges = np.concatenate([all_tris[:, [0, 1]], all_tris[:, [1, 2]], all_tris[:, [2, 0]]])
    adj = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.float64)
    lap = sp.diags(np.asarray(adj.sum(axis=1)).ravel()) - adj
    # Outer boundary on the unit circle, spaced by arc length.
    ring = vertices[outer]
    seg = np.linalg.norm(np.roll(ring, -1, axis=0) - ring, axis=1)
    angle = 2 * np.pi * np.concatenate([[0.0], np.cumsum(seg)[:-1]]) / seg.sum()
    boundary_uv = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    interior = np.setdiff1d(np.arange(n), outer)
    uv = np.zeros((n, 2))
    uv[outer] = boundary_uv
    rhs = -lap[interior][:, outer] @ boundary_uv
    uv[interior] = spla.splu(lap[interior][:, interior].tocsc()).solve(rhs)
    uv = uv[: len(vertices)]
    if np.median(uv_signed_areas(uv, triangles)) < 0:
        uv[:, 1] = -uv[:, 1]
    return uv
