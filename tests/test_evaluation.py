"""The evaluation layer on models with known answers: toy generators built from the ICT model itself,
so the oracle knows exactly what each one does."""

import json
from dataclasses import dataclass

import numpy as np
import pytest

from facegan.errors import FaceganError
from facegan.evaluation.evaluate import EvalConfig, EvaluationData, evaluate, evaluate_real
from facegan.evaluation.experiment import _cached_evaluation, findings
from facegan.evaluation.generators import FaceGenerator, Transfer
from facegan.evaluation.report import json_ready, markdown_tables, write_report

from conftest import needs_ict

pytestmark = [needs_ict, pytest.mark.usefixtures("one_thread")]

SMALL = EvalConfig(specificity_samples=12, diversity_pairs=50, decoupling_groups=3, decoupling_group_size=4,
                   judges="none")


@pytest.fixture(scope="module")
def data(tmp_path_factory, ict):
    from facegan.data.build import synthesize_dataset
    from facegan.train.prepare import ensure_encoded

    ds = synthesize_dataset(tmp_path_factory.mktemp("eval") / "tiny", "tiny", ict_path=ict.source, progress=False)
    ensure_encoded(ds, 64)
    return EvaluationData(ds, progress=False)


class LinearICT:
    """A face model that *is* the ICT model: z_id -> identity coefficients, z_exp -> blend weights.
    ignore_expression: the expression code is dropped (every face neutral)."""

    factors = ["identity", "expression"]

    def __init__(self, narrow, ignore_expression: bool = False, name: str = "linear-ict"):
        self.narrow, self.ignore_expression, self.name = narrow, ignore_expression, name
        self.n_vertices = narrow.neutral.shape[0]

    def sample(self, n, fix=None, m=1, seed=0):
        rng = np.random.default_rng(seed)
        ids = rng.standard_normal((n * m, 100))
        weights = rng.uniform(0, 0.5, (n * m, 53)) * (rng.uniform(size=(n * m, 53)) < 0.2)
        if fix == "identity":
            ids = np.repeat(ids[::m], m, axis=0)
        elif fix == "expression":
            weights = np.repeat(weights[::m], m, axis=0)
        if self.ignore_expression:
            weights[:] = 0
        return (self.narrow.identity_neutral(ids) + self.narrow.expression_offsets(weights)).astype(np.float32)

    def fit(self, meshes, seed=0):
        return np.asarray(meshes, np.float32).copy()  # a model whose span holds every face


class TrainingSet:
    """A "model" that replays training meshes: the memorization case specificity alone cannot see."""

    factors, name = ["identity", "expression"], "copy"

    def __init__(self, train):
        self.train, self.n_vertices = train, train.shape[1]

    def sample(self, n, fix=None, m=1, seed=0):
        return self.train[np.random.default_rng(seed).integers(0, len(self.train), n * m)]

    def fit(self, meshes, seed=0):
        return self.train[np.zeros(len(meshes), int)]


@dataclass
class OracleJudge:
    """An embedding 'network' that reads the factor's ICT coefficients off the mesh."""

    projector: object
    factor: str
    tau: float = 1e-3
    accuracy: float = 1.0
    far: float = 0.0

    def embedder(self, meshes):
        return self.projector.project(meshes)[self.factor]


def test_toy_models_follow_the_protocol(ict):
    assert isinstance(LinearICT(ict.narrow()), FaceGenerator)


def test_a_model_that_ignores_z_exp_is_perfectly_identity_decoupled(data, ict):
    """Fixing z_id fixes the face entirely: the oracle sees no identity variance in a group (ratio 0) and
    judges built on the true coefficients call every pair 'same' (Dec-Id 100%)."""
    projector = data.oracle[0]
    data.__dict__["judges"] = {f: OracleJudge(projector, f) for f in ("identity", "expression")}
    try:
        result = evaluate(LinearICT(ict.narrow(), ignore_expression=True), data,
                          EvalConfig(**{**SMALL.__dict__, "judges": "oracle"}))
    finally:
        del data.__dict__["judges"]
    oracle = result["metrics"]["oracle"]["identity"]
    assert oracle["identity_ratio"] < 1e-6 and oracle["expression_ratio"] < 1e-6
    assert result["metrics"]["decoupling"]["identity"]["percent"] == 100.0
    assert result["metrics"]["diversity"]["identity"]["mean"] < 1e-4  # no variation at all within a group


def test_a_decoupled_model_fixes_identity_and_frees_expression(data, ict):
    oracle = evaluate(LinearICT(ict.narrow()), data, SMALL)["metrics"]["oracle"]
    assert oracle["identity"]["identity_ratio"] < 1e-6 < 0.1 < oracle["identity"]["expression_ratio"]
    assert oracle["expression"]["expression_ratio"] < 1e-6 < 0.1 < oracle["expression"]["identity_ratio"]


def test_copying_training_meshes_is_caught_by_memorization(data):
    metrics = evaluate(TrainingSet(data.train), data, SMALL)["metrics"]
    assert metrics["specificity"]["mean"] == 0.0
    assert metrics["specificity"]["memorized_fraction"] == 1.0


def test_generalization_is_the_mean_vertex_error_of_the_fits(data, ict):
    metrics = evaluate(LinearICT(ict.narrow()), data, EvalConfig(**{**SMALL.__dict__, "metrics": ("generalization",)}))
    assert metrics["metrics"]["generalization"]["mean"] == 0.0  # fits returned unchanged
    copy = evaluate(TrainingSet(data.train), data, EvalConfig(**{**SMALL.__dict__, "metrics": ("generalization",)}))
    expected = np.linalg.norm(data.test - data.train[0], axis=-1).mean()
    assert copy["metrics"]["generalization"]["mean"] == pytest.approx(expected, rel=1e-5)


def test_generalization_reads_against_the_training_peoples_span(data, ict):
    """On the test meshes labeled neutral, a model's mean error sits beside their distance to the affine hull
    of the training people's neutral faces: what no model spanned by those people can beat."""
    from facegan.metrics.span import affine_span_residual

    config = EvalConfig(**{**SMALL.__dict__, "metrics": ("generalization",)})
    names = data.dataset.labels.class_names("expression")
    train, test = data.labels("train"), data.labels("test")
    neutral_test = np.flatnonzero(test["expression"] == names.index("neutral"))
    people = [data.train[(train["identity"] == p) & (train["expression"] == names.index("neutral"))].mean(axis=0)
              for p in np.unique(train["identity"])]
    floor = affine_span_residual(data.test[neutral_test], np.stack(people))["mean"]

    copy = evaluate(TrainingSet(data.train), data, config)["metrics"]["generalization"]
    assert copy["neutral_n"] == len(neutral_test) > 0
    assert copy["neutral_mean"] == pytest.approx(np.linalg.norm(data.test[neutral_test] - data.train[0], axis=-1).mean(),
                                                 rel=1e-5)
    assert copy["training_span_neutral"] == pytest.approx(floor) and floor > 0.01  # tiny: a few training people
    exact = evaluate(LinearICT(ict.narrow()), data, config)["metrics"]["generalization"]
    assert exact["neutral_mean"] == 0.0 < exact["training_span_neutral"]  # ICT itself leaves their span
    real = evaluate_real(data, config)["metrics"]["generalization"]
    assert real["neutral_mean"] == pytest.approx(data.roundtrip[neutral_test].mean())
    assert real["training_span_neutral"] == pytest.approx(floor)
    assert "| Training people's span (neutral) |" in markdown_tables([json_ready(evaluate_real(data, config))])


def test_real_row_draws_the_principal_components_curve(data):
    """The classic generalization-vs-components curve of the training meshes: it falls with k and reaches the
    whole training hull once k passes its rank."""
    from facegan.metrics.span import affine_span_residual

    config = EvalConfig(**{**SMALL.__dict__, "metrics": ("generalization",), "principal_components": (0, 2, 8, 10**6)})
    curve = evaluate_real(data, config)["metrics"]["generalization"]["principal_components"]
    assert list(curve) == [0, 2, 8, 10**6] and curve[0] > curve[2] > curve[8] > curve[10**6]
    assert curve[0] == pytest.approx(np.linalg.norm(data.test - data.train.mean(axis=0), axis=-1).mean(), rel=1e-5)
    assert curve[10**6] == pytest.approx(affine_span_residual(data.test, data.train)["mean"])
    with pytest.raises(FaceganError, match="principal_components"):
        EvalConfig(principal_components=(-1,)).validate()


class Untouched(LinearICT):
    """An 'editor' that returns the target unchanged: the transfer check's do-nothing reading."""

    def transfer(self, targets, sources, factor="expression", seed=0):
        unedited = np.asarray(targets, np.float32).copy()
        return Transfer(unedited, unedited, np.asarray(sources, np.float32).copy())


def test_transfer_check_reads_a_do_nothing_edit(data, ict):
    only = EvalConfig(**{**SMALL.__dict__, "metrics": ("transfer",), "transfer_pairs": 3})
    check = evaluate(Untouched(ict.narrow()), data, only)["metrics"]["transfer"]
    assert check["pairs"] == 3 and check["error_mm"] == pytest.approx(check["untouched_mm"])
    assert check["identity_change_mm"] < 1e-6 and check["expression_miss_mm"] == pytest.approx(check["expression_gap_mm"])
    assert check["fit_identity_change_mm"] < 1e-6  # its fit is the target itself
    assert check["fit_expression_miss_mm"] < 1e-6  # and the source's fit the source
    assert check["untouched_mm"] > 0.5  # sources are expressive faces: doing nothing is far from the truth
    assert check["detail_error_mm"] == pytest.approx(check["untouched_mm"]) and check["detail_identity_change_mm"] < 1e-6
    row = markdown_tables([{"model": "untouched", "metrics": {"transfer": check}}]).splitlines()[-1]
    assert row.startswith("| untouched | ") and row.count(f"{check['untouched_mm']:.2f}") == 3
    assert "transfer" not in evaluate(LinearICT(ict.narrow()), data, only)["metrics"]  # no editing, no check


class UntouchedSharing(Untouched):
    """The do-nothing editor that also takes each face's person; it records what it was given."""

    def transfer(self, targets, sources, factor="expression", seed=0, people=None):
        self.people = people
        return super().transfer(targets, sources, factor, seed)


def test_transfer_check_gives_an_editor_that_can_share_each_faces_person(data, ict):
    only = EvalConfig(**{**SMALL.__dict__, "metrics": ("transfer",), "transfer_pairs": 3})
    editor = UntouchedSharing(ict.narrow())
    check = evaluate(editor, data, only)["metrics"]["transfer"]
    targets, sources = data.transfer_pairs(3, SMALL.seed)
    person = data.dataset.labels.class_indices("identity")
    assert [list(p) for p in editor.people] == [list(person[targets]), list(person[sources])]
    assert check["shared_error_mm"] == pytest.approx(check["untouched_mm"])
    assert check["shared_detail_error_mm"] == pytest.approx(check["untouched_mm"])
    row = markdown_tables([{"model": "untouched", "metrics": {"transfer": check}}]).splitlines()[-1]
    assert row.count(f"{check['untouched_mm']:.2f}") == 5
    assert "shared_error_mm" not in evaluate(Untouched(ict.narrow()), data, only)["metrics"]["transfer"]


def test_transfer_truth_is_the_synthesized_face(data):
    """For a target and source of the same identity, the ground truth is the source mesh itself."""
    rows = data.dataset.split("test")
    same = rows[data.dataset.labels.class_indices("identity")[rows] == data.dataset.labels.class_indices("identity")[rows[0]]]
    truth = data.transfer_truth(same[:1].repeat(2), same[1:3])
    np.testing.assert_allclose(truth, data.dataset.meshes[same[1:3]], atol=1e-3)


def test_real_row_reads_like_a_perfect_model(data):
    real = evaluate_real(data, SMALL)["metrics"]
    assert real["generalization"]["mean"] == pytest.approx(data.roundtrip.mean())
    assert real["roughness"]["ratio"] == pytest.approx(1.0)
    assert real["oracle"]["identity"]["identity_ratio"] < 0.05  # meshes sharing an identity label


def test_report_files_and_cached_results(data, ict, tmp_path):
    results = [evaluate_real(data, SMALL), evaluate(LinearICT(ict.narrow()), data, SMALL)]
    path = write_report(tmp_path / "report", results, data.dataset.template.triangles, {"data": "tiny"})
    text = path.read_text()
    assert "| real (held-out) |" in text and "| linear-ict |" in text
    assert {p.name for p in (tmp_path / "report" / "figures").iterdir()} >= {
        "linear-ict_fixed_identity.png", "linear-ict_fixed_expression.png", "linear-ict_samples.png", "fits.png",
        "generalization_cumulative.png"}
    stored = (tmp_path / "report" / "report.json").read_text()
    assert "vertex_errors" not in stored and "examples" not in stored
    # a cached evaluation comes back with its figure arrays
    first = _cached_evaluation(tmp_path / "cache", "m", lambda: results[1])
    again = _cached_evaluation(tmp_path / "cache", "m", lambda: pytest.fail("recomputed"))
    np.testing.assert_array_equal(again["examples"]["identity"], first["examples"]["identity"])
    np.testing.assert_array_equal(again["metrics"]["generalization"]["fits"], first["metrics"]["generalization"]["fits"])
    assert markdown_tables([again]) == markdown_tables([json_ready(first)])
    recomputed = []
    _cached_evaluation(tmp_path / "cache", "m", lambda: recomputed.append(1) or results[1], stamp={"judges": "other"})
    assert recomputed  # made with other judges or sizes: stale


def test_report_of_a_metric_subset_draws_only_the_figures_it_has(data, ict, tmp_path):
    only = EvalConfig(**{**SMALL.__dict__, "metrics": ("oracle",)})  # groups sampled, no random samples
    path = write_report(tmp_path / "report", [evaluate(LinearICT(ict.narrow()), data, only)],
                        data.dataset.template.triangles, {"data": "tiny"})
    assert path.exists()
    assert {p.name for p in (tmp_path / "report" / "figures").iterdir()} == {
        "linear-ict_fixed_identity.png", "linear-ict_fixed_expression.png"}


def test_findings_on_hand_made_numbers():
    def row(model, dec_exp, sp, rough=1.0, div=5.0):
        return {"model": model, "metrics": {"decoupling": {"expression": {"percent": dec_exp}},
                                            "specificity": {"mean": sp}, "roughness": {"ratio": rough},
                                            "diversity": {"global": {"mean": div}}}}

    results = [row("real (held-out)", 90, 2.9), row("Us (full)", 80, 2.0), row("AC-GAN", 60, 3.0, rough=2.0, div=9.0),
               row("w/o alternate training", 85, 1.5), row("w/o expression classif.", 40, 2.5),
               row("w/o TV loss", 80, 2.0, rough=1.005)]
    verdicts = {claim: ok for claim, _, ok in findings(results)}
    assert verdicts["full model best in Dec-Expr among the variants"] is False  # w/o alternate: 85 > 80
    assert verdicts["full model best in specificity among the variants"] is False
    assert verdicts["AC-GAN: inflated global diversity (above the training data's)"] is True
    assert verdicts["AC-GAN: noisier surfaces than the full model"] is True
    assert verdicts["w/o expression classification: poor Dec-Expr"] is True
    assert verdicts["w/o TV: noisier surfaces than the full model"] is False  # 1.005 vs 1.0: within 1%


def test_config_errors_are_one_line():
    with pytest.raises(FaceganError, match="unknown metric 'bogus'"):
        EvalConfig(metrics=("bogus",)).validate()


# ---------------------------------------------------------------------------------------- commands


def facegan_cli(*args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "facegan", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_baseline_then_evaluate_from_the_command_line(data, tmp_path):
    root = data.dataset.root
    code, out, err = facegan_cli("baseline", "linear", "--data", root, "-o", tmp_path / "linear.safetensors", cwd=tmp_path)
    assert code == 0 and out.startswith("wrote"), err
    code, out, err = facegan_cli("evaluate", "--data", root, "-o", tmp_path / "report", "--run", tmp_path / "linear.safetensors",
                                 "--judges", "none", "--samples", 10, "--groups", 2, "--group-size", 3, "--pairs", 20,
                                 "--metrics", "specificity,diversity,generalization", cwd=tmp_path)
    assert code == 0 and err == "", err
    assert "| linear |" in (tmp_path / "report" / "report.md").read_text()
    code, _, err = facegan_cli("evaluate", "--data", root, "-o", tmp_path / "bad", "--run", tmp_path / "missing.safetensors",
                               cwd=tmp_path)
    assert code == 1 and err.strip().count("\n") == 0 and "missing.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_table1_experiment_resumes_from_its_files(data, tmp_path, monkeypatch):
    from facegan.evaluation import experiment

    tiny = experiment.ExperimentProfile("small", (), EvalConfig(**{**SMALL.__dict__, "metrics": ("specificity", "diversity")}))
    monkeypatch.setitem(experiment.EXPERIMENT_PROFILES, "small", tiny)
    path = experiment.table1(data.dataset.root, tmp_path / "results", runs=tmp_path / "runs", models=["linear"],
                             progress=False)
    text = path.read_text()
    assert "| Linear (DeepFLAME-like) |" in text and "| real (held-out) |" in text and "AC-GAN" in text  # the paper's table
    assert (tmp_path / "results" / "table1.json").exists() and (tmp_path / "runs" / "linear.safetensors").exists()
    monkeypatch.setattr(experiment, "evaluate", lambda *a, **k: pytest.fail("re-evaluated a cached model"))
    monkeypatch.setattr("facegan.baselines.train_baseline", lambda *a, **k: pytest.fail("re-trained a baseline"))
    assert experiment.table1(data.dataset.root, tmp_path / "results", runs=tmp_path / "runs", models=["linear"],
                             progress=False).read_text() == text


def test_evaluate_fits_with_the_given_options_and_records_them(data, tmp_path, monkeypatch):
    """The GANs fit with the caller's FitOptions (the baselines take none); report.json says which."""
    from dataclasses import replace

    from facegan.evaluation import experiment
    from facegan.evaluation.generators import GanGenerator
    from facegan.fit import FitOptions
    from test_fitting import small_model

    gan = GanGenerator(small_model(), name="gan")
    monkeypatch.setattr(experiment, "load_generator", lambda path, name: gan)
    seen = []
    monkeypatch.setattr(experiment, "evaluate", lambda g, d, c: seen.append(g.fit_options) or {"model": g.name, "metrics": {}})
    options = replace(FitOptions(), iterations=7, starts=3)
    experiment.evaluate_models(data.dataset.root, tmp_path / "report", ["any"], config=SMALL, real=False,
                               progress=False, fit_options=options)
    assert seen == [options]
    header = json.loads((tmp_path / "report" / "report.json").read_text())["gan_fit_options"]
    assert header["iterations"] == 7 and header["starts"] == 3
