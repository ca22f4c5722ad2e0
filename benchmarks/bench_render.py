"""Rendering speed: the batched torch rasterizer against a straightforward per-triangle loop.

    python benchmarks/bench_render.py [--template PATH] [--batch 64] [--threads 1,2] [--reference-meshes 3]

Renders perturbed copies of the ICT face area (6706 vertices, 13120 triangles) in "normals" mode
at 224 px (what the decoupling metric consumes) and "shaded" at 256 px, and prints meshes/s.
The reference rasterizes one triangle at a time in a Python loop (numpy over each triangle's pixel
box) on a few meshes, in the same run; its agreement with the batched renderer is printed too.
Timings are wall-clock, best of ``--repeats``: other processes on the machine slow them down
(the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from facegan.mesh import load_template
from facegan.render import CLAY, DEFAULT_LIGHT, _AMBIENT, fit_view, render_meshes

DEFAULT_TEMPLATE = "/work/shared/data/ict-face-model/generic_neutral_mesh.obj"
CASES = (("normals", 224), ("shaded", 256))


def face_batch(path: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 6706, 3) face meshes, each slightly deformed and turned, and the (F, 3) triangles."""
    template = load_template(path, keep_vertices=6706)
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor(template.vertices, dtype=torch.float32)
    noise = 0.03 * torch.randn(batch, *base.shape, generator=gen)
    angles = (torch.rand(batch, generator=gen) - 0.5) * 0.2  # +-6 degrees about y
    c, s = torch.cos(angles), torch.sin(angles)
    rot = torch.zeros(batch, 3, 3)
    rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = c, s, 1, -s, c
    return (base + noise) @ rot.transpose(1, 2), torch.tensor(template.triangles)


# ---------------------------------------------------------------------------------- reference


def reference_render(vertices: np.ndarray, triangles: np.ndarray, size: int, mode: str, view) -> np.ndarray:
    """One mesh (V, 3) -> uint8 (size, size, 3), rasterizing triangle by triangle in a Python loop."""
    x0, x1, y0, y1 = view
    scale = min(size / (x1 - x0), size / (y1 - y0))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx = (vertices[:, 0] - cx) * scale + size / 2
    sy = (cy - vertices[:, 1]) * scale + size / 2
    zbuf = np.full((size, size), -np.inf)
    normal_img = np.zeros((size, size, 3))
    normals = _reference_vertex_normals(vertices, triangles)
    for tri in triangles:
        xs, ys, zs = sx[tri], sy[tri], vertices[tri, 2]
        c0, c1 = max(int(np.ceil(xs.min() - 0.5)), 0), min(int(np.floor(xs.max() - 0.5)), size - 1)
        r0, r1 = max(int(np.ceil(ys.min() - 0.5)), 0), min(int(np.floor(ys.max() - 0.5)), size - 1)
        if c1 < c0 or r1 < r0:
            continue
        det = (xs[1] - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (ys[1] - ys[0])
        if abs(det) < 1e-10:
            continue
        px, py = np.meshgrid(np.arange(c0, c1 + 1) + 0.5, np.arange(r0, r1 + 1) + 0.5)
        w1 = ((px - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (py - ys[0])) / det
        w2 = ((xs[1] - xs[0]) * (py - ys[0]) - (px - xs[0]) * (ys[1] - ys[0])) / det
        w0 = 1 - w1 - w2
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        z = w0 * zs[0] + w1 * zs[1] + w2 * zs[2]
        win = inside & (z > zbuf[r0 : r1 + 1, c0 : c1 + 1])
        zbuf[r0 : r1 + 1, c0 : c1 + 1][win] = z[win]
        n = w0[..., None] * normals[tri[0]] + w1[..., None] * normals[tri[1]] + w2[..., None] * normals[tri[2]]
        normal_img[r0 : r1 + 1, c0 : c1 + 1][win] = n[win]
    covered = np.isfinite(zbuf)
    n = normal_img / np.maximum(np.linalg.norm(normal_img, axis=-1, keepdims=True), 1e-20)
    if mode == "normals":
        rgb = np.where(covered[..., None], (n + 1) / 2, 0.0)
    else:
        light = np.asarray(DEFAULT_LIGHT) / np.linalg.norm(DEFAULT_LIGHT)
        intensity = _AMBIENT + (1 - _AMBIENT) * np.clip(n @ light, 0, None)
        rgb = np.where(covered[..., None], np.asarray(CLAY) * intensity[..., None], 1.0)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def _reference_vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    face_n = np.cross(b - a, c - a)
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, triangles[:, k], face_n)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)


# -------------------------------------------------------------------------------------- timing


def time_batched(vertices, triangles, mode, size, repeats) -> tuple[float, float, float]:
    """Best and median wall seconds, and mean CPU seconds (all threads), per render_meshes call on the batch."""
    render_meshes(vertices, triangles, size, mode=mode)  # warm-up
    times = []
    cpu_start = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        render_meshes(vertices, triangles, size, mode=mode)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), (time.process_time() - cpu_start) / repeats


def time_reference(vertices, triangles, mode, size, view) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    images = [reference_render(v, triangles, size, mode, view) for v in vertices]
    return time.perf_counter() - start, images


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose colours differ by at most 2 levels in every channel."""
    return float((np.abs(a.astype(int) - b.astype(int)).max(axis=-1) <= 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default=DEFAULT_TEMPLATE)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to try")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-meshes", type=int, default=3)
    args = parser.parse_args()

    vertices, triangles = face_batch(args.template, args.batch)
    print(f"{args.batch} faces, {vertices.shape[1]} vertices, {len(triangles)} triangles; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    rows = []
    ref_vertices = vertices[: args.reference_meshes]
    for mode, size in CASES:
        view = fit_view(ref_vertices)
        cpu_start = time.process_time()
        ref_seconds, ref_images = time_reference(ref_vertices.double().numpy(), triangles.numpy(), mode, size, view)
        ref_cpu = (time.process_time() - cpu_start) / len(ref_vertices)
        ref_rate = len(ref_vertices) / ref_seconds
        ours = render_meshes(ref_vertices, triangles, size, mode=mode).numpy()
        match = min(agreement(o, r) for o, r in zip(ours, ref_images))
        rows.append(("reference loop", mode, size, len(ref_vertices), "-", ref_rate, ref_rate, ref_cpu, 1.0, match))
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            best, median, cpu = time_batched(vertices, triangles, mode, size, args.repeats)
            rate = args.batch / best
            rows.append(
                ("batched torch", mode, size, args.batch, threads, rate, args.batch / median, cpu / args.batch,
                 rate / ref_rate, None)
            )
    print_table(rows)


def print_table(rows) -> None:
    """Columns: wall-clock rate (best and median of the repeats), CPU time per mesh summed over
    threads (insensitive to other processes), speed-up of the best rate over the reference, and
    the share of pixels where the reference and the batched renderer agree within 2 levels."""
    header = ("renderer", "mode", "px", "meshes", "threads", "meshes/s best", "median", "cpu ms/mesh", "speed-up",
              "same px")
    fmt = "{:<15} {:<8} {:>4} {:>7} {:>8} {:>14} {:>7} {:>12} {:>9} {:>8}"
    print(fmt.format(*header))
    for name, mode, size, n, threads, best, median, cpu, ratio, match in rows:
        print(fmt.format(name, mode, size, n, threads, f"{best:.1f}", f"{median:.1f}", f"{1000 * cpu:.1f}",
                         f"{ratio:.0f}x", "" if match is None else f"{100 * match:.1f}%"))


if __name__ == "__main__":
    main()
