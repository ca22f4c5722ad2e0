"""Training curves: ``log.csv`` of a run drawn as ``curves.png``, one panel per part of the objective."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from facegan.errors import FaceganError
from facegan.fileio import atomic_path

# (panel title, log columns on the left axis, on the right axis), columns named by prefix; the right
# axis holds a column of another scale. Columns a run does not log are skipped.
PANELS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("critic: Wasserstein estimate and gradient penalty", ("d_wdist", "d_gp", "d_pair_wdist", "d_pair_gp"), ()),
    ("D: classification loss of the real faces", ("d_class_", "d_descriptor_"), ()),
    ("D: classification accuracy of the real faces", ("d_acc_",), ()),
    ("G: adversarial and classification terms", ("g_gan", "g_pair", "g_class_", "g_proto_"), ()),
    ("G: feature loss (1 - cosine) and TV", ("g_feat_",), ("g_tv",)),
    ("G: reconstruction of the real faces (mean |error|, network units)", ("g_rec",), ()),
    ("speed (images/s)", ("img_per_s",), ("lr_scale",)),
)


def read_log(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a run's ``log.csv`` as floats (an empty cell is NaN): name -> (rows,)."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise FaceganError(f"{path}: cannot read the training log ({exc.strerror})") from None
    if not rows or not rows[0] or rows[0][0] != "iteration":
        raise FaceganError(f"{path}: not a facegan training log (no 'iteration' header)")
    header, body = rows[0], [r for r in rows[1:] if r]
    try:
        return {name: [float(r[i]) if r[i] else math.nan for r in body] for i, name in enumerate(header)}
    except (ValueError, IndexError):
        raise FaceganError(f"{path}: a row is not numbers in the header's columns") from None


def plot_training_log(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Write the curves of every logged statistic against the iteration, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    log = read_log(log_path)
    panels = [(title, [c for c in log if c.startswith(left)], [c for c in log if right and c.startswith(right)])
              for title, left, right in PANELS]
    panels = [panel for panel in panels if panel[1] or panel[2]]
    rows = math.ceil(len(panels) / 2)
    figure = Figure(figsize=(11, 2.6 * rows), dpi=90)
    for k, (title, left, right) in enumerate(panels):
        axes = figure.add_subplot(rows, 2, k + 1)
        handles = [axes.plot(log["iteration"], log[c], label=c, linewidth=1)[0] for c in left]
        if right:
            twin = axes.twinx()
            twin.tick_params(labelsize=7)
            handles += [twin.plot(log["iteration"], log[c], label=c, linewidth=1, color="black")[0] for c in right]
        axes.set_title(title + (f"; right axis: {', '.join(right)}" if right else ""), fontsize=9)
        axes.set_xlabel("iteration", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        axes.legend(handles=handles, fontsize=7, loc="best")
    figure.tight_layout()
    with atomic_path(png_path) as tmp:
        FigureCanvasAgg(figure).print_png(str(tmp))
