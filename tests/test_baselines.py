"""The Table 1 baselines (linear, Tucker, autoencoder): the FaceGenerator contract (sample groups, fit,
model files), each model's defining property, and user errors, on a small hand-made labeled dataset."""

import numpy as np
import pytest
import torch

from conftest import sphere_cap
from facegan.baselines import BASELINES, AutoencoderOptions, BaselineOptions, TuckerOptions, save_baseline, train_baseline
from facegan.baselines.autoencoder import AutoencoderModel, _Partners
from facegan.baselines.common import draw_codes, principal_components
from facegan.baselines.tucker import impute
from facegan.data.dataset import Labels, write_dataset
from facegan.errors import FaceganError
from facegan.evaluation.generators import FaceGenerator, load_generator
from facegan.fit import keep_detail
from facegan.mesh.template import Template
from facegan.metrics.distances import mean_vertex_distance

pytestmark = pytest.mark.usefixtures("one_thread")

EMOTIONS = ["neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
OPTIONS = BaselineOptions(autoencoder=AutoencoderOptions(pca_size=32, hidden=64, epochs=40, batch_size=32))


def labeled_faces(seed: int = 0):
    """Sphere-cap faces: identity = 8 random modes, expression = 6 emotion offsets scaled by the identity's
    first coefficient (mildly multilinear). Labels follow the paper's parts: static (4 identities x 7
    expressions, all labeled), motion (neutral -> apex -> neutral, 3 frames labeled), spontaneous (one
    labeled neutral per identity), 2 unlabeled test identities. Returns template, meshes, label columns."""
    rng = np.random.default_rng(seed)
    template = Template(*sphere_cap()).validate()
    id_modes = rng.normal(0, 1, (8, template.n_vertices, 3))
    exp_modes = np.concatenate([np.zeros((1, template.n_vertices, 3)), rng.normal(0, 0.5, (6, template.n_vertices, 3))])
    rows, meshes = [], []

    def add(part, name, a, expression, weights, split="train"):
        rows.append((f"{part}/{name}/{len(rows)}", name, expression, part, split))
        meshes.append(template.vertices + np.tensordot(a, id_modes, 1) + (1 + 0.2 * a[0]) * np.tensordot(weights, exp_modes, 1))

    one_hot = np.eye(7)
    for i in range(4):
        a = rng.normal(size=8)
        for e in range(7):
            add("static", f"s{i}", a, EMOTIONS[e], one_hot[e])
    for split, names in (("train", ["m0", "m1"]), ("test", ["t0", "t1"])):
        for name in names:
            a = rng.normal(size=8)
            for e in range(1, 7):
                for k, t in enumerate([0, 0.5, 1, 0.5, 0]):
                    label = {0: "neutral", 2: EMOTIONS[e], 4: "neutral"}.get(k, "") if split == "train" else ""
                    add("motion", name, a, label, t * one_hot[e], split)
    for i in range(6):
        a = rng.normal(size=8)
        for k in range(8):
            weights = np.zeros(7) if k == 0 else rng.uniform(0, 1, 7) * (rng.uniform(size=7) < 0.4)
            add("spontaneous", f"p{i}", a, "neutral" if k == 0 else "", weights)
    columns = dict(zip(["mesh_id", "identity", "expression", "part", "split"], map(list, zip(*rows))))
    return template, np.array(meshes, np.float32), columns


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    template, meshes, columns = labeled_faces()
    return write_dataset(tmp_path_factory.mktemp("baselines") / "data", template, meshes, Labels(columns))


@pytest.fixture(scope="module")
def train_meshes(dataset):
    return np.asarray(dataset.meshes[dataset.split("train")])


@pytest.fixture(scope="module")
def models(dataset):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: a second thread only adds barrier stalls on a busy machine
    try:
        return {kind: train_baseline(kind, dataset, OPTIONS, progress=False) for kind in BASELINES}
    finally:
        torch.set_num_threads(before)


def mvd(a, b) -> float:
    return float(mean_vertex_distance(a, b).mean())


def span_residual(vectors: np.ndarray, basis: np.ndarray) -> float:
    """Largest norm of the part of ``vectors`` (N, D) outside the row span of ``basis`` (K, D)."""
    q, _ = np.linalg.qr(basis.T.astype(np.float64))
    return float(np.linalg.norm(vectors - (vectors @ q) @ q.T, axis=1).max())


# ------------------------------------------------------------------------------ the shared contract


@pytest.mark.parametrize("kind", BASELINES)
def test_every_baseline_is_a_face_generator(models, kind):
    model = models[kind]
    assert isinstance(model, FaceGenerator)
    assert model.name == kind and model.factors == ["identity", "expression"] and model.n_vertices == 97


@pytest.mark.parametrize("kind", BASELINES)
def test_samples_have_the_protocol_shape_and_follow_the_seed(models, kind):
    model = models[kind]
    a = model.sample(3, seed=1)
    assert a.shape == (3, 97, 3) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, model.sample(3, seed=1))
    assert mvd(a, model.sample(3, seed=2)) > 0.1
    assert model.sample(2, fix="expression", m=4).shape == (8, 97, 3)
    assert model.sample(0).shape == (0, 97, 3)


def test_codes_of_a_group_share_the_fixed_factor_only():
    codes = draw_codes({"identity": 3, "expression": 2}, n=4, fix="identity", m=5, seed=0)
    ident, expr = codes["identity"].reshape(4, 5, 3), codes["expression"]
    assert (ident == ident[:, :1]).all() and len(torch.unique(ident[:, 0], dim=0)) == 4
    assert len(torch.unique(expr, dim=0)) == 20


@pytest.mark.parametrize("kind", BASELINES)
@pytest.mark.parametrize("fix", ["identity", "expression"])
def test_samples_are_the_decoded_codes(models, kind, fix):
    model = models[kind]
    with torch.no_grad():
        decoded = model.decode(model.prior_codes(draw_codes(model.code_sizes, 3, fix, 4, seed=7))).float().numpy()
    np.testing.assert_allclose(model.sample(3, fix=fix, m=4, seed=7), decoded.reshape(12, 97, 3), atol=1e-5)


@pytest.mark.parametrize("kind", BASELINES)
def test_save_then_load_generator_gives_the_same_model(models, kind, tmp_path, train_meshes):
    model = models[kind]
    save_baseline(model, tmp_path / f"{kind}.safetensors")
    loaded = load_generator(tmp_path / f"{kind}.safetensors")
    assert type(loaded) is type(model) and loaded.name == kind and loaded.code_sizes == model.code_sizes
    assert np.array_equal(loaded.sample(3, fix="identity", m=2, seed=5), model.sample(3, fix="identity", m=2, seed=5))
    assert np.array_equal(loaded.fit(train_meshes[:4]), model.fit(train_meshes[:4]))
    assert load_generator(tmp_path / f"{kind}.safetensors", name="renamed").name == "renamed"


@pytest.mark.parametrize("kind", BASELINES)
def test_bad_input_is_a_user_error(models, kind, train_meshes):
    model = models[kind]
    with pytest.raises(FaceganError, match="96 vertices, the model has 97"):
        model.fit(train_meshes[:2, :-1])
    with pytest.raises(FaceganError, match="shape"):
        model.fit(train_meshes[0])
    broken = train_meshes[:3].copy()
    broken[1, 5, 0] = np.nan
    with pytest.raises(FaceganError, match="mesh 1 has NaN"):
        model.fit(broken)
    with pytest.raises(FaceganError, match="unknown factor 'age'"):
        model.sample(2, fix="age")


@pytest.mark.parametrize("kind", BASELINES)
def test_transferring_a_faces_own_expression_gives_its_fit(models, kind, train_meshes):
    model = models[kind]
    targets = train_meshes[:3]
    edited, target_fit, source_fit = model.transfer(targets, targets)
    np.testing.assert_allclose(edited, model.fit(targets), atol=1e-4)
    np.testing.assert_allclose(target_fit, model.fit(targets), atol=1e-4)
    np.testing.assert_allclose(source_fit, target_fit, atol=1e-6)  # the same faces, the same fits
    np.testing.assert_allclose(keep_detail(edited, target_fit, targets), targets, atol=1e-4)  # no edit
    assert all(x.shape == (0, *targets.shape[1:]) for x in model.transfer(targets[:0], targets[:0]))  # no pairs
    with pytest.raises(FaceganError, match="3 targets but 2 sources"):
        model.transfer(targets, targets[:2])
    with pytest.raises(FaceganError, match="unknown factor 'age'"):
        model.transfer(targets, targets, "age")


def test_unknown_baseline_is_a_user_error(dataset):
    with pytest.raises(FaceganError, match=r"unknown baseline 'pca' \(known: linear, tucker, autoencoder\)"):
        train_baseline("pca", dataset)


def test_linear_model_needs_neutral_faces(tmp_path):
    template, meshes, columns = labeled_faces()
    columns["expression"] = ["calm" if e == "neutral" else e for e in columns["expression"]]
    with pytest.raises(FaceganError, match="labeled 'neutral'"):
        train_baseline("linear", write_dataset(tmp_path / "data", template, meshes, Labels(columns)))


# ------------------------------------------------------------------------------ linear


def test_linear_code_sizes_are_capped_by_the_data(models):
    # 12 training identities with a neutral face: 11 identity modes; 20 expression modes
    assert models["linear"].code_sizes == {"identity": 11, "expression": 20}


@pytest.mark.parametrize("fix, free", [("identity", "expression_basis"), ("expression", "identity_basis")])
def test_linear_group_members_differ_only_along_the_free_factor(models, fix, free):
    model = models["linear"]
    group = model.sample(1, fix=fix, m=6, seed=3).reshape(6, -1).astype(np.float64)
    differences = group[1:] - group[0]
    assert np.linalg.norm(differences, axis=1).min() > 1.0
    assert span_residual(differences, model.tensors[free].numpy()) < 1e-3


def test_linear_transfer_swaps_the_codes_of_its_own_faces(models):
    model = models["linear"]
    a, b = (draw_codes(model.code_sizes, 4, seed=seed) for seed in (1, 2))
    with torch.no_grad():
        faces = {k: model.decode(codes).float().numpy().reshape(4, 97, 3)
                 for k, codes in (("a", a), ("b", b), ("a_with_b", {"identity": a["identity"], "expression": b["expression"]}))}
    assert mvd(model.transfer(faces["a"], faces["b"], "expression")[0], faces["a_with_b"]) < 2e-3


def test_linear_fit_recovers_faces_in_its_span(models, train_meshes):
    model = models["linear"]
    faces = model.sample(8, seed=4)
    assert mvd(model.fit(faces), faces) < 2e-3  # the Gaussian prior's shrinkage only
    assert mvd(model.fit(train_meshes), train_meshes) < 0.01


# ------------------------------------------------------------------------------ tucker


def test_tucker_imputation_recovers_a_low_rank_tensor():
    rng = np.random.default_rng(0)
    u_id, u_exp = (torch.from_numpy(u - u.mean(0)) for u in (rng.normal(size=(8, 2)), rng.normal(size=(5, 2))))
    truth = 10 + torch.einsum("abd,ia,eb->ied", torch.from_numpy(rng.normal(size=(2, 2, 30))), u_id, u_exp)
    observed = torch.from_numpy(rng.uniform(size=(8, 5)) > 0.25)
    observed[:, 0] = observed[0] = True  # every row and column keeps observations
    filled, rounds = impute(torch.where(observed[..., None], truth, 0.0), observed, (2, 2),
                            TuckerOptions(impute_iterations=2000, impute_tolerance=1e-9))
    assert 1 < rounds < 2000
    torch.testing.assert_close(filled, truth, atol=1e-5, rtol=0)


def test_tucker_imputation_at_full_rank_keeps_the_additive_start():
    a, b = torch.randn(6, 1, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64)
    observed = torch.ones(6, 3, dtype=torch.bool)
    observed[2:, 1:] = False  # four identities seen only in the first expression
    filled, rounds = impute(torch.where(observed[..., None], a + b, 0.0), observed, (6, 3), TuckerOptions())
    assert rounds == 1
    torch.testing.assert_close(filled, a + b)


def test_tucker_faces_sharing_an_identity_span_only_the_expression_weights(models):
    """With w_id fixed a face is linear in [1, z_exp]: 12 faces span r_exp + 1 = 8 dimensions, not 12."""
    model = models["tucker"]
    assert model.code_sizes == {"identity": 12, "expression": 7}
    singular = np.linalg.svd(model.sample(1, fix="identity", m=12, seed=2).reshape(12, -1), compute_uv=False)
    assert singular[8] < 1e-5 * singular[0]
    # independent faces span all 12: their smallest singular value is far above the 1e-5 of a missing dimension
    assert np.linalg.svd(model.sample(12, seed=2).reshape(12, -1), compute_uv=False)[-1] > 1e-4 * singular[0]


def test_tucker_fit_is_close_on_its_samples_and_the_training_meshes(models, train_meshes):
    model = models["tucker"]
    faces = model.sample(8, seed=4)
    assert mvd(model.fit(faces), faces) < 0.02
    assert mvd(model.fit(train_meshes), train_meshes) < 0.02


# ------------------------------------------------------------------------------ autoencoder


def test_autoencoder_fit_refines_the_encoder(models, train_meshes):
    model = models["autoencoder"]
    encoder_only = AutoencoderModel(model.tensors, {**model.meta, "config": {**model.meta["config"], "fit_steps": 0}})
    fitted, encoded = mvd(model.fit(train_meshes), train_meshes), mvd(encoder_only.fit(train_meshes), train_meshes)
    spread = mvd(train_meshes, train_meshes.mean(0))
    assert fitted < encoded and fitted < 0.1 * spread


def test_autoencoder_training_is_reproducible(dataset):
    options = BaselineOptions(autoencoder=AutoencoderOptions(pca_size=16, hidden=32, epochs=3, batch_size=32))
    first, second = (train_baseline("autoencoder", dataset, options, progress=False) for _ in range(2))
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)


def test_partners_share_the_label_and_unlabeled_rows_keep_themselves():
    labels = np.array([0, 1, 0, -1, 1, 2, -1])
    rows = np.tile(np.arange(7), 50)
    partners = _Partners(labels)(rows, np.random.default_rng(0))
    assert (labels[partners] == labels[rows]).all()
    assert (partners[labels[rows] < 0] == rows[labels[rows] < 0]).all() and (partners[rows == 5] == 5).all()
    assert set(partners[rows == 0]) == {0, 2}


# ------------------------------------------------------------------------------ shared linear algebra


def test_randomized_pca_matches_the_exact_one():
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.normal(size=(200, 40)) * 0.8 ** np.arange(40)) @ rng.normal(size=(40, 300)))
    mean, axes, variances = principal_components(x, 6, oversample=4)  # width 10 < 200: the randomized path
    _, s, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(variances, s[:6] ** 2 / 199, rtol=1e-6, atol=0)
    torch.testing.assert_close((axes @ vt[:6].T).abs(), torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
