"""Round-trip error of the representation: mesh -> geometry image -> mesh, on held-out meshes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facegan.data.dataset import RegisteredDataset
from facegan.geometry_image.codec import GeometryImageCodec


@dataclass
class RoundTripRow:
    resolution: int
    method: str  # "sparse" | "dense"
    form: str  # "float" | "uint8"
    mean: float  # mean vertex error (mm) over meshes and vertices
    p95: float
    max: float

    def as_markdown(self) -> str:
        return f"| {self.resolution} | {self.method} | {self.form} | {self.mean:.3f} | {self.p95:.3f} | {self.max:.3f} |"


MARKDOWN_HEADER = "| px | method | image | mean (mm) | 95th pct (mm) | max (mm) |\n|---|---|---|---|---|---|"


def vertex_errors(codec: GeometryImageCodec, meshes: np.ndarray, method: str, form: str) -> np.ndarray:
    """Per-vertex Euclidean errors (N, V) in mm of the round trip of meshes (N, V, 3)."""
    images = codec.encode(meshes)
    if form == "uint8":
        images = codec.dequantize(codec.quantize(images))
    with torch.no_grad():
        rec = codec.decode(images, method).numpy()
    return np.linalg.norm(rec - np.asarray(meshes), axis=-1)


def roundtrip_table(
    codec: GeometryImageCodec, meshes: np.ndarray, methods=("sparse", "dense"), forms=("float", "uint8")
) -> list[RoundTripRow]:
    """Mean / 95th percentile / max vertex error of meshes (N, V, 3) for each method and image form."""
    rows = []
    for method in methods:
        for form in forms:
            e = vertex_errors(codec, meshes, method, form)
            rows.append(RoundTripRow(codec.resolution, method, form, float(e.mean()), float(np.percentile(e, 95)), float(e.max())))
    return rows


def test_meshes(ds: RegisteredDataset, limit: int | None = None) -> np.ndarray:
    """The held-out test meshes (N, V, 3), at most ``limit`` of them, evenly spread."""
    idx = ds.split("test")
    if limit is not None and len(idx) > limit:
        idx = idx[np.linspace(0, len(idx) - 1, limit).round().astype(int)]
    return np.asarray(ds.meshes[idx])
