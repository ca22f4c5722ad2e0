"""Every Table 1 metric (and the ones beyond it) for one face model on one dataset, plus the real-data row.

:func:`evaluate` runs a :class:`~facegan.evaluation.generators.FaceGenerator` through the metrics of
:mod:`facegan.metrics` with the paper's sizes (Sec. 5.3, supplementary "Decoupling Evaluation"):

- ``generalization``: fit every held-out test mesh, mean vertex error (mm); also over the test meshes
  labeled neutral, beside their distance to the span of the training people (:mod:`facegan.metrics.span`);
- ``specificity``: 1000 samples, exact nearest training mesh (mm), with the fraction of samples closer
  to a training mesh than the encode/decode round trip (memorization);
- ``diversity``: 10,000 random pairs: global, same identity code, same expression code (mm);
- ``decoupling``: n = 100 anchors x m = 100 faces sharing the identity (resp. expression) code, the
  percentage judged "same" by the dataset's embedding networks (:mod:`facegan.evaluation.judges`);
- ``oracle``: the same groups projected on the ICT bases (synthesized data only): within-group variance
  of identity and expression relative to the training data (:mod:`facegan.metrics.oracle`);
- ``distribution``: MMD, coverage and 1-NNA (mesh distances) of as many samples as test meshes, and KID
  on the identity and expression embeddings, against the test split;
- ``roughness``: mean Laplacian magnitude of the samples, against the real meshes';
- ``transfer`` (models that edit, synthesized data only): expression transfer between test faces
  against the ground-truth mesh of the target identity with the source's expression.

:func:`evaluate_real` computes the same numbers for held-out real faces standing in for a perfect model,
so each model's number reads against what real data scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

from facegan.data.dataset import RegisteredDataset
from facegan.errors import FaceganError, check_known
from facegan.evaluation.generators import FACTORS, FaceGenerator, can_share_identity, can_transfer
from facegan.metrics.decoupling import decoupling_score
from facegan.metrics.distances import NearestMeshIndex
from facegan.metrics.distribution import distribution_metrics, kernel_inception_distance
from facegan.metrics.diversity import diversity, training_diversity
from facegan.metrics.oracle import OracleProjector, oracle_decoupling
from facegan.metrics.roughness import roughness

__all__ = ["EvalConfig", "EvaluationData", "evaluate", "evaluate_real", "METRIC_GROUPS"]

EXAMPLE_ROWS, EXAMPLE_COLUMNS = 4, 6  # meshes kept for the figures (paper Figures 3, 4, 7, 8)
METRIC_GROUPS = ("generalization", "specificity", "diversity", "decoupling", "oracle", "distribution", "roughness",
                 "transfer")


@dataclass
class EvalConfig:
    """Sizes of the evaluation (defaults: the paper's).

    specificity_samples: n of specificity (paper 1000); diversity_pairs (paper 10,000);
    decoupling_groups x decoupling_group_size: n anchors x m faces sharing a code (paper 100 x 100),
    also used by the oracle and the per-factor diversities; distribution_samples: samples compared with
    the test split by MMD/COV/1-NNA/KID (0 = as many as test meshes); generalization_limit: test
    meshes fitted (0 = all); principal_components: the k of the real row's curve of the test meshes' error
    on the training meshes' first k principal directions (:mod:`facegan.metrics.span`); transfer_pairs:
    (target, source) test pairs of the transfer check; judges: judge profile ("small", "paper") or "none" to
    skip the learned decoupling and KID; metrics: the groups of :data:`METRIC_GROUPS` to compute; seed: of
    every draw.
    """

    specificity_samples: int = 1000
    diversity_pairs: int = 10000
    decoupling_groups: int = 100
    decoupling_group_size: int = 100
    distribution_samples: int = 0
    generalization_limit: int = 0
    principal_components: tuple[int, ...] = (10, 20, 40, 85, 200, 400)
    transfer_pairs: int = 32
    judges: str = "small"
    metrics: tuple[str, ...] = METRIC_GROUPS
    seed: int = 0

    def validate(self) -> "EvalConfig":
        check_known(self.metrics, METRIC_GROUPS, "metric", "evaluate")
        if min(self.specificity_samples, self.diversity_pairs, self.decoupling_groups) < 1 or self.decoupling_group_size < 2:
            raise FaceganError("evaluate: sample counts must be >= 1 and the group size >= 2")
        if any(k < 0 for k in self.principal_components):
            raise FaceganError(f"evaluate: principal_components={self.principal_components}: counts must be >= 0")
        return self


@dataclass
class EvaluationData:
    """What every evaluation on one dataset shares, computed once: train/test meshes in RAM, the exact
    nearest-mesh index of the training set, the round-trip floor, the training people's span, the judges
    and the ICT oracle.

    judges_dir: where the dataset's embedding networks are cached (default DATA/judges);
    ict: path of the ICT model for the oracle (None = the default location; the oracle is skipped when
    the dataset was not synthesized from ICT or the model is not found).
    """

    dataset: RegisteredDataset
    judges_profile: str = "small"
    judges_dir: str | None = None
    ict: str | None = None
    progress: bool = True
    timings: dict = field(default_factory=dict)

    @cached_property
    def train(self) -> np.ndarray:
        """(M, V, 3) float32 mm training meshes."""
        return np.ascontiguousarray(self.dataset.meshes[self.dataset.split("train")])

    @cached_property
    def test(self) -> np.ndarray:
        """(T, V, 3) float32 mm held-out meshes."""
        rows = self.dataset.split("test")
        if len(rows) == 0:
            raise FaceganError(f"{self.dataset.root}: the dataset has no test split to evaluate on")
        return np.ascontiguousarray(self.dataset.meshes[rows])

    def labels(self, split: str) -> dict[str, np.ndarray]:
        rows = self.dataset.split(split)
        return {f: self.dataset.labels.class_indices(f)[rows] for f in FACTORS}

    @cached_property
    def index(self) -> NearestMeshIndex:
        return self._timed("index", lambda: NearestMeshIndex(self.train, progress=self.progress))

    @cached_property
    def roundtrip(self) -> np.ndarray:
        """(T,) mm per test mesh: mean vertex error of mesh -> 64 px uint8 geometry image -> mesh (dense)."""
        from facegan.data.encode import encoded_resolutions, load_codec
        from facegan.geometry_image.roundtrip import vertex_errors

        if 64 not in encoded_resolutions(self.dataset):
            raise FaceganError(f"{self.dataset.root}: not encoded at 64 px (run `facegan encode {self.dataset.root}`)")
        codec = load_codec(self.dataset, 64)
        return self._timed("roundtrip", lambda: np.concatenate(
            [vertex_errors(codec, self.test[s:s + 64], "dense", "uint8").mean(axis=1) for s in range(0, len(self.test), 64)]))

    @cached_property
    def identity_span(self) -> dict | None:
        """The training people's span (:mod:`facegan.metrics.span`): ``rows`` (n,) indices into the test split
        of its meshes labeled neutral, ``distance`` (n,) mm, each one's distance to the affine hull of the
        training people's neutral faces (each the mean of that person's neutral meshes). None when either
        split has no neutral mesh."""
        from facegan.baselines.common import NEUTRAL, training_set
        from facegan.metrics.span import affine_span_residual

        names = self.dataset.labels.class_names("expression")
        if NEUTRAL not in names:
            return None
        rows = np.flatnonzero(self.labels("test")["expression"] == names.index(NEUTRAL))
        if len(rows) == 0:
            return None
        train = training_set(self.dataset, self.train)
        if NEUTRAL not in train.expression_names:
            return None
        faces, has_neutral = train.neutral_faces()  # (I, 3V) float64, (I,)
        basis = faces[has_neutral].numpy().reshape(-1, *self.train.shape[1:])
        return {"rows": rows, "distance": affine_span_residual(self.test[rows], basis)["per_face"]}

    def principal_components_curve(self, components: Sequence[int]) -> dict[int, float]:
        """{k: mm}: the test meshes' mean error on the first k principal directions of the training meshes
        (:mod:`facegan.metrics.span`), the best k-dimensional linear model of the training set."""
        from facegan.metrics.span import affine_span_residual

        return self._timed("principal_components", lambda: affine_span_residual(
            self.test, self.train, components=components)["by_components"])

    def neutral_generalization(self, rows: np.ndarray, per_mesh: np.ndarray) -> dict:
        """For per-mesh errors ``per_mesh`` (n,) mm of the test meshes ``rows`` (n,): ``neutral_mean``, their mean
        over the neutral ones, and ``training_span_neutral``, those same meshes' distance to the training people's
        span (:attr:`identity_span`); empty when there is none to compare."""
        span = self.identity_span
        if span is None:
            return {}
        on_neutral = np.isin(rows, span["rows"])
        if not on_neutral.any():
            return {}
        distance = span["distance"][np.searchsorted(span["rows"], rows[on_neutral])]
        return {"neutral_mean": float(per_mesh[on_neutral].mean()), "neutral_n": int(on_neutral.sum()),
                "training_span_neutral": float(distance.mean())}

    @cached_property
    def judges(self) -> dict:
        from pathlib import Path

        from facegan.evaluation.judges import dataset_judges

        cache = Path(self.judges_dir) if self.judges_dir else self.dataset.root / "judges" / self.judges_profile
        return self._timed("judges", lambda: dataset_judges(self.dataset, cache, self.judges_profile, self.progress))

    @cached_property
    def narrow_ict(self):
        """The :class:`~facegan.data.ict.NarrowICT` that made the data, or None (not synthesized from ICT,
        model not found, or another vertex count): the oracle and the transfer check need it."""
        from facegan.data.ict import load_ict

        if self.dataset.info.get("provenance", {}).get("source") != "ict-synth":
            return None
        try:
            narrow = load_ict(self.ict).narrow()
        except FaceganError:
            return None
        return narrow if narrow.neutral.shape[0] == self.train.shape[1] else None

    @cached_property
    def oracle(self) -> tuple[OracleProjector, dict[str, np.ndarray]] | None:
        """(projector onto the ICT bases, reference coefficients of the training meshes) or None."""
        if self.narrow_ict is None:
            return None
        projector = OracleProjector(self.narrow_ict)
        return projector, self._timed("oracle_reference", lambda: projector.project(self.train))

    def transfer_pairs(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(target rows (P,), source rows (P,)) into the dataset, P <= n: targets are each test identity's
        most neutral mesh (smallest ground-truth blend weights), sources the most expressive test meshes
        of other identities, each used once."""
        rows = self.dataset.split("test")
        identity = self.dataset.labels.class_indices("identity")[rows]
        strength = np.linalg.norm(self.dataset.factors["expression_coeffs"][rows], axis=1)
        people = np.unique(identity)
        if len(people) < 2:
            raise FaceganError(f"{self.dataset.root}: the transfer check needs two test identities")
        neutral = {p: rows[identity == p][np.argmin(strength[identity == p])] for p in people}
        targets, sources = [], []
        for k, source in enumerate(rows[np.argsort(-strength, kind="stable")]):
            if len(targets) == n:
                break
            person = people[(k + seed) % len(people)]
            if self.dataset.labels.class_indices("identity")[source] != person:
                targets.append(neutral[person])
                sources.append(source)
        return np.array(targets), np.array(sources)

    def transfer_truth(self, targets: np.ndarray, sources: np.ndarray) -> np.ndarray:
        """(P, V, 3) mm ground truth of a transfer: each target's identity with its source's expression,
        made the way the dataset was (deformation transfer or additive offsets)."""
        from facegan.data.deformation_transfer import DeformationTransfer, expressions_for_identity

        method = self.dataset.info["provenance"].get("method", "transfer")
        dt = DeformationTransfer(self.narrow_ict.neutral, self.dataset.template.triangles) if method == "transfer" else None
        factors = self.dataset.factors
        out = np.empty((len(targets), *self.train.shape[1:]), np.float32)
        for target in np.unique(targets):  # one deformation-transfer factorization per target identity
            pick = targets == target
            out[pick] = expressions_for_identity(self.narrow_ict, factors["identity_coeffs"][target],
                                                 factors["expression_coeffs"][sources[pick]], method, dt)
        return out

    def _timed(self, name: str, fn):
        start = time.perf_counter()
        value = fn()
        self.timings[name] = round(time.perf_counter() - start, 2)
        return value


# ------------------------------------------------------------------------------------------- models


def evaluate(generator: FaceGenerator, data: EvaluationData, config: EvalConfig | None = None) -> dict:
    """All metric groups of ``config.metrics`` for one model -> JSON-ready dict.

    Keys: model, metrics: {group: numbers}, seconds: {group: wall time}, examples: meshes for the figures
    ("random" (6, V, 3); "identity"/"expression" (4, 6, V, 3), rows sharing that code; "targets"/"fits"
    (4, V, 3) test meshes and their fits). NumPy arrays (examples, per-vertex fitting errors) are for
    figures; :func:`facegan.evaluation.report.json_ready` drops them.
    """
    config = (config or EvalConfig()).validate()
    wanted = set(config.metrics)
    if config.judges == "none":
        wanted.discard("decoupling")
    out: dict = {"model": generator.name, "metrics": {}, "seconds": {}}

    def run(group: str, fn) -> None:
        if group in wanted:
            start = time.perf_counter()
            out["metrics"][group] = fn()
            out["seconds"][group] = round(time.perf_counter() - start, 2)

    rng = np.random.default_rng(config.seed)
    run("generalization", lambda: _generalization(generator, data, config))
    samples = np.zeros((0, generator.n_vertices, 3), np.float32)
    if wanted & {"specificity", "roughness", "distribution", "diversity"}:
        samples = generator.sample(max(config.specificity_samples, _n_distribution(config, data)), seed=config.seed)
    out["examples"] = {"random": samples[:EXAMPLE_COLUMNS].copy()} if len(samples) else {}
    run("specificity", lambda: _specificity(samples[:config.specificity_samples], data))
    run("roughness", lambda: _roughness(samples[:config.specificity_samples], data))
    run("distribution", lambda: _distribution(samples[:_n_distribution(config, data)], data, config))
    if wanted & {"diversity", "decoupling", "oracle"}:
        start = time.perf_counter()
        grouped = {f: _groups(generator, f, config) for f in FACTORS}
        out["seconds"]["sampling_groups"] = round(time.perf_counter() - start, 2)
        out["examples"] |= {f: grouped[f][:EXAMPLE_ROWS, :EXAMPLE_COLUMNS].copy() for f in FACTORS}
        run("diversity", lambda: {"global": diversity(samples, config.diversity_pairs, rng=rng)}
            | {f: _within_groups(grouped[f], config.diversity_pairs, rng) for f in FACTORS})
        run("decoupling", lambda: {f: _decoupling(data.judges[f], grouped[f]) for f in FACTORS})
        if data.oracle is not None:
            run("oracle", lambda: {f: oracle_decoupling(data.oracle[0], grouped[f], data.oracle[1], fixed=f)
                                   for f in FACTORS})
    if can_transfer(generator) and data.narrow_ict is not None and "expression_coeffs" in data.dataset.factors:
        run("transfer", lambda: _transfer(generator, data, config))
    return out


def _n_distribution(config: EvalConfig, data: EvaluationData) -> int:
    return config.distribution_samples or len(data.test)


def _groups(generator: FaceGenerator, factor: str, config: EvalConfig) -> np.ndarray:
    """(n, m + 1, V, 3): n groups sharing ``factor``'s code; member 0 is the anchor x_i."""
    n, m = config.decoupling_groups, config.decoupling_group_size
    seed = config.seed + 1 + FACTORS.index(factor)
    return generator.sample(n, fix=factor, m=m + 1, seed=seed).reshape(n, m + 1, generator.n_vertices, 3)


def _within_groups(groups: np.ndarray, pairs: int, rng: np.random.Generator) -> dict:
    n, m1 = groups.shape[:2]
    return diversity(groups.reshape(n * m1, *groups.shape[2:]), pairs, groups=np.repeat(np.arange(n), m1), rng=rng)


def _decoupling(judge, groups: np.ndarray) -> dict:
    result = decoupling_score(judge.embedder, groups[:, 0], groups[:, 1:], judge.tau)
    return {"percent": result["percent"], "tau": judge.tau, "validation_accuracy": judge.accuracy,
            "validation_far": judge.far}


def _generalization(generator: FaceGenerator, data: EvaluationData, config: EvalConfig) -> dict:
    rows = np.arange(len(data.test))
    if config.generalization_limit and len(rows) > config.generalization_limit:
        rows = np.linspace(0, len(rows) - 1, config.generalization_limit).round().astype(int)
    targets = data.test[rows]
    fitted = generator.fit(targets, seed=config.seed)
    per_vertex = np.linalg.norm(fitted - targets, axis=-1)  # (T, V) mm
    per_mesh = per_vertex.mean(axis=1)
    return {"mean": float(per_mesh.mean()), "median": float(np.median(per_mesh)), "max": float(per_mesh.max()),
            "n": int(len(targets)), "floor_roundtrip": float(data.roundtrip.mean()),
            **data.neutral_generalization(rows, per_mesh),
            "vertex_errors": per_vertex.astype(np.float32),
            "targets": targets[:EXAMPLE_ROWS].copy(), "fits": fitted[:EXAMPLE_ROWS].copy()}


def _transfer(generator: FaceGenerator, data: EvaluationData, config: EvalConfig) -> dict:
    """Expression transfer against ground truth: error_mm = mean vertex distance of the edited face to the
    target identity wearing the source's expression (untouched_mm: the same for the unedited target, what
    doing nothing scores). The oracle splits it: identity_change_mm (identity geometry of the result vs the
    target's, 0 = identity kept; identity_gap_mm = target vs source, for scale) and expression_miss_mm
    (expression geometry of the result vs the source's; expression_gap_mm = target vs source). The
    ``detail_`` entries measure the same for the edit applied to the target mesh itself (keep_detail), from
    the same fits; fit_identity_change_mm is the identity change of the target's own fit, before any edit
    (the part of identity_change_mm that fitting alone makes), fit_expression_miss_mm the expression miss
    of the source's own fit (how far from the source's expression the model's face already is before any
    edit); the ``shared_`` and ``shared_detail_`` entries the same again with the faces of each person fitted
    with one identity code, for models that can (:func:`can_share_identity`)."""
    from facegan.fit import keep_detail

    targets_rows, sources_rows = data.transfer_pairs(config.transfer_pairs, config.seed)
    targets, sources = data.dataset.meshes[targets_rows], data.dataset.meshes[sources_rows]
    alone = generator.transfer(targets, sources, "expression", seed=config.seed)
    results = {"": alone.edited, "detail_": keep_detail(alone.edited, alone.target_fit, np.asarray(targets, np.float32))}
    if can_share_identity(generator):
        person = data.dataset.labels.class_indices("identity")
        shared = generator.transfer(targets, sources, "expression", seed=config.seed,
                                    people=(person[targets_rows], person[sources_rows]))
        results |= {"shared_": shared.edited,
                    "shared_detail_": keep_detail(shared.edited, shared.target_fit, np.asarray(targets, np.float32))}
    truth = data.transfer_truth(targets_rows, sources_rows)
    projector = data.oracle[0]
    coeffs = {k: projector.project(x) for k, x in (("target", targets), ("source", sources))}

    def rms(factor: str, a: dict, b: dict) -> float:
        modes = projector.identity_modes if factor == "identity" else projector.expression_modes
        diff = ((a[factor] - b[factor]) @ modes).reshape(len(targets), -1, 3)
        return float(np.sqrt((diff ** 2).sum(-1).mean()))

    out = {"pairs": int(len(targets)), "untouched_mm": float(np.linalg.norm(targets - truth, axis=-1).mean()),
           "identity_gap_mm": rms("identity", coeffs["source"], coeffs["target"]),
           "expression_gap_mm": rms("expression", coeffs["target"], coeffs["source"]),
           "fit_identity_change_mm": rms("identity", projector.project(alone.target_fit), coeffs["target"]),
           "fit_expression_miss_mm": rms("expression", projector.project(alone.source_fit), coeffs["source"])}
    for prefix, result in results.items():
        projected = projector.project(result)
        out |= {f"{prefix}error_mm": float(np.linalg.norm(result - truth, axis=-1).mean()),
                f"{prefix}identity_change_mm": rms("identity", projected, coeffs["target"]),
                f"{prefix}expression_miss_mm": rms("expression", projected, coeffs["source"])}
    return out


def _specificity(samples: np.ndarray, data: EvaluationData) -> dict:
    found = data.index.query(samples)
    threshold = float(data.roundtrip.mean())
    return {"mean": float(found.distance.mean()), "std": float(found.distance.std()), "n": int(len(samples)),
            "memorization_threshold": threshold, "memorized_fraction": float(np.mean(found.distance < threshold))}


def _roughness(meshes: np.ndarray, data: EvaluationData) -> dict:
    result = roughness(meshes, data.dataset.template, reference=data.test)
    return {k: result[k] for k in ("mean", "std", "reference_mean", "ratio")}


def _distribution(samples: np.ndarray, data: EvaluationData, config: EvalConfig) -> dict:
    out = distribution_metrics(samples, data.test)
    if config.judges != "none":
        for factor, judge in data.judges.items():
            kid = kernel_inception_distance(judge.embedder(samples), _test_embeddings(data, factor), rng=config.seed)
            out[f"kid_{factor}"] = kid["kid"]
    return out


def _test_embeddings(data: EvaluationData, factor: str) -> np.ndarray:
    cache = data.__dict__.setdefault("_test_embeddings", {})
    if factor not in cache:
        cache[factor] = data.judges[factor].embedder(data.test)
    return cache[factor]


# ---------------------------------------------------------------------------------------- real data


def evaluate_real(data: EvaluationData, config: EvalConfig | None = None) -> dict:
    """The reference row: held-out real faces scored as if a perfect model had made them.

    generalization = the encode/decode round-trip floor of the test meshes, with the training set's references
    (:mod:`facegan.metrics.span`: the training people's span on the neutral test meshes, the principal
    components curve); specificity = test meshes against the training set; diversity = the training set's,
    with its labels (as the paper reports); decoupling = the percentage of same-label test pairs judged
    "same" (groups: one anchor per label, up to m members); oracle = training groups sharing a label;
    distribution = as many training meshes as test meshes against the test split; roughness = the test
    meshes'.
    """
    config = (config or EvalConfig()).validate()
    wanted = set(config.metrics)
    rng = np.random.default_rng(config.seed)
    out: dict = {"model": "real (held-out)", "metrics": {}, "seconds": {}}

    def run(group: str, fn) -> None:
        if group in wanted:
            start = time.perf_counter()
            out["metrics"][group] = fn()
            out["seconds"][group] = round(time.perf_counter() - start, 2)

    floor = data.roundtrip
    run("generalization", lambda: {"mean": float(floor.mean()), "median": float(np.median(floor)),
                                   "max": float(floor.max()), "n": int(len(floor)), "floor_roundtrip": float(floor.mean()),
                                   **data.neutral_generalization(np.arange(len(floor)), floor),
                                   "principal_components": data.principal_components_curve(config.principal_components)})
    run("specificity", lambda: _specificity(data.test, data))
    run("roughness", lambda: _roughness(data.test, data))
    train_labels = data.labels("train")
    sample = rng.choice(len(data.train), min(len(data.test), len(data.train)), replace=False)
    run("distribution", lambda: _distribution(data.train[np.sort(sample)], data, config))
    run("diversity", lambda: training_diversity(data.train, train_labels["identity"], train_labels["expression"],
                                                config.diversity_pairs, rng))
    if config.judges != "none":
        test_labels = data.labels("test")
        run("decoupling", lambda: {f: _real_decoupling(data.judges[f], data.test, test_labels[f],
                                                       config.decoupling_group_size, rng) for f in FACTORS})
    if data.oracle is not None:
        run("oracle", lambda: {f: oracle_decoupling(data.oracle[0], _label_groups(data.train, train_labels[f],
                                                    config.decoupling_group_size, rng), data.oracle[1], fixed=f)
                               for f in FACTORS})
    return out


def _label_groups(meshes: np.ndarray, labels: np.ndarray, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per label with >= 2 meshes, up to m + 1 of its meshes (first = anchor), as (k, V, 3) arrays."""
    groups = []
    for label in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == label)
        if len(rows) >= 2:
            groups.append(meshes[np.sort(rng.choice(rows, min(m + 1, len(rows)), replace=False))])
    return groups


def _real_decoupling(judge, meshes: np.ndarray, labels: np.ndarray, m: int, rng: np.random.Generator) -> dict:
    groups = _label_groups(meshes, labels, m, rng)
    if not groups:
        return {"percent": float("nan"), "tau": judge.tau}
    result = decoupling_score(judge.embedder, np.stack([g[0] for g in groups]), [g[1:] for g in groups], judge.tau)
    return {"percent": result["percent"], "tau": judge.tau, "validation_accuracy": judge.accuracy,
            "validation_far": judge.far}
