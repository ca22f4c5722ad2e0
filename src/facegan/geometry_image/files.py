"""Geometry images as files: one mesh to a PNG/NPY image and back, with the dataset's codec."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from facegan.data.dataset import open_dataset
from facegan.data.encode import encoded_resolutions, load_codec
from facegan.errors import FaceganError
from facegan.fileio import atomic_path
from facegan.geometry_image.roundtrip import MARKDOWN_HEADER, roundtrip_table, test_meshes
from facegan.mesh.io import read_mesh_vertices, write_mesh


def mesh_to_image_file(mesh: Path, data: Path, out: Path, resolution: int = 64) -> None:
    """Write a mesh's geometry image: ``.png`` holds the uint8 image, ``.npy`` the float one (mm)."""
    codec = load_codec(open_dataset(data), resolution)
    vertices = read_mesh_vertices(mesh, codec.template.n_vertices)
    image = codec.encode(vertices[None])
    suffix = out.suffix.lower()
    if suffix not in (".png", ".npy"):
        raise FaceganError(f"{out}: unknown image format (use .png or .npy)")
    with atomic_path(out) as tmp:
        if suffix == ".png":
            Image.fromarray(codec.quantize(image)[0].numpy()).save(tmp, format="PNG")
        else:
            np.save(tmp, image[0].numpy())


def read_image_file(path: Path, resolution: int) -> tuple[torch.Tensor, bool]:
    """An image file as a (1, H, W, 3) tensor and whether it is quantized (uint8)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array, quantized = np.load(path, allow_pickle=False).astype(np.float32), False
        elif suffix == ".png":
            array, quantized = np.array(Image.open(path).convert("RGB")), True
        else:
            raise FaceganError(f"{path}: unknown image format (use .png or .npy)")
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise FaceganError(f"{path}: unreadable image ({exc})") from None
    if array.shape != (resolution, resolution, 3):
        raise FaceganError(f"{path}: image is {'x'.join(map(str, array.shape))}, the dataset's codec expects {resolution}x{resolution}x3")
    return torch.from_numpy(np.ascontiguousarray(array))[None], quantized


def image_file_to_mesh(image: Path, data: Path, out: Path, method: str = "dense") -> None:
    """Reconstruct a mesh from a geometry image file with the dataset's codec (resolution from the file)."""
    ds = open_dataset(data)
    side = _image_side(image)
    encoded = encoded_resolutions(ds)
    if encoded and side not in encoded:
        sizes = " or ".join(f"{r}x{r}" for r in encoded)
        raise FaceganError(f"{image}: image is {side} pixels high, the dataset's geometry images are {sizes}")
    codec = load_codec(ds, side)
    pixels, quantized = read_image_file(image, codec.resolution)
    floats = codec.dequantize(pixels) if quantized else pixels
    with torch.no_grad():
        vertices = codec.decode(floats, method)[0].numpy()
    write_mesh(out, vertices, codec.template.triangles, uv=codec.template.uv)


def _image_side(path: Path) -> int:
    try:
        if path.suffix.lower() == ".png":
            return Image.open(path).size[1]
        if path.suffix.lower() == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise FaceganError(f"{path}: unreadable image ({exc})") from None
    raise FaceganError(f"{path}: unknown image format (use .png or .npy)")


def print_roundtrip(data: Path, resolutions: list[int], limit: int, echo: Callable[[str], None] = print) -> None:
    """Print the round-trip error table (markdown) of the dataset's test meshes."""
    ds = open_dataset(data)
    meshes = test_meshes(ds, limit)
    echo(f"round trip on {len(meshes)} held-out test meshes of {data}")
    echo(MARKDOWN_HEADER)
    for res in resolutions:
        for row in roundtrip_table(load_codec(ds, res), meshes):
            echo(row.as_markdown())
