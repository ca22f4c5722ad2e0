"""Model fitting (Eq. 12): speed of batch fitting, and generalization with a trained model.

    python benchmarks/bench_fitting.py [--data data/ict-small] [--width 32] [--single 4]
    python benchmarks/bench_fitting.py --run RUN --data DATA [--out generalization.png]
    python benchmarks/bench_fitting.py --run RUN --limit 32 --sweep 100:0.3,150:0.3,300:0.3:random

Speed: fits the test split's meshes (175 in data/ict-small, the paper's test-set size) in one
batch with the default FitOptions, and a few of them one by one (same options, same starts), and
prints faces/s and the batch speed-up over one-by-one (scaled to the whole split), both measured
in this run, and the time of Eq. 12's data term with its gradient as the fit computes it (one autograd
function) against autograd through the plain read, side by side. Without --run the generator is an
untrained one at the small profile's width (``--width``, default 32 = ``g_channels`` of the small
profile): the cost of a step does not depend on the weights. Wall and CPU seconds and the load average
are printed: on a shared machine the wall time depends on what else runs.

With --run (a trained model and its dataset) it also reports generalization: the mean vertex
error (mm) on the test split after fitting (paper, Table 1: 0.74 mm), next to the encode/decode
round-trip floor of the same meshes (the error of the representation itself), and writes the
cumulative error curves to --out.

With --sweep ITERATIONS:LR[:INIT],... it only compares schedules: the mean vertex error and time of a
fit of the (--limit) test meshes with each (INIT: FitOptions.init, "zero" or "random"; default the
default), the rest of FitOptions at its defaults but without restarts (how the defaults were chosen,
docs/fitting.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from facegan.data.dataset import open_dataset
from facegan.data.encode import load_codec
from facegan.fit.fitting import FitOptions, VertexReader, decode_codes, fit_meshes, untrained_model
from facegan.sampling import codec_of
from facegan.fit.outputs import cumulative_error_plot
from facegan.geometry_image.roundtrip import vertex_errors
from facegan.model import FaceModel


def load_line() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def timed_fit(model, meshes, options, **kwargs):
    """(FitResult, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fit_meshes(model, meshes, options=options, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def speed(model, meshes: np.ndarray, options: FitOptions, n_single: int) -> None:
    n = len(meshes)
    fit_meshes(model, meshes[:2], options=FitOptions(iterations=2, max_restarts=0))  # warm-up (kernel setup)
    print(f"before: {load_line()}")
    batch, wall, cpu = timed_fit(model, meshes, options)
    restarted = int((batch.restarts > 0).sum())
    print(f"batch of {n}: {wall:.1f} s wall ({cpu:.1f} s CPU, {batch.threads} threads), {n / wall:.2f} faces/s; "
          f"{restarted} faces restarted ({int(batch.restarts.sum())} restarts); {load_line()}")
    single_wall = 0.0
    pick = np.linspace(0, n - 1, n_single).round().astype(int)
    for i in pick:
        _, w, _ = timed_fit(model, meshes[i:i + 1], options, face_seeds=[int(i)])
        single_wall += w
    per_face = single_wall / n_single
    print(f"one by one ({n_single} faces): {per_face:.2f} s per face -> {per_face * n:.0f} s for {n} "
          f"(scaled); batch speed-up x{per_face * n / wall:.1f}; {load_line()}")
    return batch


def data_term(model, meshes: np.ndarray, rounds: int = 10) -> None:
    """Eq. 12's data term and its gradient for all the faces at once, as the fit computes it (one autograd
    function, VertexReader.weighted_distances) and as autograd through the plain read and the norm, the two
    interleaved in one run (fastest of ``rounds`` each)."""
    reader = VertexReader(codec_of(model))
    targets = torch.from_numpy(meshes)
    r = codec_of(model).resolution
    images = torch.rand(len(meshes), 3, r, r).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    images.requires_grad_(True)
    rest, weights = reader.distance_operands(targets, torch.ones(targets.shape[:2]))

    def one_pass():
        return reader.weighted_distances(images, rest, weights)

    def through_autograd():
        return torch.linalg.vector_norm(reader(images) - targets, dim=-1).sum(1)

    best = {}
    for _ in range(rounds):
        for name, term in (("one pass", one_pass), ("autograd", through_autograd)):
            start = time.perf_counter()
            torch.autograd.grad(term().sum(), images)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    print(f"data term and gradient of {len(meshes)} faces: {best['one pass'] * 1e3:.1f} ms in one pass, "
          f"{best['autograd'] * 1e3:.1f} ms through autograd, x{best['autograd'] / best['one pass']:.2f}")


def generalization(model: FaceModel, ds, meshes: np.ndarray, result, out: Path) -> None:
    codec = codec_of(model)
    floors = {f"round trip {m} (uint8)": vertex_errors(codec, meshes, m, "uint8") for m in ("sparse", "dense")}
    print("\n| errors on the test split (mm) | mean | median of per-mesh means | 95th pct vertex |")
    print("|---|---|---|---|")
    dense = decode_codes(model, result.codes, "dense")  # what a user gets as the fitted mesh
    curves = {"fit, sparse read": result.errors.numpy(),
              "fit, dense decoding": (dense - torch.from_numpy(meshes)).norm(dim=-1).numpy(), **floors}
    for label, e in curves.items():
        print(f"| {label} | {e.mean():.3f} | {np.median(e.mean(axis=1)):.3f} | {np.percentile(e, 95):.3f} |")
    print("| paper (Table 1, generalization) | 0.74 | | |")
    cumulative_error_plot(out, curves, f"generalization, {len(meshes)} test meshes of {ds.root.name}")
    print(f"\nwrote {out}")


def sweep(model, meshes: np.ndarray, schedules: str, threads: int | None) -> None:
    print("| iterations | lr | first start | mean error (mm) | max per-mesh (mm) | seconds |\n|---|---|---|---|---|---|")
    for item in schedules.split(","):
        iterations, lr, *init = item.split(":")
        options = FitOptions(iterations=int(iterations), lr=float(lr), max_restarts=0, threads=threads,
                             init=init[0] if init else FitOptions.init)
        result = fit_meshes(model, meshes, options=options)
        e = result.mean_error
        print(f"| {iterations} | {lr} | {options.init} | {e.mean():.3f} | {e.max():.3f} | {result.seconds:.1f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/ict-small"))
    parser.add_argument("--run", type=Path, default=None, help="trained run directory (or model file)")
    parser.add_argument("--width", type=int, default=32, help="untrained generator width (g_channels)")
    parser.add_argument("--single", type=int, default=4, help="faces fitted one by one for the ratio")
    parser.add_argument("--limit", type=int, default=None, help="at most this many test meshes")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads during fits (default: automatic)")
    parser.add_argument("--out", type=Path, default=Path("generalization.png"))
    parser.add_argument("--sweep", default=None, help="compare schedules ITERATIONS:LR,... (mean error, time)")
    args = parser.parse_args()

    ds = open_dataset(args.data)
    index = ds.split("test")
    if args.limit is not None and len(index) > args.limit:
        index = index[np.linspace(0, len(index) - 1, args.limit).round().astype(int)]
    meshes = np.asarray(ds.meshes[index], dtype=np.float32)
    defaults = FitOptions()
    options = FitOptions(iterations=args.iterations or defaults.iterations, lr=args.lr or defaults.lr,
                         precision=args.precision or defaults.precision, threads=args.threads)
    if args.run is None:
        model = untrained_model(load_codec(ds, 64), base_channels=args.width)
        print(f"## Fitting speed: untrained generator, width {args.width} (widths {model.generator.widths}), 64 px")
    else:
        model = FaceModel.load(args.run)
        print(f"## Fitting {args.run}: generator width {model.config.g_channels} (widths {model.generator.widths})")
    print(f"{len(meshes)} test meshes of {args.data}; options: iterations {options.iterations}, lr {options.lr}, "
          f"{options.precision}, max restarts {options.max_restarts}\n")
    if args.sweep:
        sweep(model, meshes, args.sweep, args.threads)
        return
    result = speed(model, meshes, options, args.single)
    data_term(model, meshes)
    if args.run is not None:
        generalization(model, ds, meshes, result, args.out)


if __name__ == "__main__":
    main()
