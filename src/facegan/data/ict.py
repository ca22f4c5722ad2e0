"""The ICT Face Model (ICT-FaceKit "Light"): a linear identity + blendshape-expression face model.

Two on-disk forms are accepted by :func:`load_ict`:

- the *compact copy* (a folder with ``shapes.npz``, ``generic_neutral_mesh.obj`` and
  ``vertex_indices.json``, as in ``shared/data/ict-face-model``), and
- a *clone of the ICT-FaceKit repository* (``FaceXModel/generic_neutral_mesh.obj``,
  ``FaceXModel/identity000.obj`` .. ``identity099.obj``, the 53 expression OBJs named in
  ``FaceXModel/vertex_indices.json``). A clone is converted once into the compact form and cached.

Units are those of the model files (centimetres) unless a name says ``_mm``. A face is
``neutral + sum_i a_i identity_modes[i] + sum_j b_j expression_modes[j]`` with a_i ~ N(0, 1)
and b_j in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facegan.errors import FaceganError
from facegan.fileio import atomic_path, read_json
from facegan.mesh.template import Template, load_template

#: Vertices 0..6705 form the narrow face area (polygons 0..6559), see the data README.
NARROW_VERTICES = 6706
#: ICT units are centimetres; facegan works in millimetres.
CM_TO_MM = 10.0
N_IDENTITY_MODES = 100

_COMPACT_FILES = ("shapes.npz", "generic_neutral_mesh.obj", "vertex_indices.json")
_NEUTRAL_OBJ = "generic_neutral_mesh.obj"
_INDICES_JSON = "vertex_indices.json"
_LEGAL_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "CREDITS.md")


@dataclass(frozen=True)
class NarrowICT:
    """The model restricted to the narrow face area, in millimetres (float32).

    neutral: (6706, 3); identity_modes: (100, 6706, 3); expression_modes: (53, 6706, 3).
    """

    neutral: np.ndarray
    identity_modes: np.ndarray
    expression_modes: np.ndarray

    def identity_neutral(self, coeffs: np.ndarray) -> np.ndarray:
        """Neutral faces (..., 6706, 3) mm for identity coefficients (..., 100)."""
        return self.neutral + np.tensordot(np.asarray(coeffs, np.float32), self.identity_modes, axes=1)

    def expression_offsets(self, weights: np.ndarray) -> np.ndarray:
        """Blendshape displacements (..., 6706, 3) mm for expression weights (..., 53)."""
        return np.tensordot(np.asarray(weights, np.float32), self.expression_modes, axes=1)


@dataclass(eq=False)
class ICTModel:
    """The full ICT face model as loaded (all 26719 vertices, centimetres, float32).

    neutral: (V, 3); identity_modes: (100, V, 3); expression_modes: (53, V, 3) (displacements
    from ``neutral``); expression_names: 53 ARKit-style names in mode order; landmarks: (68,)
    int64 vertex indices (Multi-PIE order); obj_path: the neutral OBJ (its faces and UVs define
    the topology); source: the compact copy or the ICT-FaceKit clone's root folder (where its LICENSE
and CREDITS.md are).
    """

    neutral: np.ndarray
    identity_modes: np.ndarray
    expression_modes: np.ndarray
    expression_names: list[str]
    landmarks: np.ndarray
    obj_path: Path
    source: Path
    _template: Template | None = field(default=None, init=False, repr=False)
    _narrow: NarrowICT | None = field(default=None, init=False, repr=False)

    @property
    def n_vertices(self) -> int:
        return len(self.neutral)

    def expression_index(self, name: str) -> int:
        """Position of expression shape ``name`` in ``expression_modes``."""
        try:
            return self.expression_names.index(name)
        except ValueError:
            raise FaceganError(f"{self.source}: the ICT model has no expression shape {name!r}") from None

    def narrow_template(self) -> Template:
        """Template of the narrow face area: 6706 vertices in millimetres, 13120 triangles, UVs,
        and the landmarks that fall inside the area. Loaded once, then cached on the model."""
        if self._template is None:
            base = load_template(self.obj_path, keep_vertices=NARROW_VERTICES)
            lm = self.landmarks[self.landmarks < NARROW_VERTICES]
            # The OBJ holds the generic neutral in cm; the template is the same shape in mm.
            self._template = Template(base.vertices * CM_TO_MM, base.triangles, base.uv, lm.astype(np.int64))
        return self._template

    def narrow(self) -> NarrowICT:
        """Neutral and modes restricted to vertices 0..6705, converted to mm (cached)."""
        if self._narrow is None:
            n = NARROW_VERTICES
            self._narrow = NarrowICT(
                neutral=np.ascontiguousarray(self.neutral[:n] * CM_TO_MM, dtype=np.float32),
                identity_modes=np.ascontiguousarray(self.identity_modes[:, :n] * CM_TO_MM, dtype=np.float32),
                expression_modes=np.ascontiguousarray(self.expression_modes[:, :n] * CM_TO_MM, dtype=np.float32),
            )
        return self._narrow


def _repo_root() -> Path:
    # src/facegan/data/ict.py -> repository root three levels above the package folder.
    return Path(__file__).resolve().parents[3]


def default_ict_path() -> Path | None:
    """``$FACEGAN_ICT`` if set, else the first existing ``shared/data/ict-face-model`` beside the
    current directory or beside the repository; None if none exists."""
    env = os.environ.get("FACEGAN_ICT")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd() / "..", _repo_root() / ".."):
        candidate = (base / "shared" / "data" / "ict-face-model").resolve()
        if candidate.is_dir():
            return candidate
    return None


def load_ict(path: str | os.PathLike | None = None) -> ICTModel:
    """Load the ICT face model from a compact copy or an ICT-FaceKit clone (see module doc).

    ``path`` None means :func:`default_ict_path`. A clone (or its ``FaceXModel`` folder) is
    converted on first use into ``$FACEGAN_CACHE`` (default ``~/.cache/facegan``) under
    ``ict-<hash>``, the hash covering the clone's absolute path and its files' mtimes.
    Raises :class:`FaceganError` naming the folder or the missing file.
    """
    if path is None:
        path = default_ict_path()
        if path is None:
            raise FaceganError(
                "ICT face model not found: set FACEGAN_ICT to the ict-face-model folder "
                "or to a clone of the ICT-FaceKit repository"
            )
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FaceganError(f"{path}: ICT face model folder not found")
    if (path / "shapes.npz").exists():
        return _load_compact(path, source=path)
    facex = _facex_dir(path)
    if facex is not None:
        # Given the FaceXModel folder itself, the clone is its parent (where LICENSE lives).
        return _load_compact(_convert_clone(facex.parent, facex), source=facex.parent)
    raise FaceganError(
        f"{path}: not an ICT face model folder (expected shapes.npz, generic_neutral_mesh.obj and "
        "vertex_indices.json, or an ICT-FaceKit clone with FaceXModel/generic_neutral_mesh.obj)"
    )


def _facex_dir(path: Path) -> Path | None:
    if (path / "FaceXModel" / _NEUTRAL_OBJ).exists():
        return path / "FaceXModel"
    if path.name == "FaceXModel" and (path / _NEUTRAL_OBJ).exists():
        return path
    return None


def _load_compact(folder: Path, source: Path) -> ICTModel:
    for name in _COMPACT_FILES:
        if not (folder / name).exists():
            raise FaceganError(f"{folder / name}: file not found (incomplete ICT face model folder)")
    indices = _read_indices(folder / _INDICES_JSON)
    obj_path = folder / _NEUTRAL_OBJ
    neutral = read_obj_vertices(obj_path)
    npz_path = folder / "shapes.npz"
    try:
        with np.load(npz_path) as data:
            identity = np.asarray(data["identity_modes"], dtype=np.float32)
            expression = np.asarray(data["expression_modes"], dtype=np.float32)
            names = [str(n) for n in data["expression_names"]]
    except KeyError as exc:
        raise FaceganError(f"{npz_path}: missing array {exc}") from None
    except (OSError, ValueError) as exc:
        raise FaceganError(f"{npz_path}: unreadable ({exc})") from None
    n_v = len(neutral)
    if identity.ndim != 3 or identity.shape[1:] != (n_v, 3) or expression.shape[1:] != (n_v, 3):
        raise FaceganError(
            f"{npz_path}: modes of shape {identity.shape} and {expression.shape} do not match the "
            f"{n_v} vertices of {obj_path.name}"
        )
    if len(names) != len(expression):
        raise FaceganError(f"{npz_path}: {len(names)} expression names for {len(expression)} expression modes")
    if indices["expressions"] and names != list(indices["expressions"]):
        raise FaceganError(f"{npz_path}: expression names differ from the order in {_INDICES_JSON}")
    landmarks = np.asarray(indices["idx_to_landmark_verts"], dtype=np.int64)
    if len(landmarks) and (landmarks.min() < 0 or landmarks.max() >= n_v):
        raise FaceganError(f"{folder / _INDICES_JSON}: landmark vertex index out of range")
    return ICTModel(neutral.astype(np.float32), identity, expression, names, landmarks, obj_path, source)


def _read_indices(path: Path) -> dict:
    if not path.exists():
        raise FaceganError(f"{path}: file not found (incomplete ICT face model folder)")
    data = read_json(path)
    for key in ("expressions", "idx_to_landmark_verts"):
        if key not in data:
            raise FaceganError(f"{path}: no {key!r} entry")
    return data


def read_obj_vertices(path: Path) -> np.ndarray:
    """Vertices (V, 3) float64 of an OBJ, reading only ``v`` lines (fast: one numpy parse)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FaceganError(f"{path}: file not found") from None
    except OSError as exc:
        raise FaceganError(f"{path}: unreadable ({exc})") from None
    lines = [line for line in raw.split(b"\n") if line.startswith(b"v ")]
    if not lines:
        raise FaceganError(f"{path}: no vertices (empty or truncated OBJ)")
    try:
        # usecols skips optional per-vertex colours after x y z.
        verts = np.loadtxt(io.BytesIO(b"\n".join(lines)), usecols=(1, 2, 3), dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise FaceganError(f"{path}: malformed vertex line ({exc})") from None
    if not np.isfinite(verts).all():
        raise FaceganError(f"{path}: vertices with NaN or infinite coordinates")
    return verts


# --- ICT-FaceKit clone -> compact copy ---------------------------------------------------------


def _clone_files(facex: Path) -> tuple[list[Path], list[Path], list[str]]:
    """(identity OBJs, expression OBJs, expression names) expected in a FaceXModel folder."""
    names = list(_read_indices(facex / _INDICES_JSON)["expressions"])
    identities = [facex / f"identity{i:03d}.obj" for i in range(N_IDENTITY_MODES)]
    expressions = [facex / f"{name}.obj" for name in names]
    return identities, expressions, names


def cache_root() -> Path:
    """``$FACEGAN_CACHE`` or ``~/.cache/facegan``."""
    env = os.environ.get("FACEGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "facegan"


def clone_cache_dir(clone: Path, files: list[Path]) -> Path:
    """Cache folder for a clone: a short hash of its absolute path and its files' mtimes, so an
    edited or moved clone is converted again."""
    h = hashlib.sha1(str(clone.resolve()).encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_mtime_ns}".encode())
    return cache_root() / f"ict-{h.hexdigest()[:12]}"


def _convert_clone(clone: Path, facex: Path) -> Path:
    """Convert an ICT-FaceKit clone into a compact copy in the cache (once); return its folder."""
    if not (facex / _INDICES_JSON).exists():
        raise FaceganError(f"{facex / _INDICES_JSON}: file not found (incomplete ICT-FaceKit folder)")
    identities, expressions, names = _clone_files(facex)
    needed = [facex / _NEUTRAL_OBJ, facex / _INDICES_JSON, *identities, *expressions]
    missing = [f for f in needed if not f.exists()]
    if missing:
        raise FaceganError(
            f"{missing[0]}: file not found (ICT-FaceKit folder incomplete: {len(missing)} of "
            f"{len(needed)} model files missing)"
        )
    cache = clone_cache_dir(clone, needed)
    if all((cache / name).exists() for name in _COMPACT_FILES):
        return cache
    neutral = read_obj_vertices(facex / _NEUTRAL_OBJ)
    identity_modes = _displacements(identities, neutral)
    expression_modes = _displacements(expressions, neutral)
    with atomic_path(cache) as tmp:
        tmp.mkdir()
        # Uncompressed: ~50 MB, but loads several times faster than savez_compressed.
        np.savez(
            tmp / "shapes.npz",
            identity_modes=identity_modes,
            expression_modes=expression_modes,
            identity_names=np.array([p.stem for p in identities]),
            expression_names=np.array(names),
        )
        shutil.copyfile(facex / _NEUTRAL_OBJ, tmp / _NEUTRAL_OBJ)
        shutil.copyfile(facex / _INDICES_JSON, tmp / _INDICES_JSON)
        # The MIT license must travel with any copy of the model.
        for folder in (clone, facex):
            for name in _LEGAL_FILES:
                if (folder / name).is_file() and not (tmp / name).exists():
                    shutil.copyfile(folder / name, tmp / name)
        (tmp / "SOURCE.txt").write_text(f"Converted by facegan from the ICT-FaceKit clone at {clone.resolve()}\n")
    return cache


def _displacements(paths: list[Path], neutral: np.ndarray) -> np.ndarray:
    """(len(paths), V, 3) float32: each OBJ's vertices minus the neutral's."""
    out = np.empty((len(paths),) + neutral.shape, dtype=np.float32)
    for k, p in enumerate(paths):
        verts = read_obj_vertices(p)
        if verts.shape != neutral.shape:
            raise FaceganError(f"{p}: {len(verts)} vertices, {_NEUTRAL_OBJ} has {len(neutral)}")
        out[k] = verts - neutral
    return out
