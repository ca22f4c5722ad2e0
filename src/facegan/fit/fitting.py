"""Model fitting (Section 4.2, Eq. 12): the latent codes that best explain registered meshes.

For input meshes v (B, V, 3) in mm we minimize, independently for every face b,

    E_b(z_b) = sum_i w_bi * ||v~_i(z_b) - v_bi||_2  +  lambda * ||z_b||^2          (Eq. 12)

where z_b = (code_1, ..., code_K, noise) of face b, v~_i(z) = mean_i + the bilinear read of the
geometry image G(z) (converted to mm) at vertex i's UV position, w_bi = 1 for the vertices that
enter the data term (all by default; a vertex mask selects e.g. the front of the face), and
lambda = 1e-4 (the paper's value). The data term is a sum of per-vertex Euclidean norms, not
squared ones, as in the paper (torch's norm has the zero subgradient at a zero residual).

The whole batch is optimized at once by Adam, from z = 0 (the prior's mode; the paper starts from a
random z ~ N(0, I), ``FitOptions.init = "random"``). Unless they share a code (``fit_meshes``' ``share``),
the faces never interact: the batch objective is sum_b E_b, each z_b only receives the gradient of its own E_b,
Adam is element-wise and G runs in eval mode (BatchNorm with running statistics), so fitting a
batch gives the same codes as fitting its faces one by one with the same starts.

Faces whose fit diverged or got stuck are detected after the run and restarted from a new random
start (see :class:`FitOptions` for the rule); a restart only replaces a face's result if it is better.

Speed (2 CPU cores): the generator's BatchNorm layers are folded into the preceding layers (G is
frozen), the bilinear read is one sparse matrix product per pass (forward and backward) instead of
gathers and scatter-adds, fused with the distances of Eq. 12 into one autograd function, convolutions
run channels-last in bf16 autocast (where the CPU has native bfloat16), and the loop never synchronizes
with the host. See docs/fitting.md for the measurements behind the defaults.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn

from facegan.device import idle_threads, native_bfloat16, torch_threads
from facegan.errors import FaceganError
from facegan.geometry_image import GeometryImageCodec, bilinear_matrix
from facegan.model import FaceModel
from facegan.sampling import codec_of

PAPER_PRIOR_WEIGHT = 1e-4  # lambda of Eq. 12
PRECISIONS = ("bf16", "fp32")
INITS = ("zero", "random")


@dataclass
class FitOptions:
    """Knobs of :func:`fit_meshes`. Defaults were chosen by measurement (docs/fitting.md).

    iterations: Adam steps per attempt; lr: initial Adam learning rate, decayed by a cosine to
    ``lr * final_lr_fraction`` at the last step; prior_weight: lambda of Eq. 12.
    init: the first start of each face: "zero", z = 0, the mode of the prior N(0, I) (the mean code), or
    "random", z ~ N(0, I) as in the paper. From z = 0 the fit converges faster: on ict-small's 175 test
    faces with the shipped model, 1.11 mm against 1.17 after 150 iterations (docs/fitting.md).
    starts: starts per face in the first attempt, optimized together as one batch; each face keeps the
    start with the lowest final loss (for a fit that settles in a poorer minimum, which the restart rule
    below does not see). The first is ``init``'s, the others random; a single-start fit is the first.
    precision: "bf16" (autocast convolutions, ~1.3x faster on a CPU with native bfloat16; where the
    device has none, facegan.device.native_bfloat16, the fit runs in fp32) or "fp32"; the final errors are
    always evaluated in fp32.
    Restart rule, applied after each attempt to every face: restart if its final loss is not finite,
    or it is *stalled* (final loss > ``stall_fraction`` x its starting loss; for a random start only: a start
    far outside the prior saturates tanh, while z = 0 starts near every face), or it is an *outlier*
    (masked mean vertex error > ``outlier_ratio`` x the median over the faces of the call, and above
    ``outlier_floor_mm``). At most ``max_restarts`` restarts per face; each restart draws a new random
    start and only replaces the face's result if its loss is lower.
    dense: also decode the fitted geometry images with the dense Laplacian method and report errors.
    chunk: faces optimized together (memory bound; results do not depend on it).
    threads: torch intra-op threads during the fit; None = automatic: torch's setting, lowered to the
    cores the 1-minute load average leaves idle (at least 1). On a machine whose cores are busy with
    other work, OpenMP threads that wait for a busy core make 2 threads ~2x slower than 1
    (docs/fitting.md).
    seed: base seed of the random starts (face b, attempt a start from seed, face seed b, a).
    """

    iterations: int = 300
    lr: float = 0.3
    final_lr_fraction: float = 0.1
    prior_weight: float = PAPER_PRIOR_WEIGHT
    precision: str = "bf16"
    max_restarts: int = 2
    init: str = "zero"
    starts: int = 1
    stall_fraction: float = 0.9
    outlier_ratio: float = 3.0
    outlier_floor_mm: float = 0.1
    dense: bool = False
    chunk: int = 256
    threads: int | None = None
    seed: int = 0

    def validate(self) -> "FitOptions":
        if self.iterations < 1:
            raise FaceganError(f"fit: iterations={self.iterations}, need at least 1")
        if not self.lr > 0 or not 0 < self.final_lr_fraction <= 1:
            raise FaceganError(f"fit: lr={self.lr}, final_lr_fraction={self.final_lr_fraction}: "
                               "need lr > 0 and a fraction in (0, 1]")
        if not self.prior_weight >= 0:
            raise FaceganError(f"fit: prior_weight={self.prior_weight}, must be >= 0")
        if self.precision not in PRECISIONS:
            raise FaceganError(f"fit: precision {self.precision!r} unknown (use {' or '.join(PRECISIONS)})")
        if self.init not in INITS:
            raise FaceganError(f"fit: init {self.init!r} unknown (use {' or '.join(INITS)})")
        if self.max_restarts < 0 or self.chunk < 1 or self.starts < 1:
            raise FaceganError(f"fit: max_restarts={self.max_restarts}, chunk={self.chunk}, starts={self.starts}: "
                               "need >= 0, >= 1 and >= 1")
        if self.threads is not None and self.threads < 1:
            raise FaceganError(f"fit: threads={self.threads}, need >= 1 (or None)")
        return self


@dataclass
class FitResult:
    """What :func:`fit_meshes` found for B meshes of V vertices (all tensors on the CPU).

    codes: factor name -> (B, size) codes, plus "noise" -> (B, noise_size): the fitted z;
    vertices: (B, V, 3) mm, the fit as the objective sees it (sparse bilinear read of G(z));
    errors: (B, V) mm, per-vertex Euclidean distance between ``vertices`` and the input;
    vertex_mask: (B, V) bool, the vertices that entered the data term;
    mean_error / mean_error_masked: (B,) mm, mean of ``errors`` over all / over masked-in vertices;
    vertices_dense, errors_dense, mean_error_dense, mean_error_dense_masked: the same for the dense
    (Laplacian) decoding of G(z), or None when ``FitOptions.dense`` is off;
    restarts: (B,) int64, restarts each face needed (0 = the first start was kept or never flagged);
    loss_history: (iterations, B) Eq. 12 value of each face at each step of its kept attempt;
    seconds: wall time of the call; threads: torch threads it ran with.
    """

    codes: dict[str, torch.Tensor]
    vertices: torch.Tensor
    errors: torch.Tensor
    vertex_mask: torch.Tensor
    mean_error: torch.Tensor
    mean_error_masked: torch.Tensor
    restarts: torch.Tensor
    loss_history: torch.Tensor
    seconds: float
    vertices_dense: torch.Tensor | None = None
    errors_dense: torch.Tensor | None = None
    mean_error_dense: torch.Tensor | None = None
    mean_error_dense_masked: torch.Tensor | None = None
    threads: int = 0

    def __len__(self) -> int:
        return len(self.vertices)


# ------------------------------------------------------------------------------------ the codec




# ------------------------------------------------------------------------ the vertex reader


def _sparse_csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    coo = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values.astype(np.float32)),
                                  shape, check_invariants=True)
    with warnings.catch_warnings():  # torch calls sparse CSR "beta"; it is used plainly here
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


class _SparseRead(torch.autograd.Function):
    """out (B, V, C) = M @ images for images (B, C, H, W) in any memory format; backward M^T @ grad."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, reader: "VertexReader") -> torch.Tensor:
        ctx.reader, ctx.shape = reader, images.shape
        return reader.read_columns(images).permute(1, 0, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.reader.read_back(grad.permute(1, 0, 2), ctx.shape), None


class _ReadDistance(torch.autograd.Function):
    """Eq. 12's data term per face, sum_i w_ib ||rest_ib + scale * (M @ images_b)_i||: (B,), for images
    (B, C, H, W), rest (V, B, C) = offset - targets and weights w (V, B).

    The same as reading with :class:`_SparseRead` and letting autograd differentiate the distances, in one
    pass each way and in the reader's (V, B, C) layout, which spares the permuted copies and the
    intermediate tensors of the composition (docs/fitting.md, Speed). The gradient of a zero-length
    residual is zero, the subgradient torch's vector norm takes."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, reader: "VertexReader", rest: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        residual = torch.addcmul(rest, reader.read_columns(images), reader.scale)
        distance = torch.linalg.vector_norm(residual, dim=-1)
        ctx.reader, ctx.shape = reader, images.shape
        ctx.save_for_backward(residual, distance, weights)
        return (distance * weights).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        residual, distance, weights = ctx.saved_tensors
        factor = torch.where(distance > 0, weights * grad / distance, 0.0)
        grad_read = (residual * factor[..., None]).mul_(ctx.reader.scale)
        return ctx.reader.read_back(grad_read, ctx.shape), None, None, None


class VertexReader:
    """Vertices (B, V, 3) mm from network-form geometry images (B, 3, R, R), differentiably.

    Equals ``codec.decode_sparse(codec.from_network(images NHWC))`` -- the mean face plus the
    bilinear read of the de-normalized image at each vertex's UV -- written as
    ``offset + scale * (M @ images)``: M (V, R*R) holds the bilinear weights restricted to chart
    pixels (from_network zeroes the others), scale (3,) = (high - low) / 2 mm per channel and
    offset (V, 3) = mean + (read chart weight) * (low + high) / 2. The products run in scipy on the
    CPU (``use_scipy`` None = on CPU devices) and as torch sparse CSR products elsewhere.
    """

    def __init__(self, codec: GeometryImageCodec, device: torch.device | str = "cpu", use_scipy: bool | None = None):
        r = codec.resolution
        rows, cols, weights = bilinear_matrix(codec.pixel_map.vertex_pixels, r, r)
        in_chart = codec.mask.reshape(-1)[cols]
        weights = np.where(in_chart, weights, 0.0)
        keep = weights != 0
        n_vertices = codec.template.n_vertices
        self.device = torch.device(device)
        self.use_scipy = self.device.type == "cpu" if use_scipy is None else use_scipy
        rows, cols, weights = rows[keep], cols[keep], weights[keep].astype(np.float32)
        if self.use_scipy:
            # scipy's single-threaded product: ~4x faster here than torch's, whose threads stall
            # when the other core is busy (same finding as GeometryImageCodec.encode)
            self._scipy = sp.csr_matrix((weights, (rows, cols)), shape=(n_vertices, r * r))
            self._scipy_t = self._scipy.T.tocsr()
        else:
            self.matrix = _sparse_csr(rows, cols, weights, (n_vertices, r * r)).to(device)
            self.matrix_t = _sparse_csr(cols, rows, weights, (r * r, n_vertices)).to(device)
        if codec.value_range is None:
            raise FaceganError("fit: the model's geometry-image codec has no quantization range")
        low, high = codec.value_range
        chart_weight = np.bincount(rows, weights=weights, minlength=n_vertices)
        self.scale = torch.as_tensor((high - low) / 2, dtype=torch.float32, device=device)
        offset = codec.mean + chart_weight[:, None] * (low + high) / 2
        self.offset = torch.as_tensor(offset, dtype=torch.float32, device=device)
        self.n_vertices = n_vertices

    def product(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """M @ x (V, K) for x (R*R, K), or M^T @ x (R*R, K) for x (V, K); float32, no autograd."""
        if self.use_scipy:
            matrix = self._scipy_t if transpose else self._scipy
            return torch.from_numpy(matrix @ x.detach().contiguous().numpy())
        return (self.matrix_t if transpose else self.matrix) @ x

    def read_columns(self, images: torch.Tensor) -> torch.Tensor:
        """(V, B, C) reads M @ images of images (B, C, R, R) in any memory format: one product for the
        whole batch, no autograd."""
        b, c, h, w = images.shape
        return self.product(images.permute(2, 3, 0, 1).reshape(h * w, b * c), transpose=False).view(-1, b, c)

    def read_back(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The gradient of images of ``shape`` (B, C, R, R) from that of their reads (V, B, C): M^T @ grad."""
        b, c, h, w = shape
        return self.product(grad.reshape(-1, b * c), transpose=True).view(h, w, b, c).permute(2, 3, 0, 1)

    def read(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) bilinear reads M @ images of images (B, 3, R, R), without offset and scale."""
        return _SparseRead.apply(images.float(), self)

    def distance_operands(self, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The operands of :meth:`weighted_distances` for targets (B, V, 3) mm and vertex weights (B, V), made
        once per fit: rest = offset - targets (V, B, 3), the constant part of v~ - v, and the weights (V, B),
        both in the reader's layout."""
        return (self.offset - targets).transpose(0, 1).contiguous(), weights.T.contiguous()

    def weighted_distances(self, images: torch.Tensor, rest: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B,) sum_i w_ib ||rest_ib + scale * read_ib|| for images (B, 3, R, R), rest (V, B, 3) and
        weights (V, B) from :meth:`distance_operands`: each face's weighted sum of vertex distances."""
        return _ReadDistance.apply(images.float(), self, rest, weights)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.offset, self.read(images), self.scale)


# ------------------------------------------------------------------- the generator, folded


class FoldedGenerator(nn.Module):
    """The frozen generator with each eval-mode BatchNorm folded into the layer before it.

    Computes ``generator(z)`` without the final chart mask (the vertex reader ignores pixels
    outside the chart): BatchNorm with running statistics is a per-channel affine map, so it
    becomes a scale of the preceding layer's weights plus a bias, which removes its forward and
    backward passes from every fitting step. Built by :func:`fitting_network`.
    """

    def __init__(self, generator: nn.Module):
        super().__init__()
        scale, shift = _batchnorm_affine(generator.stem_norm)
        cells = generator.stem.out_features // len(scale)  # 4 x 4 pixels per stem channel
        self.stem = nn.Linear(generator.stem.in_features, generator.stem.out_features)
        self.stem.weight.data = generator.stem.weight.detach() * scale.repeat_interleave(cells)[:, None]
        self.stem.bias.data = shift.repeat_interleave(cells) + _bias(generator.stem) * scale.repeat_interleave(cells)
        self.stem_channels = len(scale)
        layers: list[nn.Module] = []
        modules = list(generator.blocks)
        for conv, norm, act in zip(modules[0::3], modules[1::3], modules[2::3]):
            layers += [_fold_conv(conv, norm), act]
        self.blocks = nn.Sequential(*layers)
        self.to_rgb = copy.deepcopy(generator.to_rgb)
        self.eval().requires_grad_(False)
        self.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) -> (B, 3, R, R) in [-1, 1] (not masked)."""
        x = torch.relu(self.stem(z)).view(len(z), self.stem_channels, 4, 4)
        x = self.blocks(x.contiguous(memory_format=torch.channels_last))
        return torch.tanh(self.to_rgb(x))


def _bias(layer: nn.Module) -> torch.Tensor:
    """The layer's bias, zeros when it has none (Linear weights are (out, in), ConvTranspose (in, out, k, k))."""
    if layer.bias is not None:
        return layer.bias.detach()
    return torch.zeros(layer.weight.shape[0 if isinstance(layer, nn.Linear) else 1])


def _batchnorm_affine(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with norm(x) == x * scale + shift in eval mode."""
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias.detach() - norm.running_mean * scale


def _fold_conv(conv: nn.ConvTranspose2d, norm: nn.BatchNorm2d) -> nn.ConvTranspose2d:
    scale, shift = _batchnorm_affine(norm)
    folded = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.output_padding, conv.groups, bias=True, dilation=conv.dilation)
    folded.weight.data = conv.weight.detach() * scale[None, :, None, None]  # (C_in, C_out, k, k)
    folded.bias.data = shift + _bias(conv) * scale
    return folded


def _is_foldable(generator: nn.Module) -> bool:
    """Whether ``generator`` has the DC-GAN layout FoldedGenerator understands."""
    modules = list(getattr(generator, "blocks", []))
    return (getattr(generator, "additive", None) is None
            and isinstance(getattr(generator, "stem", None), nn.Linear)
            and isinstance(getattr(generator, "stem_norm", None), nn.BatchNorm2d)
            and isinstance(getattr(generator, "to_rgb", None), nn.ConvTranspose2d)
            and len(modules) % 3 == 0
            and all(isinstance(c, nn.ConvTranspose2d) and isinstance(n, nn.BatchNorm2d) and isinstance(a, nn.ReLU)
                    for c, n, a in zip(modules[0::3], modules[1::3], modules[2::3])))


class _PlainGenerator(nn.Module):
    """Fallback when the generator's layout is not the one FoldedGenerator knows: G as it is."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


def fitting_network(model: FaceModel) -> nn.Module:
    """z (B, z_dim) -> network-form images (B, 3, R, R) equal to ``model.generate`` on the chart.

    The BatchNorm-folded copy when the generator has the expected layout and the copy reproduces
    it (checked on a few random codes), else the generator itself.
    """
    generator = model.generator
    if _is_foldable(generator) and not generator.training:
        folded = FoldedGenerator(generator).to(model.device)
        z = torch.randn(4, generator.z_dim, generator=torch.Generator().manual_seed(0)).to(model.device)
        with torch.no_grad():
            mask = model.mask.to(torch.float32)
            if torch.allclose(folded(z) * mask, generator(z), atol=1e-4, rtol=1e-4):
                return folded
    return _PlainGenerator(generator)


# ---------------------------------------------------------------------------- input checks


def check_meshes(meshes: np.ndarray | torch.Tensor, n_vertices: int, what: str = "fit") -> torch.Tensor:
    """Input meshes as a float32 (B, V, 3) tensor; FaceganError on a wrong shape, vertex count or NaN."""
    verts = torch.as_tensor(np.asarray(meshes) if not torch.is_tensor(meshes) else meshes)
    if verts.ndim == 2:
        verts = verts[None]
    if verts.ndim != 3 or verts.shape[-1] != 3:
        raise FaceganError(f"{what}: meshes of shape {tuple(verts.shape)}, expected (B, V, 3) vertices")
    if len(verts) == 0:
        raise FaceganError(f"{what}: no meshes given")
    if verts.shape[1] != n_vertices:
        raise FaceganError(f"{what}: meshes have {verts.shape[1]} vertices, the model's template has {n_vertices}")
    finite = torch.isfinite(verts).all(dim=-1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite.all(dim=1)).flatten().tolist()
        raise FaceganError(f"{what}: mesh {bad[0]} has {int((~finite[bad[0]]).sum())} vertices with NaN or "
                           f"infinite coordinates ({len(bad)} bad meshes)")
    return verts.to(torch.float32)


def check_vertex_mask(mask: np.ndarray | torch.Tensor | None, n_meshes: int, n_vertices: int,
                      what: str = "fit") -> torch.Tensor:
    """A (B, V) bool mask from None (all vertices), (V,) or (B, V) bool; FaceganError if a face has none."""
    if mask is None:
        return torch.ones(n_meshes, n_vertices, dtype=torch.bool)
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    if m.dtype != torch.bool:
        raise FaceganError(f"{what}: vertex mask must be boolean, got {m.dtype}")
    if m.shape == (n_vertices,):
        m = m[None].expand(n_meshes, -1)
    if tuple(m.shape) != (n_meshes, n_vertices):
        raise FaceganError(f"{what}: vertex mask of shape {tuple(m.shape)}, "
                           f"expected ({n_vertices},) or ({n_meshes}, {n_vertices})")
    empty = torch.nonzero(~m.any(dim=1)).flatten().tolist()
    if empty:
        raise FaceganError(f"{what}: the vertex mask selects no vertex of mesh {empty[0]} ({len(empty)} meshes empty)")
    return m.cpu().clone()


# ------------------------------------------------------------------------------ the problem


def random_start(n_latent: int, seed: int, face_seeds: Sequence[int], attempt: int, start: int = 0) -> torch.Tensor:
    """Starting codes (B, n_latent) ~ N(0, I): face b's row depends only on (seed, face_seeds[b], attempt,
    start); start 0 is the one start of a single-start fit."""
    key = lambda s: [seed, int(s), attempt] + ([start] if start else [])  # noqa: E731
    rows = [np.random.default_rng(key(s)).standard_normal(n_latent) for s in face_seeds]
    return torch.as_tensor(np.stack(rows), dtype=torch.float32)


def first_starts(n_latent: int, face_seeds: Sequence[int], start: int, options: FitOptions) -> torch.Tensor:
    """Codes (B, n_latent) of start ``start`` of the first attempt: z = 0 for start 0 with ``init = "zero"``,
    else :func:`random_start`'s (restarts are always random: a restarted face needs a new start)."""
    if options.init == "zero" and start == 0:
        return torch.zeros(len(face_seeds), n_latent)
    return random_start(n_latent, options.seed, face_seeds, 0, start)


class _Objective:
    """Eq. 12 for a set of faces: targets (B, V, 3) mm, weights (B, V) in {0, 1}."""

    def __init__(self, network: nn.Module, reader: VertexReader, targets: torch.Tensor, weights: torch.Tensor,
                 prior_weight: float, precision: str):
        self.network, self.reader = network, reader
        self.prior_weight = prior_weight
        # bf16 only where the device runs it natively; emulated bf16 is many times slower than fp32
        self.precision = precision if native_bfloat16(targets.device) else "fp32"
        self.rest, self.weights = reader.distance_operands(targets, weights)

    def losses(self, z: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Eq. 12 per face (B,) for codes z (B, z_dim)."""
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=(precision or self.precision) == "bf16"):
            images = self.network(z)
        return self.reader.weighted_distances(images, self.rest, self.weights) + self.prior_weight * z.square().sum(1)


def _optimize(objective: _Objective, start: torch.Tensor, options: FitOptions,
              sharing: "Sharing") -> tuple[torch.Tensor, torch.Tensor]:
    """Adam with a cosine learning-rate decay from ``start`` (B, Z). Returns (codes with the lowest
    loss seen per unit of ``sharing`` (B, Z), loss history (iterations, B)). No host synchronization in the loop."""
    start = sharing.align(start)
    z = start.clone().requires_grad_(True)
    if sharing.columns:  # a shared code's gradient is its faces' sum; their Adam states then stay equal
        z.register_hook(sharing.sum_shared)
    optimizer = torch.optim.Adam([z], lr=options.lr)
    history = torch.empty(options.iterations, len(z), device=z.device)
    best_z, best_loss = start.clone(), torch.full((len(z),), math.inf, device=z.device)
    for step in range(options.iterations):
        progress = step / max(options.iterations - 1, 1)
        floor = options.final_lr_fraction
        optimizer.param_groups[0]["lr"] = options.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = objective.losses(z)
        loss.sum().backward()  # units are independent: the sum's gradient w.r.t. z_b is dE_unit(b)/dz_b
        with torch.no_grad():
            history[step] = loss
            total = sharing.unit_total(loss)
            better = total < best_loss  # NaN never is: a diverged face keeps its last finite codes
            best_loss = torch.where(better, total, best_loss)
            best_z = torch.where(better[:, None], z, best_z)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # The codes after the last step were never evaluated: they compete with the best seen.
    with torch.no_grad():
        better = sharing.unit_total(objective.losses(z.detach())) < best_loss
        best_z = torch.where(better[:, None], z.detach(), best_z)
    return best_z, history


def _run_attempt(network, reader, targets, weights, z0, options: FitOptions,
                 sharing: "Sharing") -> tuple[torch.Tensor, ...]:
    """Optimize faces from starts z0 in chunks of whole units; returns (z, fp32 loss, start loss, history)."""
    z, losses = torch.empty_like(z0), torch.empty(len(z0), device=z0.device)
    history = torch.empty(options.iterations, len(z0), device=z0.device)
    for rows in sharing.chunks(options.chunk):
        i = rows.to(z0.device)
        objective = _Objective(network, reader, targets[i], weights[i], options.prior_weight, options.precision)
        z[i], history[:, i] = _optimize(objective, z0[i], options, sharing.subset(rows))
        with torch.no_grad():
            losses[i] = objective.losses(z[i], "fp32")
    return z, losses, history[0].clone(), history


def flag_divergent(loss: torch.Tensor, start_loss: torch.Tensor, masked_error: torch.Tensor,
                   options: FitOptions, random_start: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: faces to restart (see :class:`FitOptions`): non-finite, stalled or outlier.

    loss, start_loss: (B,) Eq. 12 at the end / start of the attempt; masked_error: (B,) mm; random_start:
    (B,) bool, the faces whose fit began at a random start, the only ones the stall test applies to (None:
    all)."""
    finite = torch.isfinite(loss) & torch.isfinite(masked_error)
    stalled = loss > options.stall_fraction * start_loss
    if random_start is not None:
        stalled &= random_start
    typical = masked_error[finite].median() if bool(finite.any()) else torch.tensor(math.inf)
    outlier = (masked_error > options.outlier_ratio * typical) & (masked_error > options.outlier_floor_mm)
    return ~finite | stalled | outlier


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(1) / mask.sum(1)


# ------------------------------------------------------------------------------ shared codes


def group_sum(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, ...) sums of ``values`` (B, ...) over the rows of each row's group (``groups``: (B,) int64)."""
    sums = torch.zeros(int(groups.max()) + 1, *values.shape[1:], dtype=values.dtype, device=values.device)
    return sums.index_add_(0, groups, values)[groups]


def _relabel(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels, return_inverse=True)[1]


class Sharing:
    """Which faces of a fit share which codes (``fit_meshes(share=...)``), for B rows of z.

    columns: the z columns of each shared factor; groups: for each, (B,) int64 group of every row (rows of a
    group share those columns); units: (B,) int64, the rows linked by any shared code (connected components),
    which are optimized, compared and restarted together. Without shared codes every row is its own unit.
    """

    def __init__(self, columns: list[slice], groups: list[torch.Tensor], n: int):
        self.columns, self.groups = columns, [_relabel(g) for g in groups]
        units = torch.arange(n)
        for _ in range(n):  # label propagation: each row takes the smallest unit label of its groups
            before = units
            for g in self.groups:
                units = torch.zeros(int(g.max()) + 1, dtype=units.dtype).scatter_reduce(
                    0, g, units, "amin", include_self=False)[g]
            if torch.equal(units, before):
                break
        self.units = _relabel(units)

    @classmethod
    def of(cls, model: FaceModel, share: dict[str, Sequence] | None, n: int) -> "Sharing":
        """From ``fit_meshes``' ``share`` (factor -> (n,) labels); FaceganError for an unknown factor or a
        label count that is not n."""
        offsets = np.cumsum([0, *model.code_sizes])
        columns, groups = [], []
        for factor, labels in (share or {}).items():
            if factor not in model.factors:
                raise FaceganError(f"fit: cannot share {factor!r}; the model's codes are {', '.join(model.factors)}")
            labels = np.asarray(labels)
            if labels.shape != (n,):
                raise FaceganError(f"fit: {labels.size} {factor} labels to share for {n} meshes")
            k = model.factors.index(factor)
            columns.append(slice(int(offsets[k]), int(offsets[k + 1])))
            groups.append(torch.as_tensor(np.unique(labels, return_inverse=True)[1].reshape(-1)))
        return cls(columns, groups, n)

    def subset(self, rows: torch.Tensor) -> "Sharing":
        """The sharing among ``rows`` (whole units)."""
        rows = rows.cpu()
        return Sharing(self.columns, [g[rows] for g in self.groups], len(rows))

    def repeat(self, k: int) -> "Sharing":
        """The sharing of k starts per row, face-major (row b * k + s): start s of a group is its own group."""
        starts = torch.arange(k).repeat(len(self.units))
        return Sharing(self.columns, [g.repeat_interleave(k) * k + starts for g in self.groups], len(self.units) * k)

    def chunks(self, size: int) -> list[torch.Tensor]:
        """Row indices in chunks of about ``size`` rows (consecutive rows without shared codes), never
        splitting a unit: a unit larger than ``size`` is one chunk."""
        order = torch.argsort(self.units, stable=True)
        ends = torch.cumsum(torch.bincount(self.units), 0).tolist()  # row count up to each unit's end
        bounds = [0]
        for before, end in zip([0, *ends], ends):
            if before > bounds[-1] and end - bounds[-1] > size:
                bounds.append(before)
        return [order[a:b] for a, b in zip(bounds, [*bounds[1:], len(order)])]

    def align(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z) with each shared code set to its group's first row's."""
        if not self.columns:
            return z
        z = z.clone()
        for columns, g in zip(self.columns, self.groups):
            first = torch.full((int(g.max()) + 1,), len(g), dtype=torch.int64).scatter_reduce(
                0, g, torch.arange(len(g)), "amin")
            z[:, columns] = z[first[g].to(z.device), columns]
        return z

    def sum_shared(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient (B, Z) with each shared code's columns summed over its group."""
        grad = grad.clone()
        for columns, g in zip(self.columns, self.groups):
            grad[:, columns] = group_sum(grad[:, columns], g.to(grad.device))
        return grad

    def unit_total(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) the sum of ``values`` (B,) over each row's unit (the values themselves without shared codes)."""
        return group_sum(values, self.units.to(values.device)) if self.columns else values


# ------------------------------------------------------------------------------------ fitting


def fit_meshes(
    model: FaceModel,
    meshes: np.ndarray | torch.Tensor,
    vertex_mask: np.ndarray | torch.Tensor | None = None,
    options: FitOptions | None = None,
    face_seeds: Sequence[int] | None = None,
    share: dict[str, Sequence] | None = None,
) -> FitResult:
    """Fit latent codes to registered meshes by minimizing Eq. 12, with restarts of diverged faces.

    model: the trained model (its codec maps images to meshes); meshes: (B, V, 3) mm in the model's
    template topology (a single (V, 3) mesh is accepted); vertex_mask: None (all vertices), (V,) or
    (B, V) bool -- only masked-in vertices enter the data term; options: see :class:`FitOptions`;
    face_seeds: (B,) ints, face b starts from (options.seed, face_seeds[b], attempt) -- default
    0..B-1; pass the original indices when fitting a subset to reproduce a batch fit.
    share: factor name -> (B,) labels (beyond the paper): faces with equal labels get one code of that
    factor, fitted to all of them, e.g. ``{"identity": subject_of_each_scan}`` for several scans of each
    person. Faces linked by a shared code form a unit: its losses are summed where single faces are
    compared (best iterate, best start, restarts), and a flagged face restarts its whole unit.
    Raises FaceganError for meshes of another topology, NaN/inf coordinates, an empty mask or a bad ``share``.
    """
    options = (options or FitOptions()).validate()
    threads = options.threads or idle_threads()
    with torch_threads(threads):
        result = _fit(model, meshes, vertex_mask, options, face_seeds, share)
    result.threads = threads
    return result


def _fit(model, meshes, vertex_mask, options: FitOptions, face_seeds, share) -> FitResult:
    started = time.perf_counter()
    codec = codec_of(model)
    device = model.device
    targets = check_meshes(meshes, codec.template.n_vertices)
    mask = check_vertex_mask(vertex_mask, len(targets), targets.shape[1])
    n = len(targets)
    face_seeds = list(range(n)) if face_seeds is None else [int(s) for s in face_seeds]
    if len(face_seeds) != n:
        raise FaceganError(f"fit: {len(face_seeds)} face seeds for {n} meshes")
    sharing = Sharing.of(model, share, n)
    network, reader = fitting_network(model), VertexReader(codec, device)
    targets_d, weights_d = targets.to(device), mask.to(device, torch.float32)
    n_latent = sum(model.code_sizes) + model.noise_size

    z, loss, start_loss, history, random_kept = _first_attempt(network, reader, targets_d, weights_d, n_latent,
                                                               face_seeds, options, sharing)
    restarts = torch.zeros(n, dtype=torch.int64)
    for attempt in range(1, options.max_restarts + 1):
        errors = _masked_mean(_errors(network, reader, z, targets_d), weights_d)
        flagged = flag_divergent(loss, start_loss, errors, options, random_kept).cpu()
        todo = torch.nonzero(sharing.unit_total(flagged.float()) > 0).flatten()  # a unit restarts whole
        if len(todo) == 0:
            break
        restarts[todo] += 1
        idx, part = todo.to(device), sharing.subset(todo)
        z0 = random_start(n_latent, options.seed, [face_seeds[i] for i in todo.tolist()], attempt).to(device)
        z_new, loss_new, start_new, history_new = _run_attempt(network, reader, targets_d[idx], weights_d[idx], z0,
                                                               options, part)
        old = sharing.unit_total(loss)[idx]
        better = (part.unit_total(loss_new) < old) | ~torch.isfinite(old)
        keep = idx[better]
        z[keep], loss[keep], start_loss[keep] = z_new[better], loss_new[better], start_new[better]
        history[:, keep] = history_new[:, better]
        random_kept[keep] = True
    return _result(model, codec, network, reader, z, targets_d, mask, restarts, history, options, started)


def _first_attempt(network, reader, targets, weights, n_latent: int, face_seeds: list[int], options: FitOptions,
                   sharing: "Sharing") -> tuple[torch.Tensor, ...]:
    """Attempt 0 with ``options.starts`` starts per face in one batch (face-major rows); per unit of ``sharing``,
    the start with the lowest final loss. Returns (z, loss, start loss, history) as :func:`_run_attempt` for B faces,
    and (B,) bool: the kept start was random (not ``init = "zero"``'s z = 0)."""
    k, device = options.starts, targets.device
    z0 = torch.stack([first_starts(n_latent, face_seeds, start, options) for start in range(k)], 1)
    repeated = sharing.repeat(k)
    z, loss, start_loss, history = _run_attempt(network, reader, targets.repeat_interleave(k, 0),
                                                weights.repeat_interleave(k, 0), z0.flatten(0, 1).to(device), options,
                                                repeated)
    best = repeated.unit_total(torch.nan_to_num(loss, nan=float("inf"))).view(-1, k).argmin(1)
    rows = torch.arange(len(best), device=best.device) * k + best
    random = (best != 0) | (options.init == "random")
    return z[rows], loss[rows], start_loss[rows], history[:, rows], random


def _errors(network, reader, z: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(B, V) mm per-vertex distances of the fp32 sparse-read fits of codes z to targets."""
    with torch.no_grad():
        return torch.cat([(reader(network(z[i:i + chunk].float())) - targets[i:i + chunk]).norm(dim=-1)
                          for i in range(0, len(z), chunk)])


def split_codes(model: FaceModel, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split z (B, z_dim) into {factor: (B, size), ..., "noise": (B, noise_size)}."""
    parts = torch.split(z, [*model.code_sizes, model.noise_size], dim=1)
    return {name: part.contiguous() for name, part in zip([*model.factors, "noise"], parts)}


def join_codes(model: FaceModel, codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """z (B, z_dim) from {factor: (B, size), ..., "noise": (B, noise_size)} (the inverse of split_codes)."""
    return torch.cat([torch.as_tensor(codes[name], dtype=torch.float32) for name in [*model.factors, "noise"]], dim=1)


def _result(model, codec, network, reader, z, targets, mask, restarts, history, options, started) -> FitResult:
    with torch.no_grad():
        vertices = torch.cat([reader(network(z[i:i + 256])) for i in range(0, len(z), 256)]).cpu()
    targets = targets.cpu()
    errors = (vertices - targets).norm(dim=-1)
    maskf = mask.to(torch.float32)
    result = FitResult(
        codes=split_codes(model, z.detach().cpu()), vertices=vertices, errors=errors, vertex_mask=mask,
        mean_error=errors.mean(1), mean_error_masked=_masked_mean(errors, maskf), restarts=restarts,
        loss_history=history.cpu(), seconds=0.0,
    )
    if options.dense:
        dense = decode_codes(model, result.codes, "dense")
        result.vertices_dense = dense
        result.errors_dense = (dense - targets).norm(dim=-1)
        result.mean_error_dense = result.errors_dense.mean(1)
        result.mean_error_dense_masked = _masked_mean(result.errors_dense, maskf)
    result.seconds = time.perf_counter() - started
    return result


def decode_codes(model: FaceModel, codes: dict[str, torch.Tensor], method: str = "dense",
                 chunk: int = 128) -> torch.Tensor:
    """Meshes (N, V, 3) mm of codes {factor: (N, size), "noise": (N, noise_size)}: G(z) decoded by
    the model's codec, ``method`` "dense" (Laplacian least squares, Eq. 4) or "sparse" (bilinear read)."""
    codec = codec_of(model)
    z = join_codes(model, codes).to(model.device)
    out = []
    with torch.no_grad():
        for i in range(0, len(z), chunk):
            parts = split_codes(model, z[i:i + chunk])
            images = model.generate([parts[f] for f in model.factors], parts["noise"])
            out.append(codec.decode(codec.from_network(images.permute(0, 2, 3, 1).float()).cpu(), method))
    return torch.cat(out) if out else torch.zeros(0, codec.template.n_vertices, 3)


def untrained_model(codec: GeometryImageCodec, code_sizes: Sequence[int] = (65, 15), noise_size: int = 5,
                    base_channels: int = 32, factors: Sequence[str] = ("identity", "expression"), seed: int = 0,
                    max_mult: int = 8) -> FaceModel:
    """A FaceModel around an untrained generator, for tests and speed measurements.

    The DC-GAN initialisation makes an eval-mode generator nearly constant (its BatchNorm running
    statistics are the identity while activations shrink layer by layer), so the running statistics
    are first set from one batch of N(0, I) codes: the outputs then vary with z like a real model's.
    """
    from facegan.nn.networks import Generator
    from facegan.train.config import TrainConfig

    with torch.random.fork_rng():  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        generator = Generator(list(code_sizes), noise_size, torch.from_numpy(codec.mask), base_channels, max_mult)
        for module in generator.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: one batch sets the statistics exactly
        with torch.no_grad():
            generator.train()(torch.randn(256, generator.z_dim))
        fixed = {f: torch.randn(2, s) for f, s in zip(factors, code_sizes)}
    factors = list(factors)
    tensors, meta = codec.to_state()
    config = TrainConfig(code_sizes=list(code_sizes), noise_size=noise_size, g_channels=base_channels,
                         max_channels_mult=max_mult)
    names = {f: [f"{f}{i}" for i in range(2)] for f in factors}
    return FaceModel(generator.eval(), factors, fixed, names, config, tensors, meta, source="untrained")
