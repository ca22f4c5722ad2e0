"""The one interface every evaluated face model offers: sample meshes, fit meshes.

The metrics of Table 1 need two things from a model: random faces (optionally in groups that share
one factor's code, for decoupling and the per-factor diversities) and the closest face the model can
make to a given mesh (generalization). :class:`FaceGenerator` is that contract; the GAN
(:class:`GanGenerator`) and the baselines (:mod:`facegan.baselines`) implement it, so every metric
runs on each of them unchanged.

Model files are safetensors with JSON metadata (``facegan.train.checkpoint``); the ``kind`` field
of the metadata says which loader reads one (:func:`load_generator`).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from facegan.errors import FaceganError, lookup

__all__ = ["FaceGenerator", "GanGenerator", "Transfer", "can_transfer", "can_share_identity", "register_loader", "load_generator", "generator_kind"]

FACTORS = ("identity", "expression")


@runtime_checkable
class FaceGenerator(Protocol):
    """A face model that metrics can sample and fit.

    name: short label for reports ("full", "linear", ...); factors: its factor names in code order,
    including "identity" and "expression"; n_vertices: V of the template topology.
    """

    name: str
    factors: Sequence[str]
    n_vertices: int

    def sample(self, n: int, fix: str | None = None, m: int = 1, seed: int = 0) -> np.ndarray:
        """(n*m, V, 3) float32 mm random faces. fix=None: independent draws; fix=factor: n groups of m
        faces (rows g*m .. g*m+m-1) sharing that factor's code, all other codes drawn anew per face."""
        ...

    def fit(self, meshes: np.ndarray, seed: int = 0) -> np.ndarray:
        """(N, V, 3) float32 mm: the model's closest faces to ``meshes`` (N, V, 3) mm (the model's fit)."""
        ...


class Transfer(NamedTuple):
    """What a model's ``transfer`` returns, (P, V, 3) float32 mm each, all decoded the same way.

    edited: each target fitted and given its fitted source's code of the factor; target_fit: each
    target's own fit (what :func:`facegan.fit.keep_detail` needs); source_fit: each source's own fit
    (how far the model already is from the source before any edit). One fit of each face gives all three.
    """

    edited: np.ndarray
    target_fit: np.ndarray
    source_fit: np.ndarray


def can_transfer(generator: FaceGenerator) -> bool:
    """Whether the model also edits: ``transfer(targets (P, V, 3), sources (P, V, 3), factor="expression",
    seed=0) -> Transfer``: each target fitted and given its source's code of ``factor``, with the
    targets' and the sources' own fits (:class:`Transfer`)."""
    return callable(getattr(generator, "transfer", None))


def can_share_identity(generator: FaceGenerator) -> bool:
    """Whether the model's transfer also takes ``people=(target labels (P,), source labels (P,))``: the
    faces of one person are then fitted with one identity code (``fit_meshes``' ``share``)."""
    return can_transfer(generator) and "people" in inspect.signature(generator.transfer).parameters


class GanGenerator:
    """A trained GAN (:class:`facegan.model.FaceModel`) as a :class:`FaceGenerator`.

    Samples are decoded with the dense Laplacian reconstruction (Eq. 4), the way the model's meshes
    are made everywhere else; fits minimize Eq. 12 (``facegan.fit``) and return the bilinear read
    of G(z) at the vertices, the quantity Eq. 12 measures (the paper's generalization).
    """

    def __init__(self, model, name: str = "gan", fit_options=None, chunk: int = 256):
        from facegan.sampling import codec_of

        self.model = model
        self.codec = codec_of(model)
        self.name = name
        self.factors = list(model.factors)
        self.n_vertices = self.codec.template.n_vertices
        self.fit_options = fit_options
        self.chunk = chunk

    def sample(self, n: int, fix: str | None = None, m: int = 1, seed: int = 0) -> np.ndarray:
        from facegan.sampling import images_to_meshes

        images, _ = self.model.sample(n, fix=fix, m=m, seed=seed, chunk=self.chunk)
        with torch.no_grad():
            return np.concatenate([images_to_meshes(self.codec, images[s:s + self.chunk]).cpu().numpy()
                                   for s in range(0, len(images), self.chunk)]).astype(np.float32)

    def _fit(self, meshes: np.ndarray, seed: int, share: dict | None = None):
        from dataclasses import replace

        from facegan.fit import FitOptions, fit_meshes

        options = replace(self.fit_options or FitOptions(), seed=seed)
        return fit_meshes(self.model, np.asarray(meshes, np.float32), options=options, share=share)

    def fit(self, meshes: np.ndarray, seed: int = 0) -> np.ndarray:
        return self._fit(meshes, seed).vertices.numpy()

    def transfer(self, targets: np.ndarray, sources: np.ndarray, factor: str = "expression",
                 seed: int = 0, people: tuple[Sequence, Sequence] | None = None) -> Transfer:
        """Each target face with its source's ``factor`` (both fitted first, then the source's code
        replaces the target's: the supplementary's expression transfer), and the targets' and sources'
        own fits, all decoded densely (:class:`Transfer`). people: the person of each target and of each source;
        the faces of one person, targets and sources, are then fitted with one identity code."""
        from facegan.fit import edit_meshes, replace_factor

        share = None if people is None else {"identity": np.concatenate([np.asarray(p) for p in people])}
        fitted = self._fit(np.concatenate([targets, sources]), seed, share).codes
        target = {k: v[:len(targets)] for k, v in fitted.items()}
        source = {k: v[len(targets):] for k, v in fitted.items()}
        return Transfer(*(edit_meshes(self.model, codes).numpy()
                          for codes in (replace_factor(target, source, factor), target, source)))


Loader = Callable[[Path, dict], FaceGenerator]
_LOADERS: dict[str, Loader] = {}


def register_loader(*kinds: str) -> Callable[[Loader], Loader]:
    """Decorator: ``loader(path, meta) -> FaceGenerator`` reads files whose metadata ``kind`` is one of ``kinds``."""

    def add(fn: Loader) -> Loader:
        for kind in kinds:
            _LOADERS[kind] = fn
        return fn

    return add


@register_loader("model", "checkpoint")
def _load_gan(path: Path, meta: dict) -> GanGenerator:
    from facegan.sampling import load

    return GanGenerator(load(path), name=meta.get("config", {}).get("variant", "gan"))


def _model_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "checkpoint.safetensors"):
            if (path / name).exists():
                return path / name
        raise FaceganError(f"{path}: no model.safetensors or checkpoint.safetensors in this folder")
    if not path.exists():
        raise FaceganError(f"{path}: no such model file or run folder")
    return path


def generator_kind(path: str | os.PathLike) -> str:
    """The ``kind`` recorded in a model file's metadata ("model", "checkpoint", "linear", ...)."""
    from facegan.train.checkpoint import read_metadata

    return str(read_metadata(_model_file(Path(path))).get("kind", ""))


def load_generator(path: str | os.PathLike | None = None, name: str | None = None) -> FaceGenerator:
    """Any saved face model (GAN run folder or model file, or a baseline file) as a FaceGenerator;
    the shipped GAN when ``path`` is None. ``name`` overrides the report label."""
    import facegan.baselines  # noqa: F401  (registers the baseline loaders)
    from facegan.sampling import SHIPPED_MODEL
    from facegan.train.checkpoint import read_metadata

    file = _model_file(Path(path) if path is not None else SHIPPED_MODEL)
    meta = read_metadata(file)
    kind = meta.get("kind")
    generator = lookup(_LOADERS, kind, "model kind", str(file))(file, meta)
    if name:
        generator.name = name
    return generator
