"""Meshes back from geometry images (Section 3): the sparse bilinear read and the dense solve of Eq. 4.

Eq. 4 in displacement form: d = argmin |B d - p|^2 + alpha |L d|^2, with B the pixel -> surface point
interpolation and L the cotangent Laplacian; its normal equations are (B^T B + alpha L^T L) d = B^T p.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from facegan.geometry_image import GeometryImageCodec, bilinear_read
from facegan.geometry_image import reconstruct as reconstruct_module
from facegan.geometry_image.reconstruct import DenseReconstructor
from facegan.mesh.operators import cotangent_laplacian
from facegan.mesh.template import Template

from conftest import grid_plane, sphere_cap


# ---- bilinear read -------------------------------------------------------------------------------


def naive_bilinear(image, x, y):
    """Sum of pixel values weighted by the tent function max(0, 1-|x-col|) max(0, 1-|y-row|)."""
    h, w, _ = image.shape
    out = np.zeros(image.shape[-1])
    for row in range(h):
        for col in range(w):
            out += max(0.0, 1 - abs(x - col)) * max(0.0, 1 - abs(y - row)) * image[row, col]
    return out


def test_bilinear_read_matches_naive_loop():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(2, 6, 9, 3)))
    pts = np.concatenate([rng.uniform([0, 0], [8, 5], (20, 2)), [[0, 0], [8, 5], [8, 0], [0, 5], [3, 5], [8, 2.5], [4, 3]]])
    got = bilinear_read(images, torch.from_numpy(pts))
    assert got.shape == (2, len(pts), 3) and got.dtype == torch.float64
    for n in range(2):
        for k, (x, y) in enumerate(pts):
            np.testing.assert_allclose(got[n, k].numpy(), naive_bilinear(images[n].numpy(), x, y), atol=1e-12)


def test_bilinear_read_is_exact_on_affine_images_and_differentiable():
    rows, cols = np.mgrid[0:7, 0:5]
    image = np.stack([2 * cols - rows + 1, 0.5 * rows, cols + rows - 3], axis=-1).astype(np.float64)
    pts = np.random.default_rng(1).uniform([0, 0], [4, 6], (30, 2))
    images = torch.from_numpy(image[None]).requires_grad_()
    got = bilinear_read(images, torch.from_numpy(pts))[0]
    x, y = pts.T
    np.testing.assert_allclose(got.detach().numpy(), np.stack([2 * x - y + 1, 0.5 * y, x + y - 3], axis=1), atol=1e-12)
    got.sum().backward()
    np.testing.assert_allclose(images.grad.sum().item(), 30 * 3)  # weights sum to one per read


# ---- dense reconstruction: Eq. 4 against a hand-built solve ---------------------------------------


def bumpy_cap_template():
    v, f, uv = sphere_cap(rings=5, segments=12)
    v = v + np.random.default_rng(2).normal(0, 0.5, v.shape)
    return Template(v, f, uv).validate()


def hand_built_solve(template, pm, alpha, pixels):
    """spsolve of (B^T B + alpha L^T L) d = B^T p, B assembled one pixel at a time."""
    B = sp.lil_matrix((len(pm.pixels), template.n_vertices))
    for k in range(len(pm.pixels)):
        for corner, weight in zip(template.triangles[pm.triangle[k]], pm.barycentric[k]):
            B[k, corner] += weight
    B = B.tocsc()
    L = cotangent_laplacian(template.vertices, template.triangles)
    A = (B.T @ B + alpha * (L.T @ L)).tocsc()
    return np.stack([spla.spsolve(A, B.T @ p) for p in pixels])


@pytest.mark.parametrize("alpha", [0.1, 1.2])
def test_dense_reconstruction_solves_the_normal_equations(alpha, monkeypatch):
    t = bumpy_cap_template()
    codec = GeometryImageCodec(t, t.vertices, 16, alpha=alpha)
    pixels = np.random.default_rng(3).normal(0, 2, (2, len(codec.pixel_map.pixels), 3))
    expected = hand_built_solve(t, codec.pixel_map, alpha, pixels)
    monkeypatch.setattr(reconstruct_module, "_use_operator", lambda pixels: True)
    with torch.no_grad():
        got = codec.dense(torch.from_numpy(pixels)).numpy()  # the precomputed dense operator
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    monkeypatch.setattr(reconstruct_module, "_MAX_OPERATOR_ENTRIES", 0)
    factored = DenseReconstructor(t, codec.pixel_map, alpha)
    assert factored.operator is None
    with torch.no_grad():
        np.testing.assert_allclose(factored(torch.from_numpy(pixels)).numpy(), expected, atol=1e-10 * np.abs(expected).max())


def test_decode_dense_is_the_solve_plus_the_mean(cap_template):
    rng = np.random.default_rng(4)
    mean = cap_template.vertices + rng.normal(0, 1, cap_template.vertices.shape)
    codec = GeometryImageCodec(cap_template, mean, 16)
    images = torch.from_numpy(rng.normal(0, 1, (3, 16, 16, 3)))
    pixels = images.reshape(3, -1, 3)[:, codec.pixel_map.pixels].numpy()
    expected = hand_built_solve(cap_template, codec.pixel_map, codec.alpha, pixels) + mean
    with torch.no_grad():
        got = codec.decode(images, "dense").numpy()
        single = codec.decode(images[1:2], "dense").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(single[0], got[1], atol=1e-9)


def test_operator_path_and_factored_path_agree_in_value_and_gradient(monkeypatch):
    t = bumpy_cap_template()
    codec = GeometryImageCodec(t, t.vertices, 16, alpha=0.1)
    monkeypatch.setattr(reconstruct_module, "_use_operator", lambda pixels: True)
    monkeypatch.setattr(reconstruct_module, "_MAX_OPERATOR_ENTRIES", 0)
    factored = DenseReconstructor(t, codec.pixel_map, 0.1)
    pixels = torch.from_numpy(np.random.default_rng(5).normal(0, 1, (3, len(codec.pixel_map.pixels), 3)))
    weights = torch.from_numpy(np.random.default_rng(6).normal(0, 1, (3, t.n_vertices, 3)))
    results = []
    for rec in (codec.dense, factored):
        p = pixels.clone().requires_grad_()
        out = rec(p)
        (out * weights).sum().backward()
        results.append((out.detach().numpy(), p.grad.numpy()))
    (x_op, g_op), (x_f, g_f) = results
    np.testing.assert_allclose(x_op, x_f, atol=1e-5 * np.abs(x_f).max())
    np.testing.assert_allclose(g_op, g_f, atol=1e-5 * np.abs(g_f).max())


def test_cpu_batches_are_solved_without_forming_the_operator():
    t = bumpy_cap_template()
    codec = GeometryImageCodec(t, t.vertices, 16, alpha=0.1)
    rec = DenseReconstructor(t, codec.pixel_map, 0.1)
    pixels = torch.from_numpy(np.random.default_rng(9).normal(0, 1, (4, len(codec.pixel_map.pixels), 3)))
    with torch.no_grad():
        solved = rec(pixels)
    assert rec._operator is None  # formed on first use, and the CPU never uses it
    np.testing.assert_allclose(solved.numpy(), rec.by_operator(pixels).numpy(), atol=1e-5 * solved.abs().max().item())


def test_factored_path_passes_gradcheck(monkeypatch):
    v, f, uv = grid_plane(n=4)
    v[:, 2] = np.random.default_rng(7).normal(0, 1, len(v))
    t = Template(v, f, uv).validate()
    monkeypatch.setattr(reconstruct_module, "_MAX_OPERATOR_ENTRIES", 0)
    codec = GeometryImageCodec(t, t.vertices, 8, alpha=0.5)
    assert codec.dense.operator is None
    pixels = torch.from_numpy(np.random.default_rng(8).normal(0, 1, (2, len(codec.pixel_map.pixels), 3))).requires_grad_()
    assert torch.autograd.gradcheck(codec.dense, (pixels,), eps=1e-6, atol=1e-7)


# ---- round trips with a known answer ---------------------------------------------------------------


def roundtrip(codec, meshes, method, uint8=False):
    images = codec.encode(meshes).double()
    if uint8:
        images = codec.dequantize(codec.quantize(images.float())).double()
    with torch.no_grad():
        return codec.decode(images, method).numpy()


@pytest.mark.parametrize("method", ["sparse", "dense"])
@pytest.mark.parametrize("mesh", ["plane", "cap"])
def test_translations_round_trip_exactly(mesh, method):
    v, f, uv = grid_plane() if mesh == "plane" else sphere_cap()
    codec = GeometryImageCodec(Template(v, f, uv).validate(), v, 32)
    meshes = np.stack([v + [3.0, -2.0, 1.5], v - [10.0, 0.0, 4.0]])
    rec = roundtrip(codec, meshes, method)
    assert np.abs(rec - meshes).max() <= 1e-6 * np.abs(meshes - v).max()


def affine_meshes(v):
    """Two planes moved by affine displacement fields d(x) = A x + b."""
    rng = np.random.default_rng(9)
    return np.stack([v + v @ rng.normal(0, 0.3, (3, 3)).T + rng.normal(0, 2, 3) for _ in range(2)])


def test_plane_affine_field_is_exact_for_sparse_reads_inside_the_chart():
    v, f, uv = grid_plane()
    codec = GeometryImageCodec(Template(v, f, uv).validate(), v, 32)
    meshes = affine_meshes(v)
    err = np.abs(roundtrip(codec, meshes, "sparse") - meshes).max(axis=(0, 2))
    # Vertices whose four bilinear pixels all lie inside the chart: exactly reproduced. Reads that
    # touch the one-pixel ring (closest chart point, a constant extension) are off at the border.
    pm = codec.pixel_map
    inside = np.zeros(32 * 32, bool)
    inside[pm.pixels[pm.inside]] = True
    x0, y0 = np.floor(pm.vertex_pixels).astype(int).T
    footprint_inside = np.all([inside[(y0 + dy) * 32 + x0 + dx] for dy in (0, 1) for dx in (0, 1)], axis=0)
    assert footprint_inside.sum() >= 49  # the 7 x 7 interior vertices at least
    assert err[footprint_inside].max() <= 1e-6 * np.abs(meshes - v).max()


def test_plane_affine_field_is_exact_for_dense_without_regularization():
    v, f, uv = grid_plane()
    codec = GeometryImageCodec(Template(v, f, uv).validate(), v, 32, alpha=1e-9)
    meshes = affine_meshes(v)
    assert np.abs(roundtrip(codec, meshes, "dense") - meshes).max() <= 1e-5 * np.abs(meshes - v).max()


def test_plane_affine_field_dense_bias_shrinks_with_resolution():
    # With alpha > 0, |L d| is not zero at the boundary vertices for an affine d (the cotangent
    # Laplacian only annihilates linear functions at interior vertices), so Eq. 4 trades a little
    # data fit there; more pixels per triangle weigh the data term up.
    v, f, uv = grid_plane()
    template = Template(v, f, uv).validate()
    meshes = affine_meshes(v)
    errors = [np.abs(roundtrip(GeometryImageCodec(template, v, res), meshes, "dense") - meshes).max() for res in (32, 64)]
    assert errors[1] < errors[0] / 2
    assert errors[0] < 0.05 * np.abs(meshes - v).max()


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_smooth_displacement_on_a_cap_converges_with_resolution(method):
    v, f, uv = sphere_cap(rings=12, segments=32)
    codec = {res: GeometryImageCodec(Template(v, f, uv).validate(), v, res) for res in (32, 64)}
    x, y, _ = (v / 50.0).T
    disp = 3.0 * np.stack([np.sin(2 * x) * np.cos(y), x * y, np.cos(x + y)], axis=1)
    meshes = (v + disp)[None]
    err = {res: np.abs(roundtrip(c, meshes, method) - meshes).max() for res, c in codec.items()}
    assert err[64] < err[32]
    assert err[64] < 0.1 * np.abs(disp).max()


def test_sparse_read_of_a_quantized_image_is_within_half_a_step(cap_template):
    meshes = cap_template.vertices + np.random.default_rng(10).normal(0, 1, (4,) + cap_template.vertices.shape)
    codec = GeometryImageCodec(cap_template, meshes.mean(axis=0), 32)
    codec.fit_range([codec.encode(meshes)])
    step = (codec.value_range[1] - codec.value_range[0]) / 255
    diff = np.abs(roundtrip(codec, meshes, "sparse", uint8=True) - roundtrip(codec, meshes, "sparse"))
    assert (diff.max(axis=(0, 1)) <= step / 2 * (1 + 1e-4)).all()
