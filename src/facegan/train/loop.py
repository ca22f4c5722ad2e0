"""The training loop: D phase (``d_steps`` critic steps), G phase, EMA, logs, samples, checkpoints, resume, DDP.

State that defines the run exactly: the networks, both Adam states, G_ema, the fixed codes, the RNG
states and the iteration counter. The data order is a function of (seed, epoch) and the iteration, so
a checkpoint at iteration i resumes bit-for-bit: ``train(..., resume=True)`` in the same run directory.

Multi-process (``torchrun --nproc_per_node P``): when WORLD_SIZE > 1 a process group is created (gloo on
CPU, NCCL on CUDA); each global batch of the epoch's permutation is split into P contiguous slices,
each rank generates ``batch_size / P`` fakes with its own RNG stream, G and D are wrapped in
DistributedDataParallel, and rank 0 writes every file. The gradient penalty is the delicate part: DDP
cannot reduce gradients over a double backward. Real and fake go through the DDP-wrapped D in ONE forward,
the penalty's inner ``autograd.grad`` runs through the *bare* module's critic path (so no DDP hook or
extra forward is involved), and the single outer ``backward`` then reaches every D parameter's
gradient accumulator exactly once -- one all-reduce per D step covering the WGAN, classification and
penalty gradients alike.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from facegan.device import native_bfloat16, retain_freed_memory
from facegan.errors import FaceganError
from facegan.fileio import atomic_path, read_json, write_json
from facegan.nn.losses import (BatchPlan, CodeBatch, FaceGANLoss, LossWeights, VariantSpec, class_weights,
                               plan_batch, reconstruction_loss, sample_codes)
from facegan.nn.networks import Discriminator, Generator, stack_pairs
from facegan.train import checkpoint as ckpt
from facegan.train.board import Board, require_tensorboard
from facegan.train.config import TrainConfig, config_differences
from facegan.train.curves import plot_training_log
from facegan.train.data import (EXPRESSION, LinearDescriptor, TrainingImages, fit_linear_descriptor,
                                identity_shape_images, novel_identity_faces, recombine_identities, residual_descriptors,
                                shared_expression_pairs, to_network, to_uint8)
from facegan.train.reconstruction import pinned_codes, refine_codes

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LOG_NAME = "log.csv"
CURVES_NAME = "curves.png"

# Test hook: called with the iteration count after each completed iteration (after its checkpoint).
_after_iteration: Callable[[int], None] | None = None


# ------------------------------------------------------------------------------------------ helpers


@dataclass
class DistEnv:
    """This process's place in a multi-process run (rank 0 of 1 when single-process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def setup(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_networks(cfg: TrainConfig, spec: VariantSpec, mask: torch.Tensor, n_classes: list[int]) -> tuple[Generator, Discriminator]:
    """G and D for a dataset with ``n_classes`` per factor; D gets a branch per classified factor, and the
    expression branch a descriptor regression when ``cfg.descriptor_size`` > 0 with ``descriptor = "head"``."""
    g = cfg.build_generator(cfg.code_sizes_for(spec.n_factors), mask)
    head = cfg.descriptor_size if cfg.descriptor == "head" else 0
    descriptors = [head if k == EXPRESSION else 0 for k in spec.classified]
    d = Discriminator(int(mask.shape[-1]), [n_classes[k] for k in spec.classified], cfg.d_channels,
                      cfg.feature_size, cfg.d_norm, cfg.max_channels_mult, descriptors, pair_critic=cfg.pair_critic)
    return g, d


def check_identity_shapes(cfg: TrainConfig, spec: VariantSpec, factors: list[str]) -> None:
    """The expression descriptor, the recombined faces, the pair critic and the reconstruction's new identities
    use each identity's expression-free shape: they need exactly the two factors (identity, then expression);
    the descriptor needs an expression classifier branch, recombination a D that classifies real images only,
    and the pair critic a variant whose generator batches pair the expression codes."""
    used = [key for key in ("descriptor_size", "recombine", "pair_critic", "rec_novel") if getattr(cfg, key)]
    if used and len(factors) != 2:
        raise FaceganError(f"{used[0]} needs exactly two factors (identity, expression); the data has {factors}")
    if cfg.descriptor_size and EXPRESSION not in spec.classified:
        raise FaceganError(f"descriptor_size needs an expression classifier; variant {spec.name!r} has none")
    if cfg.recombine and spec.classify_fakes_in_d:
        raise FaceganError(f"recombine: variant {spec.name!r} classifies fakes in D; use it with the other variants")
    if cfg.pair_critic and not any(EXPRESSION in plan_batch(spec, i).paired for i in range(spec.n_phases)):
        raise FaceganError(f"pair_critic: variant {spec.name!r} never pairs expression codes; use it with "
                           f"variants that alternate with the feature loss")


def linear_descriptor(cfg: TrainConfig, data: TrainingImages) -> LinearDescriptor | None:
    """The fixed linear expression descriptor of ``cfg`` fitted on ``data``, or None when the config uses none
    (``descriptor_size`` 0 or ``descriptor = "head"``); a function of the data and config only, so a resumed
    run and ``facegan diagnose`` get the same one."""
    if not cfg.descriptor_size or cfg.descriptor != "linear":
        return None
    identity, expression = data.labels[data.factors[0]], data.labels[data.factors[EXPRESSION]]
    targets, valid = residual_descriptors(data.images, data.mask, identity, expression, cfg.descriptor_size)
    return fit_linear_descriptor(data.images, data.mask, targets, valid, expression, cfg.descriptor_ridge,
                                 cfg.descriptor_prototypes)


def draw_fixed_codes(seed: int, n_classes: list[int], code_sizes: list[int],
                     isotropic_identity: bool = False) -> list[torch.Tensor]:
    """T^k: one standard-normal code per class of each factor, from its own seeded generator.

    With ``isotropic_identity`` (beyond the paper; docs/training.md "New identities in the reconstruction")
    the identity codes (factor 0, n of them) keep their mean but their deviations from it get all their
    nonzero singular values equal to sqrt(n) (the polar factor of the drawn deviations, scaled): blends of
    them with weights c ~ N(0, I / n) (:func:`facegan.train.data.blend`) then have unit variance in every
    direction of their span, as the prior N(0, I) has, instead of the stretched spread of random codes.
    """
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    codes = [torch.randn(n, size, generator=gen) for n, size in zip(n_classes, code_sizes)]
    if isotropic_identity:
        mean = codes[0].mean(0)
        u, s, vh = torch.linalg.svd((codes[0] - mean).double(), full_matrices=False)
        rank = int((s > s[0] * 1e-6).sum())
        codes[0] = (mean + len(codes[0]) ** 0.5 * u[:, :rank] @ vh[:rank]).float()
    return codes


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the real images in ``epoch``: same on every rank, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def lr_scale(iteration: int, total_iters: int, decay_iters: int) -> float:
    """Factor on both learning rates for update ``iteration`` (0-based) of a ``total_iters`` run: 1, then
    (total_iters - iteration) / decay_iters over the last ``decay_iters`` updates, so the last update
    still moves by 1/decay_iters of the rate. ``decay_iters = 0``: constant rates, as in the paper."""
    if decay_iters <= 0:
        return 1.0
    return min(1.0, (total_iters - iteration) / decay_iters)


def make_autocast(amp: str, device: torch.device) -> Callable[[], ContextManager]:
    """The mixed-precision context of ``amp`` on ``device``: bf16 autocast only where the device runs
    bfloat16 natively (facegan.device.native_bfloat16), float32 otherwise."""
    if amp == "none":
        return contextlib.nullcontext
    if not native_bfloat16(device):
        warnings.warn(f"amp = {amp}: this {'GPU' if device.type == 'cuda' else 'CPU'} has no native bfloat16 "
                      "(emulated, many times slower than float32): training in float32")
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows*cols, h, w, 3) uint8 -> (rows*h, cols*w, 3), row-major."""
    n, h, w, c = images.shape
    return images[: rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


class Meter:
    """Sums (numerator, denominator) loss statistics on the device; read (one host sync) every k steps."""

    def __init__(self) -> None:
        self.num: dict[str, torch.Tensor] = {}
        self.den: dict[str, torch.Tensor | float] = {}

    def add(self, stats: dict) -> None:
        for key, (num, den) in stats.items():
            self.num[key] = self.num[key] + num if key in self.num else num.clone()
            self.den[key] = self.den[key] + den if key in self.den else den

    def read(self, world: int) -> dict[str, float]:
        """Mean of each statistic since the last read (summed over ranks first); resets the meter."""
        keys = sorted(self.num)
        if not keys:
            return {}
        num = torch.stack([self.num[k].float() for k in keys])
        den = torch.stack([torch.as_tensor(self.den[k], dtype=torch.float32, device=num.device) for k in keys])
        both = torch.cat([num, den])
        if world > 1:
            dist.all_reduce(both)
        values = both.tolist()
        self.num.clear()
        self.den.clear()
        return {k: (values[i] / values[len(keys) + i] if values[len(keys) + i] else float("nan"))
                for i, k in enumerate(keys)}


def log_columns(spec: VariantSpec, names: list[str], descriptor: bool = False, prototypes: bool = False,
                pair_critic: bool = False, lr_decay: bool = False, reconstruction: bool = False) -> list[str]:
    """CSV columns for a variant (with D's expression-descriptor regression or not, with the prototype loss
    or not, with the pair critic or not, with a learning-rate decay or not, with the reconstruction of the
    real faces or not): fixed up front so every row has the same layout."""
    cols = ["iteration", "epoch", "seconds", "img_per_s"] + (["lr_scale"] if lr_decay else []) + [
        "d_loss", "d_wdist", "d_gp"]
    if pair_critic:
        cols += ["d_pair_wdist", "d_pair_gp"]
    for k in spec.classified:
        cols += [f"d_class_{names[k]}", f"d_acc_{names[k]}"]
        if descriptor and k == EXPRESSION:
            cols.append(f"d_descriptor_{names[k]}")
        if spec.classify_fakes_in_d:
            cols.append(f"d_class_fake_{names[k]}")
    cols += ["g_loss", "g_gan"] + (["g_pair"] if pair_critic else []) + [f"g_class_{names[k]}" for k in spec.classified]
    if prototypes:
        cols.append(f"g_proto_{names[EXPRESSION]}")
    if spec.feature_loss:
        cols += [f"g_feat_{names[k]}" for k in spec.classified]
    if spec.tv:
        cols.append("g_tv")
    if reconstruction:
        cols.append("g_rec")
    return cols


def _max_pairs(spec: VariantSpec) -> int:
    return max(len(plan_batch(spec, i).paired) for i in range(spec.n_phases))


# -------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the state of one run; :meth:`run` trains until the configured length, then exports the model."""

    def __init__(self, data: TrainingImages, cfg: TrainConfig, run_dir: Path, resume: bool,
                 codec_state: tuple[dict[str, torch.Tensor], dict] | None,
                 preview: Callable[[torch.Tensor], np.ndarray] | None, env: DistEnv):
        cfg.validate()
        self.cfg, self.run_dir, self.env, self.preview = cfg, Path(run_dir), env, preview
        self.factors = data.factors
        self.spec = cfg.variant_spec(len(self.factors))
        data.validate(classified=list(self.spec.classified))
        check_identity_shapes(cfg, self.spec, self.factors)
        self.n_classes = data.n_classes
        self.class_names = data.class_names
        self.codec_tensors, self.codec_meta = codec_state if codec_state is not None else ({}, {})
        self._check_batch(len(data))
        if cfg.tensorboard and env.is_main:
            require_tensorboard()
        self.board: Board | None = None

        self.device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif env.world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world))
        if self.device.type == "cpu" and cfg.retain_heap:
            retain_freed_memory()  # each step's large gradients and bf16 weight copies reuse memory (docs: Speed)

        self.fingerprint = data.fingerprint()
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        saved = self._check_run_dir(resume)

        # data stays uint8 on the device; each batch is converted by to_network
        self.images = data.images.to(self.device)
        self.mask = data.mask.to(self.device)
        self.labels = [data.labels[f].to(self.device) for f in self.factors]
        self.class_choices = [torch.nonzero(torch.bincount(lab[lab >= 0], minlength=n)).flatten()
                              for lab, n in zip(self.labels, self.n_classes)]
        self.descriptors: tuple[torch.Tensor, torch.Tensor] | None = None  # D's regression targets (head)
        if cfg.descriptor_size and cfg.descriptor == "head":
            targets, valid = residual_descriptors(data.images, data.mask, data.labels[self.factors[0]],
                                                  data.labels[self.factors[EXPRESSION]], cfg.descriptor_size)
            self.descriptors = (targets.to(self.device), valid.to(self.device))
        self.identity_shapes: torch.Tensor | None = None  # recombination's a[identity] (network-space images)
        if cfg.recombine or cfg.pair_critic or cfg.rec_novel:
            shapes = identity_shape_images(data.images, data.mask, data.labels[self.factors[0]],
                                           data.labels[self.factors[EXPRESSION]])
            self.identity_shapes = shapes.to(self.device, memory_format=torch.channels_last)
            self.present_shapes = self.identity_shapes[self.class_choices[0]]  # new identities come from these
        fixed = linear_descriptor(cfg, data)
        linear = None if fixed is None else (EXPRESSION, fixed.to(self.device))
        real_weights = [class_weights(data.labels[self.factors[k]], self.n_classes[k]).to(self.device)
                        for k in self.spec.classified]

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.G, self.D = build_networks(cfg, self.spec, data.mask, self.n_classes)
        self.code_sizes = self.G.code_sizes
        self.fixed_codes = [t.to(self.device) for t in draw_fixed_codes(cfg.seed, self.n_classes, self.code_sizes,
                                                                        cfg.isotropic_identity_codes)]
        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.G = self.G.to(self.device, memory_format=memory)
        self.D = self.D.to(self.device, memory_format=memory)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        fused = self.device.type in ("cpu", "cuda")
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.sample_gen = torch.Generator(self.device).manual_seed(cfg.seed * 1009 + 17 + env.rank)
        # the free part of each real face's code (facegan.train.reconstruction); starts at the prior's mode
        self.real_codes = (torch.zeros(len(data), sum(self.code_sizes) + cfg.noise_size, device=self.device)
                           if cfg.lambda_rec else None)
        self.iteration = 0
        self.resumed = saved is not None
        if saved is not None:
            self._restore(*saved)

        self.G_sync: torch.nn.Module = self.G
        self.D_sync: torch.nn.Module = self.D
        if env.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_sync = torch.nn.parallel.DistributedDataParallel(self.G, device_ids=ids)
            self.D_sync = torch.nn.parallel.DistributedDataParallel(self.D, device_ids=ids)  # D has no buffers
        self.loss = FaceGANLoss(self.spec, LossWeights(cfg.lambda_c, cfg.lambda_gan, cfg.lambda_class, cfg.lambda_feat,
                                                       cfg.lambda_tv, cfg.gp_weight, cfg.lambda_pair),
                                self.factors, real_weights, self.mask, make_autocast(cfg.amp, self.device), linear,
                                EXPRESSION if cfg.pair_critic else None)
        self.grid_codes = self._grid_codes()
        self.meter = Meter()
        self.columns = log_columns(self.spec, self.factors, self.descriptors is not None, cfg.descriptor_prototypes,
                                   cfg.pair_critic, cfg.lr_decay_iters > 0, cfg.lambda_rec > 0)

    # ---------------------------------------------------------------------------------------- setup

    def _check_batch(self, n_images: int) -> None:
        cfg, env = self.cfg, self.env
        if cfg.batch_size % env.world:
            raise FaceganError(f"batch_size {cfg.batch_size} is not divisible by the {env.world} processes")
        self.local_batch = cfg.batch_size // env.world
        need = 2 ** _max_pairs(self.spec)
        if self.local_batch % need:
            raise FaceganError(f"per-process batch {self.local_batch} must be a multiple of {need} "
                               f"(pairs for the feature loss)")
        self.iters_per_epoch = n_images // (cfg.batch_size * cfg.d_steps)
        if self.iters_per_epoch == 0:
            raise FaceganError(f"dataset has {n_images} images; one iteration needs batch_size*d_steps = "
                               f"{cfg.batch_size * cfg.d_steps}")
        total = self.iters_per_epoch * cfg.epochs
        self.total_iters = min(total, cfg.max_iters) if cfg.max_iters else total

    def _check_run_dir(self, resume: bool) -> tuple[dict, dict] | None:
        """Refuse to overwrite a run, or to resume one trained with other settings or data."""
        if not resume:
            if self.ckpt_path.exists():
                raise FaceganError(f"{self.run_dir}: already holds a training run (resume it, or use another --out)")
            return None
        if not self.ckpt_path.exists():
            raise FaceganError(f"{self.run_dir}: no {CHECKPOINT_NAME} to resume from")
        saved_cfg = read_json(self.run_dir / CONFIG_NAME)
        diff = config_differences(saved_cfg, self.cfg)
        if diff:
            shown = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {getattr(self.cfg, k, None)!r}" for k in diff)
            raise FaceganError(f"{self.run_dir}: cannot resume with a different config ({shown})")
        tensors, meta = ckpt.load_checkpoint(self.ckpt_path, "cpu")
        if meta.get("data") != self.fingerprint:
            raise FaceganError(f"{self.ckpt_path}: the run was trained on other data (images or labels differ)")
        if meta.get("world_size") != self.env.world:
            raise FaceganError(f"{self.ckpt_path}: saved by {meta.get('world_size')} processes, resuming with "
                               f"{self.env.world}")
        return tensors, meta

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        src = str(self.ckpt_path)
        ckpt.load_module(self.G, "G", tensors, src)
        ckpt.load_module(self.G_ema, "G_ema", tensors, src)
        ckpt.load_module(self.D, "D", tensors, src)
        ckpt.load_optimizer(self.opt_G, "opt_G", tensors, meta["opt_G"], src)
        ckpt.load_optimizer(self.opt_D, "opt_D", tensors, meta["opt_D"], src)
        for k, f in enumerate(self.factors):
            self.fixed_codes[k] = tensors[f"fixed_codes.{f}"].to(self.device)
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if self.device.type == "cuda" and "rng.torch_cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
        self.sample_gen.set_state(tensors[f"rng.sample.rank{self.env.rank}"])
        if self.real_codes is not None:
            self.real_codes = tensors["real_codes"].to(self.device)
        self.iteration = int(meta["iteration"])

    def _grid_codes(self) -> CodeBatch:
        """Fixed latents of the sample grid: rows share factor 0's code (identity), columns share factor 1's
        (expression); other factors and the noise are one code for the whole grid."""
        s = self.cfg.sample_grid
        gen = torch.Generator().manual_seed(self.cfg.seed * 31 + 5)
        rows = torch.arange(s * s) // s
        cols = torch.arange(s * s) % s
        codes = []
        for k, size in enumerate(self.code_sizes):
            if k == 0:
                codes.append(torch.randn(s, size, generator=gen)[rows])
            elif k == 1:
                codes.append(torch.randn(s, size, generator=gen)[cols])
            else:
                codes.append(torch.randn(1, size, generator=gen).expand(s * s, size))
        noise = torch.randn(1, self.cfg.noise_size, generator=gen).expand(s * s, -1)
        return CodeBatch([c.to(self.device) for c in codes], noise.to(self.device), [None] * len(codes))

    # ----------------------------------------------------------------------------------------- steps

    def _real_batch(self, perm: torch.Tensor, step_in_epoch: int) -> torch.Tensor:
        b, lb, r = self.cfg.batch_size, self.local_batch, self.env.rank
        start = step_in_epoch * b + r * lb
        return perm[start:start + lb]

    def train_iteration(self, perm: torch.Tensor) -> None:
        """One iteration: ``d_steps`` D steps on fresh real batches, then one G step and the EMA update."""
        cfg, spec = self.cfg, self.spec
        scale = lr_scale(self.iteration, self.total_iters, cfg.lr_decay_iters)
        for opt, lr in ((self.opt_D, cfg.lr_d), (self.opt_G, cfg.lr_g)):
            for group in opt.param_groups:
                group["lr"] = lr * scale
        position = self.iteration % self.iters_per_epoch
        d_plan = plan_batch(spec, self.iteration, for_discriminator=True)
        for s in range(cfg.d_steps):
            idx = self._real_batch(perm, position * cfg.d_steps + s)
            real = to_network(self.images[idx], self.mask)
            real_labels = [lab[idx] for lab in self.labels]
            classified = None
            dataset_real = real  # the pair critic's real pairs are made from the faces before recombination
            if cfg.recombine:  # not merely identity_shapes: the pair critic needs them too, without recombination
                classified, real_labels[0] = recombine_identities(
                    real, real_labels[0], self.identity_shapes, cfg.recombine, self.sample_gen, cfg.recombine_novel,
                    self.present_shapes)
                if cfg.recombine_critic:  # every branch of D sees the recombined faces as the real ones
                    real, classified = classified, None
            codes = sample_codes(self.local_batch, d_plan, self.fixed_codes, self.class_choices, cfg.noise_size,
                                 self.sample_gen)
            with torch.no_grad(), self.loss.autocast():
                fake = self.G_sync(codes.z()).float()
            alpha = torch.rand(self.local_batch, generator=self.sample_gen, device=self.device)
            self.opt_D.zero_grad(set_to_none=True)
            real_descriptors = None if self.descriptors is None else (self.descriptors[0][idx], self.descriptors[1][idx])
            pairs = self._critic_pairs(dataset_real, idx) if cfg.pair_critic else None
            loss, stats = self.loss.discriminator_loss(self.D_sync, self.D, real, real_labels, fake, codes.labels, alpha,
                                                       real_descriptors, classified, pairs)
            loss.backward()
            self.opt_D.step()
            self.meter.add(stats)

        batch = sample_codes(self.local_batch, plan_batch(spec, self.iteration), self.fixed_codes,
                             self.class_choices, cfg.noise_size, self.sample_gen)
        self.opt_G.zero_grad(set_to_none=True)
        if self.real_codes is not None:
            self._reconstruction_backward(idx)
        loss, stats = self.loss.generator_loss(self.G_sync, self.D, batch)
        # inputs=: only G's gradients; D's weight gradients are neither computed nor accumulated
        loss.backward(inputs=list(self.G.parameters()))
        self.opt_G.step()
        self.meter.add(stats)
        self._update_ema()
        self.iteration += 1

    def _reconstruction_backward(self, idx: torch.Tensor) -> None:
        """Refine the codes of the real faces ``idx`` (B,) (the last D step's batch), store them, and
        accumulate lambda_rec x their reconstruction loss into G's gradients (synchronized across processes
        with the G loss's backward that follows)."""
        cfg = self.cfg
        real = to_network(self.images[idx], self.mask)
        values, pinned = pinned_codes([lab[idx] for lab in self.labels], self.fixed_codes, cfg.noise_size)
        start = torch.where(pinned, values, self.real_codes[idx])
        z = refine_codes(self.G, start, pinned, real, self.mask, cfg.rec_steps, cfg.rec_lr, self.loss.autocast,
                         [*self.code_sizes, cfg.noise_size], cfg.rec_radius)
        self._store_real_codes(idx, z)
        if cfg.rec_novel:  # some faces move to new identities, coded by the same blend of the identity codes
            real, novel_codes, chosen = novel_identity_faces(
                real, self.labels[0][idx], self.identity_shapes, cfg.rec_novel, self.sample_gen, self.present_shapes,
                self.fixed_codes[0][self.class_choices[0]])
            size = self.code_sizes[0]
            z = torch.cat([torch.where(chosen[:, None], novel_codes, z[:, :size]), z[:, size:]], dim=1)
        deferred = self.G_sync.no_sync() if self.env.world > 1 else contextlib.nullcontext()
        with deferred:  # the reduction happens once, in the G loss's backward
            with self.loss.autocast():
                fake = self.G_sync(z)
            rec = reconstruction_loss(fake, real, self.mask)
            (cfg.lambda_rec * rec).backward(inputs=list(self.G.parameters()))
        self.meter.add({"g_rec": (rec.detach(), 1.0)})

    def _store_real_codes(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Write refined codes back to the table; with several processes every rank writes every rank's rows
        (the ranks' batches are disjoint slices of the epoch's permutation), so the tables stay equal."""
        if self.env.world > 1:
            on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            rows = [torch.empty_like(idx, device=on) for _ in range(self.env.world)]
            codes = [torch.empty_like(z, device=on) for _ in range(self.env.world)]
            dist.all_gather(rows, idx.to(on))
            dist.all_gather(codes, z.to(on))
            idx, z = torch.cat(rows).to(self.device), torch.cat(codes).to(self.device)
        self.real_codes[idx] = z

    @torch.no_grad()
    def _critic_pairs(self, real: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair critic's batch for the real faces ``real`` (B, 3, R, R), dataset rows ``idx`` (B,): B/2 real
        pairs from the first half (:func:`shared_expression_pairs`, new identities with ``recombine_novel``) and
        B/2 fake pairs, each two random-code fakes sharing a random expression code. Returns (real pairs, fake
        pairs), each (B/2, 6, R, R)."""
        cfg = self.cfg
        half = len(idx) // 2
        real, _ = shared_expression_pairs(real[:half], self.labels[0][idx[:half]], self.identity_shapes,
                                          self.sample_gen, cfg.recombine_novel, self.present_shapes)
        codes = sample_codes(len(idx), BatchPlan((), (EXPRESSION,)), self.fixed_codes, self.class_choices,
                             cfg.noise_size, self.sample_gen)
        with self.loss.autocast():
            fake = self.G_sync(codes.z()).float()
        return real, stack_pairs(fake, *codes.pairs[EXPRESSION])

    @torch.no_grad()
    def _update_ema(self) -> None:
        t = self.iteration
        beta = min(self.cfg.ema_beta, (1 + t) / (10 + t))  # warm-up: early EMA follows G closely
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------------------------------ reporting

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to resume, as (tensors, JSON meta). Collective in multi-process runs."""
        tensors: dict[str, torch.Tensor] = {}
        tensors.update(ckpt.module_tensors("G", self.G))
        tensors.update(ckpt.module_tensors("G_ema", self.G_ema))
        tensors.update(ckpt.module_tensors("D", self.D))
        opt_g, groups_g = ckpt.optimizer_tensors("opt_G", self.opt_G)
        opt_d, groups_d = ckpt.optimizer_tensors("opt_D", self.opt_D)
        tensors.update(opt_g)
        tensors.update(opt_d)
        if self.real_codes is not None:
            tensors["real_codes"] = self.real_codes
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(self.device)
        for rank, state in enumerate(self._gather_sample_states()):
            tensors[f"rng.sample.rank{rank}"] = state
        meta = self.model_meta("checkpoint")
        meta.update({"iteration": self.iteration, "epoch": self.iteration // self.iters_per_epoch,
                     "images_seen": self.iteration * self.cfg.batch_size * self.cfg.d_steps,
                     "world_size": self.env.world, "data": self.fingerprint, "opt_G": groups_g, "opt_D": groups_d})
        return tensors, meta

    def model_tensors(self) -> dict[str, torch.Tensor]:
        tensors = ckpt.module_tensors("G_ema", self.G_ema)
        for f, table in zip(self.factors, self.fixed_codes):
            tensors[f"fixed_codes.{f}"] = table
        for name, t in self.codec_tensors.items():
            tensors[f"codec.{name}"] = t
        return tensors

    def model_meta(self, kind: str) -> dict:
        return {"kind": kind, "config": self.cfg.to_dict(), "factors": self.factors, "n_classes": self.n_classes,
                "class_names": self.class_names, "code_sizes": self.code_sizes, "noise_size": self.cfg.noise_size,
                "resolution": int(self.mask.shape[-1]), "classified": list(self.spec.classified),
                "codec_meta": self.codec_meta, "iteration": self.iteration}

    def _gather_sample_states(self) -> list[torch.Tensor]:
        state = self.sample_gen.get_state()
        if self.env.world == 1:
            return [state]
        on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = [torch.empty_like(state, device=on) for _ in range(self.env.world)]
        dist.all_gather(parts, state.to(on))
        return [p.cpu() for p in parts]

    def save_checkpoint(self) -> None:
        tensors, meta = self.state_tensors()  # collective: every rank takes part
        if self.env.world > 1:
            self._check_ranks_agree()
        if self.env.is_main:
            tensors.update(self.model_tensors())
            ckpt.save_checkpoint(self.ckpt_path, tensors, meta)
            plot_training_log(self.run_dir / LOG_NAME, self.run_dir / CURVES_NAME)

    def _check_ranks_agree(self) -> None:
        """Cheap guard that DDP kept the replicas identical: compare a weighted parameter sum (and the sum of
        the real faces' codes)."""
        with torch.no_grad():
            probe = torch.stack([sum(p.double().sum() * (i + 1) for i, p in enumerate(m.parameters()))
                                 for m in (self.G, self.D)]).float()
            if self.real_codes is not None:
                probe = torch.cat([probe, self.real_codes.sum()[None]])
        on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = [torch.empty_like(probe, device=on) for _ in range(self.env.world)]
        dist.all_gather(parts, probe.to(on))
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise RuntimeError("DDP replicas diverged: parameters differ between ranks")

    def export_model(self) -> Path:
        path = self.run_dir / MODEL_NAME
        if self.env.is_main:
            ckpt.save_checkpoint(path, self.model_tensors(), self.model_meta("model"))
        return path

    @torch.no_grad()
    def write_samples(self, epoch: int) -> None:
        """Sample grid of G_ema geometry images (and rendered meshes when a preview is given)."""
        if not self.env.is_main:
            return
        s = self.cfg.sample_grid
        fake = self.G_ema(self.grid_codes.z())
        folder = self.run_dir / "samples"
        pixels = to_uint8(fake) * self.mask.cpu()[None, :, :, None]  # 0 outside the chart, like the data
        grid = tile(pixels.numpy(), s, s)
        write_png(folder / f"epoch{epoch:04d}.png", grid)
        if self.board is not None:
            self.board.image("samples/geometry_images", self.iteration, grid)
        if self.preview is not None:
            # a sub-grid: rendering meshes is slower than the training step it interrupts
            m = min(s, 4)
            pick = (torch.arange(m)[:, None] * s + torch.arange(m)[None, :]).flatten().to(self.device)
            rendered = np.asarray(self.preview(fake[pick].float()))
            meshes = tile(rendered.astype(np.uint8), m, m)
            write_png(folder / f"epoch{epoch:04d}_meshes.png", meshes)
            if self.board is not None:
                self.board.image("samples/meshes", self.iteration, meshes)

    def _open_log(self, resuming: bool) -> None:
        """Create log.csv, or on resume drop rows logged after the checkpoint the run resumes from. Rows
        of a log with other columns (a run resumed with a learning-rate decay) keep their values by name."""
        if not self.env.is_main:
            return
        path = self.run_dir / LOG_NAME
        rows: list[list[str]] = []
        if resuming and path.exists():
            with path.open(newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header and header[0] == "iteration":
                    where = {name: i for i, name in enumerate(header)}
                    # a row cut short by a kill mid-write is dropped with the rows past the checkpoint
                    rows = [[r[where[c]] if c in where else "" for c in self.columns] for r in reader
                            if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= self.iteration]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(self.columns)
        writer.writerows(rows)
        with atomic_path(path) as tmp:
            tmp.write_text(buffer.getvalue())

    def _log(self, values: dict[str, float], seconds: float, img_per_s: float) -> None:
        row = {"iteration": self.iteration, "epoch": self.iteration / self.iters_per_epoch,
               "seconds": round(seconds, 2), "img_per_s": round(img_per_s, 1),
               "lr_scale": lr_scale(self.iteration - 1, self.total_iters, self.cfg.lr_decay_iters), **values}
        if self.board is not None:
            self.board.scalars(self.iteration, {c: row[c] for c in self.columns[2:] if c in row})
        with (self.run_dir / LOG_NAME).open("a", newline="") as fh:
            csv.writer(fh).writerow(["" if (v := row.get(c)) is None or (isinstance(v, float) and math.isnan(v))
                                     else (f"{v:.6g}" if isinstance(v, float) else v) for c in self.columns])

    # ------------------------------------------------------------------------------------------ run

    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # on resume only RESUMABLE_KEYS can differ: record the run's current length/reporting
            write_json(self.run_dir / CONFIG_NAME, cfg.to_dict())
            if cfg.tensorboard:
                self.board = Board(self.run_dir, self.iteration if self.resumed else None)
        self._open_log(self.resumed)
        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.iteration, disable=not (env.is_main and cfg.progress),
                   unit="it", dynamic_ncols=True, mininterval=1.0)
        perm: torch.Tensor | None = None
        start = last_time = time.perf_counter()
        last_iter = self.iteration
        wrote_ckpt_at = -1
        try:
            while self.iteration < self.total_iters:
                epoch = self.iteration // self.iters_per_epoch
                if perm is None or self.iteration % self.iters_per_epoch == 0:
                    perm = epoch_permutation(cfg.seed, epoch, len(self.images)).to(self.device)
                self.train_iteration(perm)
                bar.update(1)
                finished = self.iteration == self.total_iters
                if self.iteration % cfg.log_every == 0 or finished:
                    now = time.perf_counter()
                    rate = (self.iteration - last_iter) * cfg.batch_size * cfg.d_steps / max(now - last_time, 1e-9)
                    values = self.meter.read(env.world)
                    if env.is_main:
                        self._log(values, now - start, rate)
                        bar.set_postfix({"D": f"{values.get('d_loss', 0):.3f}", "G": f"{values.get('g_loss', 0):.3f}",
                                         "W": f"{values.get('d_wdist', 0):.3f}", "img/s": f"{rate:.0f}"}, refresh=False)
                    last_time, last_iter = now, self.iteration
                epoch_end = self.iteration % self.iters_per_epoch == 0
                epoch_done = self.iteration // self.iters_per_epoch
                if epoch_end and (epoch_done % cfg.sample_every_epochs == 0 or finished):
                    self.write_samples(epoch_done)
                if ((epoch_end and epoch_done % cfg.ckpt_every_epochs == 0) or finished
                        or self.iteration % cfg.ckpt_every_iters == 0):
                    self.save_checkpoint()
                    wrote_ckpt_at = self.iteration
                if _after_iteration is not None:
                    _after_iteration(self.iteration)
            if wrote_ckpt_at != self.iteration:
                self.save_checkpoint()
            if self.iteration % self.iters_per_epoch:  # a partial last epoch still gets its grid
                self.write_samples(self.iteration // self.iters_per_epoch + 1)
            path = self.export_model()
        finally:
            bar.close()
            if self.board is not None:
                self.board.close()
        if env.world > 1:
            dist.barrier()
        return path


def train(data: TrainingImages, cfg: TrainConfig, run_dir: Path, resume: bool = False,
          codec_state: tuple[dict[str, torch.Tensor], dict] | None = None,
          preview: Callable[[torch.Tensor], np.ndarray] | None = None) -> Path:
    """Train the GAN on ``data`` into ``run_dir``; returns the path of the exported ``model.safetensors``.

    data: the training images (validated: classified factors need labels and >= 2 classes);
    cfg: hyperparameters (saved as run_dir/config.json); resume: continue the run in ``run_dir`` exactly
    where its last checkpoint stopped (the config may differ only in length/reporting keys, the data not
    at all); codec_state: (tensors, JSON meta) of the lead's geometry-image codec, stored with the model;
    preview: normalized fakes (B, 3, H, W) -> rendered uint8 (B, h, w, 3), called once per epoch.
    Files: config.json, log.csv, curves.png (the log drawn, at each checkpoint), samples/epochNNNN.png,
    checkpoint.safetensors, model.safetensors, and with ``tensorboard`` the event files in tensorboard/.
    Under torchrun (WORLD_SIZE > 1) every rank must call this; rank 0 writes the files.
    """
    env = DistEnv.setup()
    try:
        return Trainer(data, cfg, Path(run_dir), resume, codec_state, preview, env).run()
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def logged_training_seconds(run_dir: str | os.PathLike) -> float:
    """Wall time a run trained for, from its log.csv: the ``seconds`` column counts from the start of
    each process, so a resumed run's time is the sum of each segment's last value (0 without a log)."""
    path = Path(run_dir) / LOG_NAME
    if not path.exists():
        return 0.0
    with path.open(newline="") as fh:
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh) if row.get("seconds")]
    ends = [a for a, b in zip(seconds, seconds[1:]) if b < a]  # a resume restarts the clock
    return sum(ends) + (seconds[-1] if seconds else 0.0)

