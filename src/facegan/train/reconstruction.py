"""Codes of the real training faces, kept up to date by a few steps of fitting (beyond the paper).

With ``lambda_rec > 0`` the G phase also asks G to *reproduce* real faces, not only to fool D: each
training face i has a code z_i (one row of a table), its labeled factors pinned to their fixed codes
T^k[label] and the rest (unlabeled factors and the noise) free. Each G step takes the real batch of the
iteration's last D step, refines the free part of its codes by ``rec_steps`` Adam steps on the
reconstruction loss with G frozen (warm-started from the table, like Eq. 12 fitting from the previous
visit's answer) within the prior's typical ball, writes them back, and adds ``lambda_rec`` x the
reconstruction loss of those codes to G's loss. The adversarial loss alone leaves parts of the data G
cannot reach (the shipped model fits its own training faces to 0.88 mm, docs/fitting.md); this term
trains G on the faces where fitting will look for them, and since every face of one person shares T^id,
the expression has to come from z_exp. What it buys: docs/training.md, "Reconstruction of the real faces".
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch

from facegan.nn.losses import reconstruction_loss
from facegan.train.data import MISSING


def pinned_codes(labels: list[torch.Tensor], fixed_codes: list[torch.Tensor],
                 noise_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pinned part of the codes of B real faces and where it applies.

    labels[k]: (B,) int64 class of factor k, ``MISSING`` where unlabeled; fixed_codes[k]: (n_classes_k,
    size_k) the fixed codes T^k. Returns (values, pinned), both (B, sum(size_k) + noise_size): values holds
    T^k[label] in factor k's columns of a labeled face (0 elsewhere), pinned is True there; the noise
    columns are never pinned.
    """
    values, pinned = [], []
    for lab, table in zip(labels, fixed_codes):
        known = lab != MISSING
        values.append(table[lab.clamp(min=0)] * known[:, None])
        pinned.append(known[:, None].expand(-1, table.shape[1]))
    b = labels[0].shape[0]
    device = fixed_codes[0].device
    values.append(torch.zeros(b, noise_size, device=device))
    pinned.append(torch.zeros(b, noise_size, dtype=torch.bool, device=device))
    return torch.cat(values, dim=1), torch.cat(pinned, dim=1)


def limit_to_prior(codes: torch.Tensor, sizes: list[int], radius: float) -> torch.Tensor:
    """Each block of ``sizes`` columns of ``codes`` (B, sum(sizes)) scaled back into the ball of radius
    ``radius * sqrt(size)`` (a standard normal code of that size has a norm of about sqrt(size)); blocks
    inside it are unchanged. radius 0 = no limit."""
    if not radius:
        return codes
    blocks = torch.split(codes, sizes, dim=1)
    limited = [b * (radius * size ** 0.5 / b.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
               for b, size in zip(blocks, sizes)]
    return torch.cat(limited, dim=1)


def refine_codes(generator: torch.nn.Module, codes: torch.Tensor, pinned: torch.Tensor, real: torch.Tensor,
                 mask: torch.Tensor, steps: int, lr: float, autocast: Callable[[], ContextManager],
                 sizes: list[int], radius: float) -> torch.Tensor:
    """``steps`` Adam steps on :func:`~facegan.nn.losses.reconstruction_loss` over the free entries of
    ``codes`` (B, Z) (``pinned`` (B, Z) bool entries stay as given), G's weights untouched; after each step
    the free codes are limited to the prior's ball (:func:`limit_to_prior` with the block ``sizes`` of the
    factors and the noise, and ``radius``; 0 = no limit).

    real: (B, 3, R, R) the faces to reproduce, network space; mask: (R, R) chart. Returns the refined
    codes (B, Z), detached. Only the codes' gradient is computed (``autograd.grad``), so no gradient
    reaches G's parameters or a DDP reducer.
    """
    free = (~pinned).to(codes.dtype)
    z = codes.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        with autocast():
            fake = generator(z)
        loss = reconstruction_loss(fake, real, mask)
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = grad * free
        opt.step()
        with torch.no_grad():
            z.copy_(torch.where(pinned, z, limit_to_prior(z, sizes, radius)))
    return z.detach()
