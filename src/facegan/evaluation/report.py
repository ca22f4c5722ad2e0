"""Evaluation results as files: JSON of every number, a Table-1-style markdown report, and figures.

Columns of the paper's Table 1: Dec-Id, Dec-Expr (%), Sp., Gen. (mm), Div-Global, Div-Id, Div-Expr
(mm, mean +- std). Beyond it: memorized fraction, roughness ratio to real data, oracle decoupling,
MMD / COV / 1-NNA and KID. Figures follow the paper: per model, rows of samples sharing the identity
code (Figure 7) or the expression code (Figure 8) and random | same identity | same expression
(Figure 3); across models, test meshes with each model's fit (Figure 4) and cumulative error curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from facegan.fileio import atomic_path, write_json

__all__ = ["json_ready", "markdown_tables", "write_report", "model_figures", "comparison_figures", "PAPER_TABLE1"]

# The paper's Table 1 (ICCV 2019), for side-by-side reading: Dec-Id, Dec-Expr, Sp., Gen., Div-Global, Div-Id, Div-Expr.
PAPER_TABLE1 = {
    "Training data": (None, None, None, None, "4.89 ± 1.47", "3.30 ± 1.97", "5.04 ± 1.54"),
    "AC-GAN": (25.8, 88.1, 5.23, 0.77, "14.35 ± 11.27", "12.28 ± 12.02", "6.98 ± 3.85"),
    "w/o alternate training": (37.9, 88.9, 4.69, 0.76, "9.52 ± 6.94", "7.53 ± 7.94", "6.30 ± 3.26"),
    "w/o TV loss": (97.8, 89.4, 2.08, 0.98, "4.52 ± 1.17", "2.10 ± 0.92", "3.86 ± 1.10"),
    "w/o feature loss": (99.7, 89.1, 1.93, 0.78, "4.34 ± 1.22", "1.86 ± 0.77", "3.83 ± 1.13"),
    "w/o expression classif.": (100, 53.3, 1.99, 0.82, "4.57 ± 1.26", "0.41 ± 0.08", "4.58 ± 1.27"),
    "MAE": (99.5, 53.3, 2.0, 0.31, "3.89 ± 1.05", "0.92 ± 0.35", "3.76 ± 1.02"),
    "COMA (DeepFLAME)": (97.5, 64.1, 2.42, 0.42, "3.34 ± 0.89", "1.65 ± 0.40", "2.91 ± 0.89"),
    "Us (full)": (99.1, 93.4, 1.93, 0.74, "4.54 ± 1.28", "2.08 ± 0.97", "3.90 ± 1.15"),
}
PAPER_HEADER = ("Dec-Id", "Dec-Expr", "Sp.", "Gen.", "Div-Global", "Div-Id", "Div-Expr")
FIGURE_PX = 112


def json_ready(value: Any) -> Any:
    """``value`` without NumPy arrays (figure material), NumPy scalars as Python numbers, NaN as None."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items() if not _only_arrays(v)}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _only_arrays(value: Any) -> bool:
    """An array, or a non-empty dict holding nothing but arrays (e.g. the figure examples)."""
    return isinstance(value, np.ndarray) or (isinstance(value, dict) and bool(value)
                                             and all(isinstance(v, np.ndarray) for v in value.values()))


def _get(result: dict, *path: str) -> Any:
    node: Any = result.get("metrics", {})
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _num(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value * scale:.{digits}f}"


def _spread(entry: dict | None) -> str:
    return "—" if not entry else f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def paper_row(result: dict) -> list[str]:
    """One row in the paper's Table 1 columns."""
    return [_num(_get(result, "decoupling", "identity", "percent"), 1), _num(_get(result, "decoupling", "expression", "percent"), 1),
            _num(_get(result, "specificity", "mean")), _num(_get(result, "generalization", "mean")),
            _spread(_get(result, "diversity", "global")), _spread(_get(result, "diversity", "identity")),
            _spread(_get(result, "diversity", "expression"))]


BEYOND_HEADER = ("Mem. %", "Rough. ×real", "Oracle id, id fixed", "Oracle exp, id fixed", "Oracle exp, exp fixed",
                 "Oracle id, exp fixed", "MMD", "COV", "1-NNA", "KID-id ×1e3", "KID-exp ×1e3")


def beyond_row(result: dict) -> list[str]:
    """Memorization, roughness, oracle ratios (fixed factor's, then the free one's), distribution metrics."""
    return [_num(_get(result, "specificity", "memorized_fraction"), 1, 100), _num(_get(result, "roughness", "ratio")),
            _num(_get(result, "oracle", "identity", "identity_ratio"), 3), _num(_get(result, "oracle", "identity", "expression_ratio"), 3),
            _num(_get(result, "oracle", "expression", "expression_ratio"), 3), _num(_get(result, "oracle", "expression", "identity_ratio"), 3),
            _num(_get(result, "distribution", "mmd")), _num(_get(result, "distribution", "coverage")),
            _num(_get(result, "distribution", "1-nna")), _num(_get(result, "distribution", "kid_identity"), 2, 1e3),
            _num(_get(result, "distribution", "kid_expression"), 2, 1e3)]


TRANSFER_HEADER = ("Transfer", "Untouched", "Identity change", "Identity change of the fit alone", "Expression miss",
                   "Expression miss of the source's fit",
                   "Kept detail: transfer", "Kept detail: identity change", "Identity shared: transfer",
                   "Identity shared: expression miss", "Identity shared, kept detail: transfer")
TRANSFER_KEYS = ("error_mm", "untouched_mm", "identity_change_mm", "fit_identity_change_mm", "expression_miss_mm",
                 "fit_expression_miss_mm",
                 "detail_error_mm", "detail_identity_change_mm", "shared_error_mm", "shared_expression_miss_mm",
                 "shared_detail_error_mm")


def transfer_row(result: dict) -> list[str]:
    """The transfer check (mm): the edited face and the unedited target against the truth, the oracle's split
    (and the identity change of the target's fit and the expression miss of the source's, before the edit),
    the same for the edit applied to the target mesh (keep_detail), and with each person's faces fitted with
    one identity code (models that can)."""
    return [_num(_get(result, "transfer", key)) for key in TRANSFER_KEYS]


GENERALIZATION_HEADER = ("Gen.", "Median", "Max", "Neutral test faces", "Floor: round trip",
                         "Training people's span (neutral)")
GENERALIZATION_KEYS = ("mean", "median", "max", "neutral_mean", "floor_roundtrip", "training_span_neutral")


def generalization_row(result: dict) -> list[str]:
    """Generalization (mm) over the test meshes and their neutral ones, beside the encode/decode round trip (the
    representation's floor) and the neutral faces' distance to the training people's span (what blends of the
    training people reach, :mod:`facegan.metrics.span`)."""
    return [_num(_get(result, "generalization", key)) for key in GENERALIZATION_KEYS]


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    lines = ["| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines)


def markdown_tables(results: Sequence[dict]) -> str:
    """The paper's columns, then the columns beyond the paper, one row per result, the generalization table
    when a model was fitted, and the transfer check's table when a model was checked."""
    paper = _table(PAPER_HEADER, [(r["model"], paper_row(r)) for r in results])
    beyond = _table(BEYOND_HEADER, [(r["model"], beyond_row(r)) for r in results])
    checked = [r for r in results if _get(r, "transfer") is not None]
    transfer = f"\n{_table(TRANSFER_HEADER, [(r['model'], transfer_row(r)) for r in checked])}\n" if checked else ""
    fitted = [r for r in results if _get(r, "generalization") is not None]
    generalization = (f"\n{_table(GENERALIZATION_HEADER, [(r['model'], generalization_row(r)) for r in fitted])}\n"
                      if fitted else "")
    curve = next((c for r in fitted if (c := _get(r, "generalization", "principal_components"))), None)
    if curve:
        generalization += ("\nThe test meshes on the training meshes' first k principal directions (the best linear "
                           "model of k dimensions): " + ", ".join(f"k = {k}: {_num(v)}" for k, v in curve.items()) + " mm.\n")
    return f"{paper}\n\n{beyond}\n{generalization}{transfer}"


def paper_table_markdown() -> str:
    rows = [(name, [_num(v, 1) if isinstance(v, (int, float)) else (v or "—") for v in values])
            for name, values in PAPER_TABLE1.items()]
    return _table(PAPER_HEADER, rows)


# ------------------------------------------------------------------------------------------- figures


def _render(meshes: np.ndarray, triangles: np.ndarray, view) -> np.ndarray:
    from facegan.render import render_meshes

    return render_meshes(torch.from_numpy(np.asarray(meshes, np.float32)), torch.from_numpy(triangles), FIGURE_PX,
                         view=view, supersample=2).numpy()


def _view(*meshes: np.ndarray):
    from facegan.render import fit_view

    return fit_view(torch.from_numpy(np.concatenate([m.reshape(-1, 3) for m in meshes])[None].astype(np.float32)))


def model_figures(result: dict, triangles: np.ndarray, folder: Path) -> list[Path]:
    """Write ``<model>_fixed_identity.png`` (Figure 7: each row shares the identity code),
    ``<model>_fixed_expression.png`` (Figure 8) and ``<model>_samples.png`` (Figure 3: a row of random
    faces, a row sharing the identity code, a row sharing the expression code) from ``result["examples"]``; returns the paths written."""
    from facegan.render import image_grid, save_png

    examples = result.get("examples", {})
    stem = _stem(result["model"])
    written = []
    grouped = [examples[f] for f in ("identity", "expression") if f in examples]
    view = _view(examples.get("random", np.zeros((0, 1, 3))), *grouped)
    for factor in ("identity", "expression"):
        if factor in examples:
            rows = examples[factor]
            path = folder / f"{stem}_fixed_{factor}.png"
            save_png(path, image_grid(_render(rows.reshape(-1, *rows.shape[2:]), triangles, view), ncols=rows.shape[1]))
            written.append(path)
    if "random" in examples and len(grouped) == 2:
        rows = [examples["random"], grouped[0][0], grouped[1][0]]
        k = min(len(r) for r in rows)
        tiles = np.concatenate([_render(r[:k], triangles, view) for r in rows])
        labels = [name if i == 0 else "" for name in ("random", "same identity code", "same expression code")
                  for i in range(k)]
        path = folder / f"{stem}_samples.png"
        save_png(path, image_grid(tiles, ncols=k, labels=labels))
        written.append(path)
    return written


def comparison_figures(results: Sequence[dict], triangles: np.ndarray, folder: Path) -> list[Path]:
    """``fits.png`` (Figure 4: each test mesh, then every model's fit of it) and
    ``generalization_cumulative.png`` (fraction of vertices under x mm, per model)."""
    from facegan.fit.outputs import cumulative_error_plot
    from facegan.render import image_grid, save_png

    fitted = [r for r in results if isinstance(_get(r, "generalization", "fits"), np.ndarray)]
    written = []
    if fitted:
        targets = _get(fitted[0], "generalization", "targets")
        fits = [_get(r, "generalization", "fits") for r in fitted]
        view = _view(targets, *fits)
        columns = [_render(targets, triangles, view)] + [_render(f, triangles, view) for f in fits]
        tiles = np.stack(columns, axis=1).reshape(-1, FIGURE_PX, FIGURE_PX, 3)
        names = ["test mesh"] + [r["model"] for r in fitted]
        path = folder / "fits.png"
        save_png(path, image_grid(tiles, ncols=len(columns), labels=names * len(targets)))
        written.append(path)
        path = folder / "generalization_cumulative.png"
        cumulative_error_plot(path, {r["model"]: _get(r, "generalization", "vertex_errors") for r in fitted},
                              title="Generalization: fitting the held-out test meshes")
        written.append(path)
    return written


def _stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "model"


def write_report(out_dir: str | Path, results: Sequence[dict], triangles: np.ndarray, header: dict,
                 name: str = "report", title: str | None = None, extra_markdown: str = "") -> Path:
    """Write ``<name>.json`` (header + every number), ``<name>.md`` (the tables, then ``extra_markdown``)
    and ``figures/*.png`` into ``out_dir``; returns the markdown path. Each file is written atomically."""
    out = Path(out_dir)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for result in results:
        model_figures(result, triangles, figures)
    comparison_figures(results, triangles, figures)
    write_json(out / f"{name}.json", json_ready({**header, "results": list(results)}))
    lines = [f"# {title or 'Evaluation on ' + str(header.get('data', 'the dataset'))}", "",
             f"Every number is also in {name}.json; the figures are in figures/.", "",
             "Units: Gen., Sp., Div-*, MMD in mm; Dec-* and Mem. in %; oracle columns are within-group variance "
             "over the training data's (0 = fixed, ~1 = varies as in the data); the transfer check in mm "
             "(docs/evaluation.md).", "",
             markdown_tables(results), extra_markdown]
    path = out / f"{name}.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
