"""Differential operators against their textbook definitions, computed one triangle at a time."""

import igl
import numpy as np
import pytest

from facegan.mesh.operators import cotangent_laplacian, triangle_areas, uv_signed_areas

from conftest import grid_plane, sphere_cap


def naive_cotangent_laplacian(vertices, triangles):
    """C[i, j] = (cot a_ij + cot b_ij) / 2 for each edge, C[i, i] = -sum_j C[i, j]."""
    n = len(vertices)
    C = np.zeros((n, n))
    for tri in triangles:
        for k in range(3):
            o, i, j = tri[k], tri[(k + 1) % 3], tri[(k + 2) % 3]  # the angle at o faces edge (i, j)
            e1, e2 = vertices[i] - vertices[o], vertices[j] - vertices[o]
            cot = np.dot(e1, e2) / np.linalg.norm(np.cross(e1, e2))
            C[i, j] += cot / 2
            C[j, i] += cot / 2
    C[np.diag_indices(n)] = -C.sum(axis=1)
    return C


def bumpy_cap():
    v, f, _ = sphere_cap(rings=4, segments=9)
    rng = np.random.default_rng(1)
    return v + rng.normal(0, 1.0, v.shape), f


@pytest.mark.parametrize("mesh", [sphere_cap()[:2], grid_plane(n=5)[:2], bumpy_cap()], ids=["cap", "plane", "bumpy"])
def test_cotangent_laplacian_matches_per_triangle_loop(mesh):
    v, f = mesh
    C = cotangent_laplacian(v, f)
    np.testing.assert_allclose(C.toarray(), naive_cotangent_laplacian(v, f), atol=1e-12)


def test_cotangent_laplacian_is_symmetric_negative_semidefinite_with_zero_row_sums(cap):
    v, f, _ = cap
    C = cotangent_laplacian(v, f).toarray()
    np.testing.assert_allclose(C, C.T, atol=1e-12)
    np.testing.assert_allclose(C.sum(axis=1), 0, atol=1e-12)
    assert np.linalg.eigvalsh(C).max() < 1e-9


def test_cotangent_laplacian_annihilates_linear_functions_at_interior_vertices():
    v, f, _ = grid_plane(n=6)
    rng = np.random.default_rng(2)
    v[:, :2] += rng.uniform(-0.3, 0.3, (len(v), 2))  # irregular but flat
    field = v @ rng.normal(size=(3, 4)) + rng.normal(size=4)  # 4 affine functions of position
    Lf = cotangent_laplacian(v, f) @ field
    boundary = np.unique(igl.boundary_facets(f)[0])
    interior = np.setdiff1d(np.arange(len(v)), boundary)
    np.testing.assert_allclose(Lf[interior], 0, atol=1e-10)
    # Constants are in the kernel everywhere (rows sum to zero).
    np.testing.assert_allclose(cotangent_laplacian(v, f) @ np.ones(len(v)), 0, atol=1e-12)


def test_cotangent_laplacian_weights_are_dimensionless(cap):
    v, f, _ = cap
    np.testing.assert_allclose(cotangent_laplacian(1000 * v, f).toarray(), cotangent_laplacian(v, f).toarray(), atol=1e-9)


def test_triangle_areas_match_heron():
    v, f = bumpy_cap()
    heron = []
    for tri in f:
        a, b, c = (np.linalg.norm(v[tri[i]] - v[tri[(i + 1) % 3]]) for i in range(3))
        s = (a + b + c) / 2
        heron.append(np.sqrt(s * (s - a) * (s - b) * (s - c)))
    np.testing.assert_allclose(triangle_areas(v, f), heron, rtol=1e-9)


def test_uv_signed_areas_are_positive_counter_clockwise():
    uv = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert uv_signed_areas(uv, np.array([[0, 1, 2]])).tolist() == [1.0]
    assert uv_signed_areas(uv, np.array([[0, 2, 1]])).tolist() == [-1.0]
    v, f, uv = grid_plane(n=4, size=3.0)
    np.testing.assert_allclose(uv_signed_areas(uv, f), triangle_areas(v / 3.0, f))
