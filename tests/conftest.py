"""Shared fixtures: small disk meshes with UV charts, and writers for the files facegan reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facegan.mesh.template import Template


def grid_plane(n: int = 9, size: float = 10.0):
    """A flat n x n grid on [0, size]^2 (z = 0), two triangles per cell, UV = xy / size.

    Returns vertices (n*n, 3), triangles (F, 3) counter-clockwise in xy, uv (n*n, 2).
    """
    t = np.linspace(0.0, 1.0, n)
    u, v = np.meshgrid(t, t)
    uv = np.stack([u.ravel(), v.ravel()], axis=1)
    vertices = np.concatenate([uv * size, np.zeros((n * n, 1))], axis=1)
    idx = np.arange(n * n).reshape(n, n)  # idx[row = v, col = u]
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(), idx[1:, :-1].ravel()
    triangles = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return vertices, triangles, uv


def sphere_cap(rings: int = 6, segments: int = 16, radius: float = 50.0, angle: float = 1.0):
    """The cap of a sphere of ``radius`` around +z, up to polar ``angle`` (radians).

    A centre vertex and ``rings`` rings of ``segments`` vertices; UV = the orthographic projection
    onto xy, rescaled into [0, 1]^2. Returns vertices, triangles (counter-clockwise in UV), uv.
    """
    theta = np.repeat(np.arange(1, rings + 1) * angle / rings, segments)
    phi = np.tile(np.arange(segments) * 2 * np.pi / segments, rings)
    dirs = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=1)
    vertices = radius * np.concatenate([[[0.0, 0.0, 1.0]], dirs])
    ring = lambda r, s: 1 + r * segments + s % segments  # noqa: E731
    tris = [[0, ring(0, s), ring(0, s + 1)] for s in range(segments)]
    for r in range(rings - 1):
        for s in range(segments):
            tris += [[ring(r, s), ring(r + 1, s), ring(r + 1, s + 1)], [ring(r, s), ring(r + 1, s + 1), ring(r, s + 1)]]
    xy = vertices[:, :2]
    uv = (xy - xy.min(axis=0)) / np.ptp(xy, axis=0).max()
    return vertices, np.array(tris, dtype=np.int64), uv


def write_obj(path: Path, vertices, faces, uv=None, face_uv=None) -> Path:
    """Write an OBJ: faces are lists of 0-based vertex indices (triangles or quads); with ``uv``,
    ``vt`` lines are written and corners refer to ``face_uv`` (default: the same indices as faces)."""
    lines = [f"v {x:.17g} {y:.17g} {z:.17g}" for x, y, z in np.asarray(vertices, dtype=float)]
    if uv is not None:
        lines += [f"vt {u:.17g} {v:.17g}" for u, v in np.asarray(uv, dtype=float)]
        face_uv = faces if face_uv is None else face_uv
        lines += ["f " + " ".join(f"{a + 1}/{t + 1}" for a, t in zip(f, ft)) for f, ft in zip(faces, face_uv)]
    else:
        lines += ["f " + " ".join(str(a + 1) for a in f) for f in faces]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ply(path: Path, vertices, triangles, binary: bool = False) -> Path:
    """Write an ASCII (or binary little-endian) PLY with float32 vertices and int triangles."""
    vertices = np.asarray(vertices, dtype="<f4")
    triangles = np.asarray(triangles, dtype="<i4")
    header = (
        f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\nelement vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        f"element face {len(triangles)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    if binary:
        faces = np.zeros(len(triangles), dtype=[("n", "u1"), ("i", "<i4", 3)])
        faces["n"], faces["i"] = 3, triangles
        path.write_bytes(header.encode() + vertices.tobytes() + faces.tobytes())
    else:
        body = [" ".join(f"{c:.9g}" for c in v) for v in vertices] + [f"3 {a} {b} {c}" for a, b, c in triangles]
        path.write_text(header + "\n".join(body) + "\n")
    return path


@pytest.fixture
def cap():
    return sphere_cap()


@pytest.fixture
def cap_template() -> Template:
    v, f, uv = sphere_cap()
    return Template(v, f, uv).validate()


@pytest.fixture
def cap_obj(tmp_path) -> Path:
    """A template OBJ of the sphere cap with one ``vt`` per vertex."""
    v, f, uv = sphere_cap()
    return write_obj(tmp_path / "template.obj", v, f, uv)


ICT_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ict-face-model"
needs_ict = pytest.mark.skipif(
    not (ICT_DIR / "shapes.npz").exists(), reason=f"ICT face model data not found at {ICT_DIR.resolve()}"
)


@pytest.fixture(scope="session")
def ict():
    """The ICT face model from ../shared, loaded once (skips when the data is absent)."""
    from facegan.data.ict import load_ict

    if not (ICT_DIR / "shapes.npz").exists():
        pytest.skip(f"ICT face model data not found at {ICT_DIR.resolve()}")
    return load_ict(ICT_DIR)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine OpenMP barriers stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
