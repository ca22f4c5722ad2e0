"""Ingest: a folder of registered meshes (OBJ/PLY in the template's topology) becomes a dataset.

Two layouts are understood:
- any folder, with an optional labels CSV (``mesh_id`` or ``file``, ``identity``, ``expression``,
  optional ``split``); without one, a mesh's identity is its first sub-folder's name if it has one;
- the CoMA layout ``subject/expression/*.ply``: identity = subject; the expression label is put on
  the sequence's first and last frames ("neutral") and on its peak frame (the frame farthest from
  the first), like the paper's BU-4DFE labelling.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facegan.data.dataset import SPLITS, Labels, RegisteredDataset, write_dataset
from facegan.errors import FaceganError
from facegan.mesh.io import MESH_SUFFIXES, read_mesh_vertices
from facegan.mesh.template import load_template

LABEL_COLUMNS = {"mesh_id", "file", "identity", "expression", "split"}
NEUTRAL = "neutral"


def find_meshes(mesh_dir: Path) -> list[Path]:
    """All OBJ/PLY files below ``mesh_dir``, sorted by relative path."""
    if not mesh_dir.is_dir():
        raise FaceganError(f"{mesh_dir}: not a folder")
    files = sorted(p for p in mesh_dir.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file())
    if not files:
        raise FaceganError(f"{mesh_dir}: no .obj or .ply files")
    return files


def mesh_id_of(path: Path, mesh_dir: Path) -> str:
    """A mesh's id: its path below the folder, without extension, with forward slashes."""
    return path.relative_to(mesh_dir).with_suffix("").as_posix()


def is_coma_layout(files: list[Path], mesh_dir: Path) -> bool:
    """True when every mesh sits at ``subject/expression/frame.ply``."""
    return all(len(p.relative_to(mesh_dir).parts) == 3 for p in files) and all(
        p.suffix.lower() == ".ply" for p in files
    )


def ingest(
    mesh_dir: str | os.PathLike,
    template_path: str | os.PathLike,
    out: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> RegisteredDataset:
    """Read every mesh below ``mesh_dir`` and write the dataset at ``out`` (see module doc)."""
    mesh_dir, out = Path(mesh_dir), Path(out)
    template = load_template(template_path)
    files = find_meshes(mesh_dir)
    ids = [mesh_id_of(p, mesh_dir) for p in files]
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as scratch:
        meshes = np.lib.format.open_memmap(
            Path(scratch) / "meshes.npy", mode="w+", dtype=np.float32, shape=(len(files), template.n_vertices, 3)
        )
        for i, path in enumerate(tqdm(files, desc="read meshes", unit="mesh", disable=not progress)):
            meshes[i] = read_mesh_vertices(path, template.n_vertices)
        if labels_path is not None:
            columns = _read_label_file(Path(labels_path), ids)
        elif is_coma_layout(files, mesh_dir):
            columns = _coma_labels(files, mesh_dir, meshes)
        else:
            columns = {
                "identity": [p.relative_to(mesh_dir).parts[0] if len(p.relative_to(mesh_dir).parts) > 1 else "" for p in files],
                "expression": [""] * len(files),
            }
        if "split" not in columns:
            columns["split"] = _split_by_identity(columns["identity"], test_fraction, seed)
        labels = Labels({"mesh_id": ids, **columns})
        return write_dataset(
            out, template, meshes, labels, provenance={"source": "ingest", "mesh_dir": str(mesh_dir)}
        )


def _read_label_file(path: Path, ids: list[str]) -> dict[str, list[str]]:
    """Label columns aligned with ``ids`` from a CSV naming meshes by ``mesh_id`` or ``file``."""
    try:
        lines = list(csv.reader(path.read_text().splitlines()))
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FaceganError(f"{path}: unreadable labels file ({exc})") from None
    names = lines[0] if lines else []
    ragged = [n for n, r in enumerate(lines[1:], 2) if r and len(r) != len(names)]
    if ragged:
        raise FaceganError(f"{path}: line {ragged[0]} has a different number of cells than the header")
    rows = [dict(zip(names, r)) for r in lines[1:] if r]
    header = set(names)
    unknown = sorted(header - LABEL_COLUMNS)
    if unknown:
        raise FaceganError(f"{path}: unknown column(s) {', '.join(unknown)} (known: {', '.join(sorted(LABEL_COLUMNS))})")
    key = "mesh_id" if "mesh_id" in header else "file" if "file" in header else None
    if key is None:
        raise FaceganError(f"{path}: needs a 'mesh_id' or 'file' column naming each mesh")
    by_id = {}
    for row in rows:
        name = Path(row[key]).with_suffix("").as_posix() if key == "file" else row[key]
        by_id[name] = row
    missing = sorted(set(by_id) - set(ids))
    if missing:
        raise FaceganError(f"{path}: names {len(missing)} mesh(es) not in the folder, e.g. '{missing[0]}'")
    columns = {c: [by_id.get(i, {}).get(c, "") or "" for i in ids] for c in ("identity", "expression")}
    if "split" in header:
        columns["split"] = [by_id.get(i, {}).get("split", "") or "train" for i in ids]
        bad = sorted(set(columns["split"]) - set(SPLITS))
        if bad:
            raise FaceganError(f"{path}: unknown split '{bad[0]}' (use train or test)")
    return columns


def _coma_labels(files: list[Path], mesh_dir: Path, meshes: np.ndarray) -> dict[str, list[str]]:
    identity, expression = [], [""] * len(files)
    sequences: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(files):
        subject, sequence, _ = p.relative_to(mesh_dir).parts
        identity.append(subject)
        sequences.setdefault((subject, sequence), []).append(i)
    for (_, sequence), frames in sequences.items():
        first = meshes[frames[0]]
        motion = [float(np.linalg.norm(meshes[f] - first, axis=1).mean()) for f in frames]
        expression[frames[0]] = expression[frames[-1]] = NEUTRAL
        if len(frames) > 2:
            expression[frames[int(np.argmax(motion))]] = sequence
    return {"identity": identity, "expression": expression, "sequence": [p.parent.name for p in files]}


def _split_by_identity(identity: list[str], test_fraction: float, seed: int) -> list[str]:
    """Hold out whole identities: about ``test_fraction`` of them (at least one when there are two)."""
    names = sorted({i for i in identity if i})
    n_test = min(len(names) - 1, max(1, round(test_fraction * len(names)))) if len(names) > 1 else 0
    test = set(np.random.default_rng(seed).permutation(names)[:n_test].tolist()) if n_test else set()
    return ["test" if i in test else "train" for i in identity]
