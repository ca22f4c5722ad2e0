"""Where tensors live (CUDA when present, the CPU otherwise) and how many CPU threads torch uses."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os

import torch


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=None)
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions and matrix products natively: a CUDA GPU with bf16,
    or a CPU where oneDNN has a bf16 path (AVX-512 or AMX, or Arm's bf16). Elsewhere bfloat16 is emulated
    and far slower than float32 (``python benchmarks/bench_train_step.py`` prints both on such a CPU;
    docs/training.md, Speed), so mixed precision must fall back to float32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def idle_threads() -> int:
    """torch's thread count, lowered to the cores the 1-minute load average leaves idle (>= 1)."""
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with ``threads`` intra-op threads, restoring torch's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# glibc mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def retain_freed_memory(enabled: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (``enabled``) or return it to the system (its default).

    PyTorch's CPU tensors come straight from malloc, and glibc serves large blocks (always from 32 MB on)
    with a fresh mmap that it unmaps on free, so every training step's new gradient or bfloat16 copy of
    a large weight faults in its pages anew. benchmarks/bench_train_step.py times both: about 10 ms to
    allocate and fill a 32 MB tensor against about 2 ms from a retained heap, and the gain of a whole
    training iteration. Kept memory stays with the process until it exits. Returns False where the C
    library is not glibc (nothing changes).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or one without mallopt (musl, macOS)
        return False
    mmap_max, trim = (0, 2 ** 30) if enabled else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(mallopt(_M_MMAP_MAX, mmap_max)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
