"""Geometry images: round-trip error table and encode/reconstruct speed, measured side by side.

    python benchmarks/bench_geometry_image.py [--data data/ict-small] [--alphas]

Prints (1) the mesh -> image -> mesh error on the held-out test meshes at 64 and 128 px, sparse vs
dense, float vs uint8; (2) with --alphas, the dense error for several Laplacian weights; (3) the
speed of batched encoding and dense reconstruction of 1,000 meshes against a straightforward
per-mesh implementation (scipy sparse product per mesh; per-mesh spsolve), as ratios from one run,
and the encoding kernel alone, writing into a reused buffer and into fresh memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as spla
import torch

from facegan.data.dataset import open_dataset
from facegan.data.encode import encode_dataset, load_codec
from facegan.geometry_image import PAPER_ALPHA, GeometryImageCodec
from facegan.geometry_image.gather import interpolate_displacements
from facegan.geometry_image.roundtrip import MARKDOWN_HEADER, roundtrip_table, test_meshes, vertex_errors
from facegan.mesh.operators import cotangent_laplacian


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def codec_for(ds, resolution: int) -> GeometryImageCodec:
    if not (ds.root / "images" / f"res{resolution}.json").exists():
        encode_dataset(ds, resolution, progress=False)
    return load_codec(ds, resolution)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/ict-small"))
    parser.add_argument("--alphas", action="store_true", help="also sweep the Laplacian weight")
    parser.add_argument("--n", type=int, default=1000, help="meshes in the speed test")
    args = parser.parse_args()
    ds = open_dataset(args.data)
    meshes = test_meshes(ds, 175)
    print(f"## Round trip, {len(meshes)} held-out test meshes of {args.data}\n")
    print(MARKDOWN_HEADER)
    codecs = {res: codec_for(ds, res) for res in (64, 128)}
    for res, codec in codecs.items():
        for row in roundtrip_table(codec, meshes):
            print(row.as_markdown())

    codec = codecs[64]
    if args.alphas:
        print("\n## Dense reconstruction at 64 px (uint8) vs Laplacian weight alpha\n")
        print("| alpha | mean (mm) | 95th pct (mm) | max (mm) |\n|---|---|---|---|")
        for alpha in (PAPER_ALPHA, 0.3, 0.1, 0.03, 0.01):
            c = GeometryImageCodec(codec.template, codec.mean, 64, codec.value_range, alpha)
            e = vertex_errors(c, meshes, "dense", "uint8")
            print(f"| {alpha} | {e.mean():.3f} | {np.percentile(e, 95):.3f} | {e.max():.3f} |")
        e = vertex_errors(codec, meshes, "dense", "uint8").mean(axis=0)
        worst = np.argsort(-e)[:10]
        print(f"\nlargest mean errors at vertices {worst.tolist()} (mm: {np.round(e[worst], 2).tolist()})")

    print(f"\n## Speed, {args.n} meshes at 64 px ({torch.get_num_threads()} threads)\n")
    idx = np.resize(np.arange(len(ds)), args.n)
    batch = torch.from_numpy(np.asarray(ds.meshes[np.sort(idx)]))
    B = codec.pixel_map.interpolation_matrix(codec.template.triangles, codec.template.n_vertices)
    mean = codec.mean.astype(np.float32)

    def encode_per_mesh():
        for v in batch.numpy():
            B @ (v - mean)

    calls = np.array([timed(lambda: codec.encode(batch), 1) for _ in range(10)])
    t_batch = calls.min()
    t_loop = timed(encode_per_mesh, 1)
    print("| step | batched (meshes/s) | per-mesh (meshes/s) | ratio |\n|---|---|---|---|")
    print(f"| encode (best of 10 calls) | {args.n / t_batch:,.0f} | {args.n / t_loop:,.0f} | {t_loop / t_batch:.1f}x |")
    print(f"| encode (median of 10 calls) | {args.n / np.median(calls):,.0f} | | |")
    # The kernel alone, into a reused buffer and into fresh memory whose pages its own threads fault in
    # (what encode() avoids by touching the pages from one thread first).
    corners, weights = codec._pixel_corners
    kernel = lambda out: interpolate_displacements(batch.numpy(), corners, weights, codec._mean_image, out)  # noqa: E731
    reused = np.empty((args.n, codec.resolution**2, 3), np.float32)
    t_reused = timed(lambda: kernel(reused), 10)
    t_fresh = np.median([timed(lambda: kernel(np.empty_like(reused)), 1) for _ in range(10)])
    print(f"| encode kernel into a reused buffer (best of 10) | {args.n / t_reused:,.0f} | | |")
    print(f"| encode kernel into fresh memory (median of 10) | {args.n / t_fresh:,.0f} | | |")
    # Encoding reads each mesh and writes its image once: the machine's copy bandwidth bounds it.
    buffer = np.ones(64 * 2**20 // 4, np.float32)  # 64 MB, beyond the caches
    copy_gb_s = 2 * buffer.nbytes / timed(lambda: buffer.copy()) / 1e9  # read + write
    moved = batch[0].numel() * 4 + codec.resolution**2 * 3 * 4  # bytes in (V x 3) + out (R x R x 3)
    print(f"\nmemory copy {copy_gb_s:.1f} GB/s; encoding moves {moved / 1e3:.0f} kB per mesh, so no encoder "
          f"here exceeds ~{copy_gb_s * 1e9 / moved:,.0f} meshes/s (batched reaches "
          f"{args.n / t_batch * moved / (copy_gb_s * 1e9):.0%} of that)")

    images = codec.dequantize(codec.quantize(codec.encode(batch)))
    codec.dense.operator  # form the operator outside the timing (done once per codec)
    L = cotangent_laplacian(codec.template.vertices, codec.template.triangles)
    A = (B.T @ B + codec.alpha * (L.T @ L)).tocsc()
    pixels = images.reshape(len(images), -1, 3)[:, torch.from_numpy(codec.pixel_map.pixels)].numpy()
    n_loop = 20  # per-mesh spsolve is slow: time a few and scale

    def dense_per_mesh():
        for p in pixels[:n_loop]:
            spla.spsolve(A, B.T @ p)

    with torch.no_grad():
        t_batch = timed(lambda: codec.decode_dense(images))
    t_loop = timed(dense_per_mesh, 1) * args.n / n_loop
    print(f"| dense reconstruction | {args.n / t_batch:,.0f} | {args.n / t_loop:,.0f} | {t_loop / t_batch:.1f}x |")

    # DenseReconstructor solves CPU batches through the factorization and CUDA ones by the operator
    # (reconstruct._use_operator): both paths on the CPU at several batch sizes.
    rec, pixels_t = codec.dense, torch.from_numpy(pixels).float()
    print("\n| meshes | operator (ms) | factored solve (ms) | factored / operator |\n|---|---|---|---|")
    for n in sorted({1, 4, 16, 64, 256, args.n}):
        with torch.no_grad():
            t_op = timed(lambda: rec.by_operator(pixels_t[:n]))
            t_solve = timed(lambda: rec.by_factorization(pixels_t[:n]))
        print(f"| {n} | {t_op * 1e3:.1f} | {t_solve * 1e3:.1f} | {t_solve / t_op:.2f} |")


if __name__ == "__main__":
    main()
