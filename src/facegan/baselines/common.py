"""What the three baselines share: options, the training data, Gaussian codes, input checks, the model base.

Every baseline draws its codes the same way: one standard normal vector per factor (``identity``,
``expression``), mapped by the model to a face. Whatever Gaussian a model fitted to its training codes
(PCA variances, Tucker weights, autoencoder latents) is folded into that mapping, so sampling and
grouping (``fix``) are one piece of code for all three, and N(0, I) is the prior of the linear and
Tucker MAP fits.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import Tensor

from facegan.errors import FaceganError, check_known
from facegan.evaluation.generators import Transfer
from facegan.train.checkpoint import load_checkpoint, save_checkpoint

FACTORS = ("identity", "expression")
NEUTRAL = "neutral"
_CHUNK = 1024  # faces decoded at once: n*m reaches 10^4 for the decoupling metrics


@dataclass(frozen=True)
class TuckerOptions:
    """Missing-cell imputation (HOSVD, re-impute, repeat) and the alternating least-squares fit."""

    impute_iterations: int = 200
    impute_tolerance: float = 1e-4  # mm: stop when no imputed coordinate moves more than this
    fit_iterations: int = 100  # ALS rounds; converges slowly (own samples: 0.11 mm after 30, 0.03 after 100)


@dataclass(frozen=True)
class AutoencoderOptions:
    """Network size, training schedule and loss weights of the split-latent mesh autoencoder."""

    pca_size: int = 256  # input/output coordinates: leading PCA modes of the training meshes
    hidden: int = 512
    layers: int = 2  # hidden layers of the encoder and of the decoder
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    swap_weight: float = 1.0  # label-swap consistency, per swap (identity and expression)
    prior_weight: float = 1e-3  # L2 on the latents, keeps them at a scale a Gaussian fits
    fit_steps: int = 200  # Adam refinement of the encoder's latents in ``fit``
    fit_lr: float = 0.1
    device: str | None = None  # training device; None: CUDA when present (facegan.device)


@dataclass(frozen=True)
class BaselineOptions:
    """Code sizes (Sec. 5.5: 65 identity, 20 expression), seed, and per-model settings.

    fit_noise: mm per coordinate, the Gaussian noise of the linear and Tucker MAP fits; with the
    sampling prior N(0, I) on the codes it sets their ridge (fit_noise^2).
    """

    identity_size: int = 65
    expression_size: int = 20
    seed: int = 0
    fit_noise: float = 0.1
    tucker: TuckerOptions = field(default_factory=TuckerOptions)
    autoencoder: AutoencoderOptions = field(default_factory=AutoencoderOptions)

    def config(self, kind: str) -> dict:
        """The JSON settings a model of ``kind`` was trained with (common fields + its own)."""
        common = {k: v for k, v in asdict(self).items() if k not in ("tucker", "autoencoder")}
        own = asdict(getattr(self, kind)) if kind in ("tucker", "autoencoder") else {}
        return {**common, **own}


# ---------------------------------------------------------------------------------- training data


@dataclass
class TrainingSet:
    """The train split in memory with compact class indices.

    meshes (n, V, 3) float32 mm; identity, expression (n,) int64 indices into identity_names /
    expression_names (classes present in the train split), -1 = missing label.
    """

    meshes: np.ndarray
    identity: np.ndarray
    expression: np.ndarray
    identity_names: list[str]
    expression_names: list[str]

    @property
    def n_vertices(self) -> int:
        return self.meshes.shape[1]

    def flat(self, rows: np.ndarray | None = None) -> Tensor:
        """(k, 3V) float64 meshes (all, or ``rows``)."""
        x = self.meshes if rows is None else self.meshes[rows]
        return torch.from_numpy(np.ascontiguousarray(x)).reshape(len(x), -1).double()

    def cell_means(self) -> tuple[Tensor, Tensor]:
        """Mean mesh per (identity, expression) class pair of the meshes labeled with both.

        Returns means (I, E, 3V) float64 (zero where empty) and counts (I, E) int64.
        """
        both = np.flatnonzero((self.identity >= 0) & (self.expression >= 0))
        n_id, n_exp = len(self.identity_names), len(self.expression_names)
        cell = torch.from_numpy(self.identity[both] * n_exp + self.expression[both])
        sums = torch.zeros(n_id * n_exp, 3 * self.n_vertices, dtype=torch.float64).index_add_(0, cell, self.flat(both))
        counts = torch.bincount(cell, minlength=n_id * n_exp)
        means = sums / counts.clamp(min=1)[:, None]
        return means.reshape(n_id, n_exp, -1), counts.reshape(n_id, n_exp)

    def neutral_faces(self) -> tuple[Tensor, Tensor]:
        """Each identity's neutral face, the mean of its meshes labeled neutral.

        Returns faces (I, 3V) float64 and has_neutral (I,) bool (faces are zero where False).
        """
        if NEUTRAL not in self.expression_names:
            raise FaceganError(f"no training mesh is labeled '{NEUTRAL}': the neutral faces are undefined")
        means, counts = self.cell_means()
        k = self.expression_names.index(NEUTRAL)
        return means[:, k], counts[:, k] > 0


def training_set(dataset, meshes: np.ndarray | None = None) -> TrainingSet:
    """The train split of a :class:`facegan.data.dataset.RegisteredDataset`, loaded into memory (or
    ``meshes``, the split's (n, V, 3) meshes when the caller holds them already)."""
    rows = dataset.split("train")
    if len(rows) == 0:
        raise FaceganError(f"{dataset.root}: the train split is empty")
    labels = {}
    for factor in FACTORS:
        index = dataset.labels.class_indices(factor)[rows]
        present = np.unique(index[index >= 0])
        compact = np.full(index.max(initial=0) + 1, -1, np.int64)
        compact[present] = np.arange(len(present))
        names = dataset.labels.class_names(factor)
        labels[factor] = (np.where(index >= 0, compact[index], -1), [names[i] for i in present])
    meshes = np.asarray(dataset.meshes[rows] if meshes is None else meshes, dtype=np.float32)
    return TrainingSet(meshes, labels["identity"][0], labels["expression"][0], labels["identity"][1],
                       labels["expression"][1])


# ---------------------------------------------------------------------------------- linear algebra


def principal_components(x: Tensor, k: int, seed: int = 0, power_iterations: int = 4,
                         oversample: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of the rows of ``x`` (n, D): mean (D,), axes (k', D) orthonormal, variances (k',), k' = min(k, n-1).

    Randomized SVD (Halko et al. 2011, with power iterations) when k' + oversample < min(n, D): the
    expression PCA has thousands of rows and the exact SVD of all of them is wasted work.
    """
    n, d = x.shape
    k = min(k, n - 1)
    mean = x.mean(0)
    centered = x - mean
    width = k + oversample
    if width >= min(n, d):
        _, s, vt = torch.linalg.svd(centered, full_matrices=False)
    else:
        g = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(centered @ torch.randn(d, width, generator=g, dtype=x.dtype)).Q
        for _ in range(power_iterations):  # QR between products keeps the small singular values accurate
            q = torch.linalg.qr(centered @ torch.linalg.qr(centered.T @ q).Q).Q
        _, s, vt = torch.linalg.svd(q.T @ centered, full_matrices=False)
    return mean, vt[:k], s[:k] ** 2 / max(n - 1, 1)


def fit_gaussian(codes: Tensor) -> tuple[Tensor, Tensor]:
    """The Gaussian N(mean, cov) of the rows of ``codes`` (n, d) as mean (d,) and factor (d, d):
    ``mean + z @ factor`` with z ~ N(0, I_d) has that distribution (a singular cov is fine)."""
    mean = codes.mean(0)
    centered = codes - mean
    cov = centered.T @ centered / max(len(codes) - 1, 1)
    values, vectors = torch.linalg.eigh(cov)
    return mean, values.clamp(min=0).sqrt()[:, None] * vectors.T


def ridge_solve(gram: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """argmin_z z^T gram z - 2 z^T rhs + ridge |z|^2 for each row: gram (..., k, k), rhs (..., k) -> (..., k)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, rhs.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------- codes and inputs


def draw_codes(sizes: dict[str, int], n: int, fix: str | None = None, m: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """Standard normal codes per factor, (n*m, size) float64 each.

    fix=None: all rows independent; fix=factor: n groups of m rows (g*m .. g*m+m-1) sharing that
    factor's code, the others drawn per row. Factors are drawn in ``sizes`` order from one seeded stream.
    """
    if fix is not None:
        check_known([fix], sizes, "factor", "sample")
    if n < 0 or m < 1:
        raise FaceganError(f"sample: need n >= 0 and m >= 1, got n={n}, m={m}")
    g = torch.Generator().manual_seed(seed)
    codes = {}
    for factor, size in sizes.items():
        if factor == fix:
            codes[factor] = torch.randn(n, size, generator=g, dtype=torch.float64).repeat_interleave(m, dim=0)
        else:
            codes[factor] = torch.randn(n * m, size, generator=g, dtype=torch.float64)
    return codes


def check_meshes(meshes: np.ndarray, n_vertices: int) -> Tensor:
    """(N, V, 3) mm meshes as a (N, 3V) float64 tensor; a wrong shape or non-finite values are a FaceganError."""
    x = np.asarray(meshes)
    if x.ndim != 3 or x.shape[2] != 3:
        raise FaceganError(f"fit: meshes must have shape (N, V, 3), got {x.shape}")
    if x.shape[1] != n_vertices:
        raise FaceganError(f"fit: meshes have {x.shape[1]} vertices, the model has {n_vertices}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=(1, 2)))
    if len(bad):
        raise FaceganError(f"fit: mesh {bad[0]} has NaN or infinite coordinates ({len(bad)} such meshes)")
    return torch.from_numpy(x.astype(np.float64)).reshape(len(x), 3 * n_vertices)


# ---------------------------------------------------------------------------------- the model base


class BaselineModel:
    """A baseline as a :class:`facegan.evaluation.FaceGenerator`: codes per factor -> faces.

    Subclasses set ``kind``, keep their weights in ``tensors`` (name -> float32 CPU tensor, exactly
    what is saved, so a loaded model samples identically) and implement :meth:`decode` and
    :meth:`fit_codes` (and :meth:`prior_codes` when their codes are not the standard normal draws).
    ``meta`` holds name, n_vertices, code_sizes {factor: size} and config.
    """

    kind: ClassVar[str]

    def __init__(self, tensors: dict[str, Tensor], meta: dict):
        self.tensors = tensors
        self.meta = meta
        self.name: str = meta["name"]
        self.factors = list(FACTORS)
        self.n_vertices: int = meta["n_vertices"]
        self.code_sizes: dict[str, int] = {f: int(meta["code_sizes"][f]) for f in FACTORS}

    def prior_codes(self, normal: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's codes of standard normal draws {factor: (N, size)}: the draws themselves by default."""
        return normal

    def decode(self, codes: dict[str, Tensor]) -> Tensor:
        """Codes {factor: (N, size)} -> faces (N, 3V) in mm."""
        raise NotImplementedError

    def fit_codes(self, x: Tensor) -> dict[str, Tensor]:
        """Codes {factor: (N, size)} of the model's closest faces to ``x`` (N, 3V) float64 mm."""
        raise NotImplementedError

    def sample(self, n: int, fix: str | None = None, m: int = 1, seed: int = 0) -> np.ndarray:
        """(n*m, V, 3) float32 mm random faces; see :class:`facegan.evaluation.FaceGenerator`."""
        normal = draw_codes(self.code_sizes, n, fix, m, seed)
        return self._in_chunks(lambda rows: self.decode(self.prior_codes({f: c[rows] for f, c in normal.items()})), n * m)

    def fit(self, meshes: np.ndarray, seed: int = 0) -> np.ndarray:
        """(N, V, 3) float32 mm: the model's closest faces to ``meshes`` (N, V, 3) mm.

        The fits are deterministic; ``seed`` is accepted for the protocol."""
        x = check_meshes(meshes, self.n_vertices)
        return self._in_chunks(lambda rows: self.decode(self.fit_codes(x[rows])), len(x))

    def transfer(self, targets: np.ndarray, sources: np.ndarray, factor: str = "expression",
                 seed: int = 0) -> Transfer:
        """Each target (P, V, 3) mm fitted, with the code of ``factor`` of its fitted source (P, V, 3),
        and the targets' and sources' own fits (:meth:`fit`): a :class:`Transfer`, float32 mm.

        The fits are deterministic; ``seed`` is accepted for the protocol."""
        check_known([factor], self.factors, "factor", "transfer")
        t, s = check_meshes(targets, self.n_vertices), check_meshes(sources, self.n_vertices)
        if len(t) != len(s):
            raise FaceganError(f"transfer: {len(t)} targets but {len(s)} sources")
        target, source = self._fit_codes_in_chunks(t), self._fit_codes_in_chunks(s)
        edited = target | {factor: source[factor]}
        return Transfer(*(self._in_chunks(lambda rows, codes=codes: self.decode({f: c[rows] for f, c in codes.items()}), len(t))
                          for codes in (edited, target, source)))

    def _fit_codes_in_chunks(self, x: Tensor) -> dict[str, Tensor]:
        """:meth:`fit_codes` of ``x`` (N, 3V), without gradients, 1024 rows at a time: {factor: (N, size)}."""
        with torch.no_grad():
            parts = [self.fit_codes(x[start:start + _CHUNK]) for start in range(0, len(x), _CHUNK)]
        return {f: torch.cat([p[f] for p in parts]) if parts else x.new_zeros(0, size) for f, size in self.code_sizes.items()}

    def _in_chunks(self, faces: Callable[[slice], Tensor], total: int) -> np.ndarray:
        """(total, V, 3) float32 from ``faces(rows)`` -> (rows, 3V), without gradients, 1024 rows at a time."""
        out = np.empty((total, self.n_vertices, 3), np.float32)
        with torch.no_grad():
            for start in range(0, total, _CHUNK):
                rows = slice(start, min(start + _CHUNK, total))
                out[rows] = faces(rows).reshape(-1, self.n_vertices, 3).float().numpy()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as a facegan checkpoint (safetensors + JSON, atomic) of its ``kind``."""
        save_checkpoint(path, self.tensors, {**self.meta, "kind": self.kind, "name": self.name})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BaselineModel":
        """Read a file written by :meth:`save`."""
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != cls.kind:
            raise FaceganError(f"{path}: a {meta.get('kind')!r} file, not a {cls.kind} model")
        try:
            return cls(tensors, meta)
        except KeyError as exc:
            raise FaceganError(f"{Path(path)}: incomplete {cls.kind} model (missing {exc})") from None
