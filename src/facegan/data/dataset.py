"""The on-disk registered-face dataset: one folder, read memory-mapped.

    DATA/
      dataset.json        format version, counts, units, factor names, landmarks, provenance
      template.obj        the shared topology with one ``vt`` per vertex (mm)
      meshes.npy          (N, V, 3) float32 vertices in mm, opened with mmap (30,000 x 20,000 fits)
      labels.csv          mesh_id, identity, expression, split, [part, sequence, frame, ...];
                          an empty cell is a missing label
      factors.npz         optional ground-truth factors (synthesized data), one row per mesh
      images/res64.npy    cached uint8 geometry images (N, 64, 64, 3), written by ``encode``
      images/res64.json   their codec: alpha, quantization range; images/mean.npy: training mean
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from facegan.errors import FaceganError
from facegan.fileio import atomic_path, read_json
from facegan.mesh.template import Template, load_template

FORMAT_VERSION = 1
LABEL_FACTORS = ("identity", "expression")
REQUIRED_COLUMNS = ("mesh_id", "identity", "expression", "split")
SPLITS = ("train", "test")


@dataclass
class Labels:
    """The labels table: one row per mesh, columns of strings ("" = missing label).

    columns: name -> list of N values; ``mesh_id``, ``identity``, ``expression`` and ``split``
    are always present; others (``part``, ``sequence``, ``frame``, extra factors) are kept as is.
    factors: the label columns used as factors, in order (identity, expression, then extras).
    """

    columns: dict[str, list[str]]
    factors: list[str] = field(default_factory=lambda: list(LABEL_FACTORS))

    def __len__(self) -> int:
        return len(self.columns["mesh_id"])

    def __getitem__(self, name: str) -> list[str]:
        return self.columns[name]

    def class_names(self, factor: str) -> list[str]:
        """Sorted distinct non-missing values of a factor column."""
        return sorted({v for v in self.columns[factor] if v != ""})

    def class_indices(self, factor: str) -> np.ndarray:
        """(N,) int64 class index per mesh into :meth:`class_names`, -1 where the label is missing."""
        names = {n: i for i, n in enumerate(self.class_names(factor))}
        return np.array([names.get(v, -1) for v in self.columns[factor]], dtype=np.int64)

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.array(self.columns["split"]) == split)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        names = list(self.columns)
        writer.writerow(names)
        writer.writerows(zip(*(self.columns[n] for n in names)))
        return buf.getvalue()

    @classmethod
    def read_csv(cls, path: Path, factors: list[str] | None = None) -> "Labels":
        try:
            rows = list(csv.reader(path.read_text().splitlines()))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise FaceganError(f"{path}: unreadable labels table ({exc})") from None
        if not rows:
            raise FaceganError(f"{path}: empty labels table")
        header, body = rows[0], rows[1:]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise FaceganError(f"{path}: missing column(s) {', '.join(missing)}")
        bad = [i + 2 for i, r in enumerate(body) if len(r) != len(header)]
        if bad:
            raise FaceganError(f"{path}: line {bad[0]} has a different number of cells than the header")
        columns = {name: [r[i] for r in body] for i, name in enumerate(header)}
        return cls(columns, factors or list(LABEL_FACTORS))


@dataclass
class RegisteredDataset:
    """A dataset folder opened for reading (meshes memory-mapped, nothing else loaded eagerly)."""

    root: Path
    info: dict
    template: Template
    labels: Labels

    @cached_property
    def meshes(self) -> np.ndarray:
        """(N, V, 3) float32 mm, memory-mapped read-only."""
        return np.load(self.root / "meshes.npy", mmap_mode="r")

    @cached_property
    def factors(self) -> dict[str, np.ndarray]:
        """Ground-truth factors (synthesized datasets), {} when the dataset has none."""
        path = self.root / "factors.npz"
        if not path.exists():
            return {}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> np.ndarray:
        """Mesh indices (K,) of the split ``train`` or ``test``."""
        if name not in SPLITS:
            raise FaceganError(f"unknown split '{name}' (use train or test)")
        return self.labels.split_indices(name)


def open_dataset(root: str | os.PathLike) -> RegisteredDataset:
    """Open a dataset folder written by :func:`write_dataset`."""
    root = Path(root)
    if not (root / "dataset.json").exists():
        raise FaceganError(f"{root}: not a facegan dataset (no dataset.json); make one with 'facegan synth' or 'facegan ingest'")
    info = read_json(root / "dataset.json")
    if info.get("format_version") != FORMAT_VERSION:
        raise FaceganError(f"{root / 'dataset.json'}: unsupported format version {info.get('format_version')}")
    template = load_template(root / "template.obj", landmarks=np.array(info.get("landmarks", []), np.int64))
    labels = Labels.read_csv(root / "labels.csv", info.get("factors"))
    if len(labels) != info["n_meshes"]:
        raise FaceganError(f"{root / 'labels.csv'}: {len(labels)} rows, dataset.json says {info['n_meshes']} meshes")
    return RegisteredDataset(root, info, template, labels)


def write_dataset(
    out: str | os.PathLike,
    template: Template,
    meshes: np.ndarray,
    labels: Labels,
    factors: dict[str, np.ndarray] | None = None,
    provenance: dict | None = None,
) -> RegisteredDataset:
    """Write a dataset folder atomically (a temporary folder renamed into place).

    meshes: (N, V, 3) in mm (any array-like supporting slicing, written in chunks);
    labels: N rows; factors: arrays with N rows; provenance: free-form JSON (source, seed, ...).
    """
    out = Path(out)
    n = len(meshes)
    if len(labels) != n:
        raise FaceganError(f"{out}: {n} meshes but {len(labels)} label rows")
    if meshes.shape[1:] != (template.n_vertices, 3):
        raise FaceganError(f"{out}: meshes have shape {meshes.shape[1:]}, the template has {template.n_vertices} vertices")
    _check_labels(labels, out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        template.save_obj(tmp / "template.obj")
        mm = np.lib.format.open_memmap(tmp / "meshes.npy", mode="w+", dtype=np.float32, shape=meshes.shape)
        for start in range(0, n, 1024):
            mm[start : start + 1024] = meshes[start : start + 1024]
        mm.flush()
        del mm
        (tmp / "labels.csv").write_text(labels.to_csv())
        if factors:
            np.savez(tmp / "factors.npz", **{k: np.asarray(v) for k, v in factors.items()})
        info = {
            "format_version": FORMAT_VERSION,
            "units": "mm",
            "n_meshes": n,
            "n_vertices": template.n_vertices,
            "factors": labels.factors,
            "landmarks": template.landmarks.tolist(),
            "counts": {
                "train": int(len(labels.split_indices("train"))),
                "test": int(len(labels.split_indices("test"))),
                **{f"{f}_labeled": int(sum(v != "" for v in labels[f])) for f in labels.factors},
            },
            "provenance": provenance or {},
        }
        import json

        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return open_dataset(out)


def _check_labels(labels: Labels, where: Path) -> None:
    ids = labels["mesh_id"]
    if len(set(ids)) != len(ids):
        raise FaceganError(f"{where}: mesh ids are not unique")
    bad = sorted(set(labels["split"]) - set(SPLITS))
    if bad:
        raise FaceganError(f"{where}: unknown split value '{bad[0]}' (use train or test)")
    train_ids = {i for i, s in zip(labels["identity"], labels["split"]) if s == "train" and i}
    test_ids = {i for i, s in zip(labels["identity"], labels["split"]) if s == "test" and i}
    if train_ids & test_ids:
        raise FaceganError(f"{where}: identity '{sorted(train_ids & test_ids)[0]}' is in both train and test")
