"""Where each pixel of a geometry image lies on the template (Section 3 of the paper).

The template's UV chart is scaled uniformly (aspect ratio kept) and centred so that its bounding
box fills the image up to a one-pixel border. Each pixel inside the chart stores the surface
point under its centre; pixels within one pixel of the chart (the border ring and the thin eye
and mouth slits) store the closest point of the chart, so that a bilinear read anywhere on the
chart only touches pixels that hold surface points. This map is computed once per template and
resolution; encoding a batch of meshes is then a fixed sparse interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import igl
import numpy as np
import scipy.sparse as sp
from matplotlib.tri import Triangulation

# Distance (in pixels, Chebyshev) within which pixels outside the chart still get a surface point:
# 1 is exactly what a bilinear read at any chart point needs.
_DILATION = 1


@dataclass(frozen=True, eq=False)
class PixelMap:
    """Pixel -> surface point map of one template at one resolution.

    resolution: image side H = W; vertex_pixels: (V, 2) float64 vertex positions in pixel units
    (x = column, y = row, pixel centres at integers, row 0 at the top, i.e. high v);
    mask: (H, W) bool, pixels holding a surface point; pixels: (P,) int64 flat indices of the mask
    pixels in row-major order; triangle: (P,) int64; barycentric: (P, 3) float64;
    inside: (P,) bool, True where the pixel centre lies in the chart (False: closest-point ring).
    """

    resolution: int
    vertex_pixels: np.ndarray
    mask: np.ndarray
    pixels: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray
    inside: np.ndarray

    def interpolation_matrix(self, triangles: np.ndarray, n_vertices: int) -> sp.csr_matrix:
        """B (P, V): row p holds the barycentric weights of pixel p on its triangle's vertices."""
        cols = triangles[self.triangle]  # (P, 3)
        rows = np.repeat(np.arange(len(self.pixels)), 3)
        return sp.csr_matrix(
            (self.barycentric.ravel(), (rows, cols.ravel())), shape=(len(self.pixels), n_vertices)
        )


def uv_to_pixels(uv: np.ndarray, resolution: int) -> np.ndarray:
    """Map a UV chart (V, 2) into pixel coordinates (V, 2): bounding box scaled uniformly to fill
    [0.5, resolution - 1.5] (a one-pixel border for the closest-point ring), v pointing up."""
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    span = resolution - 2.0
    scale = span / (hi - lo).max()
    offset = 0.5 + (span - (hi - lo) * scale) / 2  # centre the shorter side
    x = offset[0] + (uv[:, 0] - lo[0]) * scale
    y = offset[1] + (uv[:, 1] - lo[1]) * scale
    return np.stack([x, (resolution - 1) - y], axis=1)


def barycentric_2d(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (P, 3) of points (P, 2) in triangles given by corners (P, 3, 2)."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    v0, v1, v2 = b - a, c - a, points - a
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    l1 = (v2[:, 0] * v1[:, 1] - v2[:, 1] * v1[:, 0]) / det
    l2 = (v0[:, 0] * v2[:, 1] - v0[:, 1] * v2[:, 0]) / det
    return np.stack([1 - l1 - l2, l1, l2], axis=1)


def build_pixel_map(uv: np.ndarray, triangles: np.ndarray, resolution: int) -> PixelMap:
    """Compute the :class:`PixelMap` of a chart (uv (V, 2), triangles (F, 3)) at ``resolution``."""
    vp = uv_to_pixels(uv, resolution)
    rows, cols = np.mgrid[0:resolution, 0:resolution]
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.float64)  # (H*W, 2) as (x, y)

    # Pixel centres inside the chart: point location with matplotlib's trapezoid-map finder.
    finder = Triangulation(vp[:, 0], vp[:, 1], triangles).get_trifinder()
    tri_of = np.asarray(finder(centres[:, 0], centres[:, 1]), dtype=np.int64)
    inside = tri_of >= 0

    # Ring: pixels within _DILATION (Chebyshev) of an inside pixel or of a vertex.
    near = np.zeros((resolution, resolution), bool)
    near.ravel()[inside] = True
    vr = np.clip(np.floor(vp).astype(np.int64), 0, resolution - 1)
    for dy in (0, 1):  # the four pixels around each vertex (what a bilinear read touches)
        for dx in (0, 1):
            near[np.clip(vr[:, 1] + dy, 0, resolution - 1), np.clip(vr[:, 0] + dx, 0, resolution - 1)] = True
    dilated = near.copy()
    for _ in range(_DILATION):
        padded = np.pad(dilated, 1)
        dilated = np.zeros_like(dilated)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                dilated |= padded[1 + dy : 1 + dy + resolution, 1 + dx : 1 + dx + resolution]
    ring = dilated.ravel() & ~inside

    tri_ring, bary_ring = _closest_boundary_points(vp, triangles, centres[ring])
    mask = inside | ring
    pixels = np.flatnonzero(mask)
    triangle = np.empty(len(centres), np.int64)
    bary = np.empty((len(centres), 3))
    triangle[inside] = tri_of[inside]
    bary[inside] = barycentric_2d(centres[inside], vp[triangles[tri_of[inside]]])
    triangle[ring] = tri_ring
    bary[ring] = bary_ring
    return PixelMap(
        resolution=resolution,
        vertex_pixels=vp,
        mask=mask.reshape(resolution, resolution),
        pixels=pixels,
        triangle=triangle[pixels],
        barycentric=np.clip(bary[pixels], 0.0, 1.0) / np.clip(bary[pixels], 0.0, 1.0).sum(1, keepdims=True),
        inside=inside[pixels],
    )


def _closest_boundary_points(vp: np.ndarray, triangles: np.ndarray, points: np.ndarray):
    """For points (Q, 2) outside the chart, the closest point on the chart's boundary edges,
    as (triangle (Q,), barycentric (Q, 3)) of the triangle owning that edge."""
    facets, owner, _ = igl.boundary_facets(triangles)  # (E, 2) edges, (E,) owning triangle
    a, b = vp[facets[:, 0]], vp[facets[:, 1]]  # (E, 2)
    ab = b - a
    best_d = np.full(len(points), np.inf)
    best_e = np.zeros(len(points), np.int64)
    best_t = np.zeros(len(points))
    for start in range(0, len(points), 256):  # chunks bound the (chunk, E) distance table
        q = points[start : start + 256, None, :]
        t = np.clip(((q - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)  # (chunk, E)
        d = (((a + t[..., None] * ab) - q) ** 2).sum(-1)
        e = d.argmin(axis=1)
        rows = np.arange(len(e))
        best_d[start : start + 256], best_e[start : start + 256] = d[rows, e], e
        best_t[start : start + 256] = t[rows, e]
    tri = owner[best_e]
    # Barycentric weights of the edge point on its triangle: (1 - t) on one end, t on the other.
    bary = np.zeros((len(points), 3))
    corners = triangles[tri]
    for end, weight in ((facets[best_e, 0], 1 - best_t), (facets[best_e, 1], best_t)):
        slot = (corners == end[:, None]).argmax(axis=1)
        bary[np.arange(len(points)), slot] += weight
    return tri, bary
