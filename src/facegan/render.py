"""Headless rendering of face meshes: a batched triangle rasterizer in torch, shading, image grids.

Conventions: orthographic projection along z; the camera looks down -z, so a larger z is nearer
to the viewer; +x points to the image's right and +y up (a front view shows the subject as a
viewer facing them sees them: the subject's left, +x, on the image's right).

The rasterizer has no per-triangle or per-pixel Python loop. Triangles are sorted into a few
classes by the size of their pixel bounding box (rounded up to 1, 2, 3, 4, 6, 8, 12, ... pixels);
per class, the barycentrics and depth of every candidate pixel of every triangle come out of one
small matrix product (T, 3, 3) @ (3, K), and the covered candidates go into the z-buffer with a
single ``scatter_reduce("amax")`` over an int64 key packing (depth, triangle id): the nearest
triangle wins, exact ties go to the lower id. Only the covered pixels are stored and shaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from facegan.errors import FaceganError
from facegan.fileio import atomic_path

__all__ = [
    "Fragments",
    "fit_view",
    "rasterize",
    "interpolate",
    "face_normals",
    "vertex_normals",
    "shade",
    "to_uint8",
    "render_meshes",
    "rotate_y",
    "colormap",
    "image_grid",
    "save_png",
    "geometry_image_to_rgb",
    "render_files",
]

View = tuple[float, float, float, float]  # (xmin, xmax, ymin, ymax) in world units

# Direction towards the light: in front of the face, above it and to the image's left.
DEFAULT_LIGHT = (-0.4, 0.5, 1.0)
CLAY = (0.78, 0.75, 0.71)
_AMBIENT = 0.22
# A pixel centre this far outside a triangle (in barycentric units) still counts as inside, so
# rounding never opens cracks between triangles that share an edge; the z-buffer settles overlaps.
_INSIDE_EPS = 1e-5
# Candidate (triangle, pixel) pairs tested at once: small enough for the temporaries to stay in cache.
_TILE_BATCH = 1 << 16
_EMPTY = torch.iinfo(torch.int64).min  # z-buffer key of a pixel no triangle covers


# ----------------------------------------------------------------------------------- rasterizer


@dataclass(eq=False)
class Fragments:
    """What the rasterizer sees, stored packed: one entry per covered pixel (P of them).

    shape: (B, H, W); pixel: (P,) int64 flat index b*H*W + row*W + col, ascending;
    face: (P,) int64 index into ``triangles`` of the visible triangle;
    weights: (P, 3) float32 barycentric weights of its three corners (non-negative, sum 1);
    depth: (P,) float32 world z of the visible surface;
    view: (xmin, xmax, ymin, ymax) world box that exactly fills the image (pass it back to
    :func:`rasterize` to render other meshes with the same framing).

    Dense images are built on first access: ``pix_to_face`` (B, H, W) int64 (-1 = background),
    ``bary`` (B, H, W, 3) float32 (0 on background), ``zbuf`` (B, H, W) float32 (-inf on
    background), ``mask`` (B, H, W) bool.
    """

    shape: tuple[int, int, int]
    pixel: Tensor
    face: Tensor
    weights: Tensor
    depth: Tensor
    view: View

    @property
    def batch(self) -> Tensor:
        """(P,) int64 batch item of each covered pixel."""
        _, h, w = self.shape
        return torch.div(self.pixel, h * w, rounding_mode="floor")

    def _dense(self, packed: Tensor, fill: float) -> Tensor:
        out = torch.full((math.prod(self.shape),) + packed.shape[1:], fill, dtype=packed.dtype)
        return out.index_copy_(0, self.pixel, packed).view(*self.shape, *packed.shape[1:])

    @cached_property
    def pix_to_face(self) -> Tensor:
        return self._dense(self.face, -1)

    @cached_property
    def bary(self) -> Tensor:
        return self._dense(self.weights, 0.0)

    @cached_property
    def zbuf(self) -> Tensor:
        return self._dense(self.depth, -math.inf)

    @property
    def mask(self) -> Tensor:
        return self.pix_to_face >= 0


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def fit_view(vertices: Tensor, margin: float = 0.05) -> View:
    """Joint x/y bounding box (xmin, xmax, ymin, ymax) of a batch (B, V, 3), grown by ``margin``.

    ``margin`` is a fraction of the larger side added on every side. Non-finite vertices are ignored.
    """
    xy = vertices[..., :2].detach().reshape(-1, 2).double()
    xy = xy[torch.isfinite(xy).all(dim=1)]
    if len(xy) == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    lo, hi = xy.min(dim=0).values, xy.max(dim=0).values
    pad = margin * float((hi - lo).max()) or 1.0  # a single point still gets a finite view
    return (float(lo[0]) - pad, float(hi[0]) + pad, float(lo[1]) - pad, float(hi[1]) + pad)


def _image_view(view: View, h: int, w: int) -> tuple[View, float]:
    """Grow ``view`` to the image's aspect ratio (centred); returns (box filling the image, pixels per unit)."""
    x0, x1, y0, y1 = (float(c) for c in view)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"view {view} must have xmin < xmax and ymin < ymax")
    scale = min(w / (x1 - x0), h / (y1 - y0))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = w / scale / 2, h / scale / 2
    return (cx - hw, cx + hw, cy - hh, cy + hh), scale


def _to_screen(vertices: Tensor, view: View, scale: float) -> Tensor:
    """World (B, V, 3) -> screen (3, B, V) float32: column, row (pixel centres at k + 0.5), depth z."""
    x0, _, _, y1 = view
    v = vertices.detach().float()
    return torch.stack([(v[..., 0] - x0) * scale, (y1 - v[..., 1]) * scale, v[..., 2]])


@dataclass
class _Setup:
    """Rasterization data of the triangles that cover some pixel centre (M of them), sorted by tile class.

    tri: (M,) int64 triangle id b * F + f; base: (M,) int64 flat index (b*H + row) * W + col of the
    first pixel of the triangle's box; width, height: (M,) int64 box size;
    planes: (M, 3, 3) float32; row p = (a, b, c) gives w1, w2 (barycentrics of corners 1, 2) and
    depth z as ``a * u + b * v + c`` where (u, v) = (column, row) offset from the box's first pixel:
    small integers, so float32 stays accurate anywhere in the image;
    tiles: (tile width, tile height, start, stop) per class: rows [start, stop) have boxes that fit.
    """

    tri: Tensor
    base: Tensor
    width: Tensor
    height: Tensor
    planes: Tensor
    tiles: list[tuple[int, int, int, int]]


def _setup_triangles(screen: Tensor, triangles: Tensor, h: int, w: int) -> _Setup:
    """Pixel boxes and barycentric/depth plane equations of the triangles on screen (3, B, V)."""
    _, b, n_vertices = screen.shape
    # Flat corner indices into B*V, so every per-triangle quantity below is a contiguous (N,) vector.
    corner = (triangles[None] + (torch.arange(b) * n_vertices)[:, None, None]).reshape(-1, 3)
    xs, ys, zs = screen.reshape(3, -1)
    finite = torch.isfinite(screen.reshape(3, -1)).all(dim=0)[corner].all(dim=1)
    col0, row0, width, height = _pixel_boxes(xs, ys, corner, h, w)
    width = torch.where(finite, width, 0)  # NaN or infinite corners: skip the triangle
    tri, tiles = _tile_classes(width, height, h, w)
    corner, col0, row0, width, height = (t.index_select(0, tri) for t in (corner, col0, row0, width, height))
    planes = _plane_equations(*(c.index_select(0, corner[:, k]) for c in (xs, ys, zs) for k in range(3)), col0, row0)
    batch = torch.div(tri, triangles.shape[0], rounding_mode="floor")
    base = (batch * h + row0.long()) * w + col0.long()
    return _Setup(tri, base, width.long(), height.long(), planes, tiles)


def _pixel_boxes(xs: Tensor, ys: Tensor, corner: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First column/row (float) and width/height (int64, 0 = empty) of each triangle's box of pixel centres."""
    x0, x1, x2 = (xs.index_select(0, corner[:, k]) for k in range(3))
    y0, y1, y2 = (ys.index_select(0, corner[:, k]) for k in range(3))
    # Pixel (c, r) has its centre at (c + 0.5, r + 0.5). Clamping before rounding keeps far-off
    # coordinates from overflowing the integer cast.
    col0 = torch.ceil(torch.minimum(torch.minimum(x0, x1), x2).clamp(-1, w + 1) - 0.5).clamp(min=0)
    row0 = torch.ceil(torch.minimum(torch.minimum(y0, y1), y2).clamp(-1, h + 1) - 0.5).clamp(min=0)
    col1 = torch.floor(torch.maximum(torch.maximum(x0, x1), x2).clamp(-1, w + 1) - 0.5).clamp(max=w - 1)
    row1 = torch.floor(torch.maximum(torch.maximum(y0, y1), y2).clamp(-1, h + 1) - 0.5).clamp(max=h - 1)
    area2 = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    ok = (col1 >= col0) & (row1 >= row0) & (area2.abs() > 1e-10) & torch.isfinite(area2)
    width = torch.where(ok, col1 - col0 + 1, 0).long()
    height = torch.where(ok, row1 - row0 + 1, 0).long()
    return col0, row0, width, height


def _tile_classes(width: Tensor, height: Tensor, h: int, w: int) -> tuple[Tensor, list[tuple[int, int, int, int]]]:
    """Sort the triangles with non-empty boxes by box size rounded up to 1, 2, 3, 4, 6, 8, 12, ...

    Returns the sorted triangle ids (M,) and (tile width, tile height, start, stop) per class.
    """
    sizes = [1, 2, 3, 4]
    while sizes[-1] < max(h, w):
        sizes += [sizes[-2] * 2, sizes[-1] * 2]
    sizes_t = torch.tensor(sizes)
    cls = torch.searchsorted(sizes_t, width) * len(sizes) + torch.searchsorted(sizes_t, height)
    cls = torch.where(width > 0, cls, -1)
    cls_sorted, order = torch.sort(cls, stable=True)  # stable: within a class, ids stay ascending
    keys, counts = torch.unique_consecutive(cls_sorted, return_counts=True)
    tiles, start = [], 0
    skip = int(counts[0]) if len(keys) and keys[0] < 0 else 0  # empty boxes sort first
    for key, count in zip(keys.tolist(), counts.tolist()):
        if key >= 0:
            tiles.append((sizes[key // len(sizes)], sizes[key % len(sizes)], start - skip, start - skip + count))
        start += count
    return order[skip:], tiles


def _plane_equations(x0, x1, x2, y0, y1, y2, z0, z1, z2, col0: Tensor, row0: Tensor) -> Tensor:
    """Planes (M, 3, 3) of w1, w2 and z over pixel offsets from each box's first pixel (see _Setup)."""
    dx, dy = x0 - (col0 + 0.5), y0 - (row0 + 0.5)  # corner 0 relative to the first pixel centre
    e1x, e1y, e2x, e2y = x1 - x0, y1 - y0, x2 - x0, y2 - y0
    inv = 1.0 / (e1x * e2y - e2x * e1y)  # either winding works: the sign cancels
    # Solve p - p0 = w1 e1 + w2 e2 by cross products with e2 and e1.
    a1, b1 = e2y * inv, -e2x * inv
    a2, b2 = -e1y * inv, e1x * inv
    c1 = -(a1 * dx + b1 * dy)
    c2 = -(a2 * dx + b2 * dy)
    dz1, dz2 = z1 - z0, z2 - z0
    az, bz, cz = a1 * dz1 + a2 * dz2, b1 * dz1 + b2 * dz2, z0 + c1 * dz1 + c2 * dz2
    return torch.stack([a1, b1, c1, a2, b2, c2, az, bz, cz], dim=1).view(-1, 3, 3)


def _depth_key(z: Tensor, tri: Tensor) -> Tensor:
    """Order-preserving int64 key: high 32 bits = float32 depth, low 32 bits favour the lower triangle id."""
    bits = z.float().view(torch.int32)
    # Negative floats order backwards as integers: flipping their magnitude bits makes the map monotonic.
    mono = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return (mono << 32) | (0xFFFFFFFF - tri)


def _scatter_tile(setup: _Setup, keys: Tensor, start: int, stop: int, tile_w: int, tile_h: int, w: int) -> None:
    """Test the tile_w x tile_h candidate pixels of setup rows [start, stop) and fold the covered
    ones into the z-buffer ``keys`` (B*H*W,)."""
    n_cand = tile_w * tile_h
    v = torch.arange(tile_h).repeat_interleave(tile_w)  # (K,) row-major offsets within the tile
    u = torch.arange(tile_w).repeat(tile_h)
    grid = torch.stack([u, v, torch.ones_like(u)]).float()  # (3, K)
    values = setup.planes[start:stop] @ grid  # (T, 3, K): w1, w2, z at every candidate
    w1, w2 = values[:, 0], values[:, 1]
    inside = (w1 >= -_INSIDE_EPS) & (w2 >= -_INSIDE_EPS) & (w1 + w2 <= 1 + _INSIDE_EPS)
    if n_cand > 1:
        # Rounded-up tiles overhang the box; at the image border that would wrap to another row.
        inside &= (u < setup.width[start:stop, None]) & (v < setup.height[start:stop, None])
    flat = torch.nonzero(inside.view(-1)).squeeze(1)  # t * K + k
    t = torch.div(flat, n_cand, rounding_mode="floor")
    k = flat - t * n_cand
    z = values.view(-1).index_select(0, flat + (t + 1) * (2 * n_cand))  # values[t, 2, k]
    pixel = setup.base[start:stop].index_select(0, t) + (v * w + u).index_select(0, k)
    tri = setup.tri[start:stop].index_select(0, t)
    keys.scatter_reduce_(0, pixel, _depth_key(z, tri), reduce="amax", include_self=True)


def rasterize(
    vertices: Tensor,
    triangles: Tensor,
    size: int | Sequence[int],
    view: View | None = None,
    margin: float = 0.05,
) -> Fragments:
    """Rasterize a batch of meshes sharing one topology, orthographically along z.

    vertices: (B, V, 3) float (or (V, 3), treated as B = 1); triangles: (F, 3) int64;
    size: H = W, or (H, W). ``view`` = (xmin, xmax, ymin, ymax) world box to show, grown to the
    image's aspect ratio; by default the joint x/y box of the whole batch with ``margin`` (so all
    items share one scale). Pixel centres count as covered when inside a triangle (edges included);
    the nearest triangle (largest z) wins, exact ties go to the lower triangle index. Triangles
    with NaN corners or no area are skipped. Runs on the CPU; the result is on the CPU.
    """
    if vertices.dim() == 2:
        vertices = vertices[None]
    vertices = vertices.detach().cpu()
    triangles = torch.as_tensor(triangles, dtype=torch.int64).cpu().reshape(-1, 3)
    h, w = _size_hw(size)
    b, n_faces = vertices.shape[0], triangles.shape[0]
    if b * n_faces >= 1 << 32:
        raise ValueError(f"{b} x {n_faces} triangles is too many for one call; split the batch")
    image_view, scale = _image_view(view if view is not None else fit_view(vertices, margin), h, w)
    setup = _setup_triangles(_to_screen(vertices, image_view, scale), triangles, h, w)

    keys = torch.full((b * h * w,), _EMPTY, dtype=torch.int64)
    for tile_w, tile_h, start, stop in setup.tiles:
        step = max(1, _TILE_BATCH // (tile_w * tile_h))  # bounds the (T, 3, K) temporaries
        for chunk_start in range(start, stop, step):
            _scatter_tile(setup, keys, chunk_start, min(chunk_start + step, stop), tile_w, tile_h, w)
    return _resolve(setup, keys, (b, h, w), n_faces, image_view)


def _resolve(setup: _Setup, keys: Tensor, shape: tuple[int, int, int], n_faces: int, view: View) -> Fragments:
    """Decode the winning triangle of each pixel and recompute its barycentrics and depth."""
    pixel = torch.nonzero(keys != _EMPTY).squeeze(1)
    tri = 0xFFFFFFFF - (keys.index_select(0, pixel) & 0xFFFFFFFF)
    # Setup row of each winner: invert the class sort.
    row_of = torch.empty(shape[0] * n_faces, dtype=torch.int64)
    row_of[setup.tri] = torch.arange(len(setup.tri))
    row = row_of.index_select(0, tri)
    offset = pixel - setup.base.index_select(0, row)
    v = torch.div(offset, shape[2], rounding_mode="floor")
    u, v = (offset - v * shape[2]).float(), v.float()
    # Gathering the 9 coefficients as columns is twice as fast as gathering rows of 9.
    a1, b1, c1, a2, b2, c2, az, bz, cz = setup.planes.view(-1, 9).T.contiguous().index_select(1, row)
    w1, w2 = a1 * u + b1 * v + c1, a2 * u + b2 * v + c2
    # Clamp the edge tolerance away so interpolation never extrapolates.
    weights = torch.stack([1 - w1 - w2, w1, w2], dim=1).clamp_(min=0)
    weights /= weights.sum(dim=1, keepdim=True)
    return Fragments(shape, pixel, tri % n_faces, weights, az * u + bz * v + cz, view)


def _interpolate_packed(fragments: Fragments, triangles: Tensor, attributes: Tensor) -> Tensor:
    """Attributes (B, V, C) interpolated at the covered pixels, channel-major: (C, P)."""
    b, n_vertices, c = attributes.shape
    offset = fragments.batch * n_vertices
    # Channel-major gathers of whole columns are faster than gathering many short rows.
    table = attributes.reshape(b * n_vertices, c).T.contiguous()  # (C, B*V)
    weights = fragments.weights.T.contiguous()  # (3, P)
    out = torch.zeros(c, len(offset))
    for k in range(3):  # the three corners
        corner = triangles[:, k].index_select(0, fragments.face) + offset
        out.addcmul_(table.index_select(1, corner), weights[k])
    return out


def interpolate(fragments: Fragments, triangles: Tensor, attributes: Tensor) -> Tensor:
    """Interpolate per-vertex attributes (B, V, C) (or (V, C)) to pixels: (B, H, W, C), zero on background."""
    attributes = attributes.detach().cpu().float()
    if attributes.dim() == 2:
        attributes = attributes[None].expand(fragments.shape[0], -1, -1)
    triangles = torch.as_tensor(triangles, dtype=torch.int64).cpu().reshape(-1, 3)
    return fragments._dense(_interpolate_packed(fragments, triangles, attributes).T, 0.0)


# -------------------------------------------------------------------------------------- shading


def face_normals(vertices: Tensor, triangles: Tensor) -> Tensor:
    """Unnormalized triangle normals (B, F, 3) of vertices (B, V, 3); length = twice the area."""
    return _face_normals_fb(vertices, triangles).transpose(0, 1)


def _face_normals_fb(vertices: Tensor, triangles: Tensor) -> Tensor:
    """Face normals laid out (F, B, 3): gathering whole rows of a (V, B*3) table is fast."""
    b, n_vertices, _ = vertices.shape
    triangles = torch.as_tensor(triangles, dtype=torch.int64, device=vertices.device)
    table = vertices.transpose(0, 1).reshape(n_vertices, b * 3)
    p0, p1, p2 = (table.index_select(0, triangles[:, k]).view(-1, b, 3) for k in range(3))
    return torch.linalg.cross(p1 - p0, p2 - p0)


def _vertex_normals_from(face_n: Tensor, triangles: Tensor, n_vertices: int) -> Tensor:
    """Unit vertex normals (B, V, 3) from unnormalized face normals laid out (F, B, 3)."""
    n_faces, b, _ = face_n.shape
    per_face = face_n.reshape(n_faces, b * 3)
    normals = face_n.new_zeros(n_vertices, b * 3)
    for k in range(3):  # three corners, not a per-triangle loop
        normals.index_add_(0, triangles[:, k], per_face)
    normals = normals.view(n_vertices, b, 3).transpose(0, 1)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-20)


def vertex_normals(vertices: Tensor, triangles: Tensor) -> Tensor:
    """Area-weighted unit vertex normals (B, V, 3) of vertices (B, V, 3) (or (V, 3) -> (V, 3)).

    Orientation follows the triangles' winding (counter-clockwise seen from the normal's side).
    Vertices in no triangle get a zero normal.
    """
    squeeze = vertices.dim() == 2
    if squeeze:
        vertices = vertices[None]
    triangles = torch.as_tensor(triangles, dtype=torch.int64, device=vertices.device)
    normals = _vertex_normals_from(_face_normals_fb(vertices, triangles), triangles, vertices.shape[1])
    return normals[0] if squeeze else normals


def _pixel_normals(fragments: Fragments, vertices: Tensor, triangles: Tensor, two_sided: bool) -> Tensor:
    """Smooth unit normals at the covered pixels, channel-major (3, P)."""
    face_n = _face_normals_fb(vertices, triangles)
    normals = _interpolate_packed(fragments, triangles, _vertex_normals_from(face_n, triangles, vertices.shape[1]))
    scale = normals.square().sum(dim=0).sqrt_().clamp_(min=1e-20).reciprocal_()
    if two_sided:
        # Light the back of a triangle like its front: turn normals of away-facing triangles around.
        facing_z = face_n[..., 2].reshape(-1).index_select(0, fragments.face * vertices.shape[0] + fragments.batch)
        scale = torch.where(facing_z < 0, -scale, scale)
    return normals.mul_(scale)


def _shade_packed(
    fragments: Fragments,
    vertices: Tensor,
    triangles: Tensor,
    mode: str,
    vertex_colors: Tensor | None,
    light: Sequence[float],
    two_sided: bool,
) -> Tensor:
    """Colours (3, P) in [0, 1] of the covered pixels (see :func:`shade`)."""
    _check_mode(mode)
    normals = _pixel_normals(fragments, vertices, triangles, two_sided)
    if mode == "normals":
        return normals.add_(1).mul_(0.5).clamp_(0, 1)
    light_dir = torch.nn.functional.normalize(torch.as_tensor(light, dtype=torch.float32), dim=0)
    intensity = _AMBIENT + (1 - _AMBIENT) * (light_dir @ normals).clamp_(min=0)  # (P,) Lambert
    if mode == "shaded":
        albedo = torch.tensor(CLAY)[:, None]
    else:
        if vertex_colors is None:
            raise ValueError("mode 'colors' needs vertex_colors (B, V, 3)")
        colors = torch.as_tensor(vertex_colors).detach().cpu().float()
        if colors.shape[-1] != 3 or colors.shape[-2] != vertices.shape[1]:
            raise ValueError(f"vertex_colors must be (B, V, 3) or (V, 3), got {tuple(colors.shape)}")
        if colors.dim() == 2:
            colors = colors[None].expand(fragments.shape[0], -1, -1)
        albedo = _interpolate_packed(fragments, triangles, colors)
    return (albedo * intensity).clamp_(0, 1)


def _check_mode(mode: str) -> None:
    if mode not in ("shaded", "normals", "colors"):
        raise ValueError(f"unknown render mode {mode!r} (use 'shaded', 'normals' or 'colors')")


def _compose(fragments: Fragments, colors: Tensor, background: float | Sequence[float]) -> Tensor:
    """Place channel-major colours (3, P) on a background: (B, H, W, 3), dtype of ``colors``."""
    bg = torch.as_tensor(background, dtype=torch.float32).flatten().expand(3)[:, None]
    if colors.dtype == torch.uint8:
        bg = (bg.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    image = bg.repeat(1, math.prod(fragments.shape)).index_copy_(1, fragments.pixel, colors)
    return image.view(3, *fragments.shape).permute(1, 2, 3, 0).contiguous()


def _prepare(vertices: Tensor, triangles: Tensor) -> tuple[Tensor, Tensor]:
    if vertices.dim() == 2:
        vertices = vertices[None]
    return vertices.detach().cpu().float(), torch.as_tensor(triangles, dtype=torch.int64).cpu().reshape(-1, 3)


def shade(
    fragments: Fragments,
    vertices: Tensor,
    triangles: Tensor,
    mode: str = "shaded",
    vertex_colors: Tensor | None = None,
    light: Sequence[float] = DEFAULT_LIGHT,
    background: float | Sequence[float] | None = None,
    two_sided: bool = True,
) -> Tensor:
    """Colour rasterized fragments: float32 (B, H, W, 3) in [0, 1].

    vertices: (B, V, 3) as rasterized; triangles: (F, 3).
    mode "shaded": clay colour, Lambertian with a little ambient, smooth (interpolated) normals;
    "normals": unit normal n as RGB (n + 1) / 2 (background black by default);
    "colors": vertex_colors (B, V, 3) or (V, 3) in [0, 1], interpolated, times the shading.
    light: direction towards the light (default front-top-left). background: grey level or RGB
    in [0, 1]; None = black for "normals", white otherwise. two_sided: normals of triangles
    facing away from the viewer are turned around (robust to inconsistent winding).
    """
    vertices, triangles = _prepare(vertices, triangles)
    colors = _shade_packed(fragments, vertices, triangles, mode, vertex_colors, light, two_sided)
    return _compose(fragments, colors, _default_background(mode, background))


def _default_background(mode: str, background: float | Sequence[float] | None) -> float | Sequence[float]:
    if background is not None:
        return background
    return 0.0 if mode == "normals" else 1.0


def to_uint8(image: Tensor) -> Tensor:
    """Float image in [0, 1] -> uint8 (same shape), rounded."""
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def render_meshes(
    vertices: Tensor,
    triangles: Tensor,
    size: int | Sequence[int] = 256,
    mode: str = "shaded",
    vertex_colors: Tensor | None = None,
    light: Sequence[float] = DEFAULT_LIGHT,
    background: float | Sequence[float] | None = None,
    view: View | None = None,
    supersample: int = 1,
) -> Tensor:
    """Render a batch of meshes (B, V, 3) with triangles (F, 3) to uint8 images (B, H, W, 3).

    See :func:`shade` for the modes and the background, :func:`rasterize` for ``view``.
    ``supersample`` = k renders at k times the size and averages k x k blocks (anti-aliasing for
    figures; keep 1 for metrics).
    """
    _check_mode(mode)
    vertices, triangles = _prepare(vertices, triangles)
    h, w = _size_hw(size)
    k = int(supersample)
    fragments = rasterize(vertices, triangles, (h * k, w * k), view=view)
    colors = _shade_packed(fragments, vertices, triangles, mode, vertex_colors, light, two_sided=True)
    background = _default_background(mode, background)
    if k == 1:
        return _compose(fragments, to_uint8(colors), background)
    image = _compose(fragments, colors, background).permute(0, 3, 1, 2)
    return to_uint8(torch.nn.functional.avg_pool2d(image, k).permute(0, 2, 3, 1))


def rotate_y(vertices: Tensor, degrees: float, center: Tensor | None = None) -> Tensor:
    """Rotate vertices (..., V, 3) about the vertical axis through ``center`` (default: each mesh's box centre).

    Positive angles turn the subject to their left (the viewer sees more of the subject's right cheek).
    """
    t = math.radians(degrees)
    rot = torch.tensor([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])
    rot = rot.to(vertices)
    if center is None:
        center = (vertices.amin(dim=-2, keepdim=True) + vertices.amax(dim=-2, keepdim=True)) / 2
    return (vertices - center) @ rot.T + center


# ------------------------------------------------------------------------------------- colours


def colormap(values: Tensor | np.ndarray, vmin: float, vmax: float, name: str = "viridis") -> Tensor:
    """Map scalars (B, V) (any shape) to RGB float32 (..., 3) in [0, 1] with a matplotlib colormap.

    Values are clipped to [vmin, vmax]; NaN maps to the colormap's "bad" colour.
    """
    import matplotlib

    lut = torch.as_tensor(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3], dtype=torch.float32)
    values = torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values).detach().cpu()
    t = ((values.double() - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1)
    rgb = lut[torch.nan_to_num(t * 255 + 0.5, nan=0.0).long().clamp(0, 255)]
    bad = torch.as_tensor(matplotlib.colormaps[name].get_bad()[:3], dtype=torch.float32)
    return torch.where(torch.isnan(values)[..., None], bad, rgb)


def geometry_image_to_rgb(
    images: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None, per_image: bool = False
) -> np.ndarray:
    """Stretch each channel of geometry images to [0, 255] for viewing: uint8 (N, H, W, 3).

    images: (N, H, W, 3) float or uint8 (channels-first (N, 3, H, W) is accepted too);
    mask: (H, W) bool, pixels outside it are black and do not count for the stretch.
    The stretch is per channel over the whole batch (images stay comparable) unless ``per_image``.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images).detach().cpu().double()
    if x.dim() == 3:
        x = x[None]
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.permute(0, 2, 3, 1)
    if mask is None:
        m = torch.ones(x.shape[1:3], dtype=torch.bool)
    else:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    valid = m[None, :, :, None] & torch.isfinite(x)
    dims = (1, 2) if per_image else (0, 1, 2)
    lo = torch.where(valid, x, math.inf).amin(dim=dims, keepdim=True)
    hi = torch.where(valid, x, -math.inf).amax(dim=dims, keepdim=True)
    scaled = (x - lo) / (hi - lo).clamp(min=1e-12)
    scaled = torch.where(valid, scaled, 0.0).nan_to_num(0.0)
    return (scaled.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


# --------------------------------------------------------------------------------- image files


def _as_uint8_list(images: Tensor | np.ndarray | Sequence) -> list[np.ndarray]:
    if isinstance(images, (Tensor, np.ndarray)) and np.ndim(images) == 3:
        images = [images]
    out = []
    for im in images:
        arr = im.detach().cpu().numpy() if isinstance(im, Tensor) else np.asarray(im)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8:
            raise ValueError(f"image_grid wants uint8 images, got {arr.dtype}")
        out.append(arr[..., :3])
    return out


def image_grid(
    images: Tensor | np.ndarray | Sequence,
    ncols: int | None = None,
    pad: int = 2,
    labels: Sequence[str] | None = None,
    background: int = 255,
) -> np.ndarray:
    """Tile uint8 images (N, H, W, 3) (array, tensor or list, sizes may differ) into one (H', W', 3) uint8.

    ncols: tiles per row (default about sqrt(N)); pad: pixels between and around tiles;
    labels: one caption per image, drawn below it with PIL's default font.
    """
    tiles = _as_uint8_list(images)
    n = len(tiles)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    ncols = max(1, min(ncols or math.ceil(math.sqrt(n)), n))
    nrows = math.ceil(n / ncols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    font, label_h = _label_font(labels)
    cell_h, cell_w = th + label_h + pad, tw + pad
    grid = np.full((pad + nrows * cell_h, pad + ncols * cell_w, 3), background, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = pad + (i // ncols) * cell_h, pad + (i % ncols) * cell_w
        grid[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    if labels is not None:
        grid = _draw_labels(grid, labels, font, ncols, cell_h, cell_w, pad, th, tw)
    return grid


def _label_font(labels: Sequence[str] | None):
    """PIL's default font and the height of a caption line (0 without labels)."""
    if labels is None:
        return None, 0
    from PIL import ImageFont

    font = ImageFont.load_default()
    top, bottom = font.getbbox("Ag")[1::2]
    return font, int(bottom - top) + 4


def _draw_labels(grid, labels, font, ncols, cell_h, cell_w, pad, th, tw) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        top, left = pad + (i // ncols) * cell_h + th + 1, pad + (i % ncols) * cell_w
        text = _fit_text(draw, str(text), font, tw)
        x = left + (tw - draw.textlength(text, font=font)) / 2
        draw.text((x, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas).copy()


def _fit_text(draw, text: str, font, width: int) -> str:
    """Shorten ``text`` with a leading ellipsis until it fits ``width`` pixels (keeps the informative end)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def save_png(path: str | os.PathLike, image: Tensor | np.ndarray) -> None:
    """Write an image (H, W, 3) or (H, W) uint8 as PNG, atomically."""
    from PIL import Image

    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png wants a uint8 image, got {arr.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------- mesh files

_VIEW_ANGLES = {"front": 0.0, "three_quarter": 30.0}


def _read_triangle_mesh(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (F, 3) int64 of an OBJ or PLY file; FaceganError if unusable."""
    suffix = path.suffix.lower()
    if suffix == ".obj":
        from facegan.mesh.io import read_obj, triangulate

        obj = read_obj(path)
        corners = triangulate(obj.polygons) if obj.polygons else np.zeros((0, 3, 2), np.int64)
        vertices, triangles = obj.vertices, corners[:, :, 0]  # corners: (F, 3, [vertex, vt])
    elif suffix == ".ply":
        vertices, triangles = _read_ply(path)
    else:
        raise FaceganError(f"{path}: not a mesh file (expected .obj or .ply)")
    if len(triangles) == 0:
        raise FaceganError(f"{path}: no triangles to render")
    if not np.isfinite(vertices).all():
        raise FaceganError(f"{path}: vertices have NaN or infinite coordinates")
    return np.asarray(vertices, np.float64), np.asarray(triangles, np.int64)


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    if not path.exists():
        raise FaceganError(f"{path}: file not found")
    try:
        mesh = trimesh.load(path, file_type="ply", process=False)
    except Exception as exc:  # trimesh raises many types for broken files
        raise FaceganError(f"{path}: unreadable PLY ({type(exc).__name__}: {exc})") from None
    faces = getattr(mesh, "faces", None)
    if faces is None or len(faces) == 0:
        raise FaceganError(f"{path}: no triangles to render")
    return np.asarray(mesh.vertices), np.asarray(faces)


def render_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    size: int = 256,
    ncols: int | None = None,
    views: Sequence[str] = ("front", "three_quarter"),
    mode: str = "shaded",
    supersample: int = 2,
) -> np.ndarray:
    """Render OBJ/PLY files to one labelled grid PNG at ``out``; returns the grid (H', W', 3) uint8.

    Each grid cell is one file, its ``views`` side by side ("front"; "three_quarter" = turned 30
    degrees about y), captioned with the file name; ``ncols`` = files per row. All files share one
    scale per view (registered faces stay comparable). Raises FaceganError naming a file that
    cannot be read or has no triangles.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise FaceganError("render_files: no mesh files given")
    unknown = [v for v in views if v not in _VIEW_ANGLES]
    if unknown or not views:
        raise FaceganError(f"unknown view {unknown[0] if unknown else '(none)'!r} (use {', '.join(_VIEW_ANGLES)})")
    meshes = [_read_triangle_mesh(p) for p in paths]
    cells = [[] for _ in meshes]
    for name in views:
        posed = [rotate_y(torch.as_tensor(v, dtype=torch.float32), _VIEW_ANGLES[name]) for v, _ in meshes]
        view = fit_view(torch.cat(posed)[None])
        for cell, vertices, (_, triangles) in zip(cells, posed, meshes):
            image = render_meshes(vertices, torch.as_tensor(triangles), size, mode, view=view, supersample=supersample)
            cell.append(image[0].numpy())
    tiles = [np.concatenate(c, axis=1) for c in cells]
    grid = image_grid(tiles, ncols=ncols, labels=[p.name for p in paths])
    save_png(out, grid)
    return grid
