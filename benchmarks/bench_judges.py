"""Judge settings side by side: training time against validation accuracy, and the cost of judging.

    python benchmarks/bench_judges.py [--data data/ict-small] [--settings 0.25:64:2000 ...]
                                      [--threads 1] [--cache DIR] [--seed 0]

For each setting WIDTH:SIZE:STEPS (ResNet-18 channel scale, input pixels, optimizer steps per
network; the other fields as in the "small" profile) the judges of ``--data`` are trained with
:func:`facegan.evaluation.judges.dataset_judges` in ``--cache``/SETTING (a temporary folder by
default; an existing cache is loaded, so a second run only re-measures the judging). Columns:
training + calibration seconds per network, validation accuracy and FAR at the chosen tau (test
split pairs), and the decoupling protocol's 2 x 100 x (100 + 1) meshes judged by both networks.
The judged meshes are the distinct test meshes: each anchor with 100 others of the same label (drawn
with replacement), so "data %" is the decoupling score the data itself gets, a model's ceiling.
Wall-clock: other processes on the machine slow it down (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from facegan.data.dataset import open_dataset
from facegan.evaluation.judges import JUDGE_PROFILES, dataset_judges, distinct_rows
from facegan.fileio import read_json
from facegan.metrics.decoupling import decoupling_score


def same_label_groups(dataset, labels: np.ndarray, rows: np.ndarray, n: int, m: int, rng: np.random.Generator):
    """n anchors among ``rows`` with a label and, lazily, their groups (m, V, 3) of other same-label rows."""
    labeled = rows[labels[rows] >= 0]
    shared = labeled[[np.count_nonzero(labels[labeled] == labels[r]) > 1 for r in labeled]]
    anchors = np.sort(rng.choice(shared, n))  # sorted: memmap reads in file order

    def groups():
        for a in anchors:
            others = labeled[(labels[labeled] == labels[a]) & (labeled != a)]
            yield dataset.meshes[np.sort(rng.choice(others, m))]

    return dataset.meshes[anchors], groups()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/ict-small")
    ap.add_argument("--settings", nargs="+", default=["0.125:48:2000", "0.25:64:2000", "0.25:64:4000", "0.25:96:4000"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="folder for the judges (default: a temporary one)")
    ap.add_argument("--n", type=int, default=100, help="anchors per factor")
    ap.add_argument("--m", type=int, default=100, help="group size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dataset = open_dataset(args.data)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="bench-judges-"))
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads; {args.data}: {len(dataset)} meshes; cache {cache}")
    test = distinct_rows(dataset.meshes, dataset.split("test"))  # as the calibration: no copies
    rows = []
    for setting in args.settings:
        width, size, steps = setting.split(":")
        profile = replace(JUDGE_PROFILES["small"], name=setting, width=float(width), size=int(size), steps=int(steps))
        folder = cache / setting.replace(":", "-")
        judges = dataset_judges(dataset, folder, profile, progress=False, seed=args.seed)
        entries = read_json(folder / "judges.json")["judges"]
        row = {"setting": f"w {width} s {size} steps {steps}"}
        judge_seconds, percents = 0.0, []
        for factor, judge in judges.items():
            labels = dataset.labels.class_indices(factor)
            anchors, groups = same_label_groups(dataset, labels, test, args.n, args.m, np.random.default_rng(args.seed))
            start = time.perf_counter()
            result = decoupling_score(judge.embedder, anchors, groups, judge.tau)
            judge_seconds += time.perf_counter() - start  # includes reading the group meshes (page cache)
            e = entries[factor]
            row[factor] = f"{e['seconds']:6.0f} s {e['epochs']:4d} ep  acc {judge.accuracy:.3f} far {judge.far:.3f} tau {judge.tau:.3f}"
            percents.append(f"{result['percent']:.1f}")
        row["judging"] = f"{judge_seconds:6.1f} s"
        row["data %"] = " / ".join(percents)
        rows.append(row)
        print(" | ".join(f"{v}" for v in row.values()), flush=True)

    names = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in names}
    print(f"\nidentity / expression: train + calibrate seconds, epochs, validation accuracy, FAR, tau; "
          f"judging = 2 x {args.n} x ({args.m} + 1) meshes")
    print("  ".join(f"{k:<{widths[k]}}" for k in names))
    for r in rows:
        print("  ".join(f"{r[k]:<{widths[k]}}" for k in names))


if __name__ == "__main__":
    main()
