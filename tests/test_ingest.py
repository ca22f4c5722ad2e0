"""Ingest: a folder of registered OBJ/PLY meshes (plain or CoMA layout) becomes a dataset."""

import os

import numpy as np
import pytest

from facegan.data.ingest import ingest
from facegan.errors import FaceganError
from facegan.mesh.template import load_template

from conftest import write_obj, write_ply


@pytest.fixture
def template(cap_obj):
    return load_template(cap_obj)


def face(template, seed):
    return template.vertices + np.random.default_rng(seed).normal(0, 1, template.vertices.shape)


def write_face(path, template, vertices, binary=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".obj":
        return write_obj(path, vertices, template.triangles)
    return write_ply(path, vertices, template.triangles, binary=binary)


@pytest.fixture
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "data"


def assert_refused(out, call, *messages):
    with pytest.raises(FaceganError) as err:
        call()
    for m in messages:
        assert m in str(err.value)
    assert not out.exists()
    assert os.listdir(out.parent) == [], "no temporary leftovers beside the output"
    return str(err.value)


@pytest.fixture
def folder(tmp_path, template):
    """alice/{neutral.obj, smile.ply}, bob/{neutral.ply (binary), smile.obj}, carol/neutral.obj."""
    root = tmp_path / "meshes"
    meshes = {}
    for seed, (name, binary) in enumerate(
        [("alice/neutral.obj", False), ("alice/smile.ply", False), ("bob/neutral.ply", True), ("bob/smile.obj", False), ("carol/neutral.obj", False)]
    ):
        meshes[name.rsplit(".", 1)[0]] = v = face(template, seed)
        write_face(root / name, template, v, binary=binary)
    return root, meshes


def test_folder_of_obj_and_ply_with_labels_csv(folder, cap_obj, tmp_path, out):
    root, meshes = folder
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "mesh_id,identity,expression,split\n"
        "alice/neutral,alice,neutral,train\nalice/smile,alice,happy,train\n"
        "bob/neutral,bob,neutral,test\nbob/smile,bob,,test\n"  # carol/neutral not listed: unlabeled, train
    )
    ds = ingest(root, cap_obj, out, labels, progress=False)
    assert ds.labels["mesh_id"] == ["alice/neutral", "alice/smile", "bob/neutral", "bob/smile", "carol/neutral"]
    assert ds.labels["identity"] == ["alice", "alice", "bob", "bob", ""]
    assert ds.labels["expression"] == ["neutral", "happy", "neutral", "", ""]
    assert ds.labels["split"] == ["train", "train", "test", "test", "train"]
    expected = np.stack([meshes[i] for i in ds.labels["mesh_id"]]).astype(np.float32)
    np.testing.assert_array_equal(ds.meshes, expected)
    np.testing.assert_array_equal(ds.template.triangles, load_template(cap_obj).triangles)
    assert ds.info["provenance"]["source"] == "ingest"


def test_labels_by_file_name_and_split_by_identity(folder, cap_obj, tmp_path, out):
    root, _ = folder
    labels = tmp_path / "labels.csv"
    labels.write_text("file,identity,expression\nalice/neutral.obj,alice,neutral\nbob/smile.obj,bob,happy\n")
    ds = ingest(root, cap_obj, out, labels, test_fraction=0.5, seed=1, progress=False)
    assert ds.labels["expression"] == ["neutral", "", "", "happy", ""]
    assert ds.labels["identity"] == ["alice", "", "", "bob", ""]
    split = dict(zip(ds.labels["mesh_id"], ds.labels["split"]))
    assert {split["alice/neutral"], split["bob/smile"]} == {"train", "test"}  # one of two identities held out


def test_without_labels_identity_is_the_sub_folder(folder, cap_obj, template, out):
    root, _ = folder
    write_face(root / "loose.obj", template, face(template, 9))
    ds = ingest(root, cap_obj, out, test_fraction=0.34, progress=False)
    assert ds.labels["identity"] == ["alice", "alice", "bob", "bob", "carol", ""]
    assert ds.labels["expression"] == [""] * 6
    by_identity = {}
    for identity, split in zip(ds.labels["identity"], ds.labels["split"]):
        by_identity.setdefault(identity, set()).add(split)
    assert all(len(s) == 1 for s in by_identity.values()), "whole identities are held out"
    assert sum(s == {"test"} for i, s in by_identity.items() if i) == 1
    assert by_identity[""] == {"train"}


def test_split_by_identity_holds_out_a_fraction_deterministically(tmp_path, cap_obj, template):
    root = tmp_path / "many"
    for i in range(10):
        write_face(root / f"id{i}" / "m.ply", template, face(template, i), binary=True)
    splits = []
    for k in range(2):
        ds = ingest(root, cap_obj, tmp_path / f"d{k}", test_fraction=0.2, seed=3, progress=False)
        splits.append(ds.labels["split"])
    assert splits[0] == splits[1]
    assert splits[0].count("test") == 2


def test_coma_layout_labels_first_last_and_peak_frames(tmp_path, cap_obj, template, out):
    root = tmp_path / "coma"
    amplitude = {"bareteeth": [0, 1, 3, 1, 0.2], "mouth_open": [0, 2, 2.5, 4, 1, 0]}
    direction = np.random.default_rng(0).normal(0, 1, template.vertices.shape)
    for subject in ("FaceTalk_1", "FaceTalk_2"):
        base = face(template, len(subject))
        for sequence, amps in amplitude.items():
            for frame, a in enumerate(amps):
                write_face(root / subject / sequence / f"{sequence}.{frame:06d}.ply", template, base + a * direction)
    ds = ingest(root, cap_obj, out, progress=False)
    labels = ds.labels
    assert len(labels) == 22
    rows = list(zip(labels["mesh_id"], labels["identity"], labels["expression"], labels["sequence"]))
    first = rows[:5]  # FaceTalk_1/bareteeth
    assert [r[2] for r in first] == ["neutral", "", "bareteeth", "", "neutral"]
    assert all(r[1] == "FaceTalk_1" and r[3] == "bareteeth" for r in first)
    second = rows[5:11]  # FaceTalk_1/mouth_open: the peak is frame 3
    assert [r[2] for r in second] == ["neutral", "", "", "mouth_open", "", "neutral"]
    assert rows[11][0] == "FaceTalk_2/bareteeth/bareteeth.000000"
    split = labels["split"]
    assert len(set(split[:11])) == len(set(split[11:])) == 1 and split[0] != split[11], "one subject held out"


# ---- bad input: an error naming the problem, and no dataset ---------------------------------------


def test_mesh_with_another_vertex_count(folder, cap_obj, template, out):
    root, _ = folder
    bad = write_face(root / "bob" / "smile.obj", template, face(template, 0))
    bad.write_text(bad.read_text().replace("v ", "v 1 2 3\nv ", 1))
    assert_refused(out, lambda: ingest(root, cap_obj, out, progress=False), str(bad), f"{template.n_vertices + 1} vertices, the template has {template.n_vertices}")


def test_mesh_with_nan_coordinates(folder, cap_obj, template, out):
    root, _ = folder
    v = face(template, 0)
    v[3, 1] = np.nan
    bad = write_face(root / "alice" / "smile.ply", template, v)
    assert_refused(out, lambda: ingest(root, cap_obj, out, progress=False), str(bad), "NaN")


@pytest.mark.parametrize(
    "name, keep",
    [("alice/neutral.obj", 0.3), ("alice/neutral.obj", 0.6)]  # an OBJ has no header: cut in its vertices
    + [(ply, keep) for ply in ("alice/smile.ply", "bob/neutral.ply") for keep in (0.3, 0.6, 0.95)],
)
def test_truncated_mesh_files(folder, cap_obj, out, name, keep):
    root, _ = folder
    path = root / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert_refused(out, lambda: ingest(root, cap_obj, out, progress=False), str(path))


@pytest.mark.parametrize("name", ["alice/neutral.obj", "alice/smile.ply"])
def test_unreadable_mesh_files(folder, cap_obj, out, name):
    root, _ = folder
    (root / name).write_bytes(bytes(range(256)) * 4)
    assert_refused(out, lambda: ingest(root, cap_obj, out, progress=False), str(root / name))


def test_labels_naming_a_missing_mesh(folder, cap_obj, tmp_path, out):
    root, _ = folder
    labels = tmp_path / "labels.csv"
    labels.write_text("mesh_id,identity,expression\nalice/neutral,alice,neutral\ndave/neutral,dave,neutral\n")
    assert_refused(out, lambda: ingest(root, cap_obj, out, labels, progress=False), str(labels), "dave/neutral")


def test_labels_with_unknown_columns(folder, cap_obj, tmp_path, out):
    root, _ = folder
    labels = tmp_path / "labels.csv"
    labels.write_text("mesh_id,identity,expresion\nalice/neutral,alice,neutral\n")
    assert_refused(out, lambda: ingest(root, cap_obj, out, labels, progress=False), str(labels), "unknown column(s) expresion")


@pytest.mark.parametrize(
    "text",
    [
        "mesh_id,identity,expression\nalice/neutral,alice,neutral,extra\n",
        "file,identity,expression\nalice/neutral.obj,alice,neutral\nbob/smile.obj\n",
        "identity,expression\nalice,neutral\n",
        "mesh_id,identity,expression,split\nalice/neutral,alice,neutral,validation\n",
        "",
    ],
    ids=["extra-cell", "missing-cells", "no-mesh-column", "bad-split", "empty"],
)
def test_malformed_labels_files(folder, cap_obj, tmp_path, out, text):
    root, _ = folder
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    assert_refused(out, lambda: ingest(root, cap_obj, out, labels, progress=False), str(labels))


def test_missing_labels_file(folder, cap_obj, tmp_path, out):
    root, _ = folder
    assert_refused(out, lambda: ingest(root, cap_obj, out, tmp_path / "nope.csv", progress=False), "nope.csv", "file not found")


def test_empty_or_missing_folder(tmp_path, cap_obj, out):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no meshes here")
    assert_refused(out, lambda: ingest(tmp_path / "empty", cap_obj, out, progress=False), "empty", "no .obj or .ply files")
    assert_refused(out, lambda: ingest(tmp_path / "nowhere", cap_obj, out, progress=False), "nowhere", "not a folder")
