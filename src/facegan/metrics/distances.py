"""Mean vertex distance between registered meshes, and an exact nearest-mesh search.

Every mesh is an array (V, 3) in mm in one shared topology, so two meshes compare vertex by
vertex. The *mean vertex distance* (the paper's distance, Sec. 5.3) is

    d(a, b) = (1 / V) * sum_i ||a_i - b_i||          (mm)

Brute force costs V per pair: 1000 samples x 30,000 training meshes of 6706 vertices is 2e11
vertex distances. :class:`NearestMeshIndex` finds the exact minimum over the database with a small
fraction of that work (at that size about 3 exact distances per sample, ~200x faster than brute
force; see benchmarks/bench_metrics.py), by pruning with lower bounds that are *proven*:

1. **Block-centroid (Jensen) bound.** Split the vertices into blocks B_p (a kd-tree of the mean
   shape, so blocks are small surface patches). For any block, by convexity of the norm
   (Jensen / triangle inequality), ``sum_{i in B} ||a_i - b_i|| >= |B| * ||c_B(a) - c_B(b)||``
   with ``c_B`` the block centroid. Summing over blocks:
   ``d(a, b) >= (1/V) sum_p |B_p| ||c_p(a) - c_p(b)||``. It is tight when the difference field
   is nearly constant on each block (smooth shape differences), and it costs P instead of V per
   pair. The kd-tree gives nested levels (16, 128, 1024 blocks by default): the coarsest level
   is computed for every pair, finer ones only for the pairs still in the running.
2. **Direction (linear) bound**, for queries the block bound does not separate (e.g. noisy
   samples, where within-block variation dominates): for any unit vectors u_i,
   ``||a_i - b_i|| >= (a_i - b_i) . u_i`` (Cauchy-Schwarz), so
   ``d(a, b) >= (1/V) [sum_i a_i.u_i - sum_i b_i.u_i]``, which is linear in b: one matrix
   product against the whole database. u_i points from the best mesh found so far to the query,
   so the bound is tight for meshes near that one.

A candidate is discarded only when a lower bound, less a rigorous allowance for floating-point
rounding, exceeds the best exact distance found so far; every other candidate is evaluated
exactly, lowest bound first. Hence the result equals brute force (same minimum; ties go to the
lowest database index, like ``argmin``). The simple Frobenius bound
``||a - b||_F / V <= d(a, b) <= ||a - b||_F / sqrt(V)`` is also valid but useless for pruning:
its two sides differ by sqrt(V) = 82 for the ICT face.

"Exact" distances are computed by :func:`mean_vertex_distance`: per-vertex norms in float32 (a
relative error of a few 1e-7) summed in float64; brute force uses the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "as_meshes",
    "mean_vertex_distance",
    "paired_mean_vertex_distance",
    "pairwise_mean_vertex_distance",
    "brute_force_nearest",
    "VertexBlocks",
    "NearestMeshIndex",
    "NearestMeshes",
    "nearest_meshes",
]

_U32 = 2.0**-24  # unit roundoff of float32
# Pairs per exact-distance batch: (K, V, 3) float32 temporaries of ~20 MB for the ICT face.
_EXACT_PAIRS = 256
# Block-bound temporaries: at most this many floats (pairs x blocks x 3) at once.
_BOUND_FLOATS = 1 << 23
# One row's direction bound (a pass over the database in a matrix product) costs about as much as
# this fraction of the database's size in exact distances: worth it when more candidates remain.
_DIRECTION_BOUND_COST = 1 / 400


def as_meshes(x) -> np.ndarray:
    """A mesh batch as a float32 numpy array (N, V, 3) without copying when it already is one
    (memory maps stay memory maps). Accepts numpy arrays, memmaps and torch tensors."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected meshes of shape (N, V, 3), got {x.shape}")
    return x


def _torch(x: np.ndarray) -> Tensor:
    """A float32 tensor view of (part of) a numpy array; read-only memmaps are copied."""
    if not x.flags.writeable:
        x = np.array(x)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def mean_vertex_distance(a, b) -> np.ndarray:
    """Mean vertex distance (mm) between meshes a (..., V, 3) and b (..., V, 3), broadcast -> (...).

    Per-vertex Euclidean norms in float32, their mean accumulated in float64.
    """
    a = a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a, np.float32))
    b = b if isinstance(b, Tensor) else torch.as_tensor(np.asarray(b, np.float32))
    return _mvd(a.float(), b.float()).numpy()


def _mvd(a: Tensor, b: Tensor) -> Tensor:
    """Mean vertex distance of float32 tensors (..., V, 3) -> float64 (...)."""
    per_vertex = torch.linalg.vector_norm(a - b, dim=-1)
    return per_vertex.sum(-1, dtype=torch.float64) / a.shape[-2]


def paired_mean_vertex_distance(x, y, rows=None, cols=None, batch: int = _EXACT_PAIRS) -> np.ndarray:
    """Mean vertex distance of listed pairs: d(x[rows[k]], y[cols[k]]) -> (K,) float64 mm.

    x: (n, V, 3), y: (m, V, 3) (arrays or memmaps; only the rows used are read); rows, cols:
    (K,) int indices (default: x and y aligned, pairs (k, k)).
    """
    x, y = as_meshes(x), as_meshes(y)
    if rows is None:
        if len(x) != len(y):
            raise ValueError(f"aligned pairs need equal counts, got {len(x)} and {len(y)}")
        rows = cols = np.arange(len(x))
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), batch):
        r, c = rows[s : s + batch], cols[s : s + batch]
        out[s : s + batch] = _mvd(_torch(x[r]), _torch(y[c])).numpy()
    return out


def pairwise_mean_vertex_distance(x, y=None, batch: int = _EXACT_PAIRS, progress: bool = False) -> np.ndarray:
    """All mean vertex distances between x (n, V, 3) and y (m, V, 3) (default y = x): (n, m) float64 mm.

    Brute force, n * m * V work: for small sets and as the reference the fast search is tested against.
    """
    x = as_meshes(x)
    y = x if y is None else as_meshes(y)
    out = np.empty((len(x), len(y)), np.float64)
    per_row = max(1, batch // max(1, len(y)))
    for s in tqdm(range(0, len(x), per_row), desc="pairwise distances", disable=not progress, leave=False):
        xr = _torch(x[s : s + per_row])
        for t in range(0, len(y), batch):
            yc = _torch(y[t : t + batch])
            out[s : s + per_row, t : t + batch] = _mvd(xr[:, None], yc[None]).numpy()
    return out


def brute_force_nearest(queries, database, exclude=None, rows_per_pass: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Reference nearest mesh by brute force (n * M exact distances): (distance (n,) float64 mm, index (n,) int64).

    exclude: optional (n,) database index to skip per query (-1 = none). Ties go to the lowest
    index. Returns (inf, -1) for a query with no admissible mesh.
    """
    queries, database = as_meshes(queries), as_meshes(database)
    dist = np.full(len(queries), np.inf)
    index = np.full(len(queries), -1, np.int64)
    for s in range(0, len(queries), rows_per_pass):
        d = pairwise_mean_vertex_distance(queries[s : s + rows_per_pass], database)
        if exclude is not None:
            for r, e in enumerate(exclude[s : s + rows_per_pass]):
                if e >= 0:
                    d[r, e] = np.inf
        if d.shape[1]:
            k = np.argmin(d, axis=1)  # first minimum: the lowest index among ties
            found = np.isfinite(d[np.arange(len(d)), k])
            dist[s : s + len(d)] = np.where(found, d[np.arange(len(d)), k], np.inf)
            index[s : s + len(d)] = np.where(found, k, -1)
    return dist, index


# --------------------------------------------------------------------------- vertex blocks


@dataclass(frozen=True)
class VertexBlocks:
    """Nested partitions of the V vertices into spatially compact blocks (a balanced kd-tree).

    leaf: (V,) int64 leaf block of each vertex at the finest depth; leaves 2k and 2k+1 are
    siblings, so the block at depth d is ``leaf >> (depth - d)`` (2^d blocks).
    """

    leaf: np.ndarray
    depth: int

    @classmethod
    def from_points(cls, points: np.ndarray, depth: int = 10) -> "VertexBlocks":
        """Median-split points (V, 3) along their widest axis, ``depth`` times (at most log2 V)."""
        points = np.asarray(points, np.float64)
        depth = max(0, min(int(depth), int(math.floor(math.log2(max(len(points), 1))))))
        groups = [np.arange(len(points))]
        for _ in range(depth):
            split = []
            for idx in groups:
                p = points[idx]
                axis = int(np.argmax(p.max(0) - p.min(0)))
                order = idx[np.argsort(p[:, axis], kind="stable")]
                split += [order[: len(order) // 2], order[len(order) // 2 :]]
            groups = split
        leaf = np.empty(len(points), np.int64)
        for k, idx in enumerate(groups):
            leaf[idx] = k
        return cls(leaf, depth)

    def labels(self, depth: int) -> np.ndarray:
        """(V,) block index of each vertex with 2^depth blocks."""
        return self.leaf >> (self.depth - depth)

    def sizes(self, depth: int) -> np.ndarray:
        """(2^depth,) vertices per block."""
        return np.bincount(self.labels(depth), minlength=1 << depth)

    def block_sums(self, meshes, depth: int, batch: int = 512) -> np.ndarray:
        """Per-block coordinate sums (N, 2^depth, 3) float64 of meshes (N, V, 3)."""
        meshes = as_meshes(meshes)
        n_vertices, n_blocks = meshes.shape[1], 1 << depth
        membership = sp.csr_matrix((np.ones(n_vertices), (self.labels(depth), np.arange(n_vertices))), shape=(n_blocks, n_vertices))
        per_coordinate = sp.kron(membership, sp.eye(3), format="csr")  # (3P, 3V): sums x, y, z separately
        out = np.empty((len(meshes), n_blocks, 3), np.float64)
        for s in range(0, len(meshes), batch):
            chunk = np.asarray(meshes[s : s + batch]).reshape(-1, 3 * n_vertices)  # (c, 3V), no copy
            out[s : s + len(chunk)] = (per_coordinate @ chunk.T).T.reshape(len(chunk), n_blocks, 3)  # float64 sums
        return out

    def centroids(self, meshes, depth: int, batch: int = 512) -> np.ndarray:
        """Block centroids (N, 2^depth, 3) float64 of meshes (N, V, 3)."""
        return self.block_sums(meshes, depth, batch) / self.sizes(depth)[None, :, None]


# --------------------------------------------------------------------------- nearest-mesh search


@dataclass
class NearestMeshes:
    """Result of a nearest-mesh search.

    distance: (n,) float64 mm, exact mean vertex distance to the nearest database mesh;
    index: (n,) int64 its database index (-1 when no mesh is admissible);
    exact_pairs: how many exact distances were computed (brute force: n * M);
    stats: counters of the search stages (candidates left after each bound, ...).
    """

    distance: np.ndarray
    index: np.ndarray
    exact_pairs: int = 0
    stats: dict = field(default_factory=dict)


@dataclass
class _Level:
    """Block centroids of one kd-tree depth, centred on the database's mean centroids, float32.

    database: (M, P, 3); weights: (P,) block sizes / V; mean: (P, 3) float64 the centre;
    max_abs: largest |coordinate| of any stored centroid (bounds the float32 rounding).
    """

    depth: int
    indicator: sp.csr_matrix  # (P, V) block membership
    sizes: np.ndarray  # (P,) vertices per block
    database: Tensor
    weights: Tensor
    mean: np.ndarray
    max_abs: float


def _bound_allowance(bound: Tensor, n_terms: int, input_error: float) -> Tensor:
    """Lower a float32 bound by a rigorous allowance for rounding, so it stays below the true one.

    Relative (n_terms + 8) u covers the norms and the weighted sum of n_terms positive terms;
    ``input_error`` (mm) the float32 rounding of the centroids; 1e-6 relative the rounding of
    the exact distances the bound is compared with.
    """
    return bound * (1 - (n_terms + 8) * _U32 - 1e-6) - input_error


class NearestMeshIndex:
    """Exact nearest-mesh (mean vertex distance) queries against a fixed database.

    database: (M, V, 3) float32 mm (array or memory map; read in chunks, kept by reference).
    depths: kd-tree depths of the block bounds, coarse to fine (2^d blocks each); the first is
    computed for every (query, database) pair, the others for the pairs still in the running.
    Building reads the database once (block centroids); a query set then reads only the
    database meshes it evaluates exactly, plus one pass if the direction bound is needed.
    """

    def __init__(self, database, depths: tuple[int, ...] = (4, 7, 10), batch: int = 512, progress: bool = False):
        self.database = as_meshes(database)
        if len(self.database) == 0:
            raise ValueError("the database is empty")
        self.progress, self.batch = progress, batch
        self.n_vertices = self.database.shape[1]
        # Blocks follow the mean shape of a spread-out subset: any partition gives a valid bound,
        # compact ones a tight bound.
        pick = np.linspace(0, len(self.database) - 1, min(64, len(self.database))).astype(np.int64)
        depths = sorted(set(int(d) for d in depths))
        self.blocks = VertexBlocks.from_points(self.database[pick].mean(axis=0, dtype=np.float64), max(depths))
        self.depths = tuple(sorted(set(min(d, self.blocks.depth) for d in depths)))
        finest = self.blocks.block_sums(self.database, self.blocks.depth, batch)  # (M, 2^D, 3) float64
        self.levels = [self._level(finest, d) for d in self.depths]
        self._mean_mesh: np.ndarray | None = None

    def _level(self, finest_sums: np.ndarray, depth: int) -> _Level:
        """Centroids at depth d from the finest block sums (siblings are consecutive blocks)."""
        group = 1 << (self.blocks.depth - depth)
        sums = torch.from_numpy(finest_sums).view(len(finest_sums), -1, group, 3).sum(2)
        sizes = self.blocks.sizes(depth)
        cents = sums / torch.from_numpy(sizes.astype(np.float64))[None, :, None]
        mean = cents.mean(0)
        centred = (cents - mean).float()
        labels = self.blocks.labels(depth)
        return _Level(
            depth=depth,
            indicator=sp.csr_matrix((np.ones(self.n_vertices), (labels, np.arange(self.n_vertices))), shape=(len(sizes), self.n_vertices)),
            sizes=sizes,
            database=centred,
            weights=torch.as_tensor(sizes / self.n_vertices, dtype=torch.float32),
            mean=mean.numpy(),
            max_abs=float(centred.abs().max()),
        )

    # ------------------------------------------------------------------ bounds

    def _query_centroids(self, level: _Level, queries: np.ndarray) -> tuple[Tensor, float]:
        """Centred float32 block centroids (n, P, 3) of queries (n, V, 3), and their max |coordinate|."""
        n = len(queries)
        sums = level.indicator @ np.asarray(queries, np.float64).transpose(1, 0, 2).reshape(self.n_vertices, -1)
        cents = sums.reshape(-1, n, 3).transpose(1, 0, 2) / level.sizes[None, :, None] - level.mean
        cents = torch.from_numpy(np.ascontiguousarray(cents, np.float32))
        return cents, float(cents.abs().max()) if cents.numel() else 0.0

    def _input_error(self, level: _Level, q_max: float) -> float:
        """Bound on the bound's error from the float32 rounding of both centroid tables (mm)."""
        return 4 * _U32 * (q_max + level.max_abs)

    def _block_bound_all(self, level: _Level, q_cents: Tensor, q_max: float) -> Tensor:
        """Block bound (n, M) of every query against every database mesh (safe, float32)."""
        n, p = q_cents.shape[:2]
        a = q_cents.transpose(0, 1).contiguous()  # (P, n, 3)
        b = level.database.transpose(0, 1).contiguous()  # (P, M, 3)
        rows = max(1, _BOUND_FLOATS // max(1, p * len(level.database)))
        out = torch.empty(n, len(level.database))
        for s in range(0, n, rows):
            # Direct differences (not the |x|^2 + |y|^2 - 2xy expansion, which cancels) keep float32 accurate.
            d = torch.cdist(a[:, s : s + rows], b, compute_mode="donot_use_mm_for_euclid_dist")  # (P, r, M)
            out[s : s + rows] = torch.einsum("prm,p->rm", d, level.weights)
        return _bound_allowance(out, p, self._input_error(level, q_max))

    def _block_bound_pairs(self, level: _Level, q_cents: Tensor, q_max: float, rows: Tensor, cols: Tensor) -> Tensor:
        """Block bound (K,) of listed (query, database) pairs (safe, float32)."""
        p = q_cents.shape[1]
        out = torch.empty(len(rows))
        step = max(1, _BOUND_FLOATS // (3 * p))
        for s in range(0, len(rows), step):
            diff = q_cents[rows[s : s + step]] - level.database[cols[s : s + step]]  # (k, P, 3)
            out[s : s + step] = torch.linalg.vector_norm(diff, dim=-1) @ level.weights
        return _bound_allowance(out, p, self._input_error(level, q_max))

    def _database_mean(self) -> np.ndarray:
        """Mean database mesh (V, 3) float64: the centre of the direction bound's products."""
        if self._mean_mesh is None:
            total = np.zeros(self.database.shape[1:], np.float64)
            for s in range(0, len(self.database), self.batch):
                total += self.database[s : s + self.batch].sum(axis=0, dtype=np.float64)
            self._mean_mesh = total / len(self.database)
        return self._mean_mesh

    def _direction_bound(self, queries: np.ndarray, towards: np.ndarray) -> Tensor:
        """Direction bound (n, M) (safe, float32) of queries (n, V, 3), u_i = unit(q_i - D[towards]_i).

        (1/V)[q'.u - b'.u] with primes = centred on the database mean. The same float32 u serves
        both terms (its |u_i| <= 1 + 2^-23, hence the final 1 - 4u factor); q'.u is summed in
        float64, b'.u by a float32 matrix product whose rounding is at most gamma_{3V} sum_i |b'_i|
        per mesh, plus the rounding of the float32 centring.
        """
        n, n_vertices = len(queries), self.n_vertices
        mean = torch.from_numpy(self._database_mean())
        q = torch.from_numpy(np.asarray(queries, np.float64)) - mean  # q' (n, V, 3)
        order = np.argsort(towards, kind="stable")
        best = np.empty((n, n_vertices, 3), np.float64)
        best[order] = self.database[towards[order]]  # increasing rows: sequential reads
        u = q + mean - torch.from_numpy(best)
        u32 = (u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-30)).float()
        q_dot = (q * u32.double()).sum((1, 2))  # (n,)
        q_err = 3 * n_vertices * 2.0**-52 * torch.linalg.vector_norm(q, dim=-1).sum(-1)  # float64 summation
        u_matrix = u32.reshape(n, -1).T.contiguous()  # (3V, n)
        gamma = 3 * n_vertices * _U32 / (1 - 3 * n_vertices * _U32)
        centring_error = math.sqrt(3) * 2 * _U32 * float(mean.abs().max()) * n_vertices
        mean32 = mean.float()
        out = torch.empty(n, len(self.database))
        for s in tqdm(range(0, len(self.database), self.batch), desc="direction bound", disable=not self.progress, leave=False):
            chunk = _torch(self.database[s : s + self.batch]) - mean32  # (c, V, 3) b'
            b_dot = (chunk.reshape(len(chunk), -1) @ u_matrix).T.double()  # (n, c)
            norm_sum = 1.01 * torch.linalg.vector_norm(chunk, dim=-1).sum(-1, dtype=torch.float64)  # (c,)
            err = (gamma + 2 * _U32) * norm_sum + centring_error
            bound = (q_dot[:, None] - q_err[:, None] - b_dot - err[None]) / n_vertices
            out[:, s : s + len(chunk)] = (bound * (1 - 4 * _U32 - 1e-6)).float()
        # the cast to float32 may round up: step one ulp down
        return torch.nextafter(out, torch.tensor(-math.inf))

    # ------------------------------------------------------------------ search

    def query(self, queries, exclude=None, block: int = 1024) -> NearestMeshes:
        """Nearest database mesh of every query (n, V, 3): exact distance and index.

        exclude: optional (n,) database index that a query must not match (-1 = none), e.g.
        itself when the queries are database members (leave-one-out).
        block: queries per batch (memory ~ block x M x 4 bytes for the first bound).
        """
        queries = as_meshes(queries)
        if queries.shape[1:] != self.database.shape[1:]:
            raise ValueError(f"queries have shape {queries.shape[1:]}, the database {self.database.shape[1:]}")
        exclude = None if exclude is None else np.asarray(exclude, np.int64)
        if exclude is not None and exclude.shape != (len(queries),):
            raise ValueError(f"exclude must have shape ({len(queries)},), got {exclude.shape}")
        result = NearestMeshes(np.full(len(queries), np.inf), np.full(len(queries), -1, np.int64))
        for s in tqdm(range(0, len(queries), block), desc="nearest meshes", disable=not self.progress, leave=False):
            q = np.ascontiguousarray(queries[s : s + block])
            search = self._search(q, None if exclude is None else exclude[s : s + block], result.stats)
            result.distance[s : s + len(q)] = search.best.numpy()
            result.index[s : s + len(q)] = search.best_index.numpy()
            result.exact_pairs += search.exact_pairs
        return result

    def _search(self, q: np.ndarray, exclude: np.ndarray | None, stats: dict) -> "_Candidates":
        cents = [self._query_centroids(level, q) for level in self.levels]
        bound = self._block_bound_all(self.levels[0], *cents[0])  # (n, M)
        if exclude is not None:
            keep = np.flatnonzero(exclude >= 0)
            bound[torch.as_tensor(keep), torch.as_tensor(exclude[keep])] = math.inf
        search = _Candidates(q, self.database, bound)
        _count(stats, f"after {len(self.levels[0].sizes)} blocks", search)
        for level, (q_cents, q_max) in zip(self.levels[1:], cents[1:]):
            search.refine(self._block_bound_pairs(level, q_cents, q_max, search.rows, search.cols))
            search.evaluate(k=1)
            _count(stats, f"after {len(level.sizes)} blocks", search)
        per_row = torch.bincount(search.rows, minlength=len(q))
        crowded = torch.nonzero(per_row > max(16.0, len(self.database) * _DIRECTION_BOUND_COST)).flatten()
        if len(crowded):
            stats["direction_bound_rows"] = stats.get("direction_bound_rows", 0) + len(crowded)
            dense = self._direction_bound(q[crowded.numpy()], search.best_index[crowded].numpy())
            slot = torch.full((len(q),), -1, dtype=torch.int64)
            slot[crowded] = torch.arange(len(crowded))
            at = slot[search.rows]
            finer = torch.full_like(search.bound, -math.inf)
            finer[at >= 0] = dense[at[at >= 0], search.cols[at >= 0]]
            search.refine(finer)
            _count(stats, "after direction bound", search)
        k = 4
        while len(search.rows):
            search.evaluate(k)
            k = min(4 * k, 1024)
        return search


def _count(stats: dict, key: str, search: "_Candidates") -> None:
    stats[f"candidates {key}"] = stats.get(f"candidates {key}", 0) + len(search.rows)


class _Candidates:
    """The open (query, database) pairs of a query block, with lower bounds, and the best so far.

    rows, cols: (K,) int64 pairs that may still beat or tie the row's best (not yet evaluated);
    bound: (K,) float32 safe lower bounds; best: (n,) float64 exact minimum so far (inf before
    any), best_index: (n,) int64.
    """

    def __init__(self, queries: np.ndarray, database: np.ndarray, first_bound: Tensor):
        self.queries, self.database = queries, database
        n = len(queries)
        self.best = torch.full((n,), math.inf, dtype=torch.float64)
        self.best_index = torch.full((n,), -1, dtype=torch.int64)
        self.exact_pairs = 0
        # Seed every row with the exact distance of its lowest-bound mesh, then keep what can compete.
        seed_bound, seed_col = first_bound.min(dim=1)
        seeded = torch.nonzero(torch.isfinite(seed_bound)).flatten()
        self._exact(seeded, seed_col[seeded])
        first_bound[seeded, seed_col[seeded]] = math.inf  # evaluated: out of the running
        self.rows, self.cols = torch.nonzero(first_bound <= self._limit()[:, None], as_tuple=True)
        self.bound = first_bound[self.rows, self.cols]

    def _limit(self) -> Tensor:
        """(n,) float32 >= best (rounded up), and below +inf so excluded pairs (bound inf) never pass.

        Comparing with ``<=`` keeps exact ties in play: ties resolve to the lowest index, as in argmin.
        """
        limit = self.best.float()
        limit = torch.where(limit.double() < self.best, torch.nextafter(limit, torch.tensor(math.inf)), limit)
        return limit.clamp(max=torch.finfo(torch.float32).max)

    def _keep(self, mask: Tensor) -> None:
        self.rows, self.cols, self.bound = self.rows[mask], self.cols[mask], self.bound[mask]

    def prune(self) -> None:
        """Drop the pairs whose lower bound exceeds their row's best exact distance."""
        self._keep(self.bound <= self._limit()[self.rows])

    def refine(self, finer: Tensor) -> None:
        """Raise the bounds to another valid lower bound (K,) of the same pairs, and prune."""
        self.bound = torch.maximum(self.bound, finer)
        self.prune()

    def evaluate(self, k: int) -> None:
        """Compute the exact distances of each row's k lowest-bound pairs, update the best, prune."""
        if not len(self.rows):
            return
        order = torch.argsort(self.bound, stable=True)
        order = order[torch.argsort(self.rows[order], stable=True)]  # by row, then bound
        self.rows, self.cols, self.bound = self.rows[order], self.cols[order], self.bound[order]
        starts = torch.searchsorted(self.rows, self.rows, side="left")
        take = (torch.arange(len(self.rows)) - starts) < k
        self._exact(self.rows[take], self.cols[take])
        self._keep(~take)
        self.prune()

    def _exact(self, rows: Tensor, cols: Tensor) -> None:
        order = torch.argsort(cols)  # increasing database rows: sequential reads of a memory map
        rows, cols = rows[order], cols[order]
        dist = torch.from_numpy(paired_mean_vertex_distance(self.queries, self.database, rows.numpy(), cols.numpy()))
        self.exact_pairs += len(rows)
        self._update_best(rows, cols, dist)

    def _update_best(self, rows: Tensor, cols: Tensor, dist: Tensor) -> None:
        """Fold exact distances into the row minima; ties go to the lowest column, as in argmin."""
        # Sort by (row, distance, column): the first pair of each row is its minimum.
        order = torch.argsort(cols, stable=True)
        order = order[torch.argsort(dist[order], stable=True)]
        order = order[torch.argsort(rows[order], stable=True)]
        rows, cols, dist = rows[order], cols[order], dist[order]
        first = torch.ones(len(rows), dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        r, c, d = rows[first], cols[first], dist[first]
        better = (d < self.best[r]) | ((d == self.best[r]) & (c < self.best_index[r]))
        self.best[r[better]] = d[better]
        self.best_index[r[better]] = c[better]


def nearest_meshes(queries, database, exclude=None, progress: bool = False, **index_options) -> NearestMeshes:
    """Exact nearest database mesh (mean vertex distance) of each query; see :class:`NearestMeshIndex`.

    queries: (n, V, 3), database: (M, V, 3), float32 mm (arrays, memmaps or tensors);
    exclude: optional (n,) database index to skip per query (-1 = none).
    """
    return NearestMeshIndex(database, progress=progress, **index_options).query(queries, exclude=exclude)
