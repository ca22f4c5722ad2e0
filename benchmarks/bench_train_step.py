"""Throughput of one training iteration (3 D steps + 1 G step, batch 64, 64 px) and its share of peak FLOP/s.

For the ``small`` profile widths and the paper widths, the iteration is timed in steps from plain float32
to the optimized path, so each change's gain shows:

  fp32             float32, contiguous tensors, Adam with for-loop updates (foreach=False)
  +channels_last   float32, channels-last convolutions
  +fused_adam      ... and fused Adam
  +bf16            ... and bfloat16 autocast
  +retained heap (opt)  ... and glibc keeping freed memory (facegan.device.retain_freed_memory), as
                   ``facegan train`` does on the CPU (the default ``small`` setting): the per-step
                   gradients and bf16 copies of the 2048x4096 classifier weights stop faulting in
                   fresh pages

The allocator setting is process-wide and cannot be undone, so the settings run in child processes, the
glibc default ones and the retained-heap one alternating (``--repeats`` times each); each child also times
allocating and filling a 32 MB tensor (one such fp32 gradient) under its setting.

FLOPs of an iteration are counted once with torch.utils.flop_counter.FlopCounterMode (forward, backward
and the gradient penalty's double backward). Times are the fastest of ``--iters`` rounds, the settings
interleaved. The peak is the best of a large matmul and a large convolution, measured in the same run at
the same precision. Images/s counts the real images D consumes: batch * d_steps per iteration.

On a CPU without native bfloat16 (facegan.device.native_bfloat16: AVX2 only, say), where training runs in
float32 whatever ``amp`` says, the bf16 settings are left out and the default setting is
``+retained heap (fp32)``: fused Adam in float32 with the retained heap. The run then prints what bf16
would have cost instead: the rates of a small matmul and convolution in float32 and in emulated bfloat16.

A last table bounds what any change outside the convolution kernels can buy: in the default setting, the
convolutions' own time in an iteration (torch.profiler's self time of the aten convolution ops, fewest of
``--iters`` profiled iterations) and their FLOPs (the counter's convolution ops) give the share of peak the
kernels themselves reach; the iteration, which also runs everything else, cannot exceed it.

    python benchmarks/bench_train_step.py            # both widths, ~4 minutes on 2 AVX-512 cores, ~8 on AVX2
    python benchmarks/bench_train_step.py --widths 32 --iters 5
    python benchmarks/bench_train_step.py --threads 1   # on a shared, oversubscribed machine (see below)

On a machine whose cores are shared with other busy processes, OpenMP's 2-thread barriers stall
whenever one thread is descheduled (measured: 5.5 s/iteration at 1 thread vs 19-51 s at 2 threads at
load 6); compare settings at --threads 1 there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from facegan.device import native_bfloat16, retain_freed_memory
from facegan.train.config import make_config
from facegan.train.data import TrainingImages
from facegan.train.loop import DistEnv, Trainer, epoch_permutation

MODES = {  # name -> (amp, channels_last, fused Adam, retained heap)
    "fp32": ("none", False, False, False),
    "+channels_last": ("none", True, False, False),
    "+fused_adam": ("none", True, True, False),
    "+bf16": ("bf16", True, True, False),
    "+retained heap (opt)": ("bf16", True, True, True),
}
FP32_MODES = {  # where bfloat16 is emulated: the same steps without it
    **{name: MODES[name] for name in ("fp32", "+channels_last", "+fused_adam")},
    "+retained heap (fp32)": ("none", True, True, True),
}


def settings() -> dict[str, tuple[str, bool, bool, bool]]:
    """The settings this CPU is timed in, from plain fp32 to the default (the last)."""
    return MODES if native_bfloat16(torch.device("cpu")) else FP32_MODES


def synthetic_data(n: int, resolution: int = 64, n_id: int = 300, n_exp: int = 7) -> TrainingImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, resolution, resolution, 3), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
    expression = torch.randint(0, n_exp, (n,), generator=g)
    expression[torch.rand(n, generator=g) > 0.07] = -1  # the paper's 7% expression labels
    return TrainingImages(images, xx ** 2 + yy ** 2 < 0.9,
                          {"identity": torch.arange(n) % n_id, "expression": expression},
                          {"identity": [str(i) for i in range(n_id)], "expression": [str(i) for i in range(n_exp)]})


def make_trainer(data: TrainingImages, width: int, mode: str, run_dir: Path) -> Trainer:
    amp, channels_last, fused, heap = settings()[mode]
    cfg = make_config("small", overrides=[f"g_channels={width}", f"d_channels={width}", f"amp={amp}",
                                          f"channels_last={channels_last}", f"retain_heap={heap}", "progress=false"])
    trainer = Trainer(data, cfg, run_dir, False, None, None, DistEnv())
    if not fused:  # swap in the plain for-loop Adam
        for name in ("opt_G", "opt_D"):
            net = trainer.G if name == "opt_G" else trainer.D
            setattr(trainer, name, torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999), foreach=False))
    return trainer


def time_round_robin(trainers: dict[str, Trainer], rounds: int) -> dict[str, float]:
    """Fastest iteration of each trainer over ``rounds`` rounds, the settings interleaved so that a burst of
    load from other processes hits all of them alike (the minimum is the least disturbed measurement)."""
    perm = epoch_permutation(0, 0, len(next(iter(trainers.values())).images))
    best = {}
    for trainer in trainers.values():
        trainer.train_iteration(perm)  # warm-up (oneDNN primitive creation)
    for _ in range(rounds):
        for mode, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_iteration(perm)
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - start)
    return best


class _GlobalOnly:
    """Stand-in for FlopCounterMode's module tracker, whose backward hooks refuse autograd.grad (the GP)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def count_flops(trainer: Trainer) -> tuple[int, int]:
    """FLOPs of one iteration: (all, convolutions forward and backward)."""
    perm = epoch_permutation(0, 0, len(trainer.images))
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # totals only; per-module attribution is not needed
    with counter:
        trainer.train_iteration(perm)
    by_op = counter.get_flop_counts()["Global"]
    return counter.get_total_flops(), sum(v for op, v in by_op.items() if "convolution" in str(op))


def convolution_seconds(trainer: Trainer, rounds: int) -> tuple[float, list[tuple[str, int, float]]]:
    """Fewest seconds the convolution kernels (forward, backward, double backward) take in one iteration,
    over ``rounds`` profiled iterations: their own time, as the profiler attributes it to the aten ops; and
    the five other ops with the most own time in that iteration, as (name, calls, seconds)."""
    perm = epoch_permutation(0, 0, len(trainer.images))
    best, rest = float("inf"), []
    for _ in range(rounds):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train_iteration(perm)
        events = prof.key_averages()
        seconds = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 1e6
        if seconds < best:
            others = sorted((e for e in events if "convolution" not in e.key), key=lambda e: -e.self_cpu_time_total)
            best, rest = seconds, [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in others[:5]]
    return best, rest


def flop_rate(op, flops: int, reps: int) -> float:
    """FLOP/s of ``op()`` (``flops`` per call): the mean over ``reps`` calls after one warm-up call."""
    op()
    start = time.perf_counter()
    for _ in range(reps):
        op()
    return flops * reps / (time.perf_counter() - start)


def measured_peak(dtype: torch.dtype, reps: int = 5) -> float:
    """Best FLOP/s of a 4096^2 matmul and a 3x3 convolution (256 channels, 16x16, batch 64) at ``dtype``."""
    n = 4096
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x = torch.randn(64, 256, 16, 16).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    return max(flop_rate(lambda: a @ b, 2 * n ** 3, reps),
               flop_rate(lambda: torch.conv2d(x, w, padding=1), 2 * 64 * 256 * 256 * 9 * 256, reps))


def emulation_rates(reps: int = 10) -> dict[str, tuple[float, float]]:
    """FLOP/s in (float32, bfloat16) of a 512^2 matmul and of a 3x3 convolution (128 channels, 16x16, batch
    64), as :func:`flop_rate` measures them: what autocast would cost on a CPU that emulates bfloat16
    (small sizes: emulated bf16 runs large matmuls at a fraction of a GFLOP/s)."""
    n = 512
    operands = {"matmul 512^2": ((torch.randn(n, n), torch.randn(n, n)), torch.matmul, 2 * n ** 3),
                "conv 3x3, 128 channels": ((torch.randn(64, 128, 16, 16), torch.randn(128, 128, 3, 3)),
                                           lambda x, w: torch.conv2d(x, w, padding=1), 2 * 64 * 128 * 128 * 9 * 256)}
    rates = {}
    for name, (inputs, op, flops) in operands.items():
        fp32, bf16 = ([t.to(dtype).contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t.to(dtype)
                       for t in inputs] for dtype in (torch.float32, torch.bfloat16))
        rates[name] = (flop_rate(lambda: op(*fp32), flops, reps), flop_rate(lambda: op(*bf16), flops, reps))
    return rates


def allocation_ms(reps: int = 20) -> float:
    """Milliseconds to allocate and fill a 32 MB float32 tensor (a clone of a 2048x4096 weight)."""
    w = torch.randn(2048, 4096)
    w.clone()
    start = time.perf_counter()
    for _ in range(reps):
        w.clone()
    return (time.perf_counter() - start) / reps * 1e3


def child(args: argparse.Namespace) -> dict:
    """Time the settings of one heap setting in this process: {"alloc_ms", "flops": {width}, "seconds": {width: {mode}}}."""
    retained = args.heap == "retained"
    if retained:
        retain_freed_memory()
    modes = [m for m, setting in settings().items() if setting[3] == retained]
    data = synthetic_data(64 * 3 * (args.iters + 2))
    result = {"alloc_ms": allocation_ms(), "flops": {}, "conv_flops": {}, "seconds": {}, "conv_seconds": {},
              "rest_ops": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            trainers = {mode: make_trainer(data, width, mode, Path(tmp) / f"{width}{mode}") for mode in modes}
            result["flops"][width], result["conv_flops"][width] = count_flops(next(iter(trainers.values())))
            result["seconds"][width] = time_round_robin(trainers, args.iters)
            if retained:  # the default setting: how fast its convolutions run inside the iteration
                result["conv_seconds"][width], result["rest_ops"][width] = convolution_seconds(trainers[modes[-1]],
                                                                                                args.iters)
            del trainers
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="G/D base channels (32 = small, 64 = paper)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per setting")
    parser.add_argument("--repeats", type=int, default=2, help="child processes per heap setting, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default, one per core)")
    parser.add_argument("--heap", choices=["default", "retained"], help=argparse.SUPPRESS)  # a child's setting
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.heap:
        print(json.dumps(child(args)))
        return
    modes = settings()
    default = list(modes)[-1]
    peaks = {"fp32": measured_peak(torch.float32)}
    if modes is MODES:
        peaks["bf16"] = measured_peak(torch.bfloat16)
    else:
        print("this CPU has no native bfloat16 (emulated, many times slower): the bf16 settings are left out and "
              "training runs in float32; fp32 against emulated bf16: "
              + "; ".join(f"{name} {fp32 / 1e9:.1f} against {bf16 / 1e9:.2f} GFLOP/s (x{fp32 / bf16:.0f})"
                          for name, (fp32, bf16) in emulation_rates().items()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peak (matmul/conv): "
          + ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items()), flush=True)
    default_peak = peaks["bf16" if modes[default][0] == "bf16" else "fp32"]
    seconds: dict[str, dict[str, float]] = {}
    alloc: dict[str, float] = {}
    flops: dict[str, int] = {}
    conv_flops: dict[str, int] = {}
    conv_seconds: dict[str, float] = {}
    rest_ops: dict[str, list] = {}
    for _ in range(args.repeats):
        for heap in ("default", "retained"):
            command = [sys.executable, __file__, "--heap", heap, "--iters", str(args.iters),
                       "--threads", str(args.threads), "--widths", *map(str, args.widths)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            alloc[heap] = min(alloc.get(heap, float("inf")), result["alloc_ms"])
            flops.update(result["flops"])
            conv_flops.update(result["conv_flops"])
            for width, sec in result["conv_seconds"].items():
                if sec < conv_seconds.get(width, float("inf")):
                    conv_seconds[width], rest_ops[width] = sec, result["rest_ops"][width]
            for width, by_mode in result["seconds"].items():
                best = seconds.setdefault(width, {})
                for mode, sec in by_mode.items():
                    best[mode] = min(best.get(mode, float("inf")), sec)
    print(f"allocating and filling 32 MB: {alloc['default']:.1f} ms (glibc default), {alloc['retained']:.1f} ms "
          f"(retained heap)")
    print(f"{'width':>5} {'setting':<20} {'s/iter':>7} {'img/s':>6} {'GFLOP/it':>9} {'GFLOP/s':>8} {'of peak':>8} {'speedup':>8}")
    for width, by_mode in seconds.items():
        base = by_mode["fp32"]
        for mode, setting in modes.items():
            sec = by_mode[mode]
            achieved = flops[width] / sec
            peak = peaks["bf16" if setting[0] == "bf16" else "fp32"]
            print(f"{width:>5} {mode:<20} {sec:>7.3f} {64 * 3 / sec:>6.0f} {flops[width] / 1e9:>9.1f} "
                  f"{achieved / 1e9:>8.1f} {achieved / peak:>8.1%} {base / sec:>7.2f}x")
    print(f"\nThe convolutions alone in the default setting's ({default}) iteration (their own time under the "
          "profiler): a ceiling on the iteration's share of peak")
    print(f"{'width':>5} {'conv GFLOP':>10} {'of all':>7} {'conv s':>7} {'GFLOP/s':>8} {'of peak':>8} {'rest s':>7}")
    for width, sec in conv_seconds.items():
        rate = conv_flops[width] / sec
        rest = seconds[width][default] - sec
        print(f"{width:>5} {conv_flops[width] / 1e9:>10.1f} {conv_flops[width] / flops[width]:>7.1%} {sec:>7.3f} "
              f"{rate / 1e9:>8.1f} {rate / default_peak:>8.1%} {rest:>7.3f}")
    for width, ops in rest_ops.items():
        print(f"widths {width}, the other ops with the most own time (profiled): "
              + "; ".join(f"{name} x{calls} {sec:.3f} s" for name, calls, sec in ops))


if __name__ == "__main__":
    main()
