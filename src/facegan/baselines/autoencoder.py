"""The autoencoder baseline: a mesh autoencoder whose latent is split into identity (65) and expression (20)
parts, in the spirit of MAE (Fernández Abrevaya et al. 2018), not COMA (Ranjan et al. 2018).

MAE is the compared model that separates the factors inside one network, with labels telling the codes
apart; COMA's spectral mesh convolutions need a mesh down-sampling hierarchy of the template and are slow
on a CPU. Here both networks are MLPs on the leading ``pca_size`` PCA coordinates of the training meshes
(256 keep all but 0.001 mm RMS of data/ict-small), so a model trains on two CPU cores in minutes:

    encoder: coefficients -> (z_id, z_exp);  decoder: (z_id, z_exp) -> coefficients -> mean + coefficients @ axes

The PCA axes are orthonormal, so the squared error on the coefficients is the squared vertex error up to a
constant. Losses per step (all squared errors on coefficients scaled to unit RMS):

- reconstruction of every encoded mesh;
- identity swap: for meshes A, B with the same identity label, decode(z_id(A), z_exp(B)) = B;
- expression swap: for meshes A, B with the same expression label, decode(z_id(B), z_exp(A)) = B;
- prior: ``prior_weight`` * mean z^2, so the latents stay at a scale a Gaussian describes.

Sampling: per part, a Gaussian fitted to the training meshes' latents. Fit: the encoder's latents, then
``fit_steps`` Adam steps on the squared vertex error, keeping each face's best. MAE's decoder is a
multilinear tensor initialized from a complete labeled tensor; we keep a free MLP decoder (the Tucker
baseline already is the multilinear model) and use the labels only through the swap losses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from facegan.baselines.common import (FACTORS, BaselineModel, BaselineOptions, fit_gaussian, principal_components,
                                      training_set)
from facegan.device import default_device
from facegan.errors import FaceganError
from facegan.evaluation.generators import register_loader
from facegan.train.checkpoint import load_module, module_tensors


def _mlp(n_in: int, hidden: int, layers: int, n_out: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for k in range(layers):
        blocks += [nn.Linear(n_in if k == 0 else hidden, hidden), nn.ELU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, n_out))


class SplitAutoencoder(nn.Module):
    """MLP encoder (B, P) -> (B, k_id + k_exp) latents, identity part first; MLP decoder back to (B, P)."""

    def __init__(self, size: int, hidden: int, layers: int, latent_sizes: tuple[int, int]):
        super().__init__()
        self.encoder = _mlp(size, hidden, layers, sum(latent_sizes))
        self.decoder = _mlp(sum(latent_sizes), hidden, layers, size)
        self.k_id = latent_sizes[0]

    def swap(self, identity_from: Tensor, expression_from: Tensor) -> Tensor:
        """Latents (B, k) combining the identity part of one batch with the expression part of another."""
        return torch.cat([identity_from[:, :self.k_id], expression_from[:, self.k_id:]], dim=1)


class AutoencoderModel(BaselineModel):
    """Tensors: mean (3V,), axes (P, 3V) PCA, scale (1,) coefficient RMS, net.* network weights,
    {identity,expression}_{mean,factor}: the latent Gaussians (mean (k,), factor (k, k))."""

    kind = "autoencoder"

    def __init__(self, tensors: dict[str, Tensor], meta: dict):
        super().__init__(tensors, meta)
        config = meta["config"]
        self.net = SplitAutoencoder(meta["pca_size"], config["hidden"], config["layers"],
                                    (self.code_sizes["identity"], self.code_sizes["expression"]))
        load_module(self.net, "net", tensors, source=self.name)
        self.net.requires_grad_(False)

    def coefficients(self, x: Tensor) -> Tensor:
        """Meshes (N, 3V) mm -> network coordinates (N, P) float32."""
        return ((x - self.tensors["mean"].double()) @ self.tensors["axes"].double().T / self.tensors["scale"].double()).float()

    def prior_codes(self, normal: dict[str, Tensor]) -> dict[str, Tensor]:
        """Latent parts drawn from the Gaussians fitted to the training latents."""
        return {f: self.tensors[f"{f}_mean"] + z.float() @ self.tensors[f"{f}_factor"] for f, z in normal.items()}

    def decode(self, codes: dict[str, Tensor]) -> Tensor:
        latents = torch.cat([codes[f].float() for f in FACTORS], dim=1)
        return self.tensors["mean"] + (self.net.decoder(latents) * self.tensors["scale"]) @ self.tensors["axes"]

    def fit_codes(self, x: Tensor) -> dict[str, Tensor]:
        target = self.coefficients(x)
        latents = self.net.encoder(target)
        best, best_err = latents.clone(), torch.full((len(x),), math.inf)
        latents.requires_grad_(True)
        steps = self.meta["config"]["fit_steps"]
        opt = torch.optim.Adam([latents], lr=self.meta["config"]["fit_lr"])
        with torch.enable_grad():
            for step in range(steps + 1):
                err = (self.net.decoder(latents) - target).pow(2).sum(1)  # faces are independent: Adam is elementwise
                better = err.detach() < best_err
                best[better], best_err[better] = latents.detach()[better], err.detach()[better]
                if step < steps:
                    opt.zero_grad()
                    err.sum().backward()
                    opt.step()
        return dict(zip(FACTORS, best.split(list(self.code_sizes.values()), dim=1)))


class _Partners:
    """Per row, a random row with the same class label (possibly itself); unlabeled rows (-1) are their own partner."""

    def __init__(self, labels: np.ndarray):
        self.labels = labels
        self.order = np.argsort(labels, kind="stable")
        ordered = labels[self.order]
        self.starts = np.searchsorted(ordered, labels, "left")
        self.counts = np.searchsorted(ordered, labels, "right") - self.starts

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        picked = self.order[self.starts[rows] + rng.integers(0, self.counts[rows])]
        return np.where(self.labels[rows] >= 0, picked, rows)


def train_autoencoder(dataset, options: BaselineOptions | None = None, progress: bool = True) -> AutoencoderModel:
    """Train the split-latent autoencoder on the train split of ``dataset`` (a RegisteredDataset)."""
    options = options or BaselineOptions()
    ae = options.autoencoder
    data = training_set(dataset)
    expression_rows = np.flatnonzero(data.expression >= 0)
    if len(expression_rows) == 0 or ae.epochs < 1:
        raise FaceganError(f"{dataset.root}: the autoencoder needs expression-labeled training meshes and epochs >= 1 "
                           f"(found {len(expression_rows)} labeled meshes, epochs={ae.epochs})")
    x = data.flat()
    mean, axes, _ = principal_components(x, ae.pca_size, options.seed)
    coeffs = (x - mean) @ axes.T
    del x  # the float64 meshes (hundreds of MB) are not needed past the PCA
    scale = coeffs.pow(2).mean().sqrt()
    device = torch.device(ae.device) if ae.device else default_device()
    coeffs = (coeffs / scale).float().to(device)
    sizes = (options.identity_size, options.expression_size)
    with torch.random.fork_rng(devices=[]):  # seeded initialization without touching the caller's RNG
        torch.manual_seed(options.seed)
        net = SplitAutoencoder(len(axes), ae.hidden, ae.layers, sizes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=ae.lr)
    rng = np.random.default_rng(options.seed)
    same_identity, same_expression = _Partners(data.identity), _Partners(data.expression)
    n, batch = len(coeffs), ae.batch_size
    epochs = tqdm(range(ae.epochs), desc="autoencoder", disable=not progress, leave=False)
    for _ in epochs:
        for _ in range(math.ceil(n / batch)):
            a = rng.integers(0, n, batch)
            e = expression_rows[rng.integers(0, len(expression_rows), batch)]
            rows = torch.from_numpy(np.concatenate([a, same_identity(a, rng), e, same_expression(e, rng)])).to(device)
            c = coeffs[rows]
            z = net.encoder(c)
            za, za2, ze, ze2 = z.split(batch)
            swapped = torch.cat([net.swap(za2, za), net.swap(ze, ze2)])  # targets: a, then e
            losses = {
                "rec": (net.decoder(z) - c).pow(2).mean(),
                "swap": 2 * (net.decoder(swapped) - torch.cat([c[:batch], c[2 * batch:3 * batch]])).pow(2).mean(),
                "prior": z.pow(2).mean(),
            }
            loss = losses["rec"] + ae.swap_weight * losses["swap"] + ae.prior_weight * losses["prior"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs.set_postfix({k: f"{v.item():.2e}" for k, v in losses.items()})
    net = net.cpu().eval()
    with torch.no_grad():
        latents = net.encoder(coeffs.cpu()).double()
    tensors = {"mean": mean.float(), "axes": axes.float(), "scale": scale.float().reshape(1), **module_tensors("net", net)}
    for factor, part in zip(FACTORS, latents.split(sizes, dim=1)):
        tensors[f"{factor}_mean"], tensors[f"{factor}_factor"] = (t.float() for t in fit_gaussian(part))
    meta = {
        "name": "autoencoder",
        "n_vertices": data.n_vertices,
        "code_sizes": {"identity": sizes[0], "expression": sizes[1]},
        "pca_size": len(axes),
        "config": options.config("autoencoder"),
        "training": {"meshes": n, "expression_labeled": len(expression_rows),
                     "final_losses": {k: v.item() for k, v in losses.items()}},
    }
    return AutoencoderModel(tensors, meta)


@register_loader("autoencoder")
def load_autoencoder(path: Path, meta: dict) -> AutoencoderModel:
    """An autoencoder model file (``kind`` "autoencoder") as a FaceGenerator."""
    return AutoencoderModel.load(path)
