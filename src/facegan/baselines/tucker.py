"""The multilinear (Tucker) baseline (Vlasic et al. 2005; Bolkart & Wuhrer for missing data): a
(vertices x identity x expression) tensor model on the meshes labeled with both factors.

Training data: every train mesh with both labels (the static part plus the labeled motion and
spontaneous frames), averaged per (identity, expression) cell. The static part alone is far too small
(6 identities on data/ict-small), so most cells are missing: on data/ict-small 120 of 60 x 7 are
observed, 50 identities having only a neutral face. Missing cells are imputed:

1. start from the two-way additive model x_ie = a_i + b_e fitted by least squares to the observed
   cells (the identity's face plus the expression's mean offset);
2. repeat: centre, HOSVD truncated to the mode ranks, replace the missing cells by the low-rank
   reconstruction, until no imputed coordinate moves more than ``impute_tolerance`` mm.

This is the hard-imputation (EM-like) form of robust multilinear learning with missing data (Bolkart &
Wuhrer 2015), without its outlier model. Ranks: r_id = min(65, identities), r_exp = min(20, expressions).
With a rank equal to its mode's size the reconstruction is exact and step 2 stops at once (data/ict-small:
60 and 7 are full), so the additive start is the imputation; with more identities than 65 it refines it.

Model: face = mean + C x_id w_id x_exp w_exp with C (r_id, r_exp, 3V) the HOSVD core and w_id, w_exp
drawn from Gaussians fitted to the training weights (the rows of the two mode matrices). With
w = m + z @ F (z ~ N(0, I)) folded in, the stored ``core`` (r_id+1, r_exp+1, 3V) maps homogeneous codes
[1, z_id], [1, z_exp] bilinearly to the face. The fit is alternating ridge least squares on (z_id, z_exp)
from the mean weights (z = 0), the ridge being the MAP prior of the linear model (fit_noise^2).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from facegan.baselines.common import (BaselineModel, BaselineOptions, TuckerOptions, fit_gaussian, ridge_solve,
                                      training_set)
from facegan.errors import FaceganError
from facegan.evaluation.generators import register_loader


def _homogeneous(z: Tensor) -> Tensor:
    """(N, k) -> (N, k+1): [1, z], so the mean weights and the mean face sit in the core."""
    return torch.cat([torch.ones(len(z), 1, dtype=z.dtype), z], dim=1)


class TuckerModel(BaselineModel):
    """Tensor: core (r_id+1, r_exp+1, 3V) float32 mm; face = sum_ab core[a, b] [1, z_id]_a [1, z_exp]_b."""

    kind = "tucker"

    @cached_property
    def _core(self) -> Tensor:
        """(A*B, 3V) float64."""
        core = self.tensors["core"]
        return core.double().reshape(core.shape[0] * core.shape[1], -1)

    @cached_property
    def _core_gram(self) -> Tensor:
        """(A, B, A, B): inner products of the core's slices, so each ALS step is small."""
        a, b = self.tensors["core"].shape[:2]
        return (self._core @ self._core.T).reshape(a, b, a, b)

    def decode(self, codes: dict[str, Tensor]) -> Tensor:
        outer = _homogeneous(codes["identity"])[:, :, None] * _homogeneous(codes["expression"])[:, None, :]
        return outer.reshape(len(outer), -1) @ self._core

    def fit_codes(self, x: Tensor) -> dict[str, Tensor]:
        a, b = self.tensors["core"].shape[:2]
        ridge = self.meta["config"]["fit_noise"] ** 2
        proj = (x @ self._core.T).reshape(-1, a, b)  # the data enter the objective only through these
        gram = self._core_gram
        z_id, z_exp = torch.zeros(len(x), a - 1, dtype=x.dtype), torch.zeros(len(x), b - 1, dtype=x.dtype)
        for _ in range(self.meta["config"]["fit_iterations"]):
            z_id = _als_step(gram, proj, z_exp, ridge)
            z_exp = _als_step(gram.permute(1, 0, 3, 2), proj.transpose(1, 2), z_id, ridge)
        return {"identity": z_id, "expression": z_exp}


def _als_step(gram: Tensor, proj: Tensor, other: Tensor, ridge: float) -> Tensor:
    """The first factor's codes (N, A-1) minimizing |x - face|^2 + ridge |z|^2 with the other's (N, B-1) fixed.

    gram (A, B, A, B) core inner products; proj (N, A, B) = core . x. With h = [1, other] the objective
    is [1, z]^T Q [1, z] - 2 [1, z]^T r, Q = gram contracted twice with h, r = proj h.
    """
    h = _homogeneous(other)
    q = torch.einsum("abcd,nb,nd->nac", gram, h, h)
    r = torch.einsum("nab,nb->na", proj, h)
    return ridge_solve(q[:, 1:, 1:], r[:, 1:] - q[:, 1:, 0], ridge)


def hosvd_factors(x: Tensor, ranks: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Leading left singular vectors of the identity and expression unfoldings of x (I, E, D):
    (I, r_id) and (E, r_exp), from the small Gram matrices."""
    factors = []
    for gram, rank in ((torch.einsum("ied,jed->ij", x, x), ranks[0]), (torch.einsum("ied,ifd->ef", x, x), ranks[1])):
        _, vectors = torch.linalg.eigh(gram)
        factors.append(vectors[:, -rank:].flip(1))
    return factors[0], factors[1]


def additive_fill(means: Tensor, observed: Tensor) -> Tensor:
    """``means`` (I, E, D) with the cells where ``observed`` (I, E) is False replaced by the two-way
    additive model a_i + b_e fitted by least squares to the observed cells."""
    cells = observed.nonzero()
    n_id, n_exp = observed.shape
    design = torch.cat([torch.nn.functional.one_hot(cells[:, 0], n_id),
                        torch.nn.functional.one_hot(cells[:, 1], n_exp)], dim=1).double()
    coef = torch.linalg.pinv(design) @ means[cells[:, 0], cells[:, 1]]  # minimum norm: a and b share a constant
    return torch.where(observed[..., None], means, coef[:n_id, None] + coef[None, n_id:])


def impute(means: Tensor, observed: Tensor, ranks: tuple[int, int], options: TuckerOptions,
           progress: bool = False) -> tuple[Tensor, int]:
    """Fill the unobserved cells of ``means`` (I, E, D): additive start, then HOSVD re-imputation.

    Returns the filled tensor (I, E, D) and the number of re-imputation rounds run.
    """
    filled = additive_fill(means, observed)
    missing = ~observed
    if not missing.any():
        return filled, 0
    done = 0
    rounds = tqdm(range(1, options.impute_iterations + 1), desc="tucker imputation", disable=not progress, leave=False)
    for done in rounds:
        mean = filled.mean((0, 1))
        u_id, u_exp = hosvd_factors(filled - mean, ranks)
        low_rank = mean + torch.einsum("ij,jfd,ef->ied", u_id @ u_id.T, filled - mean, u_exp @ u_exp.T)
        change = float((low_rank - filled)[missing].abs().max())
        filled = torch.where(observed[..., None], means, low_rank)
        rounds.set_postfix(change=f"{change:.2e}")
        if change <= options.impute_tolerance:
            break
    return filled, done


def train_tucker(dataset, options: BaselineOptions | None = None, progress: bool = True) -> TuckerModel:
    """Build the Tucker model from the doubly labeled train meshes of ``dataset`` (a RegisteredDataset)."""
    options = options or BaselineOptions()
    data = training_set(dataset)
    means, counts = data.cell_means()
    observed = counts > 0
    ids, exps = observed.any(1), observed.any(0)  # classes with at least one doubly labeled mesh
    means, observed = means[ids][:, exps], observed[ids][:, exps]
    if min(observed.shape) < 2:
        raise FaceganError(f"{dataset.root}: the Tucker model needs meshes labeled with both factors for at least "
                           f"2 identities and 2 expressions, found {observed.shape[0]} and {observed.shape[1]}")
    ranks = (min(options.identity_size, observed.shape[0]), min(options.expression_size, observed.shape[1]))
    tensor, rounds = impute(means, observed, ranks, options.tucker, progress)
    mean = tensor.mean((0, 1))
    u_id, u_exp = hosvd_factors(tensor - mean, ranks)
    core = torch.einsum("ied,ia,eb->abd", tensor - mean, u_id, u_exp)
    # Training weights are the mode matrices' rows; w = [1, z] @ [m; F] turns z ~ N(0, I) into their Gaussian.
    lift_id, lift_exp = (torch.cat([m[None], f]) for m, f in (fit_gaussian(u_id), fit_gaussian(u_exp)))
    lifted = torch.einsum("abd,pa,qb->pqd", core, lift_id, lift_exp)
    lifted[0, 0] += mean
    meta = {
        "name": "tucker",
        "n_vertices": data.n_vertices,
        "code_sizes": {"identity": ranks[0], "expression": ranks[1]},
        "config": options.config("tucker"),
        "training": {"identities": int(observed.shape[0]),
                     "expressions": [n for n, keep in zip(data.expression_names, exps.tolist()) if keep],
                     "observed_cells": int(observed.sum()), "cells": int(observed.numel()),
                     "impute_rounds": rounds},
    }
    return TuckerModel({"core": lifted.float()}, meta)


@register_loader("tucker")
def load_tucker(path: Path, meta: dict) -> TuckerModel:
    """A Tucker model file (``kind`` "tucker") as a FaceGenerator."""
    return TuckerModel.load(path)
