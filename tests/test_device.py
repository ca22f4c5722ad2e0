"""Process settings of facegan.device: the allocator's retained heap (a training run sets it on the CPU), and
bfloat16 only where the device runs it natively."""

import contextlib
import platform
import subprocess
import sys

import pytest
import torch

from facegan.device import native_bfloat16, retain_freed_memory
from facegan.train import loop
from tests.test_train import synth, tiny_config


def test_retained_heap_keeps_tensors_correct_and_can_be_switched_back():
    """The setting only changes where memory comes from: tensors allocated, freed and allocated again under
    it hold what is written to them; on glibc it reports that it applied, and the default comes back."""
    code = (
        "import torch\n"
        "from facegan.device import retain_freed_memory\n"
        "applied = retain_freed_memory()\n"
        "for i in range(3):\n"
        "    w = torch.full((2048, 4096), float(i))\n"
        "    assert float(w.sum()) == i * 2048 * 4096\n"
        "    del w\n"
        "print(applied, retain_freed_memory(False))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    glibc = platform.libc_ver()[0] == "glibc"
    assert out == [str(glibc)] * 2


def test_training_turns_the_retained_heap_on_unless_told_not_to(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda enabled=True: calls.append(enabled) or True)
    loop.train(synth(), tiny_config("epochs=1", "max_iters=1"), tmp_path / "on")
    loop.train(synth(), tiny_config("epochs=1", "max_iters=1", "retain_heap=false"), tmp_path / "off")
    assert calls == ([True] if not torch.cuda.is_available() else [])


def test_native_bfloat16_is_a_yes_or_no_per_device():
    assert isinstance(native_bfloat16(torch.device("cpu")), bool)
    assert native_bfloat16(torch.device("meta")) is False


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_the_device_runs_bfloat16(monkeypatch, native):
    """amp = bf16 autocasts on a device with native bfloat16; elsewhere it trains in float32 and says so."""
    monkeypatch.setattr(loop, "native_bfloat16", lambda device: native)
    cpu = torch.device("cpu")
    assert loop.make_autocast("none", cpu) is contextlib.nullcontext
    if native:
        with loop.make_autocast("bf16", cpu)():
            assert torch.is_autocast_enabled("cpu")
    else:
        with pytest.warns(UserWarning, match="no native bfloat16"):
            assert loop.make_autocast("bf16", cpu) is contextlib.nullcontext

