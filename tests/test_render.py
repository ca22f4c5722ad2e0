"""Tests of the headless renderer: rasterizer against a naive loop, normals, shading, grids, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facegan.errors import FaceganError
from facegan.render import (
    colormap,
    geometry_image_to_rgb,
    image_grid,
    interpolate,
    rasterize,
    render_files,
    render_meshes,
    save_png,
    vertex_normals,
)


# ------------------------------------------------------------------------------------- helpers


def naive_rasterize(vertices: np.ndarray, triangles: np.ndarray, h: int, w: int, view):
    """Reference: loop over pixels and triangles in float64. Returns, per pixel, the winning
    triangle (-1 none), its barycentrics, its depth, and whether the answer is unambiguous
    (no pixel centre near an edge of any triangle, no near-tie in depth)."""
    x0, x1, y0, y1 = view
    face = np.full((h, w), -1)
    bary = np.zeros((h, w, 3))
    depth = np.full((h, w), -np.inf)
    clear = np.ones((h, w), bool)
    for r in range(h):
        for c in range(w):
            px = x0 + (c + 0.5) / w * (x1 - x0)
            py = y1 - (r + 0.5) / h * (y1 - y0)
            hits = []
            for f, (i, j, k) in enumerate(triangles):
                a, b, cc = vertices[i], vertices[j], vertices[k]
                m = np.array([[b[0] - a[0], cc[0] - a[0]], [b[1] - a[1], cc[1] - a[1]]])
                if abs(np.linalg.det(m)) < 1e-12:
                    continue
                w1, w2 = np.linalg.solve(m, [px - a[0], py - a[1]])
                wts = np.array([1 - w1 - w2, w1, w2])
                if abs(wts.min()) < 1e-3:
                    clear[r, c] = False
                if wts.min() >= 0:
                    hits.append((wts @ np.array([a[2], b[2], cc[2]]), -f, wts))
            if hits:
                hits.sort(key=lambda t: (t[0], t[1]))
                z, neg_f, wts = hits[-1]
                if len(hits) > 1 and hits[-1][0] - hits[-2][0] < 1e-4:
                    clear[r, c] = False
                face[r, c], bary[r, c], depth[r, c] = -neg_f, wts, z
    return face, bary, depth, clear


def grid_mesh(n: int = 4, z: float = 0.0):
    """A flat n x n grid of quads in the z plane, counter-clockwise seen from +z."""
    xs, ys = np.meshgrid(np.linspace(-1, 1, n + 1), np.linspace(-1, 1, n + 1))
    vertices = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, z)], axis=1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()
    triangles = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return torch.tensor(vertices, dtype=torch.float32), torch.tensor(triangles)


def sphere(subdivisions: int = 3):
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.int64)


# ---------------------------------------------------------------------------------- rasterizer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rasterizer_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    b, n_tri, h, w = 2, 12, 20, 24
    vertices = torch.rand(b, n_tri * 3, 3, generator=gen) * 2 - 1  # independent, overlapping triangles
    triangles = torch.arange(n_tri * 3).view(n_tri, 3)
    frags = rasterize(vertices, triangles, (h, w))
    n_clear = 0
    for i in range(b):
        face, bary, depth, clear = naive_rasterize(vertices[i].double().numpy(), triangles.numpy(), h, w, frags.view)
        assert np.array_equal(frags.pix_to_face[i].numpy()[clear], face[clear])
        covered = clear & (face >= 0)
        np.testing.assert_allclose(frags.bary[i].numpy()[covered], bary[covered], atol=1e-4)
        np.testing.assert_allclose(frags.zbuf[i].numpy()[covered], depth[covered], atol=1e-4)
        assert np.isneginf(frags.zbuf[i].numpy()[clear & (face < 0)]).all()
        n_clear += covered.sum()
    assert n_clear > 0.15 * b * h * w  # the comparison saw plenty of covered pixels


def test_connected_mesh_has_no_cracks():
    # A jittered grid at a resolution where pixel centres fall on shared edges and vertices.
    vertices, triangles = grid_mesh(8)
    gen = torch.Generator().manual_seed(0)
    jitter = (torch.rand(vertices.shape, generator=gen) - 0.5) * torch.tensor([0.1, 0.1, 0.5])
    inner = (vertices[:, :2].abs() < 0.99).all(dim=1, keepdim=True)
    vertices = vertices + jitter * inner  # keep the outline a square
    frags = rasterize(vertices, triangles, 64, view=(-1, 1, -1, 1))
    assert frags.mask[0].all()


def test_single_triangle_covers_known_pixels():
    # World box [0, 4]^2 on a 4 x 4 image: pixel (row r, col c) has its centre at x = c + .5, y = 3.5 - r.
    vertices = torch.tensor([[[0.2, 0.2, 0.0], [3.9, 0.2, 0.0], [0.2, 3.9, 0.0]]])
    frags = rasterize(vertices, torch.tensor([[0, 1, 2]]), 4, view=(0, 4, 0, 4))
    rows, cols = np.indices((4, 4))
    expected = cols <= rows  # x + y <= 4.1: the lower-left half, diagonal included (+y is up)
    assert np.array_equal(frags.mask[0].numpy(), expected)
    assert frags.view == (0, 4, 0, 4)
    np.testing.assert_allclose(frags.bary[0].sum(-1).numpy()[expected], 1, atol=1e-6)
    # Pixel (3, 0), centre (0.5, 0.5): weights solve p = 0.2 + w1 * 3.7 (x) and 0.2 + w2 * 3.7 (y).
    np.testing.assert_allclose(frags.bary[0, 3, 0].numpy(), [1 - 0.6 / 3.7, 0.3 / 3.7, 0.3 / 3.7], atol=1e-6)


def test_nearer_triangle_wins_whatever_the_order():
    square = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float32)
    far = torch.cat([square, torch.zeros(4, 1)], dim=1)
    near = torch.cat([square * 0.5, torch.ones(4, 1)], dim=1)
    quads = torch.tensor([[0, 1, 2], [0, 2, 3]])
    for first, second in ((near, far), (far, near)):
        vertices = torch.cat([first, second])[None]
        frags = rasterize(vertices, torch.cat([quads, quads + 4]), 16, view=(-1, 1, -1, 1))
        near_ids = {0, 1} if first is near else {2, 3}
        centre = frags.pix_to_face[0, 6:10, 6:10].unique().tolist()
        assert set(centre) <= near_ids
        assert frags.pix_to_face[0, 0, 0].item() not in near_ids
        assert frags.zbuf[0, 8, 8].item() == pytest.approx(1.0)


def test_interpenetrating_triangles_split_by_depth():
    # Two triangles crossing at x = 0: the left half of one is in front, the right half of the other.
    a = torch.tensor([[-1, -1, 1], [1, -1, -1], [0, 1, 0]], dtype=torch.float32)
    b = a * torch.tensor([1.0, 1.0, -1.0])
    frags = rasterize(torch.cat([a, b])[None], torch.tensor([[0, 1, 2], [3, 4, 5]]), 32, view=(-1, 1, -1, 1))
    row = frags.pix_to_face[0, 24]
    assert (row[4:14] == 0).all() and (row[18:28] == 1).all()


def test_orientation_not_mirrored():
    # A blob at +x, +y must land in the image's top-right corner.
    vertices, triangles = grid_mesh(2)
    moved = vertices * 0.2 + torch.tensor([0.7, 0.7, 0.0])
    frags = rasterize(moved, triangles, 20, view=(-1, 1, -1, 1))
    rows, cols = torch.nonzero(frags.mask[0], as_tuple=True)
    assert rows.float().mean() < 5 and cols.float().mean() > 15


def test_default_view_is_shared_across_the_batch():
    vertices, triangles = grid_mesh(2)
    frags = rasterize(torch.stack([vertices, vertices * 0.5]), triangles, 32)
    assert frags.mask[1].sum() < 0.4 * frags.mask[0].sum()  # half the size -> a quarter of the pixels


def test_nan_and_degenerate_triangles_are_skipped():
    vertices, triangles = grid_mesh(2)
    vertices = vertices.clone()
    vertices[0] = float("nan")
    triangles = torch.cat([triangles, torch.tensor([[1, 1, 2]])])
    frags = rasterize(vertices, triangles, 16, view=(-1, 1, -1, 1))
    assert frags.mask.any() and not frags.zbuf[frags.mask].isnan().any()
    assert not (frags.pix_to_face == 0).any()  # triangle 0 uses the NaN vertex


def test_interpolate_reproduces_linear_attribute():
    vertices, triangles = grid_mesh(3)
    frags = rasterize(vertices, triangles, 24, view=(-1.2, 1.2, -1.2, 1.2))
    out = interpolate(frags, triangles, vertices[None, :, :2])
    rows, cols = torch.nonzero(frags.mask[0], as_tuple=True)
    x = -1.2 + (cols + 0.5) / 24 * 2.4
    y = 1.2 - (rows + 0.5) / 24 * 2.4
    torch.testing.assert_close(out[0, rows, cols], torch.stack([x, y], 1), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- normals


def test_vertex_normals_of_plane_and_sphere():
    vertices, triangles = grid_mesh(3, z=0.3)
    normals = vertex_normals(vertices[None], triangles)
    torch.testing.assert_close(normals[0], torch.tensor([0.0, 0.0, 1.0]).expand_as(normals[0]))
    sv, st = sphere(3)
    sn = vertex_normals(sv, st)
    assert sn.shape == sv.shape
    assert ((sn * sv / sv.norm(dim=1, keepdim=True)).sum(1) > 0.999).all()


# ------------------------------------------------------------------------------------- shading


def test_shaded_sphere_is_brighter_towards_the_light():
    sv, st = sphere(3)
    image = render_meshes(sv, st, 64, mode="shaded")[0].float().mean(-1)
    mask = image < 255
    top_left = image[8:28, 8:28][mask[8:28, 8:28]].mean()
    bottom_right = image[36:56, 36:56][mask[36:56, 36:56]].mean()
    assert top_left > bottom_right + 40


def test_background_where_no_triangles():
    vertices, triangles = grid_mesh(2)
    small = vertices * 0.3
    shaded = render_meshes(small, triangles, 32, view=(-1, 1, -1, 1))
    assert (shaded[0, :4, :4] == 255).all() and (shaded[0, 16, 16] < 255).any()
    normals = render_meshes(small, triangles, 32, mode="normals", view=(-1, 1, -1, 1))
    assert (normals[0, :4, :4] == 0).all()
    assert normals[0, 16, 16].tolist() == [128, 128, 255]  # facing the viewer: n = (0, 0, 1)
    red = render_meshes(small, triangles, 32, background=(1, 0, 0), view=(-1, 1, -1, 1))
    assert red[0, 0, 0].tolist() == [255, 0, 0]


def test_colors_mode_and_colormap():
    vertices, triangles = grid_mesh(2)
    values = vertices[None, :, 0]  # -1 .. 1 from left to right
    colors = colormap(values, -1, 1, "viridis")
    assert colors.shape == (1, len(vertices), 3)
    import matplotlib

    np.testing.assert_allclose(colors[0, 0].numpy(), matplotlib.colormaps["viridis"](0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(colors[0, 2].numpy(), matplotlib.colormaps["viridis"](1.0)[:3], atol=1e-6)
    image = render_meshes(vertices, triangles, 32, mode="colors", vertex_colors=colors, light=(0, 0, 1))
    assert image[0, 16, 4, 2] > image[0, 16, 4, 1]  # viridis starts purple (blue > green) on the left
    assert image[0, 16, 28, 1] > image[0, 16, 28, 2]  # and ends yellow on the right


def test_supersampling_keeps_size():
    sv, st = sphere(2)
    assert render_meshes(sv, st, (20, 30), supersample=2).shape == (1, 20, 30, 3)


# -------------------------------------------------------------------------------------- images


def test_image_grid_shape_and_labels():
    images = np.zeros((5, 10, 12, 3), np.uint8)
    grid = image_grid(images, ncols=3, pad=2)
    assert grid.shape == (2 + 2 * (10 + 2), 2 + 3 * (12 + 2), 3) and grid.dtype == np.uint8
    labelled = image_grid(torch.from_numpy(images), ncols=3, labels=list("abcde"))
    assert labelled.shape[0] > grid.shape[0] and labelled.shape[1] == grid.shape[1]
    assert image_grid([images[0]]).shape == (14, 16, 3)


def test_geometry_image_to_rgb_stretches_channels():
    images = torch.stack([torch.linspace(-3, 5, 16).view(4, 4)] * 3, dim=-1)[None]
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, 0] = False
    rgb = geometry_image_to_rgb(images, mask)
    assert rgb.shape == (1, 4, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == [0, 0, 0]  # outside the mask
    assert rgb[0, 0, 1, 0] == 0 and rgb[0, 3, 3, 0] == 255  # masked min and max
    assert geometry_image_to_rgb(images.permute(0, 3, 1, 2), mask).shape == (1, 4, 4, 3)


def test_save_png_roundtrip(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), image)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary left behind


# --------------------------------------------------------------------------------------- files


def _write_quad_obj(path):
    vertices, _ = grid_mesh(2)
    lines = [f"v {x} {y} {z + 0.1 * (x * x + y * y)}" for x, y, z in vertices.tolist()]
    lines += ["f 1 2 5 4", "f 2 3 6 5", "f 4 5 8 7", "f 5 6 9 8"]  # quads, 1-based
    path.write_text("\n".join(lines) + "\n")


def test_render_files_writes_labelled_grid(tmp_path):
    import trimesh

    _write_quad_obj(tmp_path / "quads.obj")
    sv, st = sphere(2)
    trimesh.Trimesh(sv.numpy(), st.numpy(), process=False).export(tmp_path / "ball.ply")
    out = tmp_path / "grid.png"
    grid = render_files([tmp_path / "quads.obj", tmp_path / "ball.ply"], out, size=48)
    saved = np.asarray(Image.open(out))
    assert np.array_equal(saved, grid)
    assert saved.shape[1] > 2 * 2 * 48  # two files, two views each, side by side
    assert (saved < 200).any()  # something was drawn


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("broken.obj", "v 0 0 0\nv 1 0 0\nf 1 2 7\n", "does not exist"),
        ("points.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no triangles"),
        ("garbage.ply", "this is not a ply file\n", "unreadable PLY"),
        ("mesh.stl", "solid x\n", "not a mesh file"),
    ],
)
def test_render_files_errors_name_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(FaceganError) as info:
        render_files([tmp_path / name], tmp_path / "out.png")
    assert name in str(info.value) and message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out.png").exists()


def test_render_files_missing_file(tmp_path):
    with pytest.raises(FaceganError, match="missing.obj"):
        render_files([tmp_path / "missing.obj"], tmp_path / "out.png")
