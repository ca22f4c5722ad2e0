"""Training hyperparameters: one dataclass, two profiles, TOML files and ``key=value`` overrides.

Resolution order (later wins): profile defaults -> TOML file -> ``--set key=value`` overrides.
The resolved config is saved as ``config.json`` in the run directory and compared on resume.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facegan.errors import FaceganError, check_known, lookup

VARIANTS = ("full", "acgan", "no-alternate", "no-tv", "no-feature", "id-only")
PROFILES = ("small", "paper")
AMP_MODES = ("none", "bf16")
D_NORMS = ("layer", "instance", "none")
DESCRIPTORS = ("head", "linear")
GENERATORS = ("joint", "additive")

# Keys that may differ between a run and its resumption: they change neither the networks nor the
# order of random draws, only how long the run lasts (and so where its learning-rate decay falls), the
# decay's length, how fast it runs, and how often it reports.
RESUMABLE_KEYS = frozenset({"epochs", "max_iters", "lr_decay_iters", "ckpt_every_iters", "ckpt_every_epochs",
                            "sample_every_epochs", "log_every", "sample_grid", "progress", "retain_heap",
                            "tensorboard"})


@dataclass
class TrainConfig:
    """All knobs of a training run. Defaults are the ``small`` profile (2 CPU cores, <= 2 h).

    Loss weights follow the paper (Sec. 5.1): ``lambda_c`` (Eq. 5), ``lambda_gan``, ``lambda_class``,
    ``lambda_feat``, ``lambda_tv`` (lambda1..lambda4 of Eq. 7). An *iteration* is ``d_steps``
    discriminator steps (each on a fresh real batch) followed by one generator step; an *epoch* is one
    pass of the real images through D, i.e. ``len(data) // (batch_size * d_steps)`` iterations.
    """

    profile: str = "small"
    variant: str = "full"
    seed: int = 0
    # latent space: one code per labeled factor, in the dataset's factor order, then noise
    code_sizes: list[int] = field(default_factory=lambda: [65, 15])
    extra_code_size: int = 15  # code size of factors beyond len(code_sizes) (e.g. a third factor "age")
    noise_size: int = 5
    # networks
    g_channels: int = 32  # generator channels at the last hidden resolution; doubles towards 4x4
    d_channels: int = 32  # discriminator channels of the first conv block; doubles per block
    max_channels_mult: int = 8  # channel cap = mult * base (matters at 128 px)
    feature_size: int = 2048  # penultimate layer of each classifier branch (paper: 2048)
    d_norm: str = "layer"
    # "joint": the paper's DC-GAN on all codes; "additive" (beyond the paper): the expression code gets a trunk
    # of its own whose output is added before the tanh (docs/training.md, "Additive generator")
    generator: str = "joint"
    # optimisation
    batch_size: int = 64
    d_steps: int = 3
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    # beyond the paper (constant rates, 0): both rates fall linearly over the last lr_decay_iters
    # iterations of the run (docs/training.md, "Learning-rate decay")
    lr_decay_iters: int = 0
    beta1: float = 0.5
    beta2: float = 0.999
    gp_weight: float = 10.0
    lambda_c: float = 0.1
    lambda_gan: float = 1.0
    lambda_class: float = 1.0
    lambda_feat: float = 0.5
    lambda_tv: float = 1e-4
    # beyond the paper (docs/training.md, "Random-code phase"): a third, all-random phase in the alternation,
    # and a critic trained on random-code fakes only
    random_phase: bool = False
    random_critic: bool = False
    # beyond the paper: C_exp also regresses an identity-normalized expression descriptor of this many
    # components, which the expression feature loss compares (docs/training.md, "Expression descriptor"; 0 = off)
    descriptor_size: int = 0
    # where the descriptor comes from: "head" (learned by C_exp) or "linear" (a fixed ridge regression from the
    # image, fitted once; docs/training.md, "Linear descriptor"); its ridge is relative to the images' norm
    descriptor: str = "head"
    descriptor_ridge: float = 3e-3
    # with the linear descriptor: fakes of a labeled expression code are pulled to their class's mean descriptor
    descriptor_prototypes: bool = False
    # beyond the paper: this fraction of the real faces D's classifiers see get another face's identity shape
    # (its expression on that identity; docs/training.md, "Recombined faces"; 0 = off)
    recombine: float = 0.0
    # with recombine: the critic's real faces are the recombined ones too (a real distribution in which every
    # identity wears every expression)
    recombine_critic: bool = False
    # with recombine: this fraction of the recombined faces wear a new identity drawn from a Gaussian over the
    # identity shapes, identity unlabeled, so the expression branch also learns identities beyond the training ones
    recombine_novel: float = 0.0
    # beyond the paper: a second critic on pairs of faces sharing the expression code, against pairs of real
    # faces wearing one expression residual on two identities (docs/training.md, "Pair critic"); G's weight
    pair_critic: bool = False
    lambda_pair: float = 1.0
    # beyond the paper (lambda_rec 0 = off): G also reproduces the real faces from their codes, refined by
    # rec_steps Adam steps of rate rec_lr at each visit, each free code kept within rec_radius * sqrt(its size)
    # (0 = no limit; docs/training.md, "Reconstruction of the real faces")
    lambda_rec: float = 0.0
    rec_steps: int = 4
    rec_lr: float = 0.1
    rec_radius: float = 1.0
    # with lambda_rec: this fraction of the reconstructed faces wear a new identity from the Gaussian over the
    # identity shapes, reproduced from the same blend of the fixed identity codes (docs/training.md, "New
    # identities in the reconstruction"; 0 = off)
    rec_novel: float = 0.0
    # beyond the paper: the fixed identity codes spread equally in every direction of their span, so that
    # rec_novel's blends of them are distributed as the prior there (docs/training.md, same section)
    isotropic_identity_codes: bool = False
    ema_beta: float = 0.999  # per generator step, with a (1+t)/(10+t) warm-up
    # length: stop at whichever comes first (0 = no limit on iterations). The small profile is bounded by
    # its time budget (max_iters), not by epochs, whose length depends on the dataset size
    epochs: int = 1000
    max_iters: int = 3000
    # speed
    amp: str = "bf16"  # autocast dtype on CPU and CUDA; "none" = float32
    channels_last: bool = True
    retain_heap: bool = True  # on the CPU, glibc keeps freed memory for reuse (facegan.device.retain_freed_memory)
    # reporting
    ckpt_every_iters: int = 250
    ckpt_every_epochs: int = 5  # small datasets make short epochs: a checkpoint is ~250 MB at small widths
    sample_every_epochs: int = 5
    log_every: int = 25
    sample_grid: int = 8  # the sample grid is sample_grid x sample_grid
    progress: bool = True
    tensorboard: bool = False  # also write log.csv's statistics and the sample grids as TensorBoard events

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict (e.g. a saved ``config.json``), type-checking every value."""
        cfg = cls()
        for key, value in values.items():
            _set_field(cfg, key, value, source)
        cfg.validate()
        return cfg

    def validate(self) -> "TrainConfig":
        """Raise :class:`FaceganError` on values no run can use; returns self."""
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("profile", self.profile, PROFILES)
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("d_norm", self.d_norm, D_NORMS)
        _check_choice("generator", self.generator, GENERATORS)
        positive = ["noise_size", "extra_code_size", "g_channels", "d_channels", "max_channels_mult",
                    "feature_size", "batch_size", "d_steps", "epochs", "ckpt_every_iters", "ckpt_every_epochs",
                    "sample_every_epochs", "log_every", "sample_grid", "descriptor_ridge"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise FaceganError(f"config {key}={getattr(self, key)}: must be positive")
        # 0 turns each of these off (max_iters: no limit; lr_decay_iters: constant rates)
        for key in ("descriptor_size", "lambda_pair", "lambda_rec", "lr_decay_iters", "max_iters"):
            if getattr(self, key) < 0:
                raise FaceganError(f"config {key}={getattr(self, key)}: must be >= 0 (0 = off)")
        for key in ("recombine", "recombine_novel", "rec_novel"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise FaceganError(f"config {key}={getattr(self, key)}: must be a fraction in [0, 1]")
        if not self.code_sizes or any(s <= 0 for s in self.code_sizes):
            raise FaceganError(f"config code_sizes={self.code_sizes}: need positive sizes")
        _check_choice("descriptor", self.descriptor, DESCRIPTORS)
        if self.descriptor_prototypes and not (self.descriptor_size and self.descriptor == "linear"):
            raise FaceganError("config descriptor_prototypes needs descriptor='linear' and descriptor_size > 0")
        if self.recombine_critic and not self.recombine:
            raise FaceganError("config recombine_critic needs recombine > 0")
        if self.recombine_novel and not self.recombine:
            raise FaceganError("config recombine_novel needs recombine > 0")
        if self.rec_steps < 0 or self.rec_lr <= 0 or self.rec_radius < 0:
            raise FaceganError(f"config rec_steps={self.rec_steps}, rec_lr={self.rec_lr}, "
                               f"rec_radius={self.rec_radius}: need rec_steps >= 0, rec_lr > 0 and rec_radius >= 0")
        if self.rec_novel and not self.lambda_rec:
            raise FaceganError("config rec_novel needs lambda_rec > 0")
        if not 0.0 <= self.ema_beta < 1.0:
            raise FaceganError(f"config ema_beta={self.ema_beta}: must be in [0, 1)")
        return self

    def variant_spec(self, n_factors: int):
        """The :class:`~facegan.nn.losses.VariantSpec` of this config for ``n_factors`` factors."""
        from facegan.nn.losses import variant_spec

        return variant_spec(self.variant, n_factors, self.random_phase, self.random_critic)

    def build_generator(self, code_sizes: list[int], mask):
        """The :class:`~facegan.nn.networks.Generator` of this config for codes of ``code_sizes`` and a chart
        ``mask`` (R, R) bool."""
        from facegan.nn.networks import Generator
        from facegan.train.data import EXPRESSION

        if self.generator == "additive" and len(code_sizes) <= EXPRESSION:
            raise FaceganError("config generator='additive' needs an expression factor")
        return Generator(code_sizes, self.noise_size, mask, self.g_channels, self.max_channels_mult,
                         EXPRESSION if self.generator == "additive" else None)

    def code_sizes_for(self, n_factors: int) -> list[int]:
        """Code size of each of ``n_factors`` factors (extra factors get ``extra_code_size``)."""
        return [self.code_sizes[i] if i < len(self.code_sizes) else self.extra_code_size for i in range(n_factors)]


PROFILE_VALUES: dict[str, dict[str, Any]] = {
    # widths 32 with bf16: 221 GFLOP per iteration (benchmarks/bench_train_step.py), 1.85 s per iteration
    # measured on one loaded core; 3000 iterations (~65 epochs of the small dataset) is the 2-hour budget.
    # Samples were plausible faces by iteration 500 in a sanity run
    "small": {},
    # the paper's DC-GAN widths, 200 epochs; meant for a GPU
    "paper": {"g_channels": 64, "d_channels": 64, "max_iters": 0, "epochs": 200, "ckpt_every_iters": 1000,
              "ckpt_every_epochs": 1, "sample_every_epochs": 1, "log_every": 50},
}


def make_config(profile: str = "small", toml_path: str | Path | None = None,
                overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Resolve a config: ``profile`` defaults, then the TOML file, then ``key=value`` overrides.

    A ``profile`` key in the TOML file or the overrides selects the starting profile instead.
    """
    file_values: dict[str, Any] = load_toml(toml_path) if toml_path is not None else {}
    parsed = [_split_override(o) for o in overrides]
    for key, raw in parsed:
        if key == "profile":
            profile = raw
    profile = file_values.get("profile", profile) if not any(k == "profile" for k, _ in parsed) else profile
    _check_choice("profile", profile, PROFILES)
    cfg = TrainConfig(profile=profile)
    for key, value in PROFILE_VALUES[profile].items():
        setattr(cfg, key, value)
    for key, value in file_values.items():
        _set_field(cfg, key, value, str(toml_path))
    for key, raw in parsed:
        _set_field(cfg, key, _parse_value(cfg, key, raw), "--set")
    return cfg.validate()


def apply_overrides(cfg: TrainConfig, overrides: typing.Sequence[str]) -> TrainConfig:
    """Return a copy of ``cfg`` with ``key=value`` strings applied (type-checked)."""
    cfg = dataclasses.replace(cfg, code_sizes=list(cfg.code_sizes))
    for key, raw in (_split_override(o) for o in overrides):
        _set_field(cfg, key, _parse_value(cfg, key, raw), "--set")
    return cfg.validate()


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML table of config values (a ``[train]`` table is also accepted)."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FaceganError(f"{path}: not valid TOML ({exc})") from None
    if set(values) == {"train"} and isinstance(values["train"], dict):
        values = values["train"]
    return values


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    from facegan.fileio import write_json

    write_json(path, cfg.to_dict())


def config_differences(saved: dict[str, Any], requested: TrainConfig) -> list[str]:
    """Keys whose values differ between a saved config dict and ``requested`` (ignoring RESUMABLE_KEYS).

    A key the saved config lacks was added to facegan after that run started, which then trained with the
    key's default (every such key defaults to the earlier behaviour)."""
    wanted, defaults = requested.to_dict(), TrainConfig().to_dict()
    keys = sorted((set(saved) | set(wanted)) - RESUMABLE_KEYS)
    return [k for k in keys if saved.get(k, defaults.get(k)) != wanted.get(k)]


# ---------------------------------------------------------------------------------------------- helpers

def _known_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_choice(key: str, value: Any, choices: typing.Sequence[str]) -> None:
    if value not in choices:
        raise FaceganError(f"config {key}={value!r}: expected one of {', '.join(choices)}")


def _split_override(text: str) -> tuple[str, str]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FaceganError(f"--set {text!r}: expected key=value")
    check_known([key], _known_keys(), "config key")
    return key, raw.strip()


def _parse_value(cfg: TrainConfig, key: str, raw: str) -> Any:
    """Parse a command-line string into the type of ``key``."""
    kind = _field_types()[key]
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if typing.get_origin(kind) is list:
            text = raw.strip("[]")
            return [int(v) for v in text.replace(",", " ").split()] if text.strip() else []
    except ValueError:
        raise FaceganError(f"--set {key}={raw}: not a valid {getattr(kind, '__name__', kind)}") from None
    raise AssertionError(f"unhandled config type {kind}")


def _set_field(cfg: TrainConfig, key: str, value: Any, source: str) -> None:
    """Set ``cfg.key = value`` after checking the key exists and the value has the field's type."""
    kind = lookup(_field_types(), key, "config key")
    ok: bool
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # list[int]
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = list(value) if ok else value
    if not ok:
        raise FaceganError(f"{source}: config {key}={json.dumps(value, default=str)} should be "
                           f"{getattr(kind, '__name__', str(kind))}")
    setattr(cfg, key, value)
