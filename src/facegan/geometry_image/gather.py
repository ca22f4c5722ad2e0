"""Encoding's inner loop, compiled: every pixel interpolates its triangle's three vertices.

Encoding is a fixed sparse product (3 weights per pixel), but a general sparse product (scipy's) is
not vectorized for it and runs single-threaded. This kernel, compiled by numba, copies one mesh's
vertices to coordinate planes (3, V) so that each plane's reads are plain gathers the compiler
vectorizes, and spreads blocks of meshes over the cores. benchmarks/bench_geometry_image.py measures it.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(parallel=True, cache=True)
def _interpolate(meshes, corners, weights, mean_image, out, lanes):  # pragma: no cover (compiled)
    n, n_vertices = meshes.shape[0], meshes.shape[1]
    c0, c1, c2 = corners[0], corners[1], corners[2]
    w0, w1, w2 = weights[0], weights[1], weights[2]
    for lane in numba.prange(lanes):
        # each lane (thread) takes a contiguous block of meshes and allocates its vertex planes once
        planes = np.empty((3, n_vertices), np.float32)
        x, y, z = planes[0], planes[1], planes[2]
        for m in range(lane * n // lanes, (lane + 1) * n // lanes):
            for i in range(n_vertices):
                for c in range(3):
                    planes[c, i] = meshes[m, i, c]
            image = out[m]
            for p in range(c0.shape[0]):
                a, b, d = c0[p], c1[p], c2[p]
                image[p, 0] = w0[p] * x[a] + w1[p] * x[b] + w2[p] * x[d] - mean_image[p, 0]
                image[p, 1] = w0[p] * y[a] + w1[p] * y[b] + w2[p] * y[d] - mean_image[p, 1]
                image[p, 2] = w0[p] * z[a] + w1[p] * z[b] + w2[p] * z[d] - mean_image[p, 2]


def interpolate_displacements(meshes: np.ndarray, corners: np.ndarray, weights: np.ndarray,
                              mean_image: np.ndarray, out: np.ndarray) -> None:
    """out[m, p] = sum_j weights[j, p] * meshes[m, corners[j, p]] - mean_image[p], in place.

    meshes: (N, V, 3) float32 C-contiguous; corners: (3, P) int32 vertex indices; weights: (3, P)
    float32 (a pixel with all-zero weights gets -mean_image[p]); mean_image: (P, 3) float32;
    out: (N, P, 3) float32. Uses as many threads as torch does.
    """
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    _interpolate(meshes, corners, weights, mean_image, out, threads)
