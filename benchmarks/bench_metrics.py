"""Metric timings at the paper's sizes, on ICT-like meshes made from the ICT model's linear bases.

    python benchmarks/bench_metrics.py [--train 30000] [--samples 1000] [--brute-queries 4]
                                       [--embed-images 64] [--skip-noisy] [--threads 2]

Data: ``--train`` training meshes (300 identities x 100 expressions: identity coefficients
N(0, 1), sparse blend weights U(0, 1)) and ``--samples`` generated-like meshes (new identities,
new expressions), 6706 vertices, in RAM (30,000 meshes = 2.4 GB).

Rows: specificity (exact, bound-pruned) and, in the same run, brute force on ``--brute-queries``
samples scaled to all of them (the speed ratio); specificity again on noisy samples (sigma 1 mm
per coordinate, the hard case for the block bound); diversity on 10,000 pairs (global and within
identity); MMD/COV/1-NNA on 1000 vs 1000; roughness and the oracle projection of 1000 meshes; and
the decoupling protocol's 2 x 100 x (100 + 1) renders + ResNet-18 forwards at 224 px, timed on
``--embed-images`` images and scaled. Wall-clock: other processes on the machine slow it down
(the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from facegan.data.ict import load_ict
from facegan.metrics.distances import NearestMeshIndex, brute_force_nearest
from facegan.metrics.distribution import distribution_metrics
from facegan.metrics.diversity import diversity
from facegan.metrics.embedding import EmbeddingNet, MeshRenderer, embed_images, fixed_view
from facegan.metrics.oracle import OracleProjector
from facegan.metrics.roughness import roughness


def ict_meshes(narrow, n_identities: int, per_identity: int, rng: np.random.Generator, batch: int = 1000):
    """(N, 6706, 3) float32 mm ICT faces and (N,) identity ids: each identity with per_identity expressions."""
    basis = np.concatenate([narrow.identity_modes, narrow.expression_modes]).reshape(153, -1)
    identity = np.repeat(rng.standard_normal((n_identities, 100)).astype(np.float32), per_identity, axis=0)
    n = len(identity)
    weights = (rng.uniform(0, 1, (n, 53)) * (rng.uniform(size=(n, 53)) < 0.1)).astype(np.float32)
    coeffs = np.concatenate([identity, weights], axis=1)
    out = np.empty((n, narrow.neutral.shape[0], 3), np.float32)
    for s in range(0, n, batch):
        out[s : s + batch] = (narrow.neutral.reshape(1, -1) + coeffs[s : s + batch] @ basis).reshape(-1, *narrow.neutral.shape)
    return out, np.repeat(np.arange(n_identities), per_identity)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=30000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--brute-queries", type=int, default=4)
    ap.add_argument("--embed-images", type=int, default=64)
    ap.add_argument("--skip-noisy", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    ict = load_ict()
    narrow, template = ict.narrow(), ict.narrow_template()
    per_id = 100
    (train, train_ids), t_data = timed(lambda: ict_meshes(narrow, max(1, args.train // per_id), per_id, rng))
    samples, _ = ict_meshes(narrow, args.samples, 1, rng)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads; data {train.shape} + {samples.shape} made in {t_data:.1f} s")
    rows = []

    # specificity: exact search vs brute force on a subset of the same samples
    index, t_build = timed(lambda: NearestMeshIndex(train))
    found, t_query = timed(lambda: index.query(samples))
    t_spec = t_build + t_query
    k = min(args.brute_queries, len(samples))
    (brute_d, brute_i), t_brute = timed(lambda: brute_force_nearest(samples[:k], train))
    t_brute_all = t_brute * len(samples) / k
    assert np.array_equal(brute_i, found.index[:k]) and np.array_equal(brute_d, found.distance[:k])
    rows.append((f"specificity {len(samples)} x {len(train)}", t_spec,
                 f"build {t_build:.1f} s + query {t_query:.1f} s; {found.exact_pairs} exact pairs "
                 f"({found.exact_pairs / (len(samples) * len(train)):.4%}); mean {found.distance.mean():.3f} mm"))
    rows.append((f"  brute force (chunked exact, {k} samples, scaled)", t_brute_all,
                 f"speed-up x{t_brute_all / t_spec:.0f}; equal on the subset"))
    if not args.skip_noisy:
        noisy = samples + rng.normal(0, 1.0, samples.shape).astype(np.float32)
        found_n, t_noisy = timed(lambda: index.query(noisy))
        rows.append((f"specificity, noisy samples (sigma 1 mm)", t_noisy + t_build,
                     f"query {t_noisy:.1f} s; {found_n.exact_pairs} exact pairs; "
                     f"direction bound on {found_n.stats.get('direction_bound_rows', 0)} rows"))

    # diversity: 10,000 pairs
    result, t = timed(lambda: diversity(train, 10000, rng=rng))
    rows.append(("diversity global, 10,000 pairs", t, f"{result['mean']:.3f} mm"))
    result, t = timed(lambda: diversity(train, 10000, groups=train_ids, rng=rng))
    rows.append(("diversity same identity, 10,000 pairs", t, f"{result['mean']:.3f} mm"))

    # distribution metrics
    m = min(1000, len(samples), len(train))
    pick = rng.choice(len(train), m, replace=False)
    result, t = timed(lambda: distribution_metrics(samples[:m], train[np.sort(pick)]))
    rows.append((f"MMD + COV + 1-NNA, {m} vs {m}", t,
                 f"mmd {result['mmd']:.3f} mm, cov {result['coverage']:.3f}, 1-nna {result['1-nna']:.3f}"))

    # roughness and the oracle
    result, t = timed(lambda: roughness(samples, template, reference=train[:1000]))
    rows.append((f"roughness {len(samples)} meshes (+1000 reference)", t, f"{result['mean']:.4f} mm, ratio {result['ratio']:.3f}"))
    proj, t_pinv = timed(lambda: OracleProjector(narrow))
    result, t = timed(lambda: proj.project(samples))
    rows.append((f"oracle projection {len(samples)} meshes", t, f"pseudo-inverse {t_pinv:.1f} s once; residual {result['residual'].mean():.2e} mm"))

    # decoupling: 2 factors x 100 anchors x (100 + 1) meshes, rendered at 224 and embedded by ResNet-18
    n_img = min(args.embed_images, len(samples))
    renderer = MeshRenderer(template.triangles, 224, fixed_view(train[:256]))
    images, t_render = timed(lambda: renderer(samples[:n_img]))
    net = EmbeddingNet(128, 1.0).eval()
    _, t_forward = timed(lambda: embed_images(net, images, batch=32))
    total_images = 2 * 100 * (100 + 1)
    per_image = (t_render + t_forward) / n_img
    rows.append((f"decoupling 2 x 100 x 100 renders + ResNet-18 (scaled from {n_img})", per_image * total_images,
                 f"render {t_render / n_img * 1000:.0f} ms + forward {t_forward / n_img * 1000:.0f} ms per image"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'seconds':>9}  notes")
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds:9.1f}  {note}")


if __name__ == "__main__":
    main()
