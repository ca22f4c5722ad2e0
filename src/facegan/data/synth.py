"""Synthesis of a registered, sparsely labeled face dataset from the ICT face model.

The dataset mirrors the paper's training data (Sec. 5.2), with ICT identities standing in for
the subjects:

- ``static`` (like BU-3DFE / Bosphorus): each identity in neutral + the 6 basic emotions, every
  mesh labeled with identity and expression;
- ``motion`` (like BU-4DFE): per identity one neutral -> apex -> neutral sequence per emotion;
  expression labels only on the first and last frame (neutral) and the apex frame (the emotion);
- ``spontaneous`` (like BP4D): smooth sequences of sparse random blendshape mixtures; one
  neutral frame labeled per identity (the first frame of its first sequence, exactly neutral).

Identity labels are on every mesh; about 7% of the meshes carry an expression label. The test
split is whole held-out identities from the motion and spontaneous parts, frames subsampled
(175 meshes in the paper and in the ``small`` profile). Each part has its own identities.

Generation is two steps: :func:`plan_dataset` draws every label and blend weight (cheap, no
geometry), and :func:`render` turns the plan into meshes identity by identity (one factorization
per identity for deformation transfer). :func:`synthesize` does both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from facegan.data import emotions as emo
from facegan.data.deformation_transfer import METHODS, DeformationTransfer, expressions_for_identity
from facegan.data.ict import N_IDENTITY_MODES, ICTModel
from facegan.errors import check_known, lookup
from facegan.mesh.template import Template

PARTS = ("static", "motion", "spontaneous")
LABEL_COLUMNS = ("mesh_id", "identity", "expression", "part", "sequence", "frame", "split")
_BASIC = emo.EMOTIONS[1:]  # the six emotions a motion sequence can show


@dataclass(frozen=True)
class Profile:
    """Dataset size. Per part: identities and frames; test: held-out identities and kept frames.

    motion_frames: frames per motion sequence (one sequence per emotion and identity);
    spont_sequences x spont_frames per spontaneous identity; test motion sequences keep
    ``test_motion_keep`` evenly spaced frames (first, apex and last among them); a test
    spontaneous identity has one ``test_spont_length``-frame sequence of which
    ``test_spont_keep`` evenly spaced frames are kept.
    """

    static_ids: int
    motion_ids: int
    motion_frames: int
    spont_ids: int
    spont_sequences: int
    spont_frames: int
    test_motion_ids: int
    test_motion_keep: int
    test_spont_ids: int
    test_spont_length: int
    test_spont_keep: int

    def counts(self) -> dict[str, int]:
        """Meshes and expression-labeled meshes per part/split, without generating anything."""
        n_emo = len(_BASIC)
        c = {
            "static": self.static_ids * (n_emo + 1),
            "motion": self.motion_ids * n_emo * self.motion_frames,
            "spontaneous": self.spont_ids * self.spont_sequences * self.spont_frames,
            "test_motion": self.test_motion_ids * n_emo * self.test_motion_keep,
            "test_spontaneous": self.test_spont_ids * self.test_spont_keep,
        }
        labeled = (
            c["static"]
            + 3 * n_emo * (self.motion_ids + self.test_motion_ids)
            + self.spont_ids
            + self.test_spont_ids
        )
        c["total"] = sum(c.values())
        c["test"] = c["test_motion"] + c["test_spontaneous"]
        c["labeled"] = labeled
        return c


PROFILES: dict[str, Profile] = {
    # For unit tests: every part and split present, a few dozen meshes.
    "tiny": Profile(2, 1, 9, 1, 1, 12, 1, 3, 1, 12, 4),
    # ~3,000 meshes (2,917), 7.5% expression-labeled, 175 test meshes. Many short spontaneous
    # identities (60 training identities in all) so the GAN sees a varied identity space.
    "small": Profile(6, 4, 50, 50, 1, 30, 3, 7, 1, 171, 49),
    # ~30,000 meshes like the paper (30,559), 7.0% labeled, 176 test meshes (7 motion + 2 spontaneous ids).
    "paper": Profile(110, 66, 41, 39, 9, 38, 7, 3, 2, 150, 25),
}


@dataclass
class Plan:
    """Everything about a dataset except its geometry; rows are grouped by identity.

    labels: columns of :data:`LABEL_COLUMNS`, N entries each; identity_coeffs: (N, 100) float32;
    expression_coeffs: (N, 53) float32 ICT blend weights; emotion: (N,) int64 ground-truth index
    into :data:`facegan.data.emotions.EMOTIONS` (-1 for spontaneous frames other than the exactly
    neutral one); intensity: (N,) float32 (static/motion: fraction of the individual's full
    expression, 0 = neutral; spontaneous: the largest blend weight).
    """

    labels: dict[str, list]
    identity_coeffs: np.ndarray
    expression_coeffs: np.ndarray
    emotion: np.ndarray
    intensity: np.ndarray

    def __len__(self) -> int:
        return len(self.emotion)

    def identity_rows(self) -> list[np.ndarray]:
        """Row indices of each identity, in order of first appearance."""
        ids = np.asarray(self.labels["identity"])
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first)
        return [np.flatnonzero(inverse == k) for k in order]


@dataclass
class SynthResult:
    """A synthesized dataset.

    template: the narrow-area ICT template (6706 vertices, mm); meshes: (N, 6706, 3) float32 mm;
    labels: :data:`LABEL_COLUMNS` -> N values (mesh_id unique, identity on every mesh, expression
    "" where unlabeled, part, sequence "" for static, frame 0 for static, split "train"/"test");
    factors: identity_coeffs (N, 100) float32, expression_coeffs (N, 53) float32, emotion (N,)
    int64, intensity (N,) float32 (see :class:`Plan`); info: profile, seed, method, counts,
    labeled fraction, timings.
    """

    template: Template
    meshes: np.ndarray
    labels: dict[str, list]
    factors: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)


class _Rows:
    """Accumulates dataset rows."""

    def __init__(self) -> None:
        self.labels: dict[str, list] = {k: [] for k in LABEL_COLUMNS}
        self.identity: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.emotion: list[int] = []
        self.intensity: list[float] = []

    def add(self, *, mesh_id, identity, coeffs, weights, expression, part, sequence, frame, split, emotion, intensity):
        for key, value in zip(LABEL_COLUMNS, (mesh_id, identity, expression, part, sequence, int(frame), split)):
            self.labels[key].append(value)
        self.identity.append(coeffs)
        self.weights.append(weights)
        self.emotion.append(int(emotion))
        self.intensity.append(float(intensity))

    def plan(self, n_expressions: int) -> Plan:
        n = len(self.emotion)
        return Plan(
            labels=self.labels,
            identity_coeffs=np.asarray(self.identity, np.float32).reshape(n, N_IDENTITY_MODES),
            expression_coeffs=np.asarray(self.weights, np.float32).reshape(n, n_expressions),
            emotion=np.asarray(self.emotion, np.int64),
            intensity=np.asarray(self.intensity, np.float32),
        )


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    return lookup(PROFILES, profile, "profile")


def plan_dataset(
    expression_names: Sequence[str] = emo.ICT_EXPRESSIONS, profile: str | Profile = "small", seed: int = 0
) -> Plan:
    """Draw identities, expressions and labels for a dataset (deterministic given ``seed``).

    Each identity has its own random stream (spawned from ``seed`` in identity order), so one
    identity's draws do not depend on how many frames the others have.
    """
    prof = get_profile(profile)
    names = list(expression_names)
    # (part, split) of each identity, in identity-number order.
    roles = (
        [("static", "train")] * prof.static_ids
        + [("motion", "train")] * prof.motion_ids
        + [("spontaneous", "train")] * prof.spont_ids
        + [("motion", "test")] * prof.test_motion_ids
        + [("spontaneous", "test")] * prof.test_spont_ids
    )
    streams = np.random.SeedSequence(seed).spawn(len(roles))
    rows = _Rows()
    for k, ((part, split), stream) in enumerate(zip(roles, streams)):
        rng = np.random.default_rng(stream)
        ident = f"id{k:03d}"
        coeffs = rng.standard_normal(N_IDENTITY_MODES).astype(np.float32)
        add = _PART_PLANNERS[part]
        add(rows, rng, names, prof, ident, coeffs, split)
    return rows.plan(len(names))


def _plan_static(rows: _Rows, rng, names, prof: Profile, ident: str, coeffs, split: str) -> None:
    for index, emotion in enumerate(emo.EMOTIONS):
        weights, intensity = emo.sample_emotion(emotion, rng, names)
        rows.add(
            mesh_id=f"static/{ident}/{emotion}", identity=ident, coeffs=coeffs, weights=weights,
            expression=emotion, part="static", sequence="", frame=0, split=split,
            emotion=index, intensity=intensity,
        )  # fmt: skip


def _plan_motion(rows: _Rows, rng, names, prof: Profile, ident: str, coeffs, split: str) -> None:
    n_frames = prof.motion_frames
    keep = np.arange(n_frames)
    if split == "test":
        keep = np.unique(np.round(np.linspace(0, n_frames - 1, prof.test_motion_keep)).astype(int))
    for emotion in _BASIC:
        index = emo.EMOTIONS.index(emotion)
        apex_weights, intensity = emo.sample_emotion(emotion, rng, names)
        # Onset a bit shorter or longer than offset, like real recordings; apex held a few frames.
        peak = int(round(rng.uniform(0.3, 0.55) * (n_frames - 1)))
        hold = int(rng.integers(0, max(1, n_frames // 10) + 1))
        if split == "test":  # the apex must be one of the kept frames
            interior = keep[1:-1]
            peak, hold = int(interior[np.argmin(np.abs(interior - peak))]), 0
        peak = min(max(peak, 1), n_frames - 2 - hold)
        curve = emo.intensity_curve(n_frames, peak, hold)
        seq = f"motion/{ident}/{emotion}"
        for t in keep:
            label = "neutral" if t in (0, n_frames - 1) else emotion if t == peak else ""
            rows.add(
                mesh_id=f"{seq}/{t:03d}", identity=ident, coeffs=coeffs,
                weights=emo.constrain(curve[t] * apex_weights, names), expression=label,
                part="motion", sequence=seq, frame=t, split=split,
                emotion=index if curve[t] > 0 else emo.NEUTRAL, intensity=curve[t] * intensity,
            )  # fmt: skip


def _plan_spontaneous(rows: _Rows, rng, names, prof: Profile, ident: str, coeffs, split: str) -> None:
    if split == "test":
        lengths = [prof.test_spont_length]
        keep = [np.unique(np.round(np.linspace(0, prof.test_spont_length - 1, prof.test_spont_keep)).astype(int))]
    else:
        lengths = [prof.spont_frames] * prof.spont_sequences
        keep = [np.arange(prof.spont_frames)] * prof.spont_sequences
    zeros = np.zeros(len(names), np.float32)
    for s, (length, kept) in enumerate(zip(lengths, keep)):
        # The identity's one labeled neutral: first frame of its first sequence, exactly neutral.
        weights = emo.mixture_sequence(rng, length, names, start=zeros if s == 0 else None)
        seq = f"spontaneous/{ident}/s{s:02d}"
        for t in kept:
            neutral = s == 0 and t == 0
            rows.add(
                mesh_id=f"{seq}/{t:03d}", identity=ident, coeffs=coeffs, weights=weights[t],
                expression="neutral" if neutral else "", part="spontaneous", sequence=seq, frame=t,
                split=split, emotion=emo.NEUTRAL if neutral else -1, intensity=float(weights[t].max()),
            )  # fmt: skip


_PART_PLANNERS = {"static": _plan_static, "motion": _plan_motion, "spontaneous": _plan_spontaneous}


def render(
    ict: ICTModel, plan: Plan, method: str = "transfer", progress: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Meshes of a plan, one identity at a time: yields (row indices (n,), meshes (n, 6706, 3)
    float32 mm). Lets a caller stream a large dataset to disk instead of holding it in memory."""
    check_known([method], METHODS, "method")
    narrow = ict.narrow()
    dt = DeformationTransfer(narrow.neutral, ict.narrow_template().triangles) if method == "transfer" else None
    with tqdm(total=len(plan), unit="mesh", desc=f"synthesizing ({method})", disable=not progress) as bar:
        for rows in plan.identity_rows():
            coeffs = plan.identity_coeffs[rows[0]]
            yield rows, expressions_for_identity(narrow, coeffs, plan.expression_coeffs[rows], method, dt)
            bar.update(len(rows))


def synthesize(
    ict: ICTModel, profile: str = "small", seed: int = 0, method: str = "transfer", progress: bool = True
) -> SynthResult:
    """Synthesize a whole dataset in memory (see module doc). ``small``: ~3,000 meshes (~240 MB);
    ``paper``: ~30,000 meshes (~2.4 GB; prefer :func:`plan_dataset` + :func:`render` to stream)."""
    check_known([method], METHODS, "method")
    start = time.perf_counter()
    plan = plan_dataset(ict.expression_names, profile, seed)
    template = ict.narrow_template()
    ict.narrow()
    planned = time.perf_counter()
    meshes = np.empty((len(plan), template.n_vertices, 3), np.float32)
    for rows, batch in render(ict, plan, method, progress):
        meshes[rows] = batch
    done = time.perf_counter()
    factors = {
        "identity_coeffs": plan.identity_coeffs,
        "expression_coeffs": plan.expression_coeffs,
        "emotion": plan.emotion,
        "intensity": plan.intensity,
    }
    info = {
        "profile": profile if isinstance(profile, str) else "custom",
        "seed": seed,
        "method": method,
        **summarize(plan),
        "timings": {
            "plan_and_load_s": round(planned - start, 3),
            "render_s": round(done - planned, 3),
            "total_s": round(done - start, 3),
        },
    }
    return SynthResult(template, meshes, plan.labels, factors, info)


def summarize(plan: Plan) -> dict:
    """Counts per part and split, identities, and the expression-labeled fraction."""
    labels = plan.labels
    part, split = np.asarray(labels["part"]), np.asarray(labels["split"])
    labeled = np.asarray(labels["expression"]) != ""
    ids = np.asarray(labels["identity"])
    counts = {f"{p}/{s}": int(((part == p) & (split == s)).sum()) for p in PARTS for s in ("train", "test")}
    return {
        "n_meshes": len(plan),
        "counts": {k: v for k, v in counts.items() if v},
        "identities": {s: int(len(np.unique(ids[split == s]))) for s in ("train", "test")},
        "n_labeled": int(labeled.sum()),
        "label_fraction": round(float(labeled.mean()), 4),
        "label_fraction_train": round(float(labeled[split == "train"].mean()), 4),
    }
