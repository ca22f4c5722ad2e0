"""ICT face model loading: the compact copy, an ICT-FaceKit clone (converted and cached), errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from facegan.data import ict as ict_mod
from facegan.data.emotions import ICT_EXPRESSIONS
from facegan.data.ict import NARROW_VERTICES, load_ict
from facegan.errors import FaceganError

from conftest import ICT_DIR, needs_ict  # the ICT data location and its skip mark


@needs_ict
def test_compact_copy_loads(ict):
    assert ict.neutral.shape == (26719, 3) and ict.neutral.dtype == np.float32
    assert ict.identity_modes.shape == (100, 26719, 3)
    assert ict.expression_modes.shape == (53, 26719, 3)
    assert ict.expression_names == list(ICT_EXPRESSIONS)
    assert ict.landmarks.shape == (68,) and ict.landmarks.dtype == np.int64
    assert ict.obj_path.name == "generic_neutral_mesh.obj"


@needs_ict
def test_narrow_template_in_millimetres(ict):
    t = ict.narrow_template()
    assert t.vertices.shape == (NARROW_VERTICES, 3) and t.triangles.shape == (13120, 3)
    assert len(t.landmarks) == 68 and t.landmarks.max() < NARROW_VERTICES
    # README: jaw landmarks 0 and 16 are 14.7 cm apart; nose tip at z = 13.1 cm.
    assert np.linalg.norm(t.vertices[t.landmarks[0]] - t.vertices[t.landmarks[16]]) == pytest.approx(147, abs=1)
    assert t.vertices[:, 2].max() == pytest.approx(131, abs=1)
    n = ict.narrow()
    assert n.neutral.shape == (NARROW_VERTICES, 3)
    assert n.identity_modes.shape == (100, NARROW_VERTICES, 3)
    assert n.expression_modes.shape == (53, NARROW_VERTICES, 3)
    np.testing.assert_allclose(n.neutral, t.vertices, atol=1e-3)
    np.testing.assert_allclose(n.expression_modes[5], ict.expression_modes[5, :NARROW_VERTICES] * 10, rtol=1e-6)


@needs_ict
def test_default_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEGAN_ICT", str(tmp_path))
    assert ict_mod.default_ict_path() == tmp_path
    monkeypatch.delenv("FACEGAN_ICT")
    found = ict_mod.default_ict_path()
    assert found is not None and (found / "shapes.npz").exists()


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FaceganError, match="not found"):
        load_ict(tmp_path / "nowhere")
    with pytest.raises(FaceganError, match="not an ICT face model folder"):
        load_ict(tmp_path)
    monkeypatch.setenv("FACEGAN_ICT", str(tmp_path / "missing"))
    with pytest.raises(FaceganError, match="missing"):
        load_ict()


@needs_ict
def test_compact_copy_missing_file(tmp_path):
    for name in ("shapes.npz", "generic_neutral_mesh.obj"):
        (tmp_path / name).symlink_to((ICT_DIR / name).resolve())
    with pytest.raises(FaceganError, match="vertex_indices.json: file not found"):
        load_ict(tmp_path)


# --- a tiny ICT-FaceKit clone ------------------------------------------------------------------

_GRID = 3  # 3 x 3 vertices, 4 quads


def _write_obj(path: Path, verts: np.ndarray) -> None:
    lines = ["# tiny ICT-style mesh"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {x / 2:.6f} {y / 2:.6f}" for x, y, _ in verts]
    for r in range(_GRID - 1):
        for c in range(_GRID - 1):
            a = r * _GRID + c + 1
            quad = (a, a + 1, a + _GRID + 1, a + _GRID)
            lines.append("f " + " ".join(f"{i}/{i}" for i in quad))
    path.write_text("\n".join(lines) + "\n")


def _make_clone(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """An ICT-FaceKit-like clone with 9-vertex meshes; returns the true displacements."""
    rng = np.random.default_rng(seed)
    facex = root / "FaceXModel"
    facex.mkdir(parents=True)
    ys, xs = np.mgrid[0:_GRID, 0:_GRID]
    neutral = np.stack([xs.ravel(), ys.ravel(), np.zeros(_GRID * _GRID)], axis=1).astype(np.float64)
    _write_obj(facex / "generic_neutral_mesh.obj", neutral)
    indices = {"expressions": list(ICT_EXPRESSIONS), "idx_to_landmark_verts": [0, 4, 8]}
    (facex / "vertex_indices.json").write_text(json.dumps(indices))
    identity = np.round(rng.normal(0, 0.1, (100, 9, 3)), 4)
    expression = np.round(rng.normal(0, 0.1, (53, 9, 3)), 4)
    for i in range(100):
        _write_obj(facex / f"identity{i:03d}.obj", neutral + identity[i])
    for name, d in zip(ICT_EXPRESSIONS, expression):
        _write_obj(facex / f"{name}.obj", neutral + d)
    (root / "LICENSE").write_text("MIT License (test copy)\n")
    return {"neutral": neutral, "identity": identity, "expression": expression}


def test_clone_converted_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGAN_CACHE", str(tmp_path / "cache"))
    truth = _make_clone(tmp_path / "ICT-FaceKit")
    model = load_ict(tmp_path / "ICT-FaceKit")
    np.testing.assert_allclose(model.neutral, truth["neutral"], atol=1e-6)
    np.testing.assert_allclose(model.identity_modes, truth["identity"], atol=1e-5)
    np.testing.assert_allclose(model.expression_modes, truth["expression"], atol=1e-5)
    assert model.expression_names == list(ICT_EXPRESSIONS)
    assert model.landmarks.tolist() == [0, 4, 8]
    caches = list((tmp_path / "cache").glob("ict-*"))
    assert len(caches) == 1
    cache = caches[0]
    expected = {"shapes.npz", "generic_neutral_mesh.obj", "vertex_indices.json", "LICENSE"}
    assert expected <= {p.name for p in cache.iterdir()}
    assert model.source == tmp_path / "ICT-FaceKit"

    # Second load reads the cache: no OBJ but the neutral is parsed again.
    parsed = []
    real = ict_mod.read_obj_vertices
    monkeypatch.setattr(ict_mod, "read_obj_vertices", lambda p: parsed.append(p) or real(p))
    again = load_ict(tmp_path / "ICT-FaceKit")
    assert [p.name for p in parsed] == ["generic_neutral_mesh.obj"]
    np.testing.assert_array_equal(again.expression_modes, model.expression_modes)

    # The FaceXModel folder itself is accepted too, and maps to the same cache.
    load_ict(tmp_path / "ICT-FaceKit" / "FaceXModel")
    assert len(list((tmp_path / "cache").glob("ict-*"))) == 1

    # An edited model file invalidates the cache.
    f = tmp_path / "ICT-FaceKit" / "FaceXModel" / "jawOpen.obj"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    load_ict(tmp_path / "ICT-FaceKit")
    assert len(list((tmp_path / "cache").glob("ict-*"))) == 2


def test_clone_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGAN_CACHE", str(tmp_path / "cache"))
    _make_clone(tmp_path / "clone")
    (tmp_path / "clone" / "FaceXModel" / "identity042.obj").unlink()
    with pytest.raises(FaceganError, match=r"identity042\.obj: file not found .*1 of 155"):
        load_ict(tmp_path / "clone")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("ict-*"))


def test_clone_wrong_vertex_count(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGAN_CACHE", str(tmp_path / "cache"))
    _make_clone(tmp_path / "clone")
    (tmp_path / "clone" / "FaceXModel" / "mouthSmile_L.obj").write_text("v 0 0 0\nv 1 0 0\n")
    with pytest.raises(FaceganError, match=r"mouthSmile_L\.obj: 2 vertices"):
        load_ict(tmp_path / "clone")
