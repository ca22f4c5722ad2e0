"""Sampling faces from a trained model, and the shipped model that makes it work right after install."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np
import torch

from facegan.errors import FaceganError
from facegan.fileio import atomic_path, write_json
from facegan.geometry_image import GeometryImageCodec
from facegan.mesh.io import write_mesh
from facegan.model import FaceModel
from facegan.render import geometry_image_to_rgb, image_grid, render_meshes, save_png

SHIPPED_MODEL = Path(__file__).parent / "assets" / "model.safetensors"
MESH_FORMATS = ("obj", "ply", "npz")


def load(run: str | os.PathLike | None = None, device: torch.device | str | None = None) -> FaceModel:
    """A trained model: from a run folder or model file, or the shipped model when ``run`` is None.

    The returned :class:`FaceModel` samples codes and images; ``model.codec`` turns its images into
    meshes (``model.meshes(images)``).
    """
    from facegan.device import default_device

    path = Path(run) if run is not None else SHIPPED_MODEL
    if run is None and not SHIPPED_MODEL.exists():
        raise FaceganError(f"{SHIPPED_MODEL}: no shipped model in this installation; pass --run RUN")
    if not path.exists():
        raise FaceganError(f"{path}: no such run folder or model file")
    return FaceModel.load(path, device or default_device())


_CODECS: "weakref.WeakKeyDictionary[FaceModel, GeometryImageCodec]" = weakref.WeakKeyDictionary()


def codec_of(model: FaceModel) -> GeometryImageCodec:
    """The geometry-image codec stored with ``model`` (built once per model and cached)."""
    codec = _CODECS.get(model)
    if codec is None:
        if not model.codec_tensors:
            raise FaceganError(f"{model.source or 'model'}: no geometry-image codec stored with the model")
        try:
            codec = GeometryImageCodec.from_state(model.codec_tensors, model.codec_meta)
        except KeyError as exc:
            raise FaceganError(f"{model.source or 'model'}: codec state lacks {exc}") from None
        if codec.resolution != model.resolution:
            raise FaceganError(f"{model.source or 'model'}: codec is {codec.resolution} px, "
                               f"the generator {model.resolution} px")
        _CODECS[model] = codec
    return codec


def images_to_meshes(codec: GeometryImageCodec, images: torch.Tensor, method: str = "dense") -> torch.Tensor:
    """Network-form images (B, 3, H, W) -> meshes (B, V, 3) in mm (differentiable)."""
    mm = codec.from_network(images.float().permute(0, 2, 3, 1))
    return codec.decode(mm, method)


def group_names(n: int, m: int) -> list[str]:
    """File stems that sort by group: ``g003_m01`` (n groups of m), or ``s0007`` when m == 1 and ungrouped."""
    gw, mw = max(3, len(str(n - 1))), max(2, len(str(m - 1)))
    return [f"g{g:0{gw}d}_m{k:0{mw}d}" for g in range(n) for k in range(m)]


def sample_to_files(
    model: FaceModel,
    n: int,
    out: str | os.PathLike,
    fix: str | None = None,
    m: int = 1,
    fmt: str = "obj",
    seed: int = 0,
    method: str = "dense",
) -> Path:
    """Write ``n`` samples (or ``n`` groups of ``m`` sharing the ``fix`` factor's code) to folder ``out``:
    meshes, ``codes.json`` (each factor's codes and the noise, row i = mesh i), ``grid.png``."""
    if fmt not in MESH_FORMATS:
        raise FaceganError(f"--format {fmt}: unknown (use {', '.join(MESH_FORMATS)})")
    if n <= 0 or m <= 0:
        raise FaceganError("--n and --m must be positive")
    if fix is None and m != 1:
        raise FaceganError("--m needs --fix (the factor the m samples of a group share)")
    codec = codec_of(model)
    images, codes = model.sample(n, fix=fix, m=m, seed=seed)
    with torch.no_grad():
        meshes = images_to_meshes(codec, images.cpu(), method).numpy()
    names = group_names(n, m) if fix else [f"s{i:04d}" for i in range(n)]
    tri = codec.template.triangles
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if fmt == "npz":
            np.savez(tmp / "meshes.npz", vertices=meshes.astype(np.float32), triangles=tri, names=np.array(names))
        else:
            for name, vertices in zip(names, meshes):
                write_mesh(tmp / f"{name}.{fmt}", vertices, tri, uv=codec.template.uv if fmt == "obj" else None)
        write_json(tmp / "codes.json", {
            "names": names, "fix": fix, "seed": seed, "model": model.source,
            **{k: v.cpu().tolist() for k, v in codes.items()},
        })
        save_png(tmp / "grid.png", sample_grid(codec, images.cpu(), meshes, ncols=m if fix else None))
    return out


def sample_grid(codec: GeometryImageCodec, images: torch.Tensor, meshes: np.ndarray, ncols: int | None = None,
                size: int = 160) -> np.ndarray:
    """PNG-ready grid: each sample's rendered mesh with its geometry image inset in the corner."""
    shown = min(len(meshes), 64)
    renders = render_meshes(torch.from_numpy(meshes[:shown]), torch.from_numpy(codec.template.triangles), size=size).numpy()
    gimg = geometry_image_to_rgb(images[:shown].permute(0, 2, 3, 1), codec.mask)
    inset = size // 3
    for r, g in zip(renders, gimg):
        step = max(1, g.shape[0] // inset)
        small = g[::step, ::step][:inset, :inset]
        r[: small.shape[0], : small.shape[1]] = small
    return image_grid(renders, ncols=ncols or int(np.ceil(np.sqrt(shown))))
