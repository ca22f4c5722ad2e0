"""The template (Section 3): one fixed topology with one UV chart shared by every registered face."""

import igl
import numpy as np
import pytest
import trimesh

from facegan.errors import FaceganError
from facegan.mesh.io import read_mesh_vertices, read_obj, write_mesh
from facegan.mesh.operators import uv_signed_areas
from facegan.mesh.template import Template, load_template, parameterize

from conftest import grid_plane, sphere_cap, write_obj


def write_text(path, text):
    path.write_text(text)
    return path


def assert_valid_chart(t: Template):
    assert t.uv.shape == (t.n_vertices, 2)
    assert np.isfinite(t.uv).all()
    assert (uv_signed_areas(t.uv, t.triangles) > 0).all(), "every triangle counter-clockwise in UV"


def test_uv_template_loads_as_written(tmp_path):
    v, f, uv = sphere_cap()
    t = load_template(write_obj(tmp_path / "t.obj", v, f, uv))
    np.testing.assert_allclose(t.vertices, v)
    np.testing.assert_array_equal(t.triangles, f)
    np.testing.assert_allclose(t.uv, uv)
    assert t.vertices.dtype == np.float64 and t.triangles.dtype == np.int64
    assert len(t.landmarks) == 0


def test_quads_are_split_into_two_triangles_covering_the_quad(tmp_path):
    v, _, uv = grid_plane(n=3, size=1.0)
    idx = np.arange(9).reshape(3, 3)
    quads = [[idx[r, c], idx[r, c + 1], idx[r + 1, c + 1], idx[r + 1, c]] for r in range(2) for c in range(2)]
    t = load_template(write_obj(tmp_path / "quads.obj", v, quads, uv))
    assert t.triangles.shape == (8, 3)
    for k, quad in enumerate(quads):  # fan split: quad k becomes triangles 2k and 2k + 1
        pair = t.triangles[2 * k : 2 * k + 2]
        assert set(pair.ravel()) == set(quad)
        assert uv_signed_areas(t.uv, pair).sum() == pytest.approx(0.25)
    assert_valid_chart(t)


def test_seam_vertices_with_identical_uvs_are_merged(tmp_path):
    v, f, uv = sphere_cap()
    # One vt line per face corner: every vertex carries several vt entries with the same coordinates.
    corner_uv = uv[f.ravel()]
    face_uv = np.arange(len(corner_uv)).reshape(-1, 3)
    t = load_template(write_obj(tmp_path / "seams.obj", v, f, corner_uv, face_uv))
    assert t.n_vertices == len(v)
    np.testing.assert_allclose(t.uv, uv)
    assert_valid_chart(t)


def test_different_uvs_on_one_vertex_are_a_cut_chart(tmp_path):
    v, f, uv = sphere_cap()
    corner_uv = uv[f.ravel()]
    face_uv = np.arange(len(corner_uv)).reshape(-1, 3)
    corner = int(np.flatnonzero(f.ravel() == 5)[0])
    corner_uv[corner] += 0.01  # vertex 5 now has two different UVs
    path = write_obj(tmp_path / "cut.obj", v, f, corner_uv, face_uv)
    with pytest.raises(FaceganError, match="several different UVs") as err:
        load_template(path)
    assert str(path) in str(err.value)
    assert "vertex 5" in str(err.value)


def test_flipped_uv_triangle_is_an_error(tmp_path):
    v, f, uv = grid_plane(n=5, size=1.0)
    uv = uv.copy()
    uv[12, 0] += 0.4  # the centre vertex crosses its right neighbour: the triangles around it fold
    path = write_obj(tmp_path / "flipped.obj", v, f, uv)
    with pytest.raises(FaceganError, match="flipped") as err:
        load_template(path)
    assert str(path) in str(err.value)


def test_clockwise_faces_are_reoriented(tmp_path):
    v, f, uv = sphere_cap()
    t = load_template(write_obj(tmp_path / "cw.obj", v, f[:, ::-1], uv))
    assert_valid_chart(t)
    assert sorted(map(sorted, t.triangles.tolist())) == sorted(map(sorted, f.tolist()))


def test_two_disconnected_pieces_are_an_error(tmp_path):
    v, f, uv = grid_plane(n=3, size=1.0)
    v2, f2, uv2 = np.concatenate([v, v + [2, 0, 0]]), np.concatenate([f, f + len(v)]), np.concatenate([uv, uv + [2, 0]])
    with pytest.raises(FaceganError, match="2 connected pieces"):
        load_template(write_obj(tmp_path / "two.obj", v2, f2, uv2))
    with pytest.raises(FaceganError, match="not disk-shaped"):
        load_template(write_obj(tmp_path / "two_nouv.obj", v2, f2))


def test_unused_vertex_and_bad_landmarks_are_errors(tmp_path):
    v, f, uv = grid_plane(n=3, size=1.0)
    with pytest.raises(FaceganError, match="1 vertices belong to no triangle"):
        load_template(write_obj(tmp_path / "extra.obj", np.concatenate([v, [[5, 5, 5]]]), f, np.concatenate([uv, [[2, 2]]])))
    path = write_obj(tmp_path / "t.obj", v, f, uv)
    with pytest.raises(FaceganError, match="landmark"):
        load_template(path, landmarks=np.array([0, 9]))
    assert load_template(path, landmarks=np.array([0, 8])).landmarks.tolist() == [0, 8]


def test_missing_and_faceless_files_are_errors(tmp_path):
    with pytest.raises(FaceganError, match="file not found"):
        load_template(tmp_path / "nope.obj")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(FaceganError, match="no faces"):
        load_template(tmp_path / "points.obj")


def test_keep_vertices_keeps_the_faces_made_of_them(tmp_path):
    v, f, uv = grid_plane(n=4, size=1.0)
    t = load_template(write_obj(tmp_path / "t.obj", v, f, uv), keep_vertices=12)  # the first 3 rows
    assert t.n_vertices == 12
    assert t.triangles.max() < 12 and len(t.triangles) == 2 * 3 * 2
    assert_valid_chart(t)


def test_save_and_reload_is_the_same_template(tmp_path, cap_template):
    cap_template.save_obj(tmp_path / "saved.obj")
    t = load_template(tmp_path / "saved.obj")
    np.testing.assert_array_equal(t.triangles, cap_template.triangles)
    np.testing.assert_allclose(t.vertices, cap_template.vertices, atol=1e-6)
    np.testing.assert_allclose(t.uv, cap_template.uv, atol=1e-8)


# ---- templates without UVs: parameterization ------------------------------------------------------


def test_disk_mesh_without_uv_gets_a_valid_chart(tmp_path):
    v, f, _ = sphere_cap()
    t = load_template(write_obj(tmp_path / "nouv.obj", v, f))
    assert_valid_chart(t)
    assert t.uv.min() == pytest.approx(0.0) and t.uv.max() == pytest.approx(1.0)
    assert (t.uv >= -1e-12).all() and (t.uv <= 1 + 1e-12).all()


def test_lscm_of_a_flat_mesh_is_a_similarity_of_the_plane():
    v, f, _ = grid_plane(n=6, size=3.0)
    rng = np.random.default_rng(0)
    v[:, :2] += rng.uniform(-0.1, 0.1, (len(v), 2))  # irregular, still flat
    uv = parameterize(v, f)
    # Conformal on a flat mesh: uv = s R xy + t exactly (least squares fit in complex form).
    z, w = v[:, 0] + 1j * v[:, 1], uv[:, 0] + 1j * uv[:, 1]
    A = np.stack([z, np.ones_like(z)], axis=1)
    coef = np.linalg.lstsq(A, w, rcond=None)[0]
    np.testing.assert_allclose(A @ coef, w, atol=1e-9)
    assert (uv_signed_areas(uv, f) > 0).all()


def _plane_with_hole():
    v, f, _ = grid_plane(n=7, size=6.0)
    centre = v[f].mean(axis=1)
    keep = ~((np.abs(centre[:, 0] - 3) < 1) & (np.abs(centre[:, 1] - 3.5) < 0.5))  # remove two cells
    return v, f[keep]


def test_tutte_fallback_when_lscm_folds(monkeypatch):
    v, f = _plane_with_hole()
    v = v + np.array([0, 0, 1]) * np.sin(v[:, :1])  # bent, with a hole: a disk with one hole
    calls = []

    def folding_lscm(V, F, b, bc):
        calls.append(1)
        return np.zeros((len(V), 2)), True  # everything collapsed: degenerate

    monkeypatch.setattr(igl, "lscm", folding_lscm)
    uv = parameterize(v, f)
    assert calls
    assert np.isfinite(uv).all() and (uv_signed_areas(uv, f) > 0).all()
    # Tutte's embedding puts the outer boundary on a circle.
    outer = max(igl.boundary_loop_all(f), key=len)
    p = uv[outer]
    a, b, c = np.linalg.lstsq(np.c_[2 * p, np.ones(len(p))], (p**2).sum(axis=1), rcond=None)[0]
    np.testing.assert_allclose(np.linalg.norm(p - [a, b], axis=1), np.sqrt(c + a * a + b * b), rtol=1e-9)


def test_disk_with_a_hole_is_accepted():
    v, f = _plane_with_hole()
    uv = parameterize(v, f)
    assert (uv_signed_areas(uv, f) > 0).all()


@pytest.mark.parametrize(
    "mesh",
    [trimesh.creation.icosphere(subdivisions=1), trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])],
    ids=["icosphere", "tetrahedron"],
)
def test_closed_mesh_without_uv_is_not_disk_shaped(tmp_path, mesh):
    path = write_obj(tmp_path / "closed.obj", mesh.vertices, mesh.faces)
    with pytest.raises(FaceganError, match="not disk-shaped") as err:
        load_template(path)
    assert str(path) in str(err.value)


def test_torus_with_a_boundary_is_not_disk_shaped():
    n = 8
    idx = np.arange(n * n).reshape(n, n)
    a, b = idx, np.roll(idx, -1, axis=1)
    c, d = np.roll(b, -1, axis=0), np.roll(a, -1, axis=0)
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])[1:]  # one triangle cut out
    s, t = np.meshgrid(np.arange(n) * 2 * np.pi / n, np.arange(n) * 2 * np.pi / n)
    v = np.stack([(2 + np.cos(t)) * np.cos(s), (2 + np.cos(t)) * np.sin(s), np.sin(t)], -1).reshape(-1, 3)
    with pytest.raises(FaceganError, match="genus 1"):
        parameterize(v, f)


def test_non_manifold_edge_is_not_disk_shaped():
    v = np.array([[0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -1, 0], [0.5, 0, 1]], dtype=float)
    f = np.array([[0, 1, 2], [1, 0, 3], [0, 1, 4]])  # edge 0-1 shared by three triangles
    with pytest.raises(FaceganError, match="non-manifold"):
        parameterize(v, f)


# ---- mesh files ------------------------------------------------------------------------------------


def test_read_obj_face_corner_forms(tmp_path):
    text = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nvn 0 0 1\n"
    text += "f 1/1/1 2/2/1 3/3/1\nf -3/-3 -1/-1 -2/-2\n"
    t = load_template(write_text(tmp_path / "forms.obj", text))
    np.testing.assert_array_equal(t.triangles, [[0, 1, 2], [1, 3, 2]])
    np.testing.assert_allclose(t.uv, [[0, 0], [1, 0], [0, 1], [1, 1]])
    obj = read_obj(write_text(tmp_path / "normals.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1//1 2//1 3//1\n"))
    assert obj.polygons[0].tolist() == [[0, -1], [1, -1], [2, -1]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n", "vertex that does not exist"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/2 3/1\n", "texture coordinate that does not exist"),
        ("v 0 0 0\nv 1 0 zero\nv 0 1 0\nf 1 2 3\n", "malformed OBJ near line 2"),
        ("v 0 0 0\nv 1 0 0\nv 0 1\nv 1 1 0\n", "near line 3 \\(2 numbers where 3 are needed"),
        ("v 0 0\nv 1 0\nv 0 1\n", "near line 1"),  # 6 numbers: not two vertices
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0\nvt 1\n", "near line 4"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\nf 1 2\n", "near line 5 \\(a face with 2 corners"),  # truncated face
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\nf \n", "near line 5"),
    ],
    ids=["vertex-index", "vt-index", "bad-number", "short-vertex", "2d-vertices", "1d-uv", "short-face", "empty-face"],
)
def test_malformed_obj_is_an_error_naming_the_file(tmp_path, text, message):
    path = write_text(tmp_path / "bad.obj", text)
    with pytest.raises(FaceganError, match=message) as err:
        read_obj(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_write_mesh_round_trip_and_checks(tmp_path, suffix):
    v, f, uv = sphere_cap()
    path = tmp_path / f"m{suffix}"
    write_mesh(path, v, f, uv=uv if suffix == ".obj" else None)
    np.testing.assert_allclose(read_mesh_vertices(path, len(v)), v, atol=1e-5)
    with pytest.raises(FaceganError, match=f"{len(v)} vertices, the template has {len(v) + 1}"):
        read_mesh_vertices(path, len(v) + 1)
    bad = v.copy()
    bad[[2, 7], 0] = [np.nan, np.inf]
    write_mesh(tmp_path / f"nan{suffix}", bad, f)
    with pytest.raises(FaceganError, match="2 vertices have NaN or infinite coordinates"):
        read_mesh_vertices(tmp_path / f"nan{suffix}")


def test_mesh_file_errors(tmp_path):
    v, f, _ = sphere_cap()
    with pytest.raises(FaceganError, match="unknown mesh format"):
        write_mesh(tmp_path / "m.stl", v, f)
    assert list(tmp_path.iterdir()) == [], "nothing half-written"
    with pytest.raises(FaceganError, match="not a mesh file"):
        read_mesh_vertices(write_text(tmp_path / "m.txt", "v 0 0 0\n"))
    with pytest.raises(FaceganError, match="no vertices"):
        read_mesh_vertices(write_text(tmp_path / "empty.obj", "# nothing\n"))
    with pytest.raises(FaceganError, match="file not found"):
        read_mesh_vertices(tmp_path / "missing.ply")
