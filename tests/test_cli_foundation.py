"""The command line end to end: ingest -> encode -> to-image -> to-mesh, and bad input.

Each command runs as ``python -m facegan`` in its own process; user errors must end with exit
status 1 and exactly one stderr line ``error: ...`` (no traceback), with nothing written.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from facegan.data.dataset import open_dataset
from facegan.data.encode import load_codec
from facegan.mesh.io import read_mesh_vertices

from conftest import sphere_cap, write_obj, write_ply


def start(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several small commands run side by side
    cmd = [sys.executable, "-m", "facegan", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def run_all(*commands, cwd):
    """Run commands concurrently (each is a tuple of arguments); (returncode, stdout, stderr) each."""
    return [finish(p) for p in [start(*c, cwd=cwd) for c in commands]]


def assert_ok(result):
    code, out, err = result
    assert code == 0, err
    assert err == "", "nothing on stderr (no warnings, no progress bars off a terminal)"
    assert out.startswith("wrote") or out.startswith("encoded")


def assert_user_error(result, *fragments):
    code, _, err = result
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny dataset ingested (and encoded at 64 px) from generated OBJ and PLY meshes."""
    root = tmp_path_factory.mktemp("cli")
    v, f, uv = sphere_cap()
    write_obj(root / "template.obj", v, f, uv)
    rng = np.random.default_rng(0)
    smooth = np.stack([np.sin(v[:, 0] / 20), np.cos(v[:, 1] / 25), v[:, 0] * v[:, 1] / 2500], axis=1)
    meshes = {}
    for name in ["ann/0.obj", "ann/1.ply", "ben/0.obj", "ben/1.ply", "cid/0.obj", "cid/1.obj"]:
        path = root / "meshes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        meshes[name] = verts = v + rng.normal(0, 2) * smooth + rng.normal(0, 0.5, 3)
        write_obj(path, verts, f) if path.suffix == ".obj" else write_ply(path, verts, f)
    (ingested,) = run_all(("ingest", "meshes", "--template", "template.obj", "--out", "data", "--test-fraction", "0.34"), cwd=root)
    assert_ok(ingested)
    (encoded,) = run_all(("encode", "data", "--resolution", "64"), cwd=root)
    assert_ok(encoded)
    return root, meshes


def test_ingest_and_encode_write_the_dataset(work):
    root, meshes = work
    ds = open_dataset(root / "data")
    assert ds.labels["mesh_id"] == [name.rsplit(".", 1)[0] for name in sorted(meshes)]
    assert ds.labels["identity"] == ["ann", "ann", "ben", "ben", "cid", "cid"]
    np.testing.assert_allclose(ds.meshes, np.stack([meshes[n] for n in sorted(meshes)]), atol=1e-4)
    assert (root / "data" / "images" / "res64.npy").exists()
    assert np.load(root / "data" / "images" / "res64.npy").shape == (6, 64, 64, 3)


def test_to_image_then_to_mesh(work):
    root, meshes = work
    results = run_all(
        ("to-image", "meshes/ann/0.obj", "--data", "data", "-o", "out/face.png"),
        ("to-image", "meshes/ann/1.ply", "--data", "data", "-o", "out/face.npy"),
        cwd=root,
    )
    for r in results:
        assert_ok(r)
    codec = load_codec(open_dataset(root / "data"), 64)
    png = np.asarray(Image.open(root / "out" / "face.png"))
    assert png.dtype == np.uint8 and png.shape == (64, 64, 3)
    np.testing.assert_array_equal(png, codec.quantize(codec.encode(read_mesh_vertices(root / "meshes/ann/0.obj")[None]))[0].numpy())
    npy = np.load(root / "out" / "face.npy")
    assert npy.dtype == np.float32 and npy.shape == (64, 64, 3)
    np.testing.assert_allclose(npy, codec.encode(meshes["ann/1.ply"][None])[0].numpy(), atol=1e-4)

    results = run_all(
        ("to-mesh", "out/face.png", "--data", "data", "-o", "out/dense.obj"),
        ("to-mesh", "out/face.npy", "--data", "data", "-o", "out/sparse.ply", "--method", "sparse"),
        cwd=root,
    )
    for r in results:
        assert_ok(r)
    scale = np.abs(meshes["ann/0.obj"] - codec.mean).max()
    for name, original in (("dense.obj", "ann/0.obj"), ("sparse.ply", "ann/1.ply")):
        rec = read_mesh_vertices(root / "out" / name, codec.template.n_vertices)
        assert np.abs(rec - meshes[original]).max() < 0.02 * scale, name


def test_bad_input_is_one_error_line_and_nothing_written(work, tmp_path):
    root, meshes = work
    v, f, _ = sphere_cap()
    write_obj(tmp_path / "short.obj", v[:-1], f[:-16])
    bad_folder = tmp_path / "bad_meshes"
    bad_folder.mkdir()
    write_ply(bad_folder / "a.ply", meshes["ann/1.ply"], f)
    write_ply(bad_folder / "b.ply", v[:-1], f[:-16])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "small.png")
    np.save(tmp_path / "four.npy", np.zeros((64, 64, 4), np.float32))
    results = run_all(
        ("ingest", bad_folder, "--template", "template.obj", "--out", tmp_path / "new_data"),
        ("to-image", tmp_path / "short.obj", "--data", "data", "-o", tmp_path / "short.png"),
        ("to-mesh", tmp_path / "small.png", "--data", "data", "-o", tmp_path / "small.obj"),
        ("to-mesh", tmp_path / "four.npy", "--data", "data", "-o", tmp_path / "four.obj"),
        ("to-image", "meshes/ann/0.obj", "--data", tmp_path / "no_such_data", "-o", tmp_path / "x.png"),
        cwd=root,
    )
    n = len(v)
    assert_user_error(results[0], str(bad_folder / "b.ply"), f"{n - 1} vertices, the template has {n}")
    assert_user_error(results[1], str(tmp_path / "short.obj"), f"{n - 1} vertices, the template has {n}")
    assert_user_error(results[2], str(tmp_path / "small.png"), "32 pixels high", "64x64")
    assert_user_error(results[3], str(tmp_path / "four.npy"), "64x64x4", "64x64x3")
    assert_user_error(results[4], "no_such_data", "not a facegan dataset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_meshes", "four.npy", "short.obj", "small.png"]


def test_curves_draws_a_run_log_and_refuses_other_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("iteration,epoch,seconds,img_per_s,d_loss,d_wdist,d_gp,g_loss,g_gan\n"
                                 "25,1,10,150,0.5,2.0,0.1,-3,-3\n50,2,20,151,0.4,2.1,0.1,-4,-4\n")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    ok, bad = run_all(("curves", run), ("curves", tmp_path / "other.csv", "-o", tmp_path / "other.png"), cwd=tmp_path)
    assert_ok(ok)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert_user_error(bad, "other.csv", "not a facegan training log")
    assert not (tmp_path / "other.png").exists()
