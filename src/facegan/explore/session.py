"""The model state behind ``facegan explore``: faces drawn, edited and fitted, kept by short ids.

Plain Python, no HTTP (:mod:`facegan.explore.server` maps requests to these calls). Every action
makes a new :class:`Face` from latent codes: G(codes) decoded by the dense Laplacian reconstruction
(Eq. 4), as ``facegan sample`` and ``facegan edit`` do. Faces live in a bounded store (least
recently used dropped first). One lock serializes the model work: torch's thread setting is
process-wide, and a fit (seconds) must not run beside a decode that changed it.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from facegan.device import idle_threads, torch_threads
from facegan.errors import FaceganError
from facegan.fit.editing import NOISE, add_factor, check_codes, replace_factor
from facegan.fit.fitting import FitOptions, fit_meshes
from facegan.fit.outputs import codes_to_json
from facegan.mesh.io import MESH_SUFFIXES, read_mesh_vertices, write_mesh
from facegan.model import FaceModel
from facegan.render import geometry_image_to_rgb
from facegan.sampling import codec_of, images_to_meshes, load

MAX_FACES = 512  # faces kept; each holds ~130 kB (vertices + geometry image) for a 6,706-vertex template
MAX_SEED = 2**63 - 1
TRANSFER_MODES = {"replace": replace_factor, "add": add_factor}
ALL_CODES = "all"  # interpolate every code, noise included
MESH_FORMATS = ("obj", "ply")
_NAME_LENGTH = 80  # longest client file name shown (longer ones keep their start and suffix)


class UnknownFace(FaceganError):
    """A face id the store does not hold (never made, or dropped as least recently used)."""


@dataclass
class Face:
    """One face of the session.

    codes: {factor: (1, size), ..., "noise": (1, noise_size)} float32 CPU tensors; vertices: (V, 3)
    float32 mm, the dense decoding of G(codes); image: (3, R, R) network-form geometry image G(codes);
    errors: (V,) float32 mm, per-vertex distance to the uploaded mesh (fits only, else None);
    fit_error_mm: their mean; ms: milliseconds the session spent making the face.
    """

    id: str
    label: str
    codes: dict[str, torch.Tensor]
    vertices: np.ndarray
    image: torch.Tensor
    errors: np.ndarray | None = None
    fit_error_mm: float | None = None
    ms: float = 0.0


def client_file_name(name: str) -> str:
    """How a client's file name is shown in messages and labels: its last path component, letters,
    digits and ``-_.() `` only (others become ``_``; nothing markup-like reaches the page), at most
    80 characters. The name is never used to open anything."""
    base = re.split(r"[\\/]", name or "")[-1].strip()
    safe = "".join(c if c.isalnum() or c in "-_.() " else "_" for c in base)
    if len(safe) > _NAME_LENGTH:
        suffix = Path(safe).suffix[:10]
        safe = safe[: _NAME_LENGTH - len(suffix)] + suffix
    return safe


class ExploreSession:
    """A trained model, its codec and the faces made so far; thread-safe.

    Creating a session builds everything a first request would otherwise pay for (the codec's
    pixel map and the factored Laplacian system of the dense reconstruction, 3-5 s for the shipped
    model, and one decode), so every action then costs only the generator and one solve.
    fit_options: options of the upload fits (default: FitOptions(), ~2 s for one face on 2 cores).
    """

    def __init__(self, model: FaceModel, max_faces: int = MAX_FACES, fit_options: FitOptions | None = None):
        if max_faces < 1:
            raise FaceganError(f"explore: max_faces={max_faces}, need at least 1")
        self.model = model
        self.codec = codec_of(model)
        self.max_faces = max_faces
        self.fit_options = (fit_options or FitOptions()).validate()
        self._faces: OrderedDict[str, Face] = OrderedDict()
        self._made = 0
        self._lock = threading.Lock()
        self._seeds = random.Random()  # seeds of random faces the client gave none for
        self._warm_up()

    @classmethod
    def open(cls, run: str | os.PathLike | None = None, **kwargs) -> "ExploreSession":
        """A session on a run folder or model file, or on the shipped model when ``run`` is None."""
        return cls(load(run), **kwargs)

    def _warm_up(self) -> None:
        with self._compute():
            images, _ = self.model.sample(1, seed=0)
            self._decode(images.cpu())
        geometry_image_to_rgb(images[:1].cpu(), self.codec.mask)

    def _decode(self, images: torch.Tensor) -> np.ndarray:
        """(V, 3) float32 mm: the dense (Eq. 4) decoding of one network-form image (1, 3, R, R)."""
        return images_to_meshes(self.codec, images, "dense")[0].numpy()

    # ------------------------------------------------------------------------------ the model

    def describe(self) -> dict:
        """What a client needs to draw faces: factors, code sizes, the template's triangles (F, 3) int64,
        the geometry-image resolution and the model file."""
        template = self.codec.template
        return {
            "factors": list(self.model.factors), "code_sizes": list(self.model.code_sizes),
            "noise_size": self.model.noise_size, "n_vertices": template.n_vertices,
            "n_triangles": len(template.triangles), "triangles": template.triangles,
            "resolution": self.codec.resolution, "source": self.model.source,
        }

    # ------------------------------------------------------------------------------ actions

    def random(self, seed: int | None = None) -> Face:
        """A face with every code drawn from the prior N(0, I) (``facegan sample --n 1 --seed S``'s face)."""
        seed = self._seeds.randrange(2**31) if seed is None else _check_seed(seed)
        with self._compute() as started:
            images, codes = self.model.sample(1, seed=seed)
            return self._add(codes, f"random {seed}", started, images)

    def redraw(self, face_id: str, keep: str, seed: int | None = None) -> Face:
        """Face ``face_id`` with ``keep``'s code kept and every other code (noise included) drawn anew
        (Figures 7 and 8: same identity, new expression, or the reverse)."""
        self._check_factor(keep, "keep")
        seed = self._seeds.randrange(2**31) if seed is None else _check_seed(seed)
        face = self.face(face_id)
        with self._compute() as started:
            fresh = self.model.sample(1, seed=seed)[1]
            codes = replace_factor(fresh, face.codes, keep)
            others = ", ".join(f for f in self.model.factors if f != keep)
            return self._add(codes, f"{face.id} {keep} + new {others}", started)

    def transfer(self, target_id: str, source_id: str, mode: str = "replace", factor: str = "expression") -> Face:
        """The target with the source's ``factor`` code (mode "replace") or with the sum of both
        ("add"): :func:`facegan.fit.editing.replace_factor` / ``add_factor`` (Figure 9)."""
        if mode not in TRANSFER_MODES:
            raise FaceganError(f"transfer: unknown mode {mode!r} (use {' or '.join(TRANSFER_MODES)})")
        self._check_factor(factor, "factor")
        target, source = self.face(target_id), self.face(source_id)
        with self._compute() as started:
            codes = TRANSFER_MODES[mode](target.codes, source.codes, factor)
            joiner = "with" if mode == "replace" else "+"
            return self._add(codes, f"{target.id} {joiner} {factor} of {source.id}", started)

    def interpolate(self, a_id: str, b_id: str, factor: str, t: float) -> Face:
        """(1 - t) a + t b in ``factor``'s code (or in every code for "all"), the other codes from a;
        t in [0, 1] (Figure 10). t = 0 gives a's codes, t = 1 b's in the chosen code(s), exactly."""
        names = [*self.model.factors, NOISE] if factor == ALL_CODES else [self._check_factor(factor, "factor")]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise FaceganError(f"interpolate: t={t!r}, need a number in [0, 1]")
        a, b = self.face(a_id), self.face(b_id)
        with self._compute() as started:
            # (1 - t) a + t b, not a + t (b - a): exact at both ends (as editing.interpolate)
            codes = {k: (1 - t) * v + t * b.codes[k] if k in names else v.clone() for k, v in a.codes.items()}
            return self._add(codes, f"{a.id}→{b.id} {factor} t={t:.2f}", started)

    def upload(self, data: bytes, name: str) -> Face:
        """Fit a registered mesh sent as file bytes (OBJ/PLY in the template's topology, chosen by the
        extension of ``name``, the client's file name) with :func:`fit_meshes`.

        The bytes go to a temporary file this session names (only the suffix comes from the client,
        from an allowlist) and are read by the command line's reader, so they are checked the same
        way (vertex count, NaN, truncation); messages name the client's file, not the temporary one.
        The face's errors are the per-vertex distances of its (dense) vertices to the upload.
        """
        shown = client_file_name(name)
        if not shown:
            raise FaceganError("upload: no file name given (POST /api/upload?name=scan.obj)")
        suffix = Path(shown).suffix.lower()
        if suffix not in MESH_SUFFIXES:
            raise FaceganError(f"{shown}: not a mesh file (upload {' or '.join(MESH_SUFFIXES)} "
                               f"in the model's template topology)")
        target = self._read_upload(data, suffix, shown)
        with self._compute() as started:
            fit = fit_meshes(self.model, target[None], options=self.fit_options)
            face = self._add(fit.codes, f"fit of {shown}", started)
            face.errors = np.linalg.norm(face.vertices - target, axis=1).astype(np.float32)
            face.fit_error_mm = float(face.errors.mean())
            face.ms = (time.perf_counter() - started) * 1000
            return face

    def _read_upload(self, data: bytes, suffix: str, shown: str) -> np.ndarray:
        """Vertices (V, 3) float32 of uploaded file bytes; FaceganError naming ``shown``."""
        fd, tmp = tempfile.mkstemp(prefix="facegan-upload-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return read_mesh_vertices(tmp, self.codec.template.n_vertices).astype(np.float32)
        except FaceganError as exc:
            raise FaceganError(str(exc).replace(tmp, shown)) from None
        except Exception as exc:  # any parser failure on client bytes is a bad file, not a server error
            raise FaceganError(f"{shown}: unreadable mesh ({type(exc).__name__})") from None
        finally:
            os.unlink(tmp)

    # ------------------------------------------------------------------------------ exports

    def face(self, face_id: str) -> Face:
        """The stored face ``face_id`` (marked as recently used); UnknownFace if there is none."""
        with self._lock:
            face = self._faces.get(face_id) if isinstance(face_id, str) else None
            if face is None:
                raise UnknownFace(f"unknown face {str(face_id)[:40]}")
            self._faces.move_to_end(face_id)
            return face

    def mesh_file(self, face_id: str, fmt: str) -> bytes:
        """The face as an OBJ (with the template's UVs) or PLY file, as written by ``facegan sample``."""
        if fmt not in MESH_FORMATS:
            raise FaceganError(f"unknown mesh format {fmt!r} (use {' or '.join(MESH_FORMATS)})")
        face, template = self.face(face_id), self.codec.template
        with tempfile.TemporaryDirectory(prefix="facegan-explore-") as folder:
            path = Path(folder) / f"{face.id}.{fmt}"
            write_mesh(path, face.vertices, template.triangles, uv=template.uv if fmt == "obj" else None)
            return path.read_bytes()

    def codes_json(self, face_id: str) -> dict:
        """The face's codes as a ``codes.json`` that ``facegan edit`` and ``load_codes`` read: one row per
        code ({factor: [[...]], "noise": [[...]]}) plus its name, label, factors and model."""
        face = self.face(face_id)
        return {"factors": list(self.model.factors), **codes_to_json(face.codes), "names": [face.id],
                "label": face.label, "model": self.model.source}

    def image_png(self, face_id: str) -> bytes:
        """The face's geometry image as an RGB PNG (R x R), each channel stretched over the chart."""
        from PIL import Image

        rgb = geometry_image_to_rgb(self.face(face_id).image[None], self.codec.mask)[0]
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        return buffer.getvalue()

    def __len__(self) -> int:
        return len(self._faces)

    # ------------------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _compute(self) -> Iterator[float]:
        """Hold the model lock with torch set to the idle cores (2 threads on a busy 2-core machine
        are slower than 1, docs/fitting.md); yields the start time."""
        with self._lock, torch_threads(idle_threads()):
            yield time.perf_counter()

    def _check_factor(self, factor: str, what: str) -> str:
        if factor not in self.model.factors:
            raise FaceganError(f"{what}: unknown factor {factor!r} (the model has {', '.join(self.model.factors)})")
        return factor

    def _add(self, codes: Mapping[str, torch.Tensor], label: str, started: float,
             images: torch.Tensor | None = None) -> Face:
        """Store a new face of ``codes`` (one row each; ``images`` (1, 3, R, R) = G(codes) when already
        generated). Called with the lock held."""
        codes = {k: v.detach().cpu() for k, v in check_codes(codes, self.model).items()}
        with torch.no_grad():
            if images is None:
                images = self.model.generate([codes[f] for f in self.model.factors], codes[NOISE])
            images = images.float().cpu()
            vertices = self._decode(images)
        self._made += 1
        face = Face(f"f{self._made}", label, codes, vertices, images[0], ms=(time.perf_counter() - started) * 1000)
        self._faces[face.id] = face
        while len(self._faces) > self.max_faces:
            self._faces.popitem(last=False)
        return face


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise FaceganError(f"seed {seed!r}: need an integer in [0, 2^63 - 1]")
    return seed
