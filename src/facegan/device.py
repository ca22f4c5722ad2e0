"""Where tensors live (CUDA when present, the CPU otherwise) and how many CPU threads torch uses."""

from __future__ import annotations

import contextlib
import os

import torch


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
