"""The decoupling judges of a dataset: trained on its train split, calibrated on its test split, cached."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import facegan.evaluation.judges as judges_module
from facegan.data.dataset import Labels, write_dataset
from facegan.errors import FaceganError
from facegan.evaluation.judges import JUDGE_PROFILES, FactorJudge, JudgeProfile, dataset_judges
from facegan.mesh.template import Template
from facegan.metrics.embedding import make_validation_pairs, select_threshold

from conftest import sphere_cap

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = JudgeProfile("tiny", width=0.125, size=32, steps=4, n_pairs=200)
TRAIN_IDS, TEST_IDS, EXPRESSIONS, FRAMES = 4, 2, 3, 2


def cap_faces(seed: int = 0) -> tuple[Template, np.ndarray, Labels]:
    """Sphere-cap "faces": identity stretches the cap, expression raises a bump; small noise per mesh.

    Every identity x expression x frame; train identities' second frames have no expression label,
    test identities' second frames are exact copies of their first (like a sequence's neutral ends).
    """
    v, f, uv = sphere_cap()
    rng = np.random.default_rng(seed)
    meshes, cols = [], {"mesh_id": [], "identity": [], "expression": [], "split": []}
    for i in range(TRAIN_IDS + TEST_IDS):
        for e in range(EXPRESSIONS):
            for k in range(FRAMES):
                face = v * [1 + 0.08 * i, 1 - 0.05 * i, 1.0]
                face[:, 2] += 6.0 * e * np.exp(-((face[:, 0] - 15) ** 2 + face[:, 1] ** 2) / 300)
                train = i < TRAIN_IDS
                meshes.append(meshes[-1] if k == 1 and not train else face + rng.normal(0, 0.2, face.shape))
                cols["mesh_id"].append(f"id{i}/e{e}/{k}")
                cols["identity"].append(f"id{i}")
                cols["expression"].append("" if train and k == 1 else f"e{e}")
                cols["split"].append("train" if train else "test")
    return Template(v, f, uv).validate(), np.asarray(meshes, np.float32), Labels(cols)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("faces") / "data", *cap_faces())


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A complete cache of the tiny judges, made once; tests copy it."""
    cache = tmp_path_factory.mktemp("judges") / "cache"
    return cache, dataset_judges(dataset, cache, TINY, progress=False)


def copy_cache(trained, tmp_path):
    return shutil.copytree(trained[0], tmp_path / "cache")


def test_profiles():
    assert JUDGE_PROFILES["paper"].width == 1.0 and JUDGE_PROFILES["paper"].size == 224
    assert all(p.max_far == 0.10 for p in JUDGE_PROFILES.values())


def test_judges_are_trained_and_cached(dataset, trained):
    cache, judges = trained
    assert set(judges) == {"identity", "expression"}
    assert sorted(p.name for p in cache.iterdir()) == ["expression.safetensors", "identity.safetensors", "judges.json"]
    manifest = json.loads((cache / "judges.json").read_text())
    assert manifest["profile"]["name"] == "tiny" and manifest["dataset"]["n_meshes"] == len(dataset)
    # the identity net sees every training mesh, the expression net only the labeled ones
    assert manifest["judges"]["identity"]["train_meshes"] == TRAIN_IDS * EXPRESSIONS * FRAMES
    assert manifest["judges"]["expression"]["train_meshes"] == TRAIN_IDS * EXPRESSIONS
    emb = judges["identity"].embedder(dataset.meshes[:5])
    assert emb.shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("factor", ["identity", "expression"])
def test_threshold_is_select_threshold_on_distinct_test_meshes(dataset, trained, factor):
    judge: FactorJudge = trained[1][factor]
    test = dataset.split("test")
    flat = np.asarray(dataset.meshes[test]).reshape(len(test), -1)
    distinct = test[np.sort(np.unique(flat, axis=0, return_index=True)[1])]  # copies would be free positives
    assert len(distinct) == TEST_IDS * EXPRESSIONS
    first, second, same = make_validation_pairs(dataset.labels.class_indices(factor)[distinct], TINY.n_pairs, rng=0)
    meshes = dataset.meshes[distinct]
    distances = np.linalg.norm(judge.embedder(meshes[first]) - judge.embedder(meshes[second]), axis=1)
    tau, accuracy, far = select_threshold(distances, same, TINY.max_far)
    assert (judge.tau, judge.accuracy, judge.far) == pytest.approx((tau, accuracy, far), abs=1e-6)
    assert judge.far <= TINY.max_far
    np.testing.assert_array_equal(judge.same(meshes[first], meshes[second]), distances <= judge.tau)


def test_second_call_loads_instead_of_training(dataset, trained, tmp_path, monkeypatch):
    cache = copy_cache(trained, tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("a complete cache must not be retrained")

    monkeypatch.setattr(judges_module, "train_embedding", no_training)
    again = dataset_judges(dataset, cache, TINY, progress=False)
    for factor, judge in trained[1].items():
        assert (again[factor].tau, again[factor].accuracy, again[factor].far) == (judge.tau, judge.accuracy, judge.far)
        np.testing.assert_allclose(again[factor].embedder(dataset.meshes[:4]), judge.embedder(dataset.meshes[:4]), atol=1e-6)


def test_interrupted_call_keeps_the_finished_judge(dataset, tmp_path, monkeypatch):
    real = judges_module.train_embedding
    calls, interrupt = [], ["expression"]

    def recorded(labels, **kwargs):
        factor = kwargs["checkpoint"].stem
        calls.append(factor)
        if factor in interrupt:
            raise KeyboardInterrupt
        return real(labels, **kwargs)

    monkeypatch.setattr(judges_module, "train_embedding", recorded)
    with pytest.raises(KeyboardInterrupt):
        dataset_judges(dataset, tmp_path / "cache", TINY, progress=False)
    interrupt.clear()
    dataset_judges(dataset, tmp_path / "cache", TINY, progress=False)
    assert calls == ["identity", "expression", "expression"]  # the finished identity judge was kept


def test_cache_for_other_data_or_profile_is_refused(trained, tmp_path):
    cache = copy_cache(trained, tmp_path)
    other = write_dataset(tmp_path / "other", *cap_faces(seed=1))  # same labels, other geometry
    with pytest.raises(FaceganError, match="another dataset: meshes_sha256"):
        dataset_judges(other, cache, TINY, progress=False)
    with pytest.raises(FaceganError, match="another profile: .*size 32 \\(now 48\\)"):
        dataset_judges(other, cache, JudgeProfile("tiny", width=0.125, size=48, steps=4, n_pairs=200), progress=False)
    (cache / "judges.json").unlink()  # checkpoints of unknown origin
    with pytest.raises(FaceganError, match="no judges.json"):
        dataset_judges(other, cache, TINY, progress=False)


def test_a_split_without_pairs_is_refused(tmp_path):
    template, meshes, labels = cap_faces()
    labels.columns["identity"] = [i if s == "train" else "id5" for i, s in zip(labels["identity"], labels["split"])]
    one_test_identity = write_dataset(tmp_path / "data", template, meshes, labels)
    with pytest.raises(FaceganError, match="test split cannot calibrate the identity judge"):
        dataset_judges(one_test_identity, tmp_path / "cache", TINY, progress=False)
