"""Meshes back from geometry images: the sparse bilinear read and the dense Laplacian solve (Eq. 4)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from facegan.geometry_image.pixel_map import PixelMap
from facegan.linalg import FactoredSystem
from facegan.mesh.operators import cotangent_laplacian
from facegan.mesh.template import Template

# Above this many operator entries (V x P floats) the dense operator is not formed and CUDA batches
# too go through the sparse factorization (e.g. 256 px images).
_MAX_OPERATOR_ENTRIES = 120_000_000
# Meshes per factored solve: right-hand sides of 64 meshes (192 columns) solved ~1.5x faster per
# mesh than 1,000 at once on this machine (the solve's working set stays in cache).
_SOLVE_CHUNK = 64


def _use_operator(pixels: torch.Tensor) -> bool:
    """Whether a batch goes through the dense operator rather than the factorization: on CUDA only.
    On the CPU the factored solve, in chunks of _SOLVE_CHUNK meshes, was faster at every batch size
    measured (1 to 1,000 meshes, benchmarks/bench_geometry_image.py) and needs no ~100 MB operator;
    on a GPU one product avoids a round trip to the CPU solver."""
    return pixels.is_cuda


def _bilinear_corners(x: torch.Tensor, y: torch.Tensor, height: int, width: int):
    """Flat index of the top-left pixel and fractional offsets (fx, fy) of a bilinear read at
    pixel coordinates (x, y); the floor is clamped so the last row/column reads its neighbours."""
    x0 = x.floor().clamp(0, width - 2)
    y0 = y.floor().clamp(0, height - 2)
    return (y0 * width + x0).long(), x - x0, y - y0


def bilinear_read(images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (N, K, C) of images (N, H, W, C) at pixel coordinates points (K, 2) = (x, y).

    Differentiable in ``images``. Points must lie in [0, W-1] x [0, H-1].
    """
    n, h, w, c = images.shape
    pts = points.to(images.device, torch.float64)
    base, fx, fy = _bilinear_corners(pts[:, 0], pts[:, 1], h, w)
    fx = fx.to(images.dtype)[None, :, None]
    fy = fy.to(images.dtype)[None, :, None]
    flat = images.reshape(n, h * w, c)
    p00, p01 = flat[:, base], flat[:, base + 1]
    p10, p11 = flat[:, base + w], flat[:, base + w + 1]
    return (p00 * (1 - fx) + p01 * fx) * (1 - fy) + (p10 * (1 - fx) + p11 * fx) * fy


def bilinear_matrix(points: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bilinear read of :func:`bilinear_read` as a sparse matrix.

    points: (K, 2) pixel coordinates (x, y). Returns COO (rows (4K,), cols (4K,), weights (4K,))
    of the (K, H*W) matrix whose product with a flattened image gives the same samples.
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64))
    base, fx, fy = (t.numpy() for t in _bilinear_corners(pts[:, 0], pts[:, 1], height, width))
    cols = np.stack([base, base + 1, base + width, base + width + 1], axis=1)
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    rows = np.repeat(np.arange(len(pts)), 4)
    return rows, cols.ravel(), weights.ravel()


class DenseReconstructor(torch.nn.Module):
    """Solve Eq. 4 in displacement form: argmin_d |B d - p|^2 + alpha |L d|^2.

    B (P, V) interpolates vertex displacements at the mask pixels' surface points, L is the
    cotangent Laplacian of the template (not mass-normalized), d = v - v_mean so the term
    |L v_mean - L v| of the paper becomes |L d|. The normal matrix A = B^T B + alpha L^T L is the
    same for every mesh: it is factored once. On the CPU batches are solved through the
    factorization (with its own backward pass); on CUDA, when it fits in memory, by the dense
    operator R = A^{-1} B^T (V, P), one matrix product for the whole batch (autograd for free).
    """

    def __init__(self, template: Template, pixel_map: PixelMap, alpha: float):
        super().__init__()
        B = pixel_map.interpolation_matrix(template.triangles, template.n_vertices)
        L = cotangent_laplacian(template.vertices, template.triangles)
        self.alpha = float(alpha)
        self._B = sp.csr_matrix(B)
        self._system = FactoredSystem((B.T @ B + self.alpha * (L.T @ L)).tocsc())
        self._operator_fits = template.n_vertices * B.shape[0] <= _MAX_OPERATOR_ENTRIES
        self._operator: torch.Tensor | None = None

    @property
    def operator(self) -> torch.Tensor | None:
        """R = A^{-1} B^T (V, P) float32, formed on first use (None when it would be too large)."""
        if self._operator is None and self._operator_fits:
            self._operator = torch.from_numpy(self._system.solve(self._B.T.toarray()).astype(np.float32))
        return self._operator

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vertex displacements (N, V, 3) from mask-pixel values (N, P, 3)."""
        if _use_operator(pixels) and self.operator is not None:
            return self.by_operator(pixels)
        return self.by_factorization(pixels)

    def by_operator(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, P, 3) -> (N, V, 3) by one (V, P) x (P, 3N) product for the whole batch."""
        self._operator = self.operator.to(pixels.device)  # moved once, kept where the data is
        n, p, c = pixels.shape
        x = self._operator.to(dtype=pixels.dtype) @ pixels.permute(1, 0, 2).reshape(p, n * c)
        return x.reshape(-1, n, c).permute(1, 0, 2)

    def by_factorization(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, P, 3) -> (N, V, 3) by the factored normal matrix's triangular solves (differentiable),
        _SOLVE_CHUNK meshes per solve."""
        return torch.cat([_SparseSolve.apply(chunk, self) for chunk in pixels.split(_SOLVE_CHUNK)])


class _SparseSolve(torch.autograd.Function):
    """x = A^{-1} B^T p with the factored A; A is symmetric so the backward pass is B A^{-1} g."""

    @staticmethod
    def forward(ctx, pixels: torch.Tensor, rec: DenseReconstructor) -> torch.Tensor:
        ctx.rec = rec
        n, p, c = pixels.shape
        rhs = rec._B.T @ pixels.detach().cpu().double().permute(1, 0, 2).reshape(p, n * c).numpy()
        x = rec._system.solve(rhs).reshape(-1, n, c)
        return torch.from_numpy(x).permute(1, 0, 2).to(pixels.device, pixels.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rec = ctx.rec
        n, v, c = grad.shape
        g = grad.detach().cpu().double().permute(1, 0, 2).reshape(v, n * c).numpy()
        gp = rec._B @ rec._system.solve(g)
        out = torch.from_numpy(gp.reshape(-1, n, c)).permute(1, 0, 2).to(grad.device, grad.dtype)
        return out, None
