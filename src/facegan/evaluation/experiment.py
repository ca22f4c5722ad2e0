"""``facegan evaluate`` and ``facegan experiment table1``: models in, reports out.

The Table 1 experiment (paper Sec. 5.4-5.5) trains the full model, the five ablation variants and the
baselines on one dataset, evaluates all of them and the held-out real faces with the same
:class:`~facegan.evaluation.evaluate.EvalConfig`, and writes ``table1.md``, ``table1.json`` and the
figures. Every stage leaves its result in the runs folder (GAN runs resume from their checkpoints,
baselines and evaluations are skipped when their files exist), so an interrupted experiment continues
where it stopped when the same command is run again.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from facegan.data.dataset import RegisteredDataset, open_dataset
from facegan.errors import FaceganError, check_known, lookup
from facegan.evaluation.evaluate import EvalConfig, EvaluationData, evaluate, evaluate_real
from facegan.evaluation.generators import GanGenerator, load_generator
from facegan.evaluation.report import json_ready, paper_table_markdown, write_report
from facegan.fileio import read_json, write_json
from facegan.fit import FitOptions

__all__ = ["evaluate_models", "table1", "ExperimentProfile", "EXPERIMENT_PROFILES", "TABLE1_MODELS"]

# Report names of the Table 1 rows, keyed by variant (GAN) or baseline kind.
TABLE1_MODELS = {
    "full": "Us (full)",
    "acgan": "AC-GAN",
    "no-alternate": "w/o alternate training",
    "no-tv": "w/o TV loss",
    "no-feature": "w/o feature loss",
    "id-only": "w/o expression classif.",
    "linear": "Linear (DeepFLAME-like)",
    "tucker": "Multilinear (Tucker)",
    "autoencoder": "Mesh AE (MAE-like)",
}
GAN_VARIANTS = ("full", "acgan", "no-alternate", "no-tv", "no-feature", "id-only")
REAL = "real"


@dataclass(frozen=True)
class ExperimentProfile:
    """How big the experiment is: the GAN training profile and overrides, and the evaluation sizes."""

    train_profile: str
    train_overrides: tuple[str, ...]
    evaluation: EvalConfig = field(default_factory=EvalConfig)


EXPERIMENT_PROFILES = {
    # 2 CPU cores: 1500 iterations per GAN variant (~30 min each when the machine is otherwise idle),
    # small judges; the metrics keep the paper's sample sizes
    "small": ExperimentProfile("small", ("max_iters=1500",), EvalConfig(judges="small")),
    # a GPU: the paper's widths and 200 epochs, the paper's ResNet-18 judges at 224 px
    "paper": ExperimentProfile("paper", (), EvalConfig(judges="paper")),
}


def _load_data(data: str | os.PathLike, judges: str, progress: bool) -> EvaluationData:
    return EvaluationData(open_dataset(data), judges_profile=judges, progress=progress)


def _header(ds: RegisteredDataset, config: EvalConfig, data: EvaluationData) -> dict:
    return {"data": str(ds.root), "n_train": int(len(ds.split("train"))), "n_test": int(len(ds.split("test"))),
            "config": {**config.__dict__, "metrics": list(config.metrics)}, "shared_seconds": data.timings}


def evaluate_models(data: str | os.PathLike, out: str | os.PathLike, models: Sequence[str | os.PathLike | None],
                    names: Sequence[str] = (), config: EvalConfig | None = None, real: bool = True,
                    progress: bool = True, fit_options: FitOptions | None = None) -> Path:
    """``facegan evaluate``: evaluate each model (run folder, model file, baseline file; None = the
    shipped model) on the dataset ``data`` and write ``out``/report.md, report.json and figures/.
    names: report labels (default: each model's own); real: add the held-out real-data row;
    fit_options: how the GANs fit faces (default ``FitOptions()``; the baselines' fits are closed-form
    or one encoder pass and take no options). The report's header records them."""
    config = (config or EvalConfig()).validate()
    fit_options = (fit_options or FitOptions()).validate()  # before any data is read
    if names and len(names) != len(models):
        raise FaceganError(f"evaluate: {len(names)} names for {len(models)} models")
    generators = [load_generator(m, n) for m, n in zip(models, list(names) or [None] * len(models))]
    for generator in generators:
        if isinstance(generator, GanGenerator):
            generator.fit_options = fit_options
    evaluation = _load_data(data, config.judges, progress)
    results = [evaluate_real(evaluation, config)] if real else []
    results += [evaluate(g, evaluation, config) for g in generators]
    header = _header(evaluation.dataset, config, evaluation) | {"gan_fit_options": asdict(fit_options)}
    return write_report(out, results, evaluation.dataset.template.triangles, header)


# --------------------------------------------------------------------------------------------- table 1


def _train_gan(data: Path, run_dir: Path, variant: str, profile: ExperimentProfile) -> Path:
    from facegan.train.prepare import run_training

    model = run_dir / "model.safetensors"
    if not model.exists():  # the trainer writes model.safetensors only when the run is complete
        run_training(data, run_dir, profile.train_profile, variant, None, None, profile.train_overrides,
                     resume=(run_dir / "checkpoint.safetensors").exists())
    return model


def _train_baseline(ds: RegisteredDataset, path: Path, kind: str, progress: bool) -> Path:
    from facegan.baselines import save_baseline, train_baseline

    if not path.exists():
        save_baseline(train_baseline(kind, ds, progress=progress), path)
    return path


def _cached_evaluation(folder: Path, key: str, compute, stamp: dict | None = None) -> dict:
    """An evaluation result from ``folder/key.json`` + ``key.npz`` (figure arrays), else computed and saved.

    stamp: what the result depends on besides the model (evaluation sizes, judges); a cached result made
    with another stamp is recomputed."""
    from facegan.fileio import atomic_path

    numbers, arrays = folder / f"{key}.json", folder / f"{key}.npz"
    stamp = json_ready(stamp or {})
    if numbers.exists() and arrays.exists() and read_json(numbers).get("stamp", {}) == stamp:
        result = read_json(numbers)
        with np.load(arrays, allow_pickle=False) as stored:
            for name in stored.files:
                group, _, item = name.partition("/")
                target = result.setdefault("examples", {}) if group == "examples" else result["metrics"].setdefault(group, {})
                target[item] = stored[name]
        return result
    result = compute() | {"stamp": stamp}
    flat = {f"examples/{k}": v for k, v in result.get("examples", {}).items()}
    flat |= {f"{g}/{k}": v for g, entry in result["metrics"].items() if isinstance(entry, dict)
             for k, v in entry.items() if isinstance(v, np.ndarray)}
    with atomic_path(arrays) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **flat)
    write_json(numbers, json_ready(result))
    return result


def _evaluation_stamp(config: EvalConfig) -> dict:
    """The evaluation sizes and the judges' profile: a cached result made with others is stale."""
    from dataclasses import asdict

    from facegan.evaluation.judges import JUDGE_PROFILES

    judges = asdict(JUDGE_PROFILES[config.judges]) if config.judges in JUDGE_PROFILES else config.judges
    return {"config": {**config.__dict__, "metrics": list(config.metrics)}, "judges": judges}


def table1(data: str | os.PathLike, out: str | os.PathLike, profile: str = "small",
           runs: str | os.PathLike = "runs/table1", models: Sequence[str] | None = None,
           progress: bool = True) -> Path:
    """``facegan experiment table1``: train, evaluate and report every Table 1 model; returns table1.md.

    runs: where the GAN runs, baseline files, judges and per-model evaluations are kept (reused and
    resumed on the next call); models: a subset of :data:`TABLE1_MODELS` keys (default all).
    """
    from facegan.baselines import BASELINES
    from facegan.train.loop import logged_training_seconds
    from facegan.train.prepare import ensure_encoded

    setup = lookup(EXPERIMENT_PROFILES, profile, "profile", "experiment")
    keys = list(models or TABLE1_MODELS)
    check_known(keys, TABLE1_MODELS, "model", "experiment")
    runs, data = Path(runs), Path(data)
    ds = open_dataset(data)
    ensure_encoded(ds, 64)
    timings_path = runs / "timings.json"
    timings = read_json(timings_path) if timings_path.exists() else {}

    def stage(name: str, fn, seconds=None):
        """Run ``fn``; record its time (or ``seconds()``, the work's own record) when first completed."""
        start = time.perf_counter()
        value = fn()
        if name not in timings:  # the first completion is the one that did the work
            timings.update(read_json(timings_path) if timings_path.exists() else {})  # another process's stages
            timings[name] = round(seconds() if seconds else time.perf_counter() - start, 1)
            write_json(timings_path, timings)
        return value

    paths = {}
    for key in keys:
        if key in GAN_VARIANTS:  # a run may have been resumed (or trained by `facegan train`): its log has the time
            paths[key] = stage(f"train/{key}", lambda k=key: _train_gan(data, runs / k, k, setup),
                               lambda k=key: logged_training_seconds(runs / k))
        elif key in BASELINES:
            paths[key] = stage(f"train/{key}", lambda k=key: _train_baseline(ds, runs / f"{k}.safetensors", k, progress))
    config = setup.evaluation
    evaluation = EvaluationData(ds, judges_profile=config.judges, judges_dir=str(runs / "judges"), progress=progress)
    folder = runs / "evaluation"
    stamp = _evaluation_stamp(config)
    results = [stage(f"evaluate/{REAL}", lambda: _cached_evaluation(folder, REAL, lambda: evaluate_real(evaluation, config),
                                                                     stamp))]
    for key in keys:
        generator = lambda k=key: load_generator(paths[k], TABLE1_MODELS[k])  # noqa: E731
        results.append(stage(f"evaluate/{key}", lambda k=key, g=generator: _cached_evaluation(
            folder, k, lambda: evaluate(g(), evaluation, config), stamp)))
    header = _header(ds, config, evaluation) | {"profile": profile, "train_overrides": list(setup.train_overrides),
                                                "timings_seconds": timings}
    out = Path(out)
    write_report(out, results, ds.template.triangles, header, name="table1",
                 title=f"Table 1 on {ds.root.name} (`facegan experiment table1 --profile {profile}`)",
                 extra_markdown=_table1_sections(results, timings))
    return out / "table1.md"


def _table1_sections(results: Sequence[dict], timings: dict) -> str:
    """The paper's table, the paper's findings checked on these numbers, and the time each stage took."""
    lines = ["## The paper's Table 1 (ICCV 2019, its datasets)", "", paper_table_markdown(), "",
             "## The paper's findings, checked on these numbers", "",
             "| finding (paper Sec. 5.4-5.5) | here | holds |", "|---|---|---|"]
    lines += [f"| {claim} | {evidence} | {'yes' if ok else 'no'} |" for claim, evidence, ok in findings(results)]
    total = sum(timings.values())
    lines += ["", f"## Time per stage (seconds; total {total / 3600:.1f} h)", "",
              "GAN training times are the runs' own logs (`log.csv`, summed over resumes); the judges are "
              "trained inside the first evaluation (`evaluate/real`).", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    return "\n".join(lines) + "\n"


# A pairwise finding whose two numbers differ by at most this fraction is not counted as holding.
TIE_FRACTION = 0.01


def findings(results: Sequence[dict]) -> list[tuple[str, str, bool]]:
    """Each of the paper's ablation findings as (claim, the numbers here, whether it holds)."""
    by_name = {r["model"]: r["metrics"] for r in results}

    def value(key: str, *path: str) -> float | None:
        node = by_name.get(TABLE1_MODELS.get(key, key))
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node if isinstance(node, (int, float)) else None

    gans = [k for k in GAN_VARIANTS if TABLE1_MODELS[k] in by_name]
    out = []

    def best(metric: tuple[str, ...], higher: bool, claim: str) -> None:
        values = {k: value(k, *metric) for k in gans}
        values = {k: v for k, v in values.items() if v is not None}
        if "full" in values and len(values) > 1:
            winner = (max if higher else min)(values, key=values.get)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
            out.append((claim, shown, winner == "full"))

    best(("decoupling", "expression", "percent"), True, "full model best in Dec-Expr among the variants")
    best(("specificity", "mean"), False, "full model best in specificity among the variants")
    pairs = [
        ("acgan", ("diversity", "global", "mean"), REAL, ("diversity", "global", "mean"), ">",
         "AC-GAN: inflated global diversity (above the training data's)"),
        ("acgan", ("roughness", "ratio"), "full", ("roughness", "ratio"), ">", "AC-GAN: noisier surfaces than the full model"),
        ("no-alternate", ("specificity", "mean"), "full", ("specificity", "mean"), ">",
         "w/o alternate training: worse specificity than the full model"),
        ("no-tv", ("roughness", "ratio"), "full", ("roughness", "ratio"), ">", "w/o TV: noisier surfaces than the full model"),
        ("id-only", ("decoupling", "expression", "percent"), "full", ("decoupling", "expression", "percent"), "<",
         "w/o expression classification: poor Dec-Expr"),
    ]
    real_name = next((r["model"] for r in results if r["model"].startswith("real")), REAL)
    for a, path_a, b, path_b, op, claim in pairs:
        va = value(a, *path_a)
        vb = value(real_name if b == REAL else b, *path_b)
        if va is not None and vb is not None:
            tie = abs(va - vb) <= TIE_FRACTION * max(abs(va), abs(vb))  # too close to call either way
            shown = f"{a} {va:.3g} vs {'real' if b == REAL else b} {vb:.3g}" + (" (within 1%)" if tie else "")
            out.append((claim, shown, not tie and (va > vb if op == ">" else va < vb)))
    return out

