"""From a dataset folder to a training run: the training images, the mesh preview, the run itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from facegan.data.dataset import RegisteredDataset, open_dataset
from facegan.data.encode import encode_dataset, load_codec, load_images
from facegan.geometry_image import GeometryImageCodec
from facegan.render import render_meshes
from facegan.train.config import make_config
from facegan.train.data import TrainingImages


def ensure_encoded(ds: RegisteredDataset, resolution: int) -> GeometryImageCodec:
    """The dataset's codec at ``resolution``, encoding the dataset first if it was not."""
    if not (ds.root / "images" / f"res{resolution}.json").exists():
        encode_dataset(ds, resolution)
    return load_codec(ds, resolution)


def training_images(ds: RegisteredDataset, codec: GeometryImageCodec, split: str = "train") -> TrainingImages:
    """The split's uint8 geometry images with one label column per factor (-1 = missing).

    Class lists come from the split itself, so every class the classifiers know has examples.
    """
    index = ds.split(split)
    images = torch.from_numpy(np.ascontiguousarray(load_images(ds, codec.resolution)[index]))
    labels, names = {}, {}
    for factor in ds.labels.factors:
        column = [ds.labels[factor][i] for i in index]
        names[factor] = sorted({v for v in column if v})
        lookup = {name: k for k, name in enumerate(names[factor])}
        labels[factor] = torch.tensor([lookup.get(v, -1) for v in column], dtype=torch.int64)
    return TrainingImages(images, torch.from_numpy(codec.mask.copy()), labels, names)


def mesh_preview(codec: GeometryImageCodec, size: int = 96) -> Callable[[torch.Tensor], np.ndarray]:
    """Network-form fakes (B, 3, H, W) -> shaded renders (B, size, size, 3) of their dense reconstructions."""

    def preview(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            mm = codec.from_network(x.detach().float().cpu().permute(0, 2, 3, 1))
            meshes = codec.decode_dense(mm)
        return render_meshes(meshes, torch.from_numpy(codec.template.triangles), size=size).numpy()

    return preview


def run_training(
    data: str | os.PathLike,
    out: str | os.PathLike,
    profile: str = "small",
    variant: str | None = None,
    epochs: int | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    resolution: int = 64,
) -> Path:
    """``facegan train``: resolve the config, prepare the images, train; returns the model file."""
    from facegan.train.loop import train

    extra = list(overrides)
    if variant is not None:
        extra.append(f"variant={variant}")
    if epochs is not None:
        extra.append(f"epochs={epochs}")
    cfg = make_config(profile, config_file, extra)
    ds = open_dataset(data)
    codec = ensure_encoded(ds, resolution)
    images = training_images(ds, codec)
    return train(images, cfg, Path(out), resume=resume, codec_state=codec.to_state(), preview=mesh_preview(codec))
