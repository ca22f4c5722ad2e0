"""The on-disk dataset: written atomically, read memory-mapped; and its cached geometry images."""

import csv
import io
import os

import numpy as np
import pytest
import torch

from facegan.data import dataset as dataset_module
from facegan.data.dataset import Labels, open_dataset, write_dataset
from facegan.data.encode import encode_dataset, load_codec, load_images
from facegan.errors import FaceganError
from facegan.geometry_image import GeometryImageCodec


def make_labels(**overrides) -> Labels:
    columns = {
        "mesh_id": ["a/0", "a/1", "b/0", "b/1", "c/0", "x"],
        "identity": ["a", "a", "b", "b", "c", ""],
        "expression": ["neutral", "happy", "", "happy", "neutral", "sad"],
        "split": ["train", "train", "train", "train", "test", "train"],
        "part": ["static"] * 4 + ["motion"] * 2,
    }
    columns.update(overrides)
    return Labels(columns)


def make_meshes(template, n=6, seed=0):
    return template.vertices + np.random.default_rng(seed).normal(0, 1, (n,) + template.vertices.shape)


def assert_nothing_written(path):
    assert not path.exists()
    assert os.listdir(path.parent) == [], "no temporary leftovers beside the output"


@pytest.fixture
def written(tmp_path, cap_template):
    meshes = make_meshes(cap_template)
    factors = {"identity_code": np.arange(12.0).reshape(6, 2)}
    ds = write_dataset(tmp_path / "data", cap_template, meshes, make_labels(), factors, provenance={"source": "test"})
    return ds, meshes


def test_write_then_open_round_trip(written, cap_template):
    ds, meshes = written
    again = open_dataset(ds.root)
    assert len(again) == 6
    np.testing.assert_array_equal(again.template.triangles, cap_template.triangles)
    np.testing.assert_allclose(again.template.vertices, cap_template.vertices, atol=1e-6)
    np.testing.assert_allclose(again.template.uv, cap_template.uv, atol=1e-8)
    assert again.meshes.dtype == np.float32 and again.meshes.shape == meshes.shape
    np.testing.assert_array_equal(again.meshes, meshes.astype(np.float32))
    assert again.labels.columns == make_labels().columns
    np.testing.assert_array_equal(again.factors["identity_code"], np.arange(12.0).reshape(6, 2))
    info = again.info
    assert info["n_meshes"] == 6 and info["n_vertices"] == cap_template.n_vertices and info["units"] == "mm"
    assert info["counts"] == {"train": 5, "test": 1, "identity_labeled": 5, "expression_labeled": 5}
    assert info["provenance"] == {"source": "test"}
    assert sorted(os.listdir(ds.root)) == ["dataset.json", "factors.npz", "labels.csv", "meshes.npy", "template.obj"]


def test_meshes_are_memory_mapped_read_only(written):
    ds, _ = written
    meshes = open_dataset(ds.root).meshes
    assert isinstance(meshes, np.memmap)
    with pytest.raises(ValueError):
        meshes[0, 0, 0] = 1.0


def test_labels_csv_has_one_row_per_mesh_and_empty_cells_for_missing_labels(written):
    ds, _ = written
    rows = list(csv.reader(io.StringIO((ds.root / "labels.csv").read_text())))
    assert rows[0] == ["mesh_id", "identity", "expression", "split", "part"]
    assert rows[3] == ["b/0", "b", "", "train", "static"]
    assert rows[6] == ["x", "", "sad", "train", "motion"]
    assert len(rows) == 7


def test_class_indices_with_missing_labels(written):
    labels = written[0].labels
    assert labels.class_names("identity") == ["a", "b", "c"]
    assert labels.class_indices("identity").tolist() == [0, 0, 1, 1, 2, -1]
    assert labels.class_names("expression") == ["happy", "neutral", "sad"]
    assert labels.class_indices("expression").tolist() == [1, 0, -1, 0, 1, 2]
    assert labels.class_indices("expression").dtype == np.int64


def test_splits(written):
    ds = written[0]
    assert ds.split("train").tolist() == [0, 1, 2, 3, 5]
    assert ds.split("test").tolist() == [4]
    with pytest.raises(FaceganError, match="unknown split"):
        ds.split("validation")


def test_meshes_are_written_in_chunks(tmp_path, cap_template):
    n = 1030  # more than one 1024-mesh chunk
    ids = [str(i) for i in range(n)]
    labels = Labels({"mesh_id": ids, "identity": ids, "expression": [""] * n, "split": ["train"] * n})
    meshes = np.broadcast_to(cap_template.vertices, (n,) + cap_template.vertices.shape) + np.arange(n)[:, None, None]
    ds = write_dataset(tmp_path / "big", cap_template, meshes, labels)
    np.testing.assert_array_equal(ds.meshes[[0, 1023, 1024, 1029]], meshes[[0, 1023, 1024, 1029]].astype(np.float32))


@pytest.mark.parametrize(
    "labels, meshes_n, message",
    [
        (make_labels(split=["train", "train", "test", "train", "test", "train"]), 6, "identity 'b' is in both train and test"),
        (make_labels(mesh_id=["a", "a", "b", "c", "d", "e"]), 6, "not unique"),
        (make_labels(split=["train"] * 5 + ["val"]), 6, "unknown split value 'val'"),
        (make_labels(), 5, "5 meshes but 6 label rows"),
    ],
    ids=["identity-in-both-splits", "duplicate-ids", "bad-split", "count"],
)
def test_invalid_datasets_are_refused_and_nothing_is_written(tmp_path, cap_template, labels, meshes_n, message):
    out = tmp_path / "out" / "data"
    out.parent.mkdir()
    with pytest.raises(FaceganError, match=message):
        write_dataset(out, cap_template, make_meshes(cap_template, meshes_n), labels)
    assert_nothing_written(out)


def test_wrong_vertex_count_is_refused(tmp_path, cap_template):
    out = tmp_path / "out" / "data"
    out.parent.mkdir()
    with pytest.raises(FaceganError, match="the template has"):
        write_dataset(out, cap_template, make_meshes(cap_template)[:, :-1], make_labels())
    assert_nothing_written(out)


def test_failure_while_writing_leaves_nothing(tmp_path, cap_template, monkeypatch):
    out = tmp_path / "out" / "data"
    out.parent.mkdir()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(dataset_module.np, "savez", disk_full)
    with pytest.raises(OSError):
        write_dataset(out, cap_template, make_meshes(cap_template), make_labels(), factors={"f": np.zeros(6)})
    assert_nothing_written(out)


def test_failed_rewrite_keeps_the_old_dataset_and_a_good_one_replaces_it(written, cap_template, monkeypatch):
    ds, meshes = written
    before = {p: (ds.root / p).read_bytes() for p in os.listdir(ds.root)}
    with pytest.raises(FaceganError):
        write_dataset(ds.root, cap_template, meshes, make_labels(mesh_id=["a"] * 6))
    monkeypatch.setattr(dataset_module.np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_dataset(ds.root, cap_template, meshes + 1, make_labels(), factors={"f": np.zeros(6)})
    assert {p: (ds.root / p).read_bytes() for p in os.listdir(ds.root)} == before
    monkeypatch.undo()
    new = write_dataset(ds.root, cap_template, meshes + 1, make_labels())
    np.testing.assert_array_equal(new.meshes, (meshes + 1).astype(np.float32))
    assert not (ds.root / "factors.npz").exists()
    assert os.listdir(ds.root.parent) == ["data"]


def test_open_errors(tmp_path, written):
    with pytest.raises(FaceganError, match="not a facegan dataset"):
        open_dataset(tmp_path / "missing")
    root = written[0].root
    labels = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(labels.replace("c/0,c,neutral,test,motion\n", ""))
    with pytest.raises(FaceganError, match="5 rows, dataset.json says 6 meshes"):
        open_dataset(root)
    (root / "labels.csv").write_text(labels.replace("split,", ""))
    with pytest.raises(FaceganError, match="missing column"):
        open_dataset(root)
    (root / "labels.csv").write_text(labels.replace("c/0,c,", "c/0,c,c,"))
    with pytest.raises(FaceganError, match="line 6 has a different number of cells"):
        open_dataset(root)
    (root / "labels.csv").write_text(labels)
    (root / "dataset.json").write_text((root / "dataset.json").read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(FaceganError, match="unsupported format version 99"):
        open_dataset(root)
    (root / "dataset.json").write_text("{")
    with pytest.raises(FaceganError, match="not valid JSON"):
        open_dataset(root)


# ---- cached geometry images (facegan encode) --------------------------------------------------------


def test_encode_dataset_uses_the_training_split_only(tmp_path, cap_template):
    meshes = make_meshes(cap_template)
    meshes[4] += 100.0  # the test mesh is far away: it must not move the mean or the range
    ds = write_dataset(tmp_path / "data", cap_template, meshes, make_labels())
    codec = encode_dataset(ds, 64, alpha=0.3, progress=False)
    train = meshes[ds.split("train")].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(codec.mean, train.mean(axis=0), atol=1e-9)
    reference = GeometryImageCodec(cap_template, train.mean(axis=0), 64)
    reference.fit_range([reference.encode(train)])
    np.testing.assert_allclose(codec.value_range, reference.value_range, atol=1e-4)

    images = load_images(ds, 64)
    assert isinstance(images, np.memmap) and images.dtype == np.uint8 and images.shape == (6, 64, 64, 3)
    expected = codec.quantize(codec.encode(np.asarray(ds.meshes))).numpy()
    np.testing.assert_array_equal(images, expected)
    assert (images[4][codec.mask] == 255).all(), "the far test mesh clips at the top of the range"

    loaded = load_codec(ds, 64)
    assert loaded.alpha == 0.3 and loaded.resolution == 64
    np.testing.assert_allclose(loaded.mean, codec.mean)
    np.testing.assert_allclose(loaded.value_range, codec.value_range)
    np.testing.assert_array_equal(loaded.encode(meshes[:2]).numpy(), codec.encode(meshes[:2]).numpy())


def test_encode_errors(tmp_path, cap_template):
    ds = write_dataset(tmp_path / "data", cap_template, make_meshes(cap_template), make_labels())
    with pytest.raises(FaceganError, match="resolution 32 not supported"):
        encode_dataset(ds, 32, progress=False)
    with pytest.raises(FaceganError, match="must be positive"):
        encode_dataset(ds, 64, alpha=0.0, progress=False)  # Eq. 4 without it is singular
    assert not (ds.root / "images").exists()
    with pytest.raises(FaceganError, match="run 'facegan encode"):
        load_codec(ds, 64)
    with pytest.raises(FaceganError, match="run 'facegan encode"):
        load_images(ds, 64)
    no_train = write_dataset(tmp_path / "test_only", cap_template, make_meshes(cap_template), make_labels(split=["test"] * 6))
    with pytest.raises(FaceganError, match="no training meshes"):
        encode_dataset(no_train, 64, progress=False)
    assert not (no_train.root / "images").exists()
    encode_dataset(ds, 64, progress=False)
    np.save(ds.root / "images" / "res64.npy", np.zeros((5, 64, 64, 3), np.uint8))  # stale cache
    with pytest.raises(FaceganError, match="5 images for 6 meshes"):
        load_images(ds, 64)
    assert torch.is_tensor(load_codec(ds).encode(make_meshes(cap_template, 1)))
