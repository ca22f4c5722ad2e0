"""DC-GAN generator and the multi-branch discriminator of Abrevaya et al. (ICCV 2019), Fig. 2 / Sec. 5.1.

Generator: z = concat(code_1, ..., code_K, noise) -> (B, 3, R, R) geometry image, tanh, zero outside the
UV chart. Discriminator: two shared conv blocks, then one copy of the remaining blocks per branch:
C_real (WGAN critic, one output) and one classifier per labeled factor (features of ``feature_size``,
then a linear layer to one logit per class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

N_SHARED_BLOCKS = 2  # conv blocks shared by all discriminator branches (paper Sec. 5.1)


def _n_resamplings(resolution: int) -> int:
    """Number of stride-2 stages between 4x4 and ``resolution`` (4 for 64 px, 5 for 128 px)."""
    n = int(round(math.log2(resolution))) - 2
    if 2 ** (n + 2) != resolution or n < N_SHARED_BLOCKS:
        raise ValueError(f"resolution {resolution}: need a power of two >= {2 ** (N_SHARED_BLOCKS + 2)}")
    return n


def dcgan_init(module: nn.Module) -> None:
    """DC-GAN initialisation: conv/linear weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Trunk(nn.Module):
    """A DC-GAN generator trunk: linear to 4x4 x widths[0], then (ConvTranspose 4x4 stride 2, BatchNorm, ReLU)
    blocks through ``widths``, and a last ConvTranspose to 3 channels: (B, in_features) -> (B, 3, R, R) logits."""

    def __init__(self, in_features: int, widths: list[int]):
        super().__init__()
        self.widths = widths
        self.stem = nn.Linear(in_features, widths[0] * 16, bias=False)
        self.stem_norm = nn.BatchNorm2d(widths[0])
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem(z).view(z.shape[0], self.widths[0], 4, 4)
        x = torch.relu(self.stem_norm(x))
        x = self.blocks(x)  # follows the weights' memory format (channels_last after .to(memory_format=...))
        return self.to_rgb(x)


class Generator(Trunk):
    """G(z): latent codes -> normalized geometry images.

    code_sizes: size of each factor's code, in factor order (e.g. [65, 15] for identity, expression);
    noise_size: size of the unstructured noise (5 in the paper);
    mask: (R, R) bool UV-chart mask; the output is forced to 0 outside it.
    Architecture: a :class:`Trunk` whose ``base_channels`` is the width of the last hidden block (widths
    double towards 4x4, capped at ``max_mult * base``), then tanh.
    additive: None (the paper), or the index of a factor whose code gets a trunk of its own, seeing only that
    code, whose logits are added to the main trunk's (which sees every other code and the noise) before the
    tanh: G(z) = tanh(T(z without code k) + T_k(code k)) (beyond the paper, docs/training.md "Additive
    generator").
    BatchNorm is fine here: the gradient penalty only differentiates the discriminator.
    """

    def __init__(self, code_sizes: list[int], noise_size: int, mask: torch.Tensor, base_channels: int = 64,
                 max_mult: int = 8, additive: int | None = None):
        resolution = int(mask.shape[-1])
        n_up = _n_resamplings(resolution)
        widths = [base_channels * min(2 ** (n_up - 1 - i), max_mult) for i in range(n_up)]  # at 4x4, 8x8, ...
        z_dim = sum(code_sizes) + noise_size
        separate = 0 if additive is None else code_sizes[additive]
        super().__init__(z_dim - separate, widths)
        self.code_sizes = list(code_sizes)
        self.noise_size = noise_size
        self.resolution = resolution
        self.z_dim = z_dim
        self.additive = additive
        if additive is not None:
            begin = sum(code_sizes[:additive])
            self.separate = (begin, begin + separate)  # z columns of the separate code
            self.separate_trunk = Trunk(separate, widths)
        self.register_buffer("mask", mask.detach().to(torch.float32).reshape(1, 1, resolution, resolution).clone())
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_dim) -> (B, 3, R, R) in [-1, 1], exactly 0 outside the chart."""
        if self.additive is None:
            x = super().forward(z)
        else:
            begin, end = self.separate
            x = super().forward(torch.cat([z[:, :begin], z[:, end:]], 1)) + self.separate_trunk(z[:, begin:end])
        return torch.tanh(x) * self.mask.to(x.dtype)

    def join(self, codes: list[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """Concatenate per-factor codes (B, size_k) and noise (B, noise_size) into z (B, z_dim)."""
        if len(codes) != len(self.code_sizes):
            raise ValueError(f"expected {len(self.code_sizes)} codes, got {len(codes)}")
        return torch.cat([*codes, noise], dim=1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # layer norm over (C, H, W), per sample
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # instance norm with affine, per sample
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}")


def _down_block(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm == "none"), _norm(norm, c_out), nn.LeakyReLU(0.2))


def stack_pairs(images: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """images (B, 3, R, R) and pair indices first, second (P,) -> (P, 6, R, R): each pair's two images on channels."""
    return torch.cat([images[first], images[second]], dim=1)


@dataclass
class DOutput:
    """What a discriminator pass returns; entries not asked for are None.

    critic: (B,) float WGAN critic values; logits[k]: (B, n_classes_k); features[k]: (B, feature_size),
    the penultimate layer of classifier branch k (after its LeakyReLU); descriptors[k]: (B, descriptor_size_k)
    for a branch with an expression descriptor, else None. Lists are indexed by branch.
    """

    critic: torch.Tensor | None
    logits: list[torch.Tensor | None]
    features: list[torch.Tensor | None]
    descriptors: list[torch.Tensor | None]


class ClassifierHead(nn.Module):
    """Flattened 4x4 maps -> features (feature_size, LeakyReLU) -> logits (n_classes), and with
    ``descriptor_size`` > 0 also a linear regression of the expression descriptor from the same features."""

    def __init__(self, in_features: int, feature_size: int, n_classes: int, descriptor_size: int = 0):
        super().__init__()
        self.features = nn.Linear(in_features, feature_size)
        self.logits = nn.Linear(feature_size, n_classes)
        self.descriptor = nn.Linear(feature_size, descriptor_size) if descriptor_size else None

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.nn.functional.leaky_relu(self.features(h.flatten(1)), 0.2)
        return self.logits(f), f


class Discriminator(nn.Module):
    """D(x) with a shared trunk, a critic branch C_real and one classifier branch per entry of n_classes.

    resolution: R of the (B, 3, R, R) input; base_channels: width of the first conv block (doubling per
    block, capped at ``max_mult * base``); n_classes: class count of each classifier branch (may be empty);
    descriptor_sizes: per branch, the size of its expression-descriptor regression (0 = none; default none);
    norm: "layer" (default: GroupNorm(1, C), per-sample layer norm as recommended by Gulrajani et al. for
    WGAN-GP), "instance" or "none". No batch norm: it couples the samples of a batch, which would make
    each sample's gradient-penalty term depend on the others. The first block has no norm (DC-GAN).
    in_channels: channels of the input (3; 6 for a pair critic's two stacked images).
    pair_critic: also hold a critic of image pairs, a discriminator of its own with 6 input channels and no
    classifier (beyond the paper, docs/training.md "Pair critic"); None otherwise.
    """

    def __init__(self, resolution: int, n_classes: list[int], base_channels: int = 64, feature_size: int = 2048,
                 norm: str = "layer", max_mult: int = 8, descriptor_sizes: list[int] | None = None,
                 in_channels: int = 3, pair_critic: bool = False):
        super().__init__()
        n_down = _n_resamplings(resolution)
        widths = [base_channels * min(2 ** i, max_mult) for i in range(n_down)]
        self.n_classes = list(n_classes)
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2),
            *[_down_block(widths[i - 1], widths[i], norm) for i in range(1, N_SHARED_BLOCKS)],
        )

        def branch_convs() -> nn.Sequential:
            return nn.Sequential(*[_down_block(widths[i - 1], widths[i], norm) for i in range(N_SHARED_BLOCKS, n_down)])

        flat = widths[-1] * 16
        self.critic_convs = branch_convs()
        self.critic_out = nn.Linear(flat, 1)
        self.class_convs = nn.ModuleList([branch_convs() for _ in n_classes])
        sizes = descriptor_sizes or [0] * len(n_classes)
        self.class_heads = nn.ModuleList([ClassifierHead(flat, feature_size, c, d) for c, d in zip(n_classes, sizes)])
        self.pairs = (Discriminator(resolution, [], base_channels, feature_size, norm, max_mult, in_channels=6)
                      if pair_critic else None)
        dcgan_init(self)

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B,) critic values; the only path the gradient penalty differentiates."""
        return self.critic_out(self.critic_convs(self.trunk(x)).flatten(1)).squeeze(1)

    def pair_critic(self, pairs: torch.Tensor) -> torch.Tensor:
        """(P, 6, R, R) pairs of images stacked on channels (:func:`stack_pairs`) -> (P,) pair critic values."""
        return self.pairs.critic(pairs)

    def forward(self, x: torch.Tensor, critic: bool = True, branches: list[int] | None = None,
                n_classify: int | None = None, critic_from: int = 0) -> DOutput:
        """Run the trunk once, then the critic (if ``critic``) on the samples from ``critic_from`` on and the
        classifier ``branches`` (branch indices; None = all) on the first ``n_classify`` samples (None = all).

        x: (B, 3, R, R). Returns a :class:`DOutput` (logits/features have n_classify rows, critic B - critic_from).
        """
        h = self.trunk(x)
        wanted = range(len(self.class_heads)) if branches is None else branches
        logits: list[torch.Tensor | None] = [None] * len(self.class_heads)
        features: list[torch.Tensor | None] = [None] * len(self.class_heads)
        descriptors: list[torch.Tensor | None] = [None] * len(self.class_heads)
        h_cls = h if n_classify is None else h[:n_classify]
        for k in wanted:
            head = self.class_heads[k]
            logits[k], features[k] = head(self.class_convs[k](h_cls))
            if head.descriptor is not None:
                descriptors[k] = head.descriptor(features[k])
        score = self.critic_out(self.critic_convs(h[critic_from:]).flatten(1)).squeeze(1) if critic else None
        return DOutput(score, logits, features, descriptors)
