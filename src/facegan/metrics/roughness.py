"""Surface roughness: how far each vertex sits from the average of its neighbours.

At every *interior* vertex i (vertices on a boundary - the face's outline, eye and mouth holes -
are left out, their one-ring is one-sided) the uniform ("umbrella") Laplacian is

    delta_i = (1/|N(i)|) sum_{j in N(i)} x_j - x_i          (mm)

Two measures (mm), averaged over interior vertices, then over meshes:

- ``kind="normal"`` (default): |n_i . delta_i|, the component along the vertex normal n_i. It is
  0 on any planar mesh however irregular its triangulation, grows with curvature as h^2 / (4R)
  for edge length h on a sphere of radius R, and with high-frequency bumps - the geometric noise
  of Fig. 3b of the paper. Tangential jitter (sliding vertices within the surface) is ignored.
- ``kind="uniform"``: ||delta_i||, which also counts tangential irregularity of the vertex layout
  (so a flat but irregular grid is not 0).

Compare generated meshes with real ones of the same template: :func:`roughness` with ``reference``
reports both and their ratio (1 = as smooth as the data).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from facegan.metrics import register
from facegan.metrics.distances import as_meshes

__all__ = ["boundary_vertices", "RoughnessOperator", "roughness"]

KINDS = ("normal", "uniform")


def boundary_vertices(triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """(V,) bool: vertices on an edge used by exactly one triangle (any boundary loop)."""
    tri = np.asarray(triangles, np.int64)
    edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    border = np.zeros(n_vertices, bool)
    border[unique[counts == 1].ravel()] = True
    return border


class RoughnessOperator:
    """Precomputed uniform Laplacian, normal accumulation and interior mask of one topology.

    triangles: (F, 3) int; n_vertices: V. Vertices in no triangle count as boundary.
    """

    def __init__(self, triangles: np.ndarray, n_vertices: int):
        tri = np.asarray(triangles, np.int64)
        self.triangles, self.n_vertices = tri, int(n_vertices)
        i = np.concatenate([tri[:, 0], tri[:, 1], tri[:, 2], tri[:, 1], tri[:, 2], tri[:, 0]])
        j = np.concatenate([tri[:, 1], tri[:, 2], tri[:, 0], tri[:, 0], tri[:, 1], tri[:, 2]])
        adjacency = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n_vertices, n_vertices))
        adjacency.data[:] = 1.0  # an edge shared by two triangles counts once
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        self.mean_of_neighbours = sp.diags(1.0 / np.maximum(degree, 1)) @ adjacency
        faces = np.arange(len(tri)).repeat(3)
        self.vertex_faces = sp.csr_matrix((np.ones(3 * len(tri)), (tri.ravel(), faces)), shape=(n_vertices, len(tri)))
        self.interior = ~boundary_vertices(tri, n_vertices) & (degree > 0)

    def per_vertex(self, meshes: np.ndarray, kind: str = "normal") -> np.ndarray:
        """Roughness (N, I) mm at the I interior vertices of meshes (N, V, 3)."""
        if kind not in KINDS:
            raise ValueError(f"unknown roughness kind {kind!r} (use {' or '.join(KINDS)})")
        x = np.asarray(meshes, np.float64)
        n = len(x)
        flat = x.transpose(1, 0, 2).reshape(self.n_vertices, 3 * n)  # (V, 3N)
        delta = (self.mean_of_neighbours @ flat - flat).reshape(self.n_vertices, n, 3).transpose(1, 0, 2)
        if kind == "uniform":
            values = np.linalg.norm(delta, axis=-1)
        else:
            values = np.abs(np.sum(self.vertex_normals(x) * delta, axis=-1))
        return values[:, self.interior]

    def vertex_normals(self, meshes: np.ndarray) -> np.ndarray:
        """Unit area-weighted vertex normals (N, V, 3) (zero where undefined)."""
        a, b, c = (meshes[:, self.triangles[:, k]] for k in range(3))
        face_normals = np.cross(b - a, c - a)  # (N, F, 3), length = 2 x area
        n = len(meshes)
        summed = self.vertex_faces @ face_normals.transpose(1, 0, 2).reshape(len(self.triangles), 3 * n)
        normals = summed.reshape(self.n_vertices, n, 3).transpose(1, 0, 2)
        length = np.linalg.norm(normals, axis=-1, keepdims=True)
        return np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)


def _triangles(template_or_triangles) -> np.ndarray:
    return np.asarray(getattr(template_or_triangles, "triangles", template_or_triangles), np.int64)


@register("roughness")
def roughness(meshes, template, kind: str = "normal", reference=None, batch: int = 256) -> dict:
    """Mean roughness (mm) of meshes (N, V, 3); see the module doc for ``kind``.

    template: a Template (its triangles are used) or triangles (F, 3); reference: optional real
    meshes (M, V, 3) of the same topology to compare with. Returns mean, std (over meshes, mm),
    per_mesh (N,) mm, and with a reference reference_mean (mm) and ratio = mean / reference_mean.
    """
    meshes = as_meshes(meshes)
    op = RoughnessOperator(_triangles(template), meshes.shape[1])
    if not op.interior.any():
        raise ValueError("the mesh has no interior vertex")
    per_mesh = _per_mesh(op, meshes, kind, batch)
    out = {"mean": float(per_mesh.mean()), "std": float(per_mesh.std()), "per_mesh": per_mesh, "kind": kind}
    if reference is not None:
        ref = _per_mesh(op, as_meshes(reference), kind, batch)
        out["reference_mean"] = float(ref.mean())
        out["ratio"] = out["mean"] / out["reference_mean"] if out["reference_mean"] > 0 else float("inf")
    return out


def _per_mesh(op: RoughnessOperator, meshes: np.ndarray, kind: str, batch: int) -> np.ndarray:
    return np.concatenate([op.per_vertex(meshes[s : s + batch], kind).mean(axis=1) for s in range(0, len(meshes), batch)])
