"""Baseline face models for Table 1 (Sec. 5.5), trained on the same data with the same code sizes
(65 identity, 20 expression): a linear model (identity PCA + expression PCA, DeepFLAME-like), a
multilinear (Tucker) model, and a mesh autoencoder with an identity/expression latent split (MAE-like).

Each is a :class:`facegan.evaluation.FaceGenerator` (``sample`` / ``fit``), so every metric runs on it
unchanged; saved files are read back by :func:`facegan.evaluation.load_generator`. See docs/baselines.md.

    from facegan.baselines import train_baseline, save_baseline
    model = train_baseline("linear", open_dataset("data/ict-small"))
    save_baseline(model, "runs/baselines/linear.safetensors")
"""

from __future__ import annotations

import os

from facegan.baselines.autoencoder import AutoencoderModel, train_autoencoder
from facegan.baselines.common import AutoencoderOptions, BaselineModel, BaselineOptions, TuckerOptions
from facegan.baselines.linear import LinearModel, train_linear
from facegan.baselines.tucker import TuckerModel, train_tucker
from facegan.errors import check_known
from facegan.evaluation.generators import FaceGenerator

__all__ = ["BASELINES", "train_baseline", "save_baseline", "BaselineOptions", "TuckerOptions", "AutoencoderOptions",
           "BaselineModel", "LinearModel", "TuckerModel", "AutoencoderModel"]

BASELINES = ("linear", "tucker", "autoencoder")


def train_baseline(kind: str, dataset, options: BaselineOptions | None = None, progress: bool = True) -> FaceGenerator:
    """Train baseline ``kind`` (one of :data:`BASELINES`) on the train split of ``dataset`` (a RegisteredDataset)."""
    check_known([kind], BASELINES, "baseline")
    if kind == "linear":
        return train_linear(dataset, options)
    if kind == "tucker":
        return train_tucker(dataset, options, progress)
    return train_autoencoder(dataset, options, progress)


def save_baseline(model: BaselineModel, path: str | os.PathLike) -> None:
    """Write a trained baseline to ``path`` (safetensors + JSON metadata); read it with ``load_generator``."""
    model.save(path)
