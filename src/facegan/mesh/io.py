"""Reading and writing registered meshes (OBJ and PLY).

OBJ is parsed here rather than by trimesh because a template's ``vt`` indices must be kept per
corner (trimesh re-indexes vertices at UV seams, which would break the registration). PLY goes
through trimesh with processing off, which keeps the vertex order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facegan.errors import FaceganError
from facegan.fileio import atomic_path

MESH_SUFFIXES = (".obj", ".ply")


@dataclass
class ObjData:
    """The parts of an OBJ file a template needs.

    vertices: (V, 3) float64; uv: (T, 2) float64 (``vt`` lines, may be empty);
    polygons: list of (K, 2) int arrays of 0-based (vertex, vt) indices per face corner
    (vt index -1 where the face has none).
    """

    vertices: np.ndarray
    uv: np.ndarray
    polygons: list[np.ndarray]


def read_obj(path: str | os.PathLike) -> ObjData:
    """Parse ``v``, ``vt`` and ``f`` lines of an OBJ file (``f v``, ``v/vt``, ``v/vt/vn``, ``v//vn``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FaceganError(f"{path}: unreadable OBJ ({exc})") from None
    verts, uvs, polys = [], [], []
    try:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.startswith("v "):
                verts.append((lineno, line.split()[1:4]))
            elif line.startswith("vt "):
                uvs.append((lineno, line.split()[1:3]))
            elif line.startswith("f "):
                corners = []
                for c in line.split()[1:]:
                    parts = c.split("/")
                    vi = int(parts[0])
                    ti = int(parts[1]) if len(parts) > 1 and parts[1] else 0
                    corners.append((vi, ti))
                if len(corners) < 3:
                    raise ValueError(f"a face with {len(corners)} corners")
                polys.append(corners)
    except ValueError as exc:
        raise FaceganError(f"{path}: malformed OBJ near line {lineno} ({exc})") from None
    vertices = _number_rows(verts, 3, path)
    uv = _number_rows(uvs, 2, path)
    polygons = []
    for corners in polys:
        arr = np.array(corners, dtype=np.int64)
        # OBJ indices are 1-based; negative ones count from the end.
        arr[:, 0] = np.where(arr[:, 0] < 0, arr[:, 0] + len(vertices), arr[:, 0] - 1)
        arr[:, 1] = np.where(arr[:, 1] < 0, arr[:, 1] + len(uv), arr[:, 1] - 1)
        polygons.append(arr)
    if polygons:
        flat = np.concatenate(polygons)
        if len(flat[:, 0]) and (flat[:, 0].min() < 0 or flat[:, 0].max() >= len(vertices)):
            raise FaceganError(f"{path}: a face refers to a vertex that does not exist (truncated file?)")
        with_uv = flat[flat[:, 1] >= 0, 1]
        if len(with_uv) and with_uv.max() >= len(uv):
            raise FaceganError(f"{path}: a face refers to a texture coordinate that does not exist")
    return ObjData(vertices, uv, polygons)


def _number_rows(rows: list[tuple[int, list[str]]], width: int, path: Path) -> np.ndarray:
    """(line number, cells) rows of ``width`` numbers as a (K, width) float64 array."""
    if not rows:
        return np.zeros((0, width))
    try:
        array = np.array([cells for _, cells in rows], dtype=np.float64)
        if array.shape == (len(rows), width):
            return array
    except ValueError:
        pass
    for lineno, cells in rows:  # only to name the first bad line
        try:
            if len(cells) != width:
                raise ValueError(f"{len(cells)} numbers where {width} are needed")
            [float(c) for c in cells]
        except ValueError as exc:
            raise FaceganError(f"{path}: malformed OBJ near line {lineno} ({exc})") from None
    raise FaceganError(f"{path}: malformed OBJ")


def triangulate(polygons: list[np.ndarray]) -> np.ndarray:
    """Fan-triangulate polygons given as (K, ...) corner arrays; returns (F, 3, ...) corners."""
    tris = [p[[0, k, k + 1]] for p in polygons for k in range(1, len(p) - 1)]
    if not tris:
        return np.zeros((0, 3) + polygons[0].shape[1:] if polygons else (0, 3), dtype=np.int64)
    return np.stack(tris)


def read_mesh_vertices(path: str | os.PathLike, n_vertices: int | None = None) -> np.ndarray:
    """Vertices (V, 3) float64 of an OBJ or PLY mesh, checked for count and finiteness."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".obj":
        vertices = read_obj(path).vertices
    elif suffix == ".ply":
        vertices = _read_ply_vertices(path)
    else:
        raise FaceganError(f"{path}: not a mesh file (expected .obj or .ply)")
    if len(vertices) == 0:
        raise FaceganError(f"{path}: no vertices (empty or truncated mesh)")
    if n_vertices is not None and len(vertices) != n_vertices:
        raise FaceganError(f"{path}: {len(vertices)} vertices, the template has {n_vertices}")
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices)).any(axis=1).sum())
        raise FaceganError(f"{path}: {bad} vertices have NaN or infinite coordinates")
    return vertices


def _read_ply_vertices(path: Path) -> np.ndarray:
    import trimesh

    if not path.is_file():
        raise FaceganError(f"{path}: file not found")
    try:
        loaded = trimesh.load(path, file_type="ply", process=False, maintain_order=True)
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except Exception as exc:  # trimesh raises many types for broken files
        raise FaceganError(f"{path}: unreadable PLY ({type(exc).__name__}: {exc})") from None
    vertices = getattr(loaded, "vertices", None)
    if vertices is None:
        raise FaceganError(f"{path}: no vertices (empty or truncated mesh)")
    _check_ascii_ply_complete(path)
    return np.asarray(vertices, dtype=np.float64)


def _check_ascii_ply_complete(path: Path) -> None:
    """trimesh checks a binary PLY's length but reads a truncated ASCII one silently: compare its
    data lines (one per element) with the element counts its header declares."""
    head, _, body = path.read_bytes().partition(b"end_header")
    if b"format ascii" not in head:
        return
    declared = sum(int(line.split()[2]) for line in head.splitlines() if line.startswith(b"element "))
    found = sum(1 for line in body.splitlines() if line.strip())
    if found < declared:
        raise FaceganError(f"{path}: truncated PLY ({found} of {declared} element lines)")


def write_mesh(
    path: str | os.PathLike,
    vertices: np.ndarray,
    triangles: np.ndarray,
    uv: np.ndarray | None = None,
    vertex_colors: np.ndarray | None = None,
) -> None:
    """Write a triangle mesh as OBJ (with per-vertex ``vt`` when ``uv`` is given) or PLY, atomically.

    vertices: (V, 3); triangles: (F, 3); uv: (V, 2) or None; vertex_colors: (V, 3) uint8 or None (PLY).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    vertices = np.asarray(vertices, dtype=np.float64)
    triangles = np.asarray(triangles, dtype=np.int64)
    with atomic_path(path) as tmp:
        if suffix == ".obj":
            _write_obj(tmp, vertices, triangles, uv)
        elif suffix == ".ply":
            import trimesh

            mesh = trimesh.Trimesh(vertices, triangles, process=False, vertex_colors=vertex_colors)
            mesh.export(tmp, file_type="ply")
        else:
            raise FaceganError(f"{path}: unknown mesh format (use .obj or .ply)")


def _write_obj(path: Path, vertices: np.ndarray, triangles: np.ndarray, uv: np.ndarray | None) -> None:
    lines = ["# written by facegan"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    f1 = triangles + 1
    if uv is not None:
        lines += [f"vt {u:.8f} {v:.8f}" for u, v in uv]
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f1]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in f1]
    path.write_text("\n".join(lines) + "\n")
