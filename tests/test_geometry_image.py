"""Geometry images (Section 3): pixel -> surface point map, encoding, quantization, codec state.

References are computed pixel by pixel with plain point-in-triangle and closest-point loops.
"""

import numpy as np
import pytest
import torch

from facegan.errors import FaceganError
from facegan.geometry_image import GeometryImageCodec, build_pixel_map, uv_to_pixels
from facegan.geometry_image import codec as codec_module
from facegan.geometry_image.gather import interpolate_displacements
from facegan.mesh.template import Template

from conftest import grid_plane, sphere_cap


def naive_vertex_pixels(uv, res):
    """The chart's bounding box scaled uniformly into [0.5, res - 1.5], centred, v pointing up."""
    lo, hi = uv.min(axis=0), uv.max(axis=0)
    scale = (res - 2) / (hi - lo).max()
    x = 0.5 + (uv[:, 0] - lo[0]) * scale + ((res - 2) - (hi[0] - lo[0]) * scale) / 2
    y = 0.5 + (uv[:, 1] - lo[1]) * scale + ((res - 2) - (hi[1] - lo[1]) * scale) / 2
    return np.stack([x, res - 1 - y], axis=1)


def barycentric_by_areas(p, a, b, c):
    area = lambda p0, p1, p2: (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p1[1] - p0[1]) * (p2[0] - p0[0])  # noqa: E731
    total = area(a, b, c)
    return np.array([area(p, b, c), area(a, p, c), area(a, b, p)]) / total


def locate(p, vp, triangles, tol):
    """First triangle containing point p (all barycentrics >= -tol), with its barycentrics."""
    for t, tri in enumerate(triangles):
        lam = barycentric_by_areas(p, *vp[tri])
        if (lam >= -tol).all():
            return t, lam
    return None, None


def boundary_edges(triangles):
    count = {}
    for t, tri in enumerate(triangles):
        for k in range(3):
            e = tuple(sorted((tri[k], tri[(k + 1) % 3])))
            count.setdefault(e, []).append(t)
    return [(e, ts[0]) for e, ts in count.items() if len(ts) == 1]


def closest_on_boundary(p, vp, edges):
    """Closest point to p on the chart's boundary edges: (distance, edge, t along the edge)."""
    best = (np.inf, None, None)
    for (i, j), _ in edges:
        a, b = vp[i], vp[j]
        t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
        d = np.linalg.norm(a + t * (b - a) - p)
        if d < best[0]:
            best = (d, (i, j), t)
    return best


def rect_chart():
    """A plane whose chart is twice as wide as high (tests the centring of the short side)."""
    v, f, uv = grid_plane(n=5, size=1.0)
    return Template(v * [20, 10, 1], f, uv * [1, 0.5]).validate()


# ---- pixel coordinates ---------------------------------------------------------------------------


@pytest.mark.parametrize("res", [8, 16, 64])
def test_uv_to_pixels_fills_the_image_up_to_a_one_pixel_border(res):
    t = rect_chart()
    vp = uv_to_pixels(t.uv, res)
    np.testing.assert_allclose(vp, naive_vertex_pixels(t.uv, res), atol=1e-12)
    assert vp[:, 0].min() == pytest.approx(0.5) and vp[:, 0].max() == pytest.approx(res - 1.5)
    assert vp[:, 1].min() + vp[:, 1].max() == pytest.approx(res - 1)  # short side centred
    top = np.argmax(t.uv[:, 1])
    assert vp[top, 1] == vp[:, 1].min(), "high v is row 0 (the top)"


# ---- pixel map vs per-pixel point location --------------------------------------------------------


@pytest.mark.parametrize("chart", ["cap", "rect"])
def test_pixel_map_matches_point_in_triangle_loop(chart):
    res = 20
    t = rect_chart() if chart == "rect" else Template(*sphere_cap()).validate()
    pm = build_pixel_map(t.uv, t.triangles, res)
    vp = naive_vertex_pixels(t.uv, res)
    np.testing.assert_allclose(pm.vertex_pixels, vp, atol=1e-12)
    where = {int(p): k for k, p in enumerate(pm.pixels)}
    assert np.all(np.diff(pm.pixels) > 0), "row-major order"
    n_strict = 0
    for row in range(res):
        for col in range(res):
            p = np.array([col, row], dtype=float)
            tri, lam = locate(p, vp, t.triangles, tol=-1e-9)  # strictly inside
            k = where.get(row * res + col)
            if tri is not None:
                n_strict += 1
                assert k is not None and pm.inside[k], (row, col)
                assert pm.triangle[k] == tri
                np.testing.assert_allclose(pm.barycentric[k], lam, atol=1e-9)
            elif locate(p, vp, t.triangles, tol=1e-9)[0] is None:  # clearly outside the chart
                assert k is None or not pm.inside[k]
    assert n_strict > 0.5 * pm.inside.sum()
    assert pm.mask.sum() == len(pm.pixels) == pm.mask.ravel()[pm.pixels].sum()


def test_ring_pixels_hold_the_closest_chart_point_within_one_pixel():
    res = 20
    t = Template(*sphere_cap()).validate()
    pm = build_pixel_map(t.uv, t.triangles, res)
    vp = pm.vertex_pixels
    edges = boundary_edges(t.triangles)
    inside = np.zeros((res, res), bool)
    inside.ravel()[pm.pixels[pm.inside]] = True
    near = inside.copy()  # the inside pixels and the four pixels around each vertex
    for x, y in vp:
        near[int(np.floor(y)) : int(np.floor(y)) + 2, int(np.floor(x)) : int(np.floor(x)) + 2] = True
    for row in range(res):
        for col in range(res):
            if inside[row, col]:
                continue
            within_one = near[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].any()
            assert pm.mask[row, col] == within_one, (row, col)
    for k in np.flatnonzero(~pm.inside):
        centre = np.array([pm.pixels[k] % res, pm.pixels[k] // res], dtype=float)
        stored = pm.barycentric[k] @ vp[t.triangles[pm.triangle[k]]]
        d, _, _ = closest_on_boundary(centre, vp, edges)
        assert np.linalg.norm(stored - centre) == pytest.approx(d, abs=1e-9)
        assert d <= 2 * np.sqrt(2)  # one pixel (Chebyshev) from a chart pixel or a vertex's footprint


@pytest.mark.parametrize("res", [8, 16, 33])
def test_bilinear_footprint_of_every_vertex_lies_in_the_mask(res):
    t = Template(*sphere_cap()).validate()
    pm = build_pixel_map(t.uv, t.triangles, res)
    x0, y0 = np.floor(pm.vertex_pixels).astype(int).T
    for dy in (0, 1):
        for dx in (0, 1):
            assert pm.mask[y0 + dy, x0 + dx].all()
    assert (pm.barycentric >= 0).all()
    np.testing.assert_allclose(pm.barycentric.sum(axis=1), 1, atol=1e-12)


# ---- encoding ------------------------------------------------------------------------------------


def naive_encode(mesh, mean, template, res):
    """Per pixel: the displacement (mesh - mean) at the surface point under the pixel centre, the
    closest chart point for pixels within one pixel of the chart, zero elsewhere."""
    vp = naive_vertex_pixels(template.uv, res)
    edges = boundary_edges(template.triangles)
    pm = build_pixel_map(template.uv, template.triangles, res)  # only its mask is used
    disp = mesh - mean
    out = np.zeros((res, res, 3))
    for row in range(res):
        for col in range(res):
            if not pm.mask[row, col]:
                continue
            p = np.array([col, row], dtype=float)
            tri, lam = locate(p, vp, template.triangles, tol=1e-9)
            if tri is not None:
                out[row, col] = lam @ disp[template.triangles[tri]]
            else:
                _, (i, j), s = closest_on_boundary(p, vp, edges)
                out[row, col] = (1 - s) * disp[i] + s * disp[j]
    return out


def random_faces(template, n, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    return template.vertices + rng.normal(0, scale, (n,) + template.vertices.shape)


def test_encode_matches_per_pixel_loop(cap_template):
    res = 16
    meshes = random_faces(cap_template, 3)
    mean = meshes.mean(axis=0)
    codec = GeometryImageCodec(cap_template, mean, res)
    images = codec.encode(meshes)
    assert images.shape == (3, res, res, 3) and images.dtype == torch.float32
    for k in range(3):
        np.testing.assert_allclose(images[k].numpy(), naive_encode(meshes[k], mean, cap_template, res), atol=2e-4)


def test_gather_kernel_matches_a_loop_over_meshes_and_pixels():
    rng = np.random.default_rng(0)
    meshes = rng.normal(size=(5, 30, 3)).astype(np.float32)
    corners = rng.integers(0, 30, (3, 40)).astype(np.int32)
    weights = rng.random((3, 40)).astype(np.float32)
    weights[:, :4] = 0  # pixels outside the chart: no weights, so -mean_image
    mean_image = rng.normal(size=(40, 3)).astype(np.float32)
    out = np.empty((5, 40, 3), np.float32)
    interpolate_displacements(meshes, corners, weights, mean_image, out)
    expected = np.zeros_like(out)
    for m in range(5):
        for p in range(40):
            expected[m, p] = sum(weights[j, p] * meshes[m, corners[j, p]] for j in range(3)) - mean_image[p]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_encode_of_the_mean_is_zero_and_outside_the_mask_is_zero(cap_template):
    codec = GeometryImageCodec(cap_template, cap_template.vertices, 32)
    images = codec.encode(np.stack([cap_template.vertices, random_faces(cap_template, 1)[0]]))
    np.testing.assert_allclose(images[0].numpy(), 0, atol=1e-5)
    assert (images[1][torch.from_numpy(~codec.mask)] == 0).all()


def test_encode_is_the_same_in_chunks_and_for_tensors(cap_template, monkeypatch):
    meshes = random_faces(cap_template, 5, seed=3)
    codec = GeometryImageCodec(cap_template, cap_template.vertices, 24)
    whole = codec.encode(meshes)
    monkeypatch.setattr(codec_module, "_ENCODE_CHUNK", 2)
    np.testing.assert_array_equal(codec.encode(meshes).numpy(), whole.numpy())
    np.testing.assert_array_equal(codec.encode(torch.from_numpy(meshes)).numpy(), whole.numpy())
    for k in range(5):
        np.testing.assert_array_equal(codec.encode(meshes[k : k + 1])[0].numpy(), whole[k].numpy())


# ---- quantization --------------------------------------------------------------------------------


@pytest.fixture
def fitted(cap_template):
    meshes = random_faces(cap_template, 8, seed=4)
    codec = GeometryImageCodec(cap_template, meshes.mean(axis=0), 32)
    images = codec.encode(meshes)
    codec.fit_range([images[:5], images[5:]])
    return codec, images


def test_fit_range_is_min_max_over_mask_pixels_plus_headroom(fitted):
    codec, images = fitted
    px = images[:, torch.from_numpy(codec.mask)].double().numpy()
    lo, hi = px.min(axis=(0, 1)), px.max(axis=(0, 1))
    pad = codec_module.RANGE_HEADROOM * (hi - lo)
    np.testing.assert_allclose(codec.value_range, np.stack([lo - pad, hi + pad]))


def test_quantization_error_is_at_most_half_a_step_per_channel(fitted):
    codec, images = fitted
    q = codec.quantize(images)
    assert q.dtype == torch.uint8
    mask = torch.from_numpy(codec.mask)
    assert (q[:, ~mask] == 0).all()
    back = codec.dequantize(q)
    assert (back[:, ~mask] == 0).all()
    step = (codec.value_range[1] - codec.value_range[0]) / 255
    err = (back - images)[:, mask].abs().amax(dim=(0, 1)).double().numpy()
    assert (err <= step / 2 * (1 + 1e-4)).all(), (err, step / 2)
    assert (err > step / 4).all(), "the bound is tight, not vacuous"


def test_quantization_clamps_values_outside_the_range(fitted):
    codec, images = fitted
    lo, hi = codec.value_range
    mask = torch.from_numpy(codec.mask)
    far = torch.zeros_like(images[:2])
    far[0, mask] = torch.as_tensor(hi + 100, dtype=torch.float32)
    far[1, mask] = torch.as_tensor(lo - 100, dtype=torch.float32)
    q = codec.quantize(far)
    assert (q[0, mask] == 255).all() and (q[1, mask] == 0).all()


def test_network_form_spans_the_range(fitted):
    codec, _ = fitted
    lo, hi = codec.value_range
    ones = torch.ones(1, 32, 32, 3)
    mask = torch.from_numpy(codec.mask)
    np.testing.assert_allclose(codec.from_network(-ones)[0, mask].numpy(), np.broadcast_to(lo, (mask.sum(), 3)), rtol=1e-6)
    np.testing.assert_allclose(codec.from_network(ones)[0, mask].numpy(), np.broadcast_to(hi, (mask.sum(), 3)), rtol=1e-6)
    x = torch.zeros(1, 32, 32, 3, requires_grad=True)
    codec.from_network(x).sum().backward()
    assert x.grad is not None and (x.grad[0, ~mask] == 0).all()


def test_quantize_without_a_range_is_an_error(cap_template):
    codec = GeometryImageCodec(cap_template, cap_template.vertices, 16)
    with pytest.raises(FaceganError, match="no quantization range"):
        codec.quantize(torch.zeros(1, 16, 16, 3))
    with pytest.raises(FaceganError, match="no quantization range"):
        codec.to_state()


def test_state_round_trip_rebuilds_the_same_codec(fitted):
    codec, images = fitted
    tensors, meta = codec.to_state()
    again = GeometryImageCodec.from_state(tensors, meta)
    assert again.resolution == codec.resolution and again.alpha == codec.alpha
    np.testing.assert_array_equal(again.value_range, codec.value_range)
    np.testing.assert_array_equal(again.template.triangles, codec.template.triangles)
    meshes = random_faces(codec.template, 2, seed=9)
    np.testing.assert_array_equal(again.encode(meshes).numpy(), codec.encode(meshes).numpy())
    np.testing.assert_array_equal(again.quantize(images).numpy(), codec.quantize(images).numpy())
    with torch.no_grad():
        np.testing.assert_allclose(again.decode(images).numpy(), codec.decode(images).numpy(), atol=1e-5)


def test_unknown_decode_method_is_an_error(fitted):
    codec, images = fitted
    with pytest.raises(FaceganError, match="unknown reconstruction method"):
        codec.decode(images, "nearest")
