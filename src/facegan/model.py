"""A trained face model for sampling: G_ema, the fixed codes T^k, the config and the codec state."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from facegan.errors import FaceganError, check_known
from facegan.nn.networks import Generator
from facegan.train.checkpoint import BANK_PREFIX, load_checkpoint, load_module
from facegan.train.config import TrainConfig

NOISE = "noise"  # the name of the unstructured code beside the factors' codes


class FaceModel:
    """G_ema of a run plus what is needed to use it.

    factors: factor names in code order ("identity", "expression", ...); code_sizes: size of each code;
    noise_size; fixed_codes: factor -> (n_classes, size) codes T^k used for the labeled classes;
    class_names: factor -> class names; config: the run's TrainConfig; codec_tensors / codec_meta: the
    geometry-image codec state the lead passed to ``train`` (to decode images into meshes).
    code_bank: factor name (or "noise") -> (N, size) codes of the training faces that this model draws that
    code from, instead of N(0, I) (beyond the paper; see :meth:`draw`); bank_bandwidth: name -> the kernel
    width of that bank, a fraction of each code dimension's standard deviation over the bank.
    """

    def __init__(self, generator: Generator, factors: list[str], fixed_codes: dict[str, torch.Tensor],
                 class_names: dict[str, list[str]], config: TrainConfig, codec_tensors: dict[str, torch.Tensor],
                 codec_meta: dict[str, Any], source: str = "", code_bank: dict[str, torch.Tensor] | None = None,
                 bank_bandwidth: dict[str, float] | None = None):
        self.generator = generator.eval().requires_grad_(False)
        self.factors = factors
        self.code_sizes = list(generator.code_sizes)
        self.noise_size = generator.noise_size
        self.fixed_codes = fixed_codes
        self.class_names = class_names
        self.config = config
        self.codec_tensors = codec_tensors
        self.codec_meta = codec_meta
        self.source = source
        self.code_bank = dict(code_bank or {})
        self.bank_bandwidth = dict(bank_bandwidth or {})

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    @property
    def mask(self) -> torch.Tensor:
        """(R, R) bool UV-chart mask."""
        return self.generator.mask[0, 0] > 0.5

    @property
    def device(self) -> torch.device:
        return self.generator.mask.device

    def to(self, device: torch.device | str) -> "FaceModel":
        self.generator.to(device)
        self.fixed_codes = {k: v.to(device) for k, v in self.fixed_codes.items()}
        return self

    def draw(self, name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n random codes (n, size) of factor ``name`` (or "noise") from this model's prior, on the CPU.

        N(0, I), the paper's prior, unless the model has a code bank for ``name``: then a kernel density
        estimate of the training faces' codes, a random bank row plus N(0, (bandwidth * std)^2) per dimension
        (std over the bank's rows). A model whose G learned the real faces' codes (``lambda_rec``) maps those
        to the data's faces, while Gaussian codes can fall between them (docs/training.md, "Sampling from
        the real faces' codes").
        """
        bank = self.code_bank.get(name)
        if bank is None:
            sizes = dict(zip(self.factors, self.code_sizes)) | {NOISE: self.noise_size}
            return torch.randn(n, sizes[name], generator=generator)
        rows = bank[torch.randint(len(bank), (n,), generator=generator)]
        return rows + self.bank_bandwidth[name] * bank.std(dim=0) * torch.randn(n, bank.shape[1], generator=generator)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "FaceModel":
        """Load from a run directory (its model.safetensors, else checkpoint.safetensors) or either file."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "model.safetensors", path / "checkpoint.safetensors"]
            found = [p for p in candidates if p.exists()]
            if not found:
                raise FaceganError(f"{path}: no model.safetensors or checkpoint.safetensors in this run directory")
            path = found[0]
        tensors, meta = load_checkpoint(path, "cpu")
        try:
            config = TrainConfig.from_dict(meta["config"], source=str(path))
            factors = list(meta["factors"])
            mask = tensors["G_ema.mask"][0, 0] > 0.5
            generator = config.build_generator(meta["code_sizes"], mask)
            fixed = {f: tensors[f"fixed_codes.{f}"] for f in factors}
        except KeyError as exc:
            raise FaceganError(f"{path}: checkpoint lacks {exc}") from None
        load_module(generator, "G_ema", tensors, str(path))
        codec = {name[len("codec."):]: t for name, t in tensors.items() if name.startswith("codec.")}
        bank = {name[len(BANK_PREFIX):]: t for name, t in tensors.items() if name.startswith(BANK_PREFIX)}
        model = cls(generator, factors, fixed, meta["class_names"], config, codec, meta.get("codec_meta", {}), str(path),
                    bank, meta.get("bank_bandwidth"))
        return model.to(device)

    def generate(self, codes: list[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """Geometry images from codes: codes[k] (B, code_sizes[k]) per factor, noise (B, noise_size) ->
        (B, 3, R, R) normalized (in [-1, 1] inside the chart, 0 outside). Differentiable in the codes."""
        if len(codes) != len(self.factors):
            raise FaceganError(f"generate: {len(codes)} codes given, the model has factors {self.factors}")
        for k, (code, size) in enumerate(zip(codes, self.code_sizes)):
            if code.ndim != 2 or code.shape[1] != size:
                raise FaceganError(f"generate: {self.factors[k]} code of shape {tuple(code.shape)}, expected (B, {size})")
        if noise.ndim != 2 or noise.shape[1] != self.noise_size:
            raise FaceganError(f"generate: noise of shape {tuple(noise.shape)}, expected (B, {self.noise_size})")
        return self.generator(torch.cat([*codes, noise], dim=1).to(self.device, torch.float32))

    def sample(self, n: int, fix: str | None = None, m: int = 1, seed: int | None = None, chunk: int = 256
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Random faces with codes from the model's prior (:meth:`draw`: N(0, I) unless it has a code bank).

        fix=None: n*m independent samples. fix="identity" (any factor name): n groups of m samples, the
        samples of a group sharing that factor's code (rows g*m .. g*m+m-1), everything else drawn anew.
        Returns (images (n*m, 3, R, R), codes: factor name -> (n*m, size), plus "noise" -> (n*m, noise_size)).
        """
        if fix is not None:
            check_known([fix], self.factors, "factor", "sample")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        total = n * m
        codes = {name: self.draw(name, n, gen).repeat_interleave(m, dim=0) if name == fix else self.draw(name, total, gen)
                 for name in [*self.factors, NOISE]}
        codes = {k: v.to(self.device) for k, v in codes.items()}
        with torch.no_grad():  # in chunks: n*m can be 10^4 (decoupling metrics)
            images = torch.cat([self.generate([codes[f][i:i + chunk] for f in self.factors], codes[NOISE][i:i + chunk])
                                for i in range(0, total, chunk)]) if total else self.generate(
                [codes[f] for f in self.factors], codes[NOISE])
        return images, codes
