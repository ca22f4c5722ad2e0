"""Geometry images: meshes <-> 3-channel images of displacements from the mean face (Section 3).

An image's pixel holds the displacement (mm) of the surface point under it from the same point
on the mean face. Images come in three forms: float (mm), uint8 (quantized over the training
set, the paper's "standard 3-channel 2D image arrays") and network form (uint8 / 127.5 - 1,
in [-1, 1], zero outside the mask). Layout is NHWC everywhere (torch's channels-last memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

import numpy as np
import torch

from facegan.errors import FaceganError, check_known
from facegan.geometry_image.pixel_map import PixelMap, build_pixel_map
from facegan.geometry_image.reconstruct import DenseReconstructor, bilinear_read
from facegan.mesh.template import Template

# Headroom added to the training set's per-channel range so unseen faces rarely clip.
RANGE_HEADROOM = 0.05
# The paper's Laplacian weight (Eq. 4).
PAPER_ALPHA = 1.2
# Our default: measured best for uint8 64 px images of ICT faces (benchmarks/bench_roundtrip.py).
DEFAULT_ALPHA = 0.1
# Ways back from images to meshes (decode's ``method``).
RECONSTRUCTION_METHODS = ("dense", "sparse")
# Meshes per call of the encoding kernel: bounds the float32 copy of a memory-mapped float64 dataset.
_ENCODE_CHUNK = 256


@dataclass(eq=False)
class GeometryImageCodec:
    """Two-way conversion between registered meshes and geometry images.

    template: the shared topology; mean: (V, 3) float64 mean face (mm) of the training set;
    resolution: image side; value_range: (2, 3) float64 per-channel [low, high] displacement in mm
    mapped to uint8 0 and 255; alpha: weight of the Laplacian term in dense reconstruction.
    """

    template: Template
    mean: np.ndarray
    resolution: int = 64
    value_range: np.ndarray | None = None
    alpha: float = DEFAULT_ALPHA

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON metadata that rebuild this codec (saved with models and datasets)."""
        t = self.template
        tensors = {
            "template_vertices": torch.from_numpy(np.ascontiguousarray(t.vertices)),
            "template_triangles": torch.from_numpy(np.ascontiguousarray(t.triangles)),
            "template_uv": torch.from_numpy(np.ascontiguousarray(t.uv)),
            "template_landmarks": torch.from_numpy(np.ascontiguousarray(t.landmarks)),
            "mean": torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float64)),
            "value_range": torch.from_numpy(np.asarray(self._range_array(), dtype=np.float64)),
        }
        return tensors, {"resolution": self.resolution, "alpha": self.alpha}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "GeometryImageCodec":
        template = Template(
            tensors["template_vertices"].numpy().astype(np.float64),
            tensors["template_triangles"].numpy().astype(np.int64),
            tensors["template_uv"].numpy().astype(np.float64),
            tensors["template_landmarks"].numpy().astype(np.int64),
        )
        return cls(
            template,
            tensors["mean"].numpy().astype(np.float64),
            int(meta["resolution"]),
            tensors["value_range"].numpy().astype(np.float64),
            float(meta["alpha"]),
        )

    @cached_property
    def pixel_map(self) -> PixelMap:
        return build_pixel_map(self.template.uv, self.template.triangles, self.resolution)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the pixels that hold surface points."""
        return self.pixel_map.mask

    @cached_property
    def _pixel_corners(self) -> tuple[np.ndarray, np.ndarray]:
        """(3, H*W) int32 triangle corners and (3, H*W) float32 barycentric weights of every pixel
        (vertex 0 with weight 0 outside the mask): the encoding kernel's form of the interpolation."""
        pm = self.pixel_map
        corners = np.zeros((3, self.resolution**2), np.int32)
        weights = np.zeros((3, self.resolution**2), np.float32)
        corners[:, pm.pixels] = self.template.triangles[pm.triangle].T
        weights[:, pm.pixels] = pm.barycentric.T
        return corners, weights

    @cached_property
    def _mean_image(self) -> np.ndarray:
        """(H*W, 3) float32 the mean face interpolated at every pixel (0 outside the mask)."""
        corners, weights = self._pixel_corners
        mean = self.mean.astype(np.float32)
        return np.einsum("jp,jpc->pc", weights, mean[corners]).astype(np.float32)

    @cached_property
    def dense(self) -> DenseReconstructor:
        return DenseReconstructor(self.template, self.pixel_map, self.alpha)

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, meshes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Float geometry images (N, H, W, 3) in mm of meshes (N, V, 3) in mm; 0 outside the mask.

        Runs on the CPU in a compiled kernel (:mod:`facegan.geometry_image.gather`), as many threads as
        torch uses; meshes may be a memory-mapped array of any float type.
        """
        from facegan.geometry_image.gather import interpolate_displacements  # numba: 0.5 s to import, on use only

        verts = meshes.detach().cpu().numpy() if torch.is_tensor(meshes) else meshes
        corners, weights = self._pixel_corners
        out = np.empty((len(verts), self.resolution**2, 3), np.float32)
        # Fault the fresh pages in from one thread: when the kernel's threads do it, some processes run 4x
        # slower (README, "Speed"; benchmarks/bench_geometry_image.py).
        out.fill(0)
        for start in range(0, len(verts), _ENCODE_CHUNK):
            chunk = np.ascontiguousarray(verts[start : start + _ENCODE_CHUNK], dtype=np.float32)
            interpolate_displacements(chunk, corners, weights, self._mean_image, out[start : start + len(chunk)])
        return torch.from_numpy(out).view(len(verts), self.resolution, self.resolution, 3)

    def fit_range(self, batches: Iterable[torch.Tensor]) -> np.ndarray:
        """Set the quantization range from float images (batches of (N, H, W, 3), e.g. the whole
        training set in chunks): per-channel min and max over mask pixels, plus headroom."""
        mask = torch.from_numpy(self.mask)
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for images in batches:
            px = images[:, mask]
            lo = np.minimum(lo, px.amin(dim=(0, 1)).double().numpy())
            hi = np.maximum(hi, px.amax(dim=(0, 1)).double().numpy())
        pad = RANGE_HEADROOM * (hi - lo)
        self.value_range = np.stack([lo - pad, hi + pad])
        return self.value_range

    def _range_array(self) -> np.ndarray:
        if self.value_range is None:
            raise FaceganError("geometry image codec has no quantization range: encode the dataset first")
        return self.value_range

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = (torch.as_tensor(r, dtype=torch.float32) for r in self._range_array())
        return lo, hi

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) from float images in mm; 0 outside the mask."""
        lo, hi = self._range()
        q = ((images - lo) / (hi - lo) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return q * torch.from_numpy(self.mask)[None, :, :, None]

    def dequantize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in mm (N, H, W, 3) from uint8 images; 0 outside the mask."""
        return self.from_network(images.to(torch.float32) / 127.5 - 1.0)

    def from_network(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in mm from network-form images x (N, H, W, 3) in [-1, 1] (differentiable)."""
        lo, hi = (r.to(x.device) for r in self._range())
        mask = torch.from_numpy(self.mask).to(x.device)[None, :, :, None]
        return (lo + (x + 1.0) * 0.5 * (hi - lo)) * mask

    # ---- decoding -----------------------------------------------------------------------------
    def decode_sparse(self, images: torch.Tensor) -> torch.Tensor:
        """Meshes (N, V, 3) mm by bilinear reads of float images (N, H, W, 3) at each vertex's UV."""
        disp = bilinear_read(images, torch.from_numpy(self.pixel_map.vertex_pixels))
        return disp + torch.as_tensor(self.mean, dtype=disp.dtype, device=disp.device)

    def decode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Meshes (N, V, 3) mm by the Laplacian-regularized least squares of Eq. 4 (differentiable)."""
        pixels = images.reshape(len(images), -1, 3)[:, torch.from_numpy(self.pixel_map.pixels)]
        disp = self.dense(pixels)
        return disp + torch.as_tensor(self.mean, dtype=disp.dtype, device=disp.device)

    def decode(self, images: torch.Tensor, method: str = "dense") -> torch.Tensor:
        """Meshes from float images by ``method`` "dense" or "sparse"."""
        check_known([method], RECONSTRUCTION_METHODS, "reconstruction method")
        return self.decode_dense(images) if method == "dense" else self.decode_sparse(images)
