"""Checkpoints without pickle: tensors in safetensors, everything else as JSON in the file's header.

One file holds one consistent state: tensor names are prefixed by what they belong to (``G.``,
``G_ema.``, ``D.``, ``opt_G.``, ``opt_D.``, ``rng.``, ``fixed_codes.``, ``codec.``, ``real_codes``; a
sampling model may add ``code_bank.``) and the JSON
metadata (config, counters, class names, optimizer hyperparameters, codec meta) sits under the
``facegan`` key of the safetensors header. Loading parses a header and copies bytes; it never runs code.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from facegan.errors import FaceganError
from facegan.fileio import atomic_path

FORMAT = "facegan-checkpoint"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024  # a header larger than this is not one we wrote


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-serializable ``meta`` to ``path`` atomically (a rename at the end)."""
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    header = {"format": FORMAT, "version": str(FORMAT_VERSION), "facegan": json.dumps(meta)}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=header)
        tmp.chmod(0o666 & ~_umask())  # safetensors creates files 0600; give them the usual permissions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_checkpoint` -> (tensors, meta).

    Anything else (a pickle, a truncated or corrupted file, a foreign safetensors file) is refused with a
    one-line :class:`FaceganError` naming the file.
    """
    path = Path(path)
    _check_layout(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise FaceganError(f"{path}: a safetensors file but not a facegan checkpoint")
            meta = json.loads(header["facegan"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FaceganError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt content
        raise FaceganError(f"{path}: corrupt checkpoint ({_one_line(exc)})") from None
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a file written by :func:`save_checkpoint`, without reading its tensors."""
    path = Path(path)
    _check_layout(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise FaceganError(f"{path}: a safetensors file but not a facegan checkpoint")
        return json.loads(header["facegan"])
    except FaceganError:
        raise
    except Exception as exc:
        raise FaceganError(f"{path}: corrupt checkpoint ({_one_line(exc)})") from None


def _check_layout(path: Path) -> None:
    """Validate the safetensors framing: header length, JSON header, data size matching the offsets."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FaceganError(f"{path}: not a checkpoint (file too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise FaceganError(f"{path}: not a safetensors checkpoint (bad header; a pickle or other format?)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise FaceganError(f"{path}: is a directory, expected a checkpoint file") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FaceganError(f"{path}: not a safetensors checkpoint (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FaceganError(f"{path}: not a safetensors checkpoint (bad header)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if max(ends, default=0) != size - 8 - n:
        raise FaceganError(f"{path}: truncated or corrupt checkpoint ({size - 8 - n} data bytes, "
                           f"header describes {max(ends, default=0)})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


# ------------------------------------------------------------------------------ flattening helpers


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``prefix.name -> tensor`` for every parameter and buffer of ``module``."""
    return {f"{prefix}.{name}": t for name, t in module.state_dict().items()}


def load_module(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``module``'s state from ``prefix.*`` tensors; a shape or name mismatch is a FaceganError."""
    state = {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FaceganError(f"{source}: {prefix} does not match the network ({_one_line(exc)})") from None


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer: per-parameter state tensors ``prefix.<index>.<key>`` and JSON param groups."""
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], groups: list[dict],
                   source: str) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    restored = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    try:
        opt.load_state_dict({"state": state, "param_groups": restored})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise FaceganError(f"{source}: {prefix} does not match the optimizer ({_one_line(exc)})") from None
    # Saved state is contiguous; give it back each parameter's strides (e.g. channels_last), because
    # fused/foreach kernels walk parameter and state memory in lockstep.
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


MODEL_PREFIXES = ("G_ema.", "fixed_codes.", "codec.")
MODEL_META_KEYS = ("config", "factors", "n_classes", "class_names", "code_sizes", "noise_size", "resolution",
                   "classified", "codec_meta", "iteration")
BANK_PREFIX = "code_bank."


def silverman_bandwidth(n: int, size: int) -> float:
    """Silverman's rule of thumb for a Gaussian kernel density estimate of ``n`` points in ``size``
    dimensions, as a fraction of each dimension's standard deviation: (4 / (size + 2) / n)^(1 / (size + 4))."""
    return (4.0 / (size + 2) / n) ** (1.0 / (size + 4))


def code_bank(tensors: dict[str, torch.Tensor], meta: dict[str, Any], names: list[str], source: str
              ) -> dict[str, torch.Tensor]:
    """The training faces' codes of the factors ``names`` (or "noise") in a training checkpoint's
    (``tensors``, ``meta``) table of real-face codes (kept with ``lambda_rec``): name -> (N, size), one row per
    face the run has visited. ``source`` names the file in errors."""
    if "real_codes" not in tensors:
        raise FaceganError(f"{source}: no codes of the real faces (a code bank needs a run trained with lambda_rec > 0)")
    table = tensors["real_codes"].float()
    table = table[table.abs().sum(dim=1) > 0]  # the visited faces: rows start at 0 and never return there
    blocks = dict(zip([*meta["factors"], "noise"], torch.split(table, [*meta["code_sizes"], meta["noise_size"]], 1)))
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise FaceganError(f"{source}: no code named {', '.join(unknown)} (codes: {', '.join(blocks)})")
    return {n: blocks[n].contiguous() for n in names}


def bank_bandwidths(bank: dict[str, torch.Tensor], bandwidth: float | dict[str, float] | None) -> dict[str, float]:
    """The kernel width of each code of ``bank`` (name -> (N, size)): ``bandwidth`` for all, a dict of widths
    for the codes it names, and :func:`silverman_bandwidth` of each code's N and size for the others."""
    given = bandwidth if isinstance(bandwidth, dict) else {} if bandwidth is None else dict.fromkeys(bank, bandwidth)
    unknown = [n for n in given if n not in bank]
    if unknown:
        raise FaceganError(f"bandwidth for {', '.join(unknown)}: not a banked code (banked: {', '.join(bank)})")
    negative = [f"{n}={h}" for n, h in given.items() if h < 0]
    if negative:
        raise FaceganError(f"bandwidth {', '.join(negative)}: must be >= 0")
    return {n: float(given[n]) if n in given else silverman_bandwidth(*codes.shape) for n, codes in bank.items()}


def export_model_from_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, bank: list[str] = (),
                                 bandwidth: float | dict[str, float] | None = None) -> Path:
    """Write the sampling model (G_ema, fixed codes, codec; a few MB) of a training checkpoint to ``out``,
    e.g. to ship the current state of a run that is still going. With ``bank`` (factor names or "noise"),
    the model draws those codes from the training faces' codes with a kernel of width ``bandwidth`` (one
    for all, or per code; Silverman's rule where not given: :func:`bank_bandwidths`,
    :meth:`facegan.model.FaceModel.draw`) instead of N(0, I)."""
    tensors, meta = load_checkpoint(checkpoint, "cpu")
    if meta.get("kind") != "checkpoint":
        raise FaceganError(f"{checkpoint}: not a training checkpoint (kind {meta.get('kind')!r})")
    model = {k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIXES)}
    extra = {}
    if bank:
        codes = code_bank(tensors, meta, list(bank), str(checkpoint))
        extra = {"bank_bandwidth": bank_bandwidths(codes, bandwidth)}
        model |= {BANK_PREFIX + n: c for n, c in codes.items()}
    save_checkpoint(out, model, {"kind": "model", **{k: meta[k] for k in MODEL_META_KEYS if k in meta}, **extra})
    return Path(out)
