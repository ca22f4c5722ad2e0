"""Geometry images of a dataset: computed once (``facegan encode``) and cached in its folder."""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from facegan.data.dataset import RegisteredDataset
from facegan.errors import FaceganError
from facegan.fileio import atomic_path, read_json
from facegan.geometry_image import DEFAULT_ALPHA, GeometryImageCodec

ALLOWED_RESOLUTIONS = (64, 128, 256)
_CHUNK = 2048


def _paths(ds: RegisteredDataset, resolution: int):
    folder = ds.root / "images"
    return folder / f"res{resolution}.npy", folder / f"res{resolution}.json"


def encode_dataset(
    ds: RegisteredDataset, resolution: int = 64, alpha: float = DEFAULT_ALPHA, progress: bool = True
) -> GeometryImageCodec:
    """Encode every mesh as a uint8 geometry image and cache them in ``DATA/images``.

    The mean face and the quantization range come from the training split only, so the test
    meshes are encoded exactly as unseen faces would be.
    """
    if resolution not in ALLOWED_RESOLUTIONS:
        raise FaceganError(f"resolution {resolution} not supported (use {', '.join(map(str, ALLOWED_RESOLUTIONS))})")
    if not alpha > 0:
        raise FaceganError(f"alpha {alpha} not supported: the Laplacian weight must be positive")
    train = ds.split("train")
    if len(train) == 0:
        raise FaceganError(f"{ds.root}: no training meshes to compute the mean face from")
    meshes = ds.meshes
    mean = np.zeros((meshes.shape[1], 3))
    for start in range(0, len(train), _CHUNK):
        mean += meshes[train[start : start + _CHUNK]].sum(axis=0, dtype=np.float64)
    mean /= len(train)
    codec = GeometryImageCodec(ds.template, mean, resolution, alpha=alpha)
    # Two passes: the range over the training set, then quantization of everything.
    codec.fit_range(
        codec.encode(meshes[train[start : start + _CHUNK]])
        for start in tqdm(range(0, len(train), _CHUNK), desc="range", disable=not progress)
    )
    npy, meta = _paths(ds, resolution)
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ds), resolution, resolution, 3))
        for start in tqdm(range(0, len(ds), _CHUNK), desc=f"encode {resolution}px", disable=not progress):
            out[start : start + _CHUNK] = codec.quantize(codec.encode(meshes[start : start + _CHUNK])).numpy()
        out.flush()
        del out
    tensors, codec_meta = codec.to_state()
    with atomic_path(npy.parent / "mean.npy") as tmp:
        np.save(tmp, mean)
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps({**codec_meta, "value_range": codec.value_range.tolist()}, indent=2) + "\n")
    return codec


def load_codec(ds: RegisteredDataset, resolution: int = 64) -> GeometryImageCodec:
    """The codec saved by :func:`encode_dataset` (error if the dataset was not encoded)."""
    npy, meta_path = _paths(ds, resolution)
    if not meta_path.exists():
        raise FaceganError(f"{ds.root}: no {resolution}px geometry images; run 'facegan encode {ds.root} --resolution {resolution}'")
    meta = read_json(meta_path)
    mean = np.load(npy.parent / "mean.npy", allow_pickle=False)
    return GeometryImageCodec(ds.template, mean, int(meta["resolution"]), np.array(meta["value_range"]), float(meta["alpha"]))


def encoded_resolutions(ds: RegisteredDataset) -> list[int]:
    """The resolutions at which the dataset's geometry images are cached."""
    return [r for r in ALLOWED_RESOLUTIONS if _paths(ds, r)[1].exists()]


def load_images(ds: RegisteredDataset, resolution: int = 64) -> np.ndarray:
    """Cached uint8 geometry images (N, H, W, 3), memory-mapped."""
    npy, _ = _paths(ds, resolution)
    load_codec(ds, resolution)  # same error as above when missing
    images = np.load(npy, mmap_mode="r")
    if len(images) != len(ds):
        raise FaceganError(f"{npy}: {len(images)} images for {len(ds)} meshes; re-run 'facegan encode'")
    return images
