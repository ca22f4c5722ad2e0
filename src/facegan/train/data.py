"""The training set as the GAN sees it: quantized geometry images, the UV-chart mask, factor labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from facegan.errors import FaceganError

MISSING = -1  # label value of a sample without a label for that factor
EXPRESSION = 1  # factor index of the expression, the factor an expression descriptor describes


@dataclass
class TrainingImages:
    """Quantized geometry images with per-factor labels.

    images: (N, H, W, 3) uint8, NHWC, H == W a power of two >= 16 (64 or 128 in practice);
    mask: (H, W) bool, True on pixels inside the UV chart;
    labels: factor name -> (N,) int64 class index, ``MISSING`` (-1) where unlabeled. Dict order is the
        factor order of the latent code: "identity", "expression", then any extra factor;
    class_names: factor name -> class names (index = class).
    """

    images: torch.Tensor
    mask: torch.Tensor
    labels: dict[str, torch.Tensor]
    class_names: dict[str, list[str]]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    @property
    def factors(self) -> list[str]:
        return list(self.labels)

    @property
    def n_classes(self) -> list[int]:
        return [len(self.class_names[f]) for f in self.labels]

    def validate(self, classified: list[int] | None = None) -> "TrainingImages":
        """Check shapes, dtypes and label ranges; classified factors (indices) need >= 2 classes and labels.

        Raises :class:`FaceganError` naming the problem. ``classified=None`` checks every factor.
        """
        img = self.images
        if img.dtype != torch.uint8 or img.ndim != 4 or img.shape[3] != 3:
            raise FaceganError(f"training images: expected (N, H, W, 3) uint8, got {tuple(img.shape)} {img.dtype}")
        n, h, w = img.shape[:3]
        if h != w or h < 16 or h & (h - 1):
            raise FaceganError(f"training images: {h}x{w} pixels, need square with a power-of-two side >= 16")
        if self.mask.shape != (h, w) or self.mask.dtype != torch.bool:
            raise FaceganError(f"training mask: expected ({h}, {w}) bool, got {tuple(self.mask.shape)} {self.mask.dtype}")
        if not bool(self.mask.any()):
            raise FaceganError("training mask: no pixel inside the UV chart")
        if not self.labels:
            raise FaceganError("training labels: no factor (need at least 'identity')")
        if n == 0:
            raise FaceganError("training images: the dataset is empty")
        for index, (factor, lab) in enumerate(self.labels.items()):
            if factor not in self.class_names:
                raise FaceganError(f"training labels: factor {factor!r} has no class names")
            n_cls = len(self.class_names[factor])
            if lab.shape != (n,) or lab.dtype != torch.int64:
                raise FaceganError(f"training labels {factor!r}: expected ({n},) int64, got {tuple(lab.shape)} {lab.dtype}")
            if bool(((lab < MISSING) | (lab >= n_cls)).any()):
                raise FaceganError(f"training labels {factor!r}: class index outside [-1, {n_cls - 1}]")
            if classified is not None and index not in classified:
                continue
            if n_cls < 2:
                raise FaceganError(f"training labels {factor!r}: {n_cls} class, a classifier needs at least 2")
            if not bool((lab != MISSING).any()):
                raise FaceganError(f"training labels {factor!r}: no sample is labeled (all -1)")
        return self

    def fingerprint(self) -> dict:
        """Identity of the data for resume checks: sizes, class names and a SHA-256 of images+labels."""
        digest = hashlib.sha256()
        digest.update(self.images.cpu().contiguous().numpy().tobytes())
        digest.update(self.mask.cpu().numpy().tobytes())
        for lab in self.labels.values():
            digest.update(lab.cpu().numpy().astype(np.int64).tobytes())
        return {"n_images": len(self), "resolution": self.resolution, "factors": self.factors,
                "class_names": self.class_names, "sha256": digest.hexdigest()}


def to_network(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) geometry images -> float32 (B, 3, H, W) in [-1, 1] inside ``mask``, 0 outside.

    The result is a channels-last view of the NHWC data (no copy beyond the float conversion).
    """
    x = images.float().div_(127.5).sub_(1.0)
    x = x * mask.to(x.dtype)[None, :, :, None]
    return x.permute(0, 3, 1, 2)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Normalized (B, 3, H, W) float -> (B, H, W, 3) uint8 (the inverse of :func:`to_network` in the chart)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def chart_vectors(images: torch.Tensor, mask: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> (N, 3 * pixels inside ``mask``) float64 network values, pixel-major."""
    inside = mask.flatten()
    return torch.cat([to_network(images[s:s + chunk], mask).permute(0, 2, 3, 1).flatten(1, 2)[:, inside].flatten(1)
                      for s in range(0, len(images), chunk)]).double()


def group_mean(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """(n, D) mean of the rows of ``values`` (M, D) in each of the n groups (``groups``: (M,) int64); 0 for an
    empty group."""
    sums = torch.zeros(n, values.shape[1], dtype=values.dtype).index_add_(0, groups, values)
    return sums / torch.bincount(groups, minlength=n).clamp_min(1).to(values.dtype)[:, None]


def identity_shapes(flat: torch.Tensor, identity: torch.Tensor, expression: torch.Tensor,
                    sweeps: int = 20) -> torch.Tensor:
    """Each identity's expression-free shape, (n_identities, D), from (N, D) chart vectors ``flat``.

    The shape comes from the additive model x ~ a[identity] + b[expression class] fitted by least squares
    (backfitting) on the images with both labels, so it does not depend on which expressions an identity
    happens to show; an identity without any expression label gets the mean of its images minus the mean
    class effect. identity, expression: (N,) int64 classes, -1 = unlabeled; at least one identity label.
    """
    valid = identity >= 0
    n_id, n_exp = int(identity.max()) + 1, int(expression.max()) + 1
    both = valid & (expression >= 0)
    x, i, e = flat[both], identity[both], expression[both]

    shape = group_mean(x, i, n_id)
    effect = torch.zeros(max(n_exp, 1), flat.shape[1], dtype=flat.dtype)
    for _ in range(sweeps if len(x) else 0):
        effect = group_mean(x - shape[i], e, n_exp)
        shape = group_mean(x - effect[e], i, n_id)
    seen = torch.bincount(i, minlength=n_id) > 0
    if not bool(seen.all()):
        present = torch.bincount(e, minlength=n_exp) > 0
        mean_effect = effect[present].mean(0) if bool(present.any()) else 0.0  # no image has both labels: 0
        shape = torch.where(seen[:, None], shape, group_mean(flat[valid], identity[valid], n_id) - mean_effect)
    return shape


def residual_descriptors(images: torch.Tensor, mask: torch.Tensor, identity: torch.Tensor, expression: torch.Tensor,
                         n_components: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the expression descriptor (beyond the paper, docs/training.md "Expression descriptor").

    An image minus its identity's expression-free shape (:func:`identity_shapes`) leaves the expression.
    The leading ``n_components`` principal components of the residuals, scaled to unit variance, are the
    descriptor. images: (N, H, W, 3) uint8; mask: (H, W) bool; identity, expression: (N,) int64 classes,
    -1 = unlabeled. Returns (targets (N, n_components) float32, zero where the identity is unlabeled;
    valid (N,) bool: the identity is labeled).
    """
    valid = identity >= 0
    if not bool(valid.any()):
        raise FaceganError("expression descriptor: no image has an identity label")
    flat = chart_vectors(images, mask, chunk)
    shape = identity_shapes(flat, identity, expression)

    residual = flat if bool(valid.all()) else flat[valid]
    groups = identity[valid]
    for s in range(0, len(residual), chunk):  # in place, a chunk at a time: 30,000 images are ~2 GB
        residual[s:s + chunk] -= shape[groups[s:s + chunk]]
    residual -= residual.mean(0)
    k = min(n_components, len(residual) - 1, residual.shape[1])
    if k < n_components:
        raise FaceganError(f"expression descriptor: {n_components} components asked, the data supports {k}")
    with torch.random.fork_rng():  # the same targets in a run and in its resumption
        torch.manual_seed(0)
        u, _, _ = torch.svd_lowrank(residual, q=k + 8, niter=6)
    u = u[:, :k] * torch.sign(u.sum(0, keepdim=True)[:, :k] + 1e-300)  # sign convention: positive sum of scores
    targets = torch.zeros(len(images), k, dtype=torch.float32)
    targets[valid] = (u * (len(residual) - 1) ** 0.5).float()  # scores u * s have std s / sqrt(n - 1)
    return targets, valid


def chart_images(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, 3 * pixels inside ``mask``) pixel-major network values -> (N, 3, H, W) float32 images, 0 outside
    the chart: the inverse of :func:`chart_vectors`."""
    h, w = mask.shape
    out = torch.zeros(len(vectors), h * w, 3, dtype=torch.float32)
    out[:, mask.flatten()] = vectors.view(len(vectors), -1, 3).float()
    return out.view(-1, h, w, 3).permute(0, 3, 1, 2).contiguous()


def identity_shape_images(images: torch.Tensor, mask: torch.Tensor, identity: torch.Tensor,
                          expression: torch.Tensor) -> torch.Tensor:
    """(n_identities, 3, H, W) float32 network-space images of each identity's expression-free shape
    (:func:`identity_shapes`) from uint8 (N, H, W, 3) ``images``; identity, expression: (N,) int64, -1 = unlabeled."""
    if not bool((identity >= 0).any()):
        raise FaceganError("recombination: no image has an identity label")
    return chart_images(identity_shapes(chart_vectors(images, mask), identity, expression), mask)


def gaussian_weights(n: int, m: int, generator: torch.Generator, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, m) weights ``c ~ N(0, I / m)`` of :func:`blend`: with them, a blend of m shapes follows the Gaussian
    with the shapes' mean and covariance. Draws from ``generator``."""
    return torch.randn(n, m, generator=generator, device=device, dtype=dtype) / m ** 0.5


def blend(weights: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``mean + sum_i c_i (x_i - mean)`` for each row c of ``weights`` (n, m) over the m ``items`` (m, ...),
    ``mean`` their mean: the point of the linear model of the items with coefficients c. Returns (n, ...)."""
    mean = items.mean(0)
    return mean + torch.einsum("nm,m...->n...", weights, items - mean)


def gaussian_identities(shapes: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` new identity shapes drawn from the Gaussian with the mean and covariance of ``shapes`` (the linear
    face model of the training identities): :func:`blend` of ``shapes`` with :func:`gaussian_weights`.

    shapes: (m, 3, H, W) from :func:`identity_shape_images`. Returns (n, 3, H, W), 0 where every shape is 0
    (outside the chart). Draws from ``generator``.
    """
    return blend(gaussian_weights(n, len(shapes), generator, shapes.device, shapes.dtype), shapes)


def novel_identity_faces(images: torch.Tensor, identity: torch.Tensor, shapes: torch.Tensor, fraction: float,
                         generator: torch.Generator, novel_from: torch.Tensor, novel_codes: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Faces on new identities *with their identity codes*, for the reconstruction term (beyond the paper,
    docs/training.md "New identities in the reconstruction"): a random ``fraction`` of the identity-labeled
    faces k become ``x_k - a[id_k] + blend(c, A)``, a new identity from the Gaussian over the identity shapes
    A = ``novel_from``, and its identity code is the same blend of those identities' fixed codes,
    ``blend(c, T)`` with T = ``novel_codes``. A training identity is the blend with c = e_j (its own shape
    and code). With ``c ~ N(0, I / m)`` the blended codes have the covariance ``(T - mean)^T (T - mean) / m``:
    the prior's unit variance on their span when the codes are drawn with ``isotropic_identity_codes``,
    stretched along a few directions when they are plain Gaussian draws.

    images: (B, 3, H, W) network values; identity: (B,) int64, -1 = unlabeled (never chosen); shapes:
    (n_identities, 3, H, W) indexed by label; novel_from: (m, 3, H, W) and novel_codes: (m, size), row for
    row (the identities that have images). Returns (images (B, 3, H, W) clamped to [-1, 1], identity codes
    (B, size), 0 for the faces not chosen, chosen (B,) bool). Draws from ``generator``.
    """
    n = len(images)
    chosen = (torch.rand(n, generator=generator, device=images.device) < fraction) & (identity >= 0)
    weights = gaussian_weights(n, len(novel_from), generator, images.device, images.dtype)
    offset = (blend(weights, novel_from) - shapes[identity.clamp_min(0)]) * chosen[:, None, None, None]
    codes = blend(weights, novel_codes) * chosen[:, None]
    return (images + offset).clamp_(-1.0, 1.0), codes, chosen


def recombine_identities(images: torch.Tensor, identity: torch.Tensor, shapes: torch.Tensor, fraction: float,
                         generator: torch.Generator, novel: float = 0.0, novel_from: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Give a random ``fraction`` of the faces the identity of another face of the batch (beyond the paper,
    docs/training.md "Recombined faces"): face k becomes ``x_k - a[id_k] + a[id_j]`` for a random j, i.e.
    face k's expression on face j's identity, labeled ``id_j``; other labels (its expression) stay k's.
    A random ``novel`` fraction of those faces wear a new identity from :func:`gaussian_identities` of
    ``novel_from`` (default ``shapes``; give the shapes of the identities that have images) instead, with an
    unknown identity label (-1).

    images: (B, 3, H, W) network values; identity: (B,) int64, -1 = unlabeled (such faces are never
    recombined, nor given to others); shapes: (n_identities, 3, H, W) from :func:`identity_shape_images`.
    Returns (images (B, 3, H, W) clamped to [-1, 1], identity labels (B,)). Draws from ``generator``.
    """
    n = len(images)
    partner = torch.randint(n, (n,), generator=generator, device=images.device)
    chosen = torch.rand(n, generator=generator, device=images.device) < fraction
    chosen &= (identity >= 0) & (identity[partner] >= 0)
    new_identity = torch.where(chosen, identity[partner], identity)
    new_shape = shapes[new_identity.clamp_min(0)]
    if novel:  # no draw otherwise: runs without it keep their random streams
        fresh = chosen & (torch.rand(n, generator=generator, device=images.device) < novel)
        drawn = gaussian_identities(shapes if novel_from is None else novel_from, n, generator)
        new_shape = torch.where(fresh[:, None, None, None], drawn, new_shape)
        new_identity = torch.where(fresh, -1, new_identity)
    offset = new_shape - shapes[identity.clamp_min(0)]  # exactly 0 where not chosen
    return (images + offset).clamp_(-1.0, 1.0), new_identity


def shared_expression_pairs(images: torch.Tensor, identity: torch.Tensor, shapes: torch.Tensor,
                            generator: torch.Generator, novel: float = 0.0, novel_from: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Real pairs for the pair critic (beyond the paper, docs/training.md "Pair critic"): each face's expression
    residual ``x_k - a[id_k]`` worn by two identities, each drawn as :func:`recombine_identities` draws one
    (another face's identity, or with ``novel`` a new Gaussian identity).

    images: (P, 3, H, W) network values; identity: (P,) int64 (-1: unlabeled, then both members are the face
    itself); shapes, novel, novel_from: as for :func:`recombine_identities`. Returns (pairs (P, 6, H, W), the two
    members stacked on channels; identities (2, P) of the members, -1 for a new one).
    """
    members = [recombine_identities(images, identity, shapes, 1.0, generator, novel, novel_from) for _ in range(2)]
    return torch.cat([m[0] for m in members], dim=1), torch.stack([m[1] for m in members])


@dataclass
class LinearDescriptor:
    """A fixed linear expression descriptor (beyond the paper, docs/training.md "Linear descriptor").

    weights: (K, 3, H, W), zero outside the UV chart; bias: (K,); prototypes: (C, K) mean descriptor of each
    expression class over the real images (zero for a class without images), or None when unused.
    Calling it on network-space images (B, 3, H, W) gives their descriptors (B, K), differentiably.
    """

    weights: torch.Tensor
    bias: torch.Tensor
    prototypes: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", images.float(), self.weights) + self.bias

    def to(self, device: torch.device) -> "LinearDescriptor":
        protos = None if self.prototypes is None else self.prototypes.to(device)
        return LinearDescriptor(self.weights.to(device), self.bias.to(device), protos)


def fit_linear_descriptor(images: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                          expression: torch.Tensor, ridge: float, prototypes: bool, chunk: int = 512
                          ) -> LinearDescriptor:
    """Ridge regression from an image alone to its expression descriptor (the targets of
    :func:`residual_descriptors`), fitted on the images whose identity is labeled.

    The targets subtract the identity's shape, which a generated face does not come with; a linear map
    that predicts them from the image must cancel the identity directions of the training faces, so two
    faces with one expression on different training-span identities get (nearly) the same descriptor.
    Unlike a learned head it does not adapt to G during training; identities outside the training span
    still move it (measured in docs/training.md, "Why z_exp is weak"). ``ridge`` is relative
    to the mean squared norm of the centered images. images: (N, H, W, 3) uint8; mask: (H, W) bool;
    targets: (N, K); valid: (N,) bool; expression: (N,) int64 classes, -1 = unlabeled.
    """
    x = chart_vectors(images[valid], mask, chunk)
    t = targets[valid].double()
    x_mean, t_mean = x.mean(0), t.mean(0)
    x -= x_mean
    lam = ridge * float(x.square().sum(1).mean())
    n, d = x.shape
    if n <= d:  # the dual form solves an n x n system: (X X^T + lam I) A = T, W = X^T A
        w = x.T @ torch.linalg.solve(x @ x.T + lam * torch.eye(n, dtype=x.dtype), t - t_mean)
    else:
        w = torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=x.dtype), x.T @ (t - t_mean))
    k = t.shape[1]
    h, wd = mask.shape
    image = torch.zeros(h * wd, 3, k, dtype=torch.float64)
    image[mask.flatten()] = w.view(-1, 3, k)
    weights = image.view(h, wd, 3, k).permute(3, 2, 0, 1).contiguous().float()  # (K, 3, H, W)
    bias = (t_mean - x_mean @ w).float()
    protos = None
    if prototypes:
        labeled = valid & (expression >= 0)
        protos = group_mean(targets[labeled].float(), expression[labeled], int(expression.max()) + 1)
    return LinearDescriptor(weights, bias, protos)
