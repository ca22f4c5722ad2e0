"""Files for the command line: fitted meshes, codes, errors and figures; edited faces and strips.

Every entry point reads and checks all of its inputs, computes everything, and only then writes:
on bad input nothing is written. Files are staged in a temporary folder beside ``out_dir`` and
moved into it at the end (each move atomic), so no half-written file is ever visible.

Layouts written:

    fit_files / fit_split -> OUT/
      meshes/<name>_fit.obj         the fit as the objective sees it (sparse read of G(z))
      meshes/<name>_fit_dense.obj   the dense (Laplacian) decoding of G(z), when dense is on
      codes.json                    {"identity": [[...]], "expression": [[...]], "noise": [[...]]}, row i = mesh i
      codes.npz                     the same arrays plus "names"
      errors.csv                    name, mean vertex errors (mm; all / masked vertices; sparse / dense), restarts
      cumulative_error.png          fraction of vertices with error <= x (mm)
      fits.png                      input | fit | error heat map, one row per mesh (the first grid_limit)

    edit_files -> OUT/  meshes/<pair>_<operation>.obj, codes_<operation>.json, edits.png
                        (columns: source | target | replaced | added, as in Figure 9)
    interpolate_files -> OUT/  meshes/<pair>_t<k>.obj, codes.json, interpolation.png (one row per pair, Figure 10)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from facegan.errors import FaceganError, check_known
from facegan.fileio import read_json
from facegan.fit.editing import (add_factor, check_codes, edit_meshes, interpolate, keep_detail, n_rows,
                                 replace_factor)
from facegan.fit.fitting import FitOptions, FitResult, fit_meshes
from facegan.geometry_image.codec import RECONSTRUCTION_METHODS
from facegan.sampling import codec_of
from facegan.mesh.io import read_mesh_vertices, write_mesh
from facegan.model import FaceModel

PathLike = str | os.PathLike
CODE_SUFFIXES = (".json", ".npz")
TILE_PX = 160  # rendered tile side in the PNG figures
GRID_LIMIT = 16  # meshes shown in fits.png (all meshes are still written)
EDIT_OPERATIONS = ("transfer", "add")


# ------------------------------------------------------------------------------ staging


@contextlib.contextmanager
def staged_output(out_dir: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir``; on success move its files into ``out_dir``
    (created if needed, files of the same name replaced), on failure delete it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FaceganError(f"{out_dir}: exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield stage
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            dst = out_dir / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------- inputs


def read_meshes(paths: Sequence[PathLike], n_vertices: int) -> tuple[np.ndarray, list[str]]:
    """Vertices (B, V, 3) mm of OBJ/PLY files and their names (file stems, unique).

    FaceganError naming the first bad file (missing, unreadable, wrong vertex count, NaN) or a
    repeated name (outputs are named after the inputs)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise FaceganError("no mesh files given")
    names = [p.stem for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FaceganError(f"two input meshes are named {repeated[0]!r}: outputs are named after the inputs")
    return np.stack([read_mesh_vertices(p, n_vertices) for p in paths]), names


def load_vertex_mask(path: PathLike, n_vertices: int) -> np.ndarray:
    """A (V,) bool vertex mask from a file: .npy (bool (V,) or vertex indices) or text (indices).

    FaceganError for an unreadable file, indices out of range or a mask that selects nothing."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.array(path.read_text().split(), dtype=np.int64)
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise FaceganError(f"{path}: not a vertex mask (bool .npy or vertex indices) ({exc})") from None
    if values.dtype == np.bool_:
        if values.shape != (n_vertices,):
            raise FaceganError(f"{path}: mask of shape {values.shape}, the template has {n_vertices} vertices")
        mask = values
    else:
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise FaceganError(f"{path}: expected a bool mask or a list of vertex indices")
        if len(values) and (values.min() < 0 or values.max() >= n_vertices):
            raise FaceganError(f"{path}: vertex index out of range [0, {n_vertices - 1}]")
        mask = np.zeros(n_vertices, dtype=bool)
        mask[values] = True
    if not mask.any():
        raise FaceganError(f"{path}: the mask selects no vertex")
    return mask


def load_codes(path: PathLike, model: FaceModel) -> dict[str, torch.Tensor]:
    """Codes from a ``codes.json`` ({factor: [[...], ...], "noise": [[...]]}, as written by
    ``facegan sample`` / ``facegan fit``) or ``codes.npz``, checked against the model's factors and
    sizes. Other entries (``facegan sample`` adds "names", "fix", "seed", "model") are ignored."""
    return _read_codes(path, model)[0]


def _read_codes(path: PathLike, model: FaceModel) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(codes, the file's row names or None)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise FaceganError(f"{path}: expected an object of code lists, e.g. {{\"identity\": [[...]], ...}}")
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                raw = {k: data[k].tolist() for k in data.files}
        except FileNotFoundError:
            raise FaceganError(f"{path}: file not found") from None
        except (OSError, ValueError) as exc:
            raise FaceganError(f"{path}: unreadable codes file ({exc})") from None
    else:
        raise FaceganError(f"{path}: not a codes file (expected {' or '.join(CODE_SUFFIXES)})")
    arrays = {}
    for name in [*model.factors, "noise"]:
        if name not in raw:
            raise FaceganError(f"{path}: no {name!r} codes (the model has {', '.join([*model.factors, 'noise'])})")
        try:
            arrays[name] = np.asarray(raw[name], dtype=np.float32)
        except (ValueError, TypeError):
            raise FaceganError(f"{path}: {name!r} is not a list of equally long number rows") from None
    codes = check_codes(arrays, model, what=str(path))
    names = raw.get("names")
    valid = isinstance(names, list) and len(names) == n_rows(codes) and all(isinstance(n, str) for n in names)
    return codes, (_file_names(names) if valid else None)


def codes_to_json(codes: Mapping[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    """{name: list of rows} (float32 values written exactly) for ``codes.json``."""
    return {name: np.asarray(value, dtype=np.float32).astype(np.float64).tolist() for name, value in codes.items()}


def resolve_codes(spec: PathLike | Sequence[PathLike], model: FaceModel, options: FitOptions | None = None,
                  what: str = "codes") -> tuple[dict[str, torch.Tensor], list[str], np.ndarray | None]:
    """Codes given either as one codes file (.json/.npz) or as mesh files fitted here.

    Returns (codes (B rows), row names, the fitted meshes (B, V, 3) mm or None for a codes file). All files
    are checked before fitting."""
    paths = [Path(spec)] if isinstance(spec, (str, os.PathLike)) else [Path(p) for p in spec]
    if not paths:
        raise FaceganError(f"{what}: nothing given (a codes .json/.npz or mesh files)")
    kinds = {p.suffix.lower() in CODE_SUFFIXES for p in paths}
    if kinds == {True}:
        if len(paths) != 1:
            raise FaceganError(f"{what}: give one codes file, not {len(paths)}")
        codes, names = _read_codes(paths[0], model)
        return codes, names or [f"{paths[0].stem}{i}" for i in range(n_rows(codes))], None
    if kinds != {False}:
        raise FaceganError(f"{what}: mix of codes files and meshes; give one codes file or mesh files")
    meshes, names = read_meshes(paths, codec_of(model).template.n_vertices)
    return fit_meshes(model, meshes, options=options).codes, names, meshes


# ---------------------------------------------------------------------------- writers


def write_codes(folder: Path, codes: Mapping[str, torch.Tensor], names: Sequence[str], stem: str = "codes") -> None:
    """``<stem>.json`` ({"names": [...], factor: rows, ..., "noise": rows}, the layout ``facegan sample``
    writes) and ``<stem>.npz`` (the same arrays) in ``folder``."""
    (folder / f"{stem}.json").write_text(json.dumps({"names": list(names), **codes_to_json(codes)}) + "\n")
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in codes.items()}
    np.savez(folder / f"{stem}.npz", names=np.array(list(names)), **arrays)


def errors_table(names: Sequence[str], result: FitResult) -> str:
    """CSV text: one row per mesh with its mean vertex errors (mm) and restarts."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["name", "error_mm", "error_masked_mm"]
    columns = [result.mean_error, result.mean_error_masked]
    if result.mean_error_dense is not None:
        header += ["error_dense_mm", "error_dense_masked_mm"]
        columns += [result.mean_error_dense, result.mean_error_dense_masked]
    writer.writerow(header + ["restarts"])
    for i, name in enumerate(names):
        writer.writerow([name, *(f"{float(c[i]):.4f}" for c in columns), int(result.restarts[i])])
    return buf.getvalue()


def cumulative_error_plot(path: PathLike, curves: Mapping[str, np.ndarray], title: str = "",
                          max_mm: float | None = None) -> None:
    """Save a PNG of the cumulative error curves: for each label, the fraction of vertices (over all
    meshes) whose error is <= x mm, against x. curves: label -> per-vertex errors (any shape), mm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    flat = {label: np.sort(np.asarray(e, dtype=np.float64).ravel()) for label, e in curves.items()}
    if max_mm is None:
        max_mm = max(float(np.percentile(e, 99.5)) for e in flat.values() if len(e)) * 1.05 or 1.0
    figure = Figure(figsize=(5.5, 4), dpi=110)
    axes = figure.add_subplot()
    for label, e in flat.items():
        fraction = np.arange(1, len(e) + 1) / len(e)
        axes.plot(np.concatenate([[0.0], e]), np.concatenate([[0.0], fraction]),
                  label=f"{label} (mean {e.mean():.3f} mm)")
    axes.set_xlim(0, max_mm)
    axes.set_ylim(0, 1)
    axes.set_xlabel("vertex error x (mm)")
    axes.set_ylabel("fraction of vertices with error <= x")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


def _render(vertices: torch.Tensor, triangles: torch.Tensor, view, colors: torch.Tensor | None = None) -> np.ndarray:
    from facegan.render import render_meshes

    mode = "shaded" if colors is None else "colors"
    images = render_meshes(vertices.float(), triangles, TILE_PX, mode, vertex_colors=colors, view=view, supersample=2)
    return images.numpy()


def fit_figure(inputs: torch.Tensor, fits: torch.Tensor, errors: torch.Tensor, names: Sequence[str],
               triangles: np.ndarray, heat_max_mm: float | None = None) -> np.ndarray:
    """uint8 grid (H, W, 3): one row per mesh -- input | fit | input coloured by the fit's per-vertex
    error (viridis, 0 .. heat_max_mm, default the 99th percentile of the errors)."""
    from facegan.render import colormap, fit_view, image_grid

    if heat_max_mm is None:
        heat_max_mm = max(float(np.percentile(errors.numpy(), 99)), 1e-3)
    tri = torch.as_tensor(triangles)
    view = fit_view(torch.cat([inputs, fits]).float())
    shown_in, shown_fit = _render(inputs, tri, view), _render(fits, tri, view)
    heat = _render(inputs, tri, view, colormap(errors, 0.0, heat_max_mm))
    tiles, labels = [], []
    for i, name in enumerate(names):
        tiles += [shown_in[i], shown_fit[i], heat[i]]
        labels += [f"{name}", "fit", f"{errors[i].mean():.2f} mm (0-{heat_max_mm:.1f})"]
    return image_grid(tiles, ncols=3, labels=labels)


def _write_fit(stage: Path, names: Sequence[str], inputs: torch.Tensor, result: FitResult, model: FaceModel,
               grid_limit: int, heat_max_mm: float | None) -> None:
    from facegan.render import save_png

    template = codec_of(model).template
    (stage / "meshes").mkdir()
    for i, name in enumerate(names):
        _write_obj(stage / "meshes" / f"{name}_fit.obj", result.vertices[i], template)
        if result.vertices_dense is not None:
            _write_obj(stage / "meshes" / f"{name}_fit_dense.obj", result.vertices_dense[i], template)
    write_codes(stage, result.codes, names)
    (stage / "errors.csv").write_text(errors_table(names, result))
    curves = {"fit (sparse read)": result.errors.numpy()}
    if result.errors_dense is not None:
        curves["fit (dense decoding)"] = result.errors_dense.numpy()
    if not bool(result.vertex_mask.all()):  # partial data: the vertices the fit saw, on their own
        curves["fit (sparse read), masked-in vertices"] = result.errors[result.vertex_mask].numpy()
    cumulative_error_plot(stage / "cumulative_error.png", curves, f"{len(names)} meshes")
    shown = slice(0, min(grid_limit, len(names)))
    fits = result.vertices_dense if result.vertices_dense is not None else result.vertices
    errors = result.errors_dense if result.errors_dense is not None else result.errors
    if grid_limit > 0:
        save_png(stage / "fits.png", fit_figure(inputs[shown], fits[shown], errors[shown], names[shown],
                                                template.triangles, heat_max_mm))


# ------------------------------------------------------------------------------ fitting


def shared_labels(dataset, factor: str, index: np.ndarray) -> list[str]:
    """The ``factor`` labels of the dataset's meshes ``index``, as groups for ``fit_meshes(share=...)``: a
    missing label becomes the mesh's own group."""
    if factor not in dataset.labels.columns:
        raise FaceganError(f"{dataset.root}: no {factor!r} labels to share")
    column = dataset.labels[factor]
    return [column[i] or f"\0mesh {i}" for i in index]


def _file_names(mesh_ids: Sequence[str]) -> list[str]:
    """File-safe names of mesh ids ("motion/id060/happiness/000" -> "motion_id060_happiness_000")."""
    names = ["".join(c if c.isalnum() or c in "-." else "_" for c in m).strip(".") or "mesh" for m in mesh_ids]
    if len(set(names)) != len(names):
        names = [f"{i:05d}_{n}" for i, n in enumerate(names)]
    return names


def _file_options(options: FitOptions | None) -> FitOptions:
    """File outputs decode densely by default (the nicer meshes); explicit options win."""
    return options if options is not None else FitOptions(dense=True)


def fit_files(mesh_paths: Sequence[PathLike], out_dir: PathLike, model: FaceModel, *,
              vertex_mask: np.ndarray | torch.Tensor | PathLike | None = None, options: FitOptions | None = None,
              share: Sequence[str] = (), grid_limit: int = GRID_LIMIT, heat_max_mm: float | None = None) -> FitResult:
    """Fit registered OBJ/PLY meshes and write the fit outputs (see the module doc) into ``out_dir``.

    vertex_mask: None, a (V,) / (B, V) bool array, or a mask file (see :func:`load_vertex_mask`);
    options: FitOptions (default: defaults with dense decoding); share: factors whose code all the meshes
    share (e.g. ("identity",) for several scans of one person; ``fit_meshes``' ``share``). Returns the
    FitResult (mesh i = path i).
    """
    n_vertices = codec_of(model).template.n_vertices
    meshes, names = read_meshes(mesh_paths, n_vertices)
    if isinstance(vertex_mask, (str, os.PathLike)):
        vertex_mask = load_vertex_mask(vertex_mask, n_vertices)
    result = fit_meshes(model, meshes, vertex_mask, _file_options(options),
                        share={factor: [0] * len(meshes) for factor in share})
    with staged_output(out_dir) as stage:
        _write_fit(stage, names, torch.as_tensor(meshes, dtype=torch.float32), result, model, grid_limit, heat_max_mm)
    return result


def fit_split(dataset, split: str, out_dir: PathLike, model: FaceModel, *, limit: int | None = None,
              vertex_mask: np.ndarray | torch.Tensor | PathLike | None = None, options: FitOptions | None = None,
              share: Sequence[str] = (), grid_limit: int = GRID_LIMIT, heat_max_mm: float | None = None) -> FitResult:
    """Fit the meshes of a dataset split ("train" / "test") and write the fit outputs into ``out_dir``.

    dataset: a RegisteredDataset or its folder; limit: at most this many meshes, evenly spread; share:
    factors whose code the meshes with the same label share (``fit_meshes``' ``share``; a mesh without
    that label keeps its own code).
    Meshes are named by their ``mesh_id``. The paper's generalization number is the mean of
    ``mean_error`` over the test split (0.74 mm, Table 1).
    """
    from facegan.data.dataset import open_dataset

    ds = open_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    index = ds.split(split)
    if len(index) == 0:
        raise FaceganError(f"{ds.root}: the {split!r} split has no meshes")
    if limit is not None and len(index) > limit:
        index = index[np.linspace(0, len(index) - 1, limit).round().astype(int)]
    n_vertices = codec_of(model).template.n_vertices
    meshes = np.asarray(ds.meshes[index], dtype=np.float32)
    if meshes.shape[1] != n_vertices:
        raise FaceganError(f"{ds.root}: meshes have {meshes.shape[1]} vertices, the model's template has {n_vertices}")
    names = _file_names([str(ds.labels["mesh_id"][i]) for i in index])
    if isinstance(vertex_mask, (str, os.PathLike)):
        vertex_mask = load_vertex_mask(vertex_mask, n_vertices)
    result = fit_meshes(model, meshes, vertex_mask, _file_options(options), face_seeds=[int(i) for i in index],
                        share={factor: shared_labels(ds, factor, index) for factor in share})
    with staged_output(out_dir) as stage:
        _write_fit(stage, names, torch.from_numpy(meshes), result, model, grid_limit, heat_max_mm)
    return result


# ------------------------------------------------------------------------------ editing


def _pairs(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], first_names: Sequence[str],
           second_names: Sequence[str], joiner: str) -> tuple[dict, dict, list[str]]:
    """Pair rows, a single row of either side going with every row of the other.

    Returns (first, second) with B rows each and the pair names ``<first><joiner><second>``."""
    n1, n2 = n_rows(first), n_rows(second)
    if n1 != n2 and 1 not in (n1, n2):
        raise FaceganError(f"{n1} and {n2} faces to pair: give as many of each, or one of either")
    n = max(n1, n2)
    grow = lambda codes: {k: v.expand(n, -1).clone() for k, v in codes.items()}  # noqa: E731
    names1, names2 = _row_names(first_names, second_names, n)
    return grow(first), grow(second), [f"{a}{joiner}{b}" for a, b in zip(names1, names2)]


def edit_files(out_dir: PathLike, model: FaceModel, source: PathLike | Sequence[PathLike],
               target: PathLike | Sequence[PathLike], *, operations: Sequence[str] = EDIT_OPERATIONS,
               factor: str = "expression", method: str = "dense", options: FitOptions | None = None,
               detail: bool = False) -> dict[str, torch.Tensor]:
    """Expression transfer (replace) and/or addition from sources to targets (Figure 9).

    source / target: a codes file (.json/.npz) or mesh files (fitted first); B sources and B targets
    pair row by row, a single one pairs with all of the other side. operations: any of "transfer"
    (G(z_id^t, z_f^s, z_noise^t)) and "add" (z_f^s + z_f^t); factor: the code that is edited (any of
    the model's factors); detail: apply each edit to the target mesh itself, keeping what the fit missed
    (:func:`~facegan.fit.editing.keep_detail`; the targets must be meshes). Writes the edited meshes, their
    codes and edits.png (source | target | one column per operation). Returns {operation: edited meshes
    (B, V, 3) mm}.
    """
    unknown = [op for op in operations if op not in EDIT_OPERATIONS]
    if unknown or not operations:
        raise FaceganError(f"unknown edit {unknown[0] if unknown else '(none)'!r} (use {', '.join(EDIT_OPERATIONS)})")
    check_known([factor], model.factors, "factor")
    check_known([method], RECONSTRUCTION_METHODS, "reconstruction method")
    target_codes, target_names, target_meshes = resolve_codes(target, model, options, "target")
    if detail and target_meshes is None:  # a codes file is always a single path
        codes_file = target if isinstance(target, (str, os.PathLike)) else target[0]
        raise FaceganError(f"{codes_file}: keeping the detail needs the target meshes, not a codes file")
    source_codes, source_names, _ = resolve_codes(source, model, options, "source")
    target_codes, source_codes, pair_names = _pairs(target_codes, source_codes, target_names, source_names, "_from_")
    edit = {"transfer": replace_factor, "add": add_factor}
    edited = {op: edit[op](target_codes, source_codes, factor) for op in operations}
    meshes = {op: edit_meshes(model, codes, method) for op, codes in edited.items()}
    shown = {"source": edit_meshes(model, source_codes, method), "target": edit_meshes(model, target_codes, method)}
    if detail:
        inputs = torch.from_numpy(target_meshes).expand(len(pair_names), -1, -1)
        meshes = {op: keep_detail(m, shown["target"], inputs) for op, m in meshes.items()}
        shown["target"] = inputs
    column_names = {"transfer": "replaced", "add": "added"}
    template = codec_of(model).template
    with staged_output(out_dir) as stage:
        (stage / "meshes").mkdir()
        for op in operations:
            for i, name in enumerate(pair_names):
                _write_obj(stage / "meshes" / f"{name}_{op}.obj", meshes[op][i], template)
            write_codes(stage, edited[op], pair_names, f"codes_{op}")
        columns = [shown["source"], shown["target"], *(meshes[op] for op in operations)]
        labels = [[f"source {s}", f"target {t}", *(column_names[op] for op in operations)]
                  for s, t in zip(*_row_names(source_names, target_names, len(pair_names)))]
        _save_strip(stage / "edits.png", columns, labels, template.triangles)
    return meshes


def interpolate_files(out_dir: PathLike, model: FaceModel, a: PathLike | Sequence[PathLike],
                      b: PathLike | Sequence[PathLike], *, factor: str = "identity", steps: int = 7,
                      method: str = "dense", options: FitOptions | None = None) -> torch.Tensor:
    """Interpolate ``factor``'s code from faces a to faces b in ``steps`` steps, other codes from a
    (Figure 10). a / b: codes file or mesh files (fitted first), paired row by row (or one with all).
    Writes meshes, codes.json and interpolation.png (one row per pair). Returns (B, steps, V, 3) mm."""
    check_known([factor], model.factors, "factor")
    check_known([method], RECONSTRUCTION_METHODS, "reconstruction method")
    codes_a, names_a, _ = resolve_codes(a, model, options, "a")
    codes_b, names_b, _ = resolve_codes(b, model, options, "b")
    codes_a, codes_b, pair_names = _pairs(codes_a, codes_b, names_a, names_b, "_to_")
    mixed = interpolate(codes_a, codes_b, factor, steps)
    meshes = edit_meshes(model, mixed, method).reshape(len(pair_names), steps, -1, 3)
    template = codec_of(model).template
    with staged_output(out_dir) as stage:
        (stage / "meshes").mkdir()
        for i, name in enumerate(pair_names):
            for k in range(steps):
                _write_obj(stage / "meshes" / f"{name}_t{k}.obj", meshes[i, k], template)
        write_codes(stage, mixed, [f"{name}_t{k}" for name in pair_names for k in range(steps)])
        labels = [[a_name if k == 0 else f"{factor} of {b_name}" if k == steps - 1 else f"t={k / (steps - 1):.2f}"
                   for k in range(steps)] for a_name, b_name in zip(*_row_names(names_a, names_b, len(pair_names)))]
        _save_strip(stage / "interpolation.png", [meshes[:, k] for k in range(steps)], labels, template.triangles)
    return meshes


def _write_obj(path: Path, vertices: torch.Tensor, template) -> None:
    """A mesh (V, 3) mm in the template's topology, with its UVs."""
    write_mesh(path, vertices.numpy(), template.triangles, uv=template.uv)


def _save_strip(path: Path, columns: Sequence[torch.Tensor], labels: Sequence[Sequence[str]],
                triangles: np.ndarray) -> None:
    """One row per pair, one column per entry of ``columns`` ((B, V, 3) each), shared framing;
    labels[i][j] captions row i, column j."""
    from facegan.render import fit_view, image_grid, save_png

    tri = torch.as_tensor(triangles)
    view = fit_view(torch.cat(list(columns)).float())
    rendered = [_render(c, tri, view) for c in columns]
    n = len(columns[0])
    tiles = [rendered[j][i] for i in range(n) for j in range(len(columns))]
    save_png(path, image_grid(tiles, ncols=len(columns), labels=[text for row in labels for text in row]))


def _row_names(first: Sequence[str], second: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """Both name lists at the pair count ``n`` (a single name repeated)."""
    def grow(names: Sequence[str]) -> list[str]:
        return list(names) * n if len(names) == 1 else list(names)

    return grow(first), grow(second)
