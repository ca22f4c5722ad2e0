"""Metrics with known answers, and every vectorized computation against a naive loop."""

from __future__ import annotations

import numpy as np
import pytest

from facegan import metrics
from facegan.metrics.distances import (
    NearestMeshIndex,
    VertexBlocks,
    brute_force_nearest,
    mean_vertex_distance,
    nearest_meshes,
    paired_mean_vertex_distance,
    pairwise_mean_vertex_distance,
)
from facegan.metrics.distribution import (
    coverage,
    kernel_inception_distance,
    minimum_matching_distance,
    one_nearest_neighbor_accuracy,
)
from facegan.metrics.diversity import diversity, paired_diversity, sample_pairs, training_diversity
from facegan.metrics.oracle import OracleProjector, oracle_decoupling
from facegan.metrics.roughness import RoughnessOperator, boundary_vertices, roughness
from facegan.metrics.span import affine_span_residual
from facegan.metrics.specificity import specificity

from conftest import grid_plane, sphere_cap


def smooth_meshes(n: int, n_vertices: int = 300, modes: int = 6, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """Random face-like meshes (n, V, 3) float32: a fixed point cloud plus smooth random deformations."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(123).uniform(-50, 50, (n_vertices, 3))
    freq = np.random.default_rng(7).normal(0, 0.04, (modes, 3))
    shapes = np.stack([np.sin(base @ f)[:, None] * np.random.default_rng(k).normal(size=3) for k, f in enumerate(freq)])
    coeffs = rng.normal(0, scale, (n, modes))
    return (base + np.tensordot(coeffs, shapes, axes=1)).astype(np.float32)


def naive_mvd(a, b) -> float:
    return float(np.mean([np.linalg.norm(np.asarray(a[i], np.float64) - b[i]) for i in range(len(a))]))


# --------------------------------------------------------------------------- distances


def test_mean_vertex_distance_matches_a_loop():
    x = smooth_meshes(4)
    y = smooth_meshes(5, seed=1)
    full = pairwise_mean_vertex_distance(x, y)
    for i in range(4):
        for j in range(5):
            assert full[i, j] == pytest.approx(naive_mvd(x[i], y[j]), rel=1e-6)
    assert mean_vertex_distance(x[1], y[2]) == pytest.approx(full[1, 2], rel=1e-12)
    pairs = paired_mean_vertex_distance(x, y, [0, 3, 3], [4, 0, 1])
    np.testing.assert_allclose(pairs, [full[0, 4], full[3, 0], full[3, 1]], rtol=1e-12)


def test_mean_vertex_distance_hand_value():
    a = np.zeros((1, 2, 3), np.float32)
    b = np.array([[[3, 4, 0], [0, 0, 1]]], np.float32)  # distances 5 and 1
    assert mean_vertex_distance(a, b)[0] == pytest.approx(3.0)


def test_kd_blocks_partition_and_nest():
    points = np.random.default_rng(0).normal(size=(1000, 3))
    blocks = VertexBlocks.from_points(points, depth=5)
    assert blocks.sizes(5).sum() == 1000 and blocks.sizes(5).min() >= 31
    coarse = blocks.labels(2)
    # each depth-5 block lies inside one depth-2 block
    for leaf in range(32):
        assert len(np.unique(coarse[blocks.leaf == leaf])) == 1


@pytest.mark.parametrize("noise", [0.0, 2.0, 20.0])
def test_nearest_search_equals_brute_force(noise):
    train = smooth_meshes(300, seed=1)
    rng = np.random.default_rng(2)
    queries = smooth_meshes(40, seed=3) + noise * rng.normal(size=(40, 300, 3)).astype(np.float32)
    found = nearest_meshes(queries, train, depths=(2, 4, 6))
    dist, index = brute_force_nearest(queries, train)
    np.testing.assert_array_equal(found.index, index)
    np.testing.assert_array_equal(found.distance, dist)
    assert found.exact_pairs <= 40 * 300
    if noise > 0:  # noisy queries exercise the direction bound too
        assert found.stats["direction_bound_rows"] > 0
    else:
        assert found.exact_pairs < 40 * 5  # smooth differences: the block bounds prune nearly everything


def test_nearest_search_adversarial_cases():
    """Cases built to fool prefilters: a far-in-Frobenius but nearest mesh, cancelling block
    centroids, duplicates (ties) and an excluded self."""
    rng = np.random.default_rng(0)
    v = 256
    query = np.zeros((1, v, 3), np.float32)
    uniform = np.ones((v, 3), np.float32) / np.sqrt(3)  # every vertex at distance 1: d = 1, ||.||_F = 16
    spike = np.zeros((v, 3), np.float32)
    spike[17, 0] = 0.9 * v  # one vertex far away: d = 0.9 (the nearest), ||.||_F = 230
    cancel = np.zeros((v, 3), np.float32)
    cancel[:, 2] = np.where(np.arange(v) % 2 == 0, 0.95, -0.95)  # block centroids unchanged: d = 0.95
    others = rng.normal(0, 3, (50, v, 3)).astype(np.float32)
    train = np.concatenate([others, uniform[None], cancel[None], spike[None], spike[None]])
    found = nearest_meshes(query, train, depths=(1, 3, 5))
    dist, index = brute_force_nearest(query, train)
    assert index[0] == 52 and found.index[0] == 52  # the first of the duplicated spikes
    assert found.distance[0] == pytest.approx(0.9, rel=1e-6) and found.distance[0] == dist[0]

    # cancelling centroids is the nearest once the spike is gone
    found = nearest_meshes(query, train[:52], depths=(1, 3, 5))
    assert found.index[0] == 51 and found.distance[0] == pytest.approx(0.95, rel=1e-6)

    # leave-one-out: a set of duplicates still finds another copy, never itself
    twins = np.repeat(others[:3], 2, axis=0)  # 0=1, 2=3, 4=5
    found = nearest_meshes(twins, twins, exclude=np.arange(6))
    np.testing.assert_array_equal(found.index, [1, 0, 3, 2, 5, 4])
    np.testing.assert_array_equal(found.distance, np.zeros(6))
    d, i = brute_force_nearest(twins, twins, exclude=np.arange(6))
    np.testing.assert_array_equal(found.index, i)

    # a single database mesh that is excluded: nothing admissible
    found = nearest_meshes(others[:1], others[:1], exclude=[0])
    assert found.index[0] == -1 and np.isinf(found.distance[0])


def test_nearest_index_reuse_and_exclusion_against_brute_force():
    data = smooth_meshes(120, seed=5)
    index = NearestMeshIndex(data, depths=(2, 5))
    found = index.query(data, exclude=np.arange(120), block=50)
    dist, idx = brute_force_nearest(data, data, exclude=np.arange(120))
    np.testing.assert_array_equal(found.index, idx)
    np.testing.assert_array_equal(found.distance, dist)


# --------------------------------------------------------------------------- specificity


def test_specificity_of_training_meshes_is_zero():
    train = smooth_meshes(50)
    result = metrics.compute("specificity", samples=train[::5], train=train)
    assert result["mean"] == 0.0
    np.testing.assert_array_equal(result["nearest_index"], np.arange(0, 50, 5))
    assert "seconds" in result


def test_specificity_equals_brute_force_and_memorization():
    train = smooth_meshes(200, seed=1)
    samples = smooth_meshes(30, seed=2)
    samples[:3] = train[[4, 9, 16]] + 0.01  # near copies
    result = specificity(samples, train, memorization_threshold=0.1)
    dist, index = brute_force_nearest(samples, train)
    assert result["mean"] == pytest.approx(dist.mean(), rel=1e-12)
    np.testing.assert_array_equal(result["nearest_index"], index)
    assert result["memorized_fraction"] == pytest.approx(3 / 30)


# --------------------------------------------------------------------------- diversity


def test_diversity_of_identical_meshes_is_zero():
    meshes = np.repeat(smooth_meshes(1), 10, axis=0)
    assert diversity(meshes, pairs=100, rng=0)["mean"] == 0.0


def test_diversity_hand_value():
    # two meshes at mean vertex distance 2: every pair of distinct meshes is that pair
    a = np.zeros((1, 5, 3), np.float32)
    b = a + np.array([0, 0, 2], np.float32)
    result = diversity(np.concatenate([a, b]), pairs=50, rng=1)
    assert result["mean"] == pytest.approx(2.0) and result["std"] == pytest.approx(0.0)
    assert paired_diversity(a, b)["mean"] == pytest.approx(2.0)


def test_grouped_pairs_stay_in_their_group_and_match_the_loop():
    groups = np.array([0, 0, 0, 1, 1, -1, 2, 2, 2, 2])
    first, second = sample_pairs(10, 2000, groups, rng=0)
    assert np.all(groups[first] == groups[second]) and np.all(first != second)
    assert np.all(groups[first] >= 0)
    # groups weighted by their number of ordered pairs: 6, 2, 12 of 20
    share = np.bincount(groups[first], minlength=3) / 2000
    np.testing.assert_allclose(share, [6 / 20, 2 / 20, 12 / 20], atol=0.04)
    meshes = smooth_meshes(10)
    result = diversity(meshes, pairs=300, groups=groups, rng=3)
    f, s = sample_pairs(10, 300, groups, rng=3)
    assert result["mean"] == pytest.approx(np.mean([naive_mvd(meshes[i], meshes[j]) for i, j in zip(f, s)]), rel=1e-6)


def test_training_diversity_variants():
    # identity = row offset in x, expression = offset in z; same identity -> only z differs
    ids = np.repeat(np.arange(4), 3)
    exps = np.tile(np.arange(3), 4)
    meshes = np.zeros((12, 4, 3), np.float32)
    meshes[:, :, 0] = 10.0 * ids[:, None]
    meshes[:, :, 2] = 1.0 * exps[:, None]
    exps_missing = exps.copy()
    exps_missing[::3] = -1
    result = training_diversity(meshes, ids, exps_missing, pairs=500, rng=0)
    assert set(result) == {"global", "identity", "expression"}
    # same identity: z differs by 1 or 2 (labels 1, 2 only for expression rows kept) ...
    assert 1.0 <= result["identity"]["mean"] <= 2.0
    # same expression: x differs by a multiple of 10
    assert result["expression"]["mean"] >= 10.0
    assert result["global"]["mean"] > result["identity"]["mean"]


# --------------------------------------------------------------------------- distribution


def test_one_nna_identical_and_disjoint_distributions():
    a = smooth_meshes(150, seed=10)
    b = smooth_meshes(150, seed=11)  # same distribution, independent draws
    same = one_nearest_neighbor_accuracy(a, b)["accuracy"]
    assert 0.35 <= same <= 0.65
    far = b + np.float32(200.0)  # disjoint
    assert one_nearest_neighbor_accuracy(a, far)["accuracy"] == 1.0
    # copies: each sample's nearest neighbour is its reference twin
    assert one_nearest_neighbor_accuracy(a, a.copy())["accuracy"] < 0.05


def test_coverage_and_mmd_known_answers():
    ref = smooth_meshes(40, seed=3)
    assert coverage(ref, ref)["coverage"] == 1.0
    assert minimum_matching_distance(ref, ref)["mmd"] == 0.0
    collapsed = np.repeat(ref[:1], 10, axis=0)  # mode collapse: one reference mesh covered
    assert coverage(collapsed, ref)["coverage"] == pytest.approx(1 / 40)
    # MMD of the collapsed set: mean distance of every reference mesh to ref[0]
    expected = np.mean([naive_mvd(r, ref[0]) for r in ref])
    assert minimum_matching_distance(collapsed, ref)["mmd"] == pytest.approx(expected, rel=1e-6)
    result = metrics.compute("distribution", samples=collapsed, reference=ref)
    assert result["coverage"] == pytest.approx(1 / 40) and result["1-nna"] > 0.5


def test_coverage_matches_a_loop():
    s, r = smooth_meshes(25, seed=1), smooth_meshes(30, seed=2)
    d = pairwise_mean_vertex_distance(s, r)
    assert coverage(s, r)["coverage"] == pytest.approx(len(set(d.argmin(1))) / 30)
    assert minimum_matching_distance(s, r)["mmd"] == pytest.approx(d.min(0).mean(), rel=1e-12)


def test_kid_matches_a_loop_and_separates():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 0.5
    # the unbiased estimator on the whole sets, written out pair by pair
    k = lambda a, b: (a @ b / 8 + 1) ** 3  # noqa: E731
    m = 60
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    result = kernel_inception_distance(x, y, num_subsets=1, max_subset_size=60, rng=0)
    assert result["kid"] == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    same = kernel_inception_distance(x, rng.normal(size=(60, 8)), num_subsets=20, rng=0)["kid"]
    assert abs(same) < result["kid"] / 3


# --------------------------------------------------------------------------- roughness


def test_roughness_of_planes_is_zero():
    v, f, _ = grid_plane(9)
    assert roughness(v[None], f)["mean"] == pytest.approx(0.0, abs=1e-12)
    assert roughness(v[None], f, kind="uniform")["mean"] == pytest.approx(0.0, abs=1e-12)  # regular grid
    # an irregular (jittered in-plane), tilted plane: the normal measure is still 0
    rng = np.random.default_rng(0)
    jitter = v + np.c_[rng.uniform(-0.3, 0.3, (len(v), 2)), np.zeros(len(v))]
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    assert roughness((jitter @ rot.T)[None], f)["mean"] == pytest.approx(0.0, abs=1e-6)  # float32 rounding
    assert roughness(jitter[None], f, kind="uniform")["mean"] > 0.01


def test_roughness_matches_a_loop_and_noise_is_rougher():
    v, f, _ = sphere_cap(rings=10, segments=24, radius=50.0, angle=0.5)
    op = RoughnessOperator(f, len(v))
    border = boundary_vertices(f, len(v))
    assert border.sum() == 24  # the outer ring
    values = op.per_vertex(v[None], "uniform")[0]
    neighbours = [set() for _ in v]
    for a, b, c in f:
        neighbours[a] |= {b, c}
        neighbours[b] |= {a, c}
        neighbours[c] |= {a, b}
    expected = [np.linalg.norm(v[sorted(neighbours[i])].mean(0) - v[i]) for i in range(len(v)) if not border[i]]
    np.testing.assert_allclose(values, expected, rtol=1e-10)
    noisy = v + np.random.default_rng(0).normal(0, 0.5, v.shape)
    result = roughness(noisy[None], f, reference=v[None])
    assert result["ratio"] > 2


# --------------------------------------------------------------------------- oracle


class TinyICT:
    """An ICT-like linear model with random smooth modes: neutral (V, 3), 100 + 53 modes."""

    def __init__(self, n_vertices: int = 400, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.neutral = rng.normal(0, 30, (n_vertices, 3)).astype(np.float32)
        self.identity_modes = rng.normal(0, 1, (100, n_vertices, 3)).astype(np.float32)
        self.expression_modes = rng.normal(0, 2, (53, n_vertices, 3)).astype(np.float32)

    def mesh(self, a, b):
        return (self.neutral + np.tensordot(a, self.identity_modes, 1) + np.tensordot(b, self.expression_modes, 1)).astype(np.float32)


def test_oracle_recovers_exact_coefficients():
    model = TinyICT()
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 100)), rng.uniform(0, 1, (6, 53)) * (rng.uniform(size=(6, 53)) < 0.2)
    meshes = model.mesh(a, b)
    for bounded in (False, True):
        coeffs = OracleProjector(model, bounded=bounded).project(meshes)
        np.testing.assert_allclose(coeffs["identity"], a, atol=2e-3)
        np.testing.assert_allclose(coeffs["expression"], b, atol=2e-3)
        assert coeffs["residual"].max() < 1e-3


def test_oracle_decoupling_known_models():
    model = TinyICT()
    proj = OracleProjector(model)
    rng = np.random.default_rng(2)
    ref_a, ref_b = rng.normal(size=(300, 100)), rng.uniform(0, 1, (300, 53)) * (rng.uniform(size=(300, 53)) < 0.2)
    reference = {"identity": ref_a, "expression": ref_b}
    # a "model" that ignores z_exp: every sample of a group is the same face
    collapsed = [np.repeat(model.mesh(rng.normal(size=100), ref_b[g])[None], 8, axis=0) for g in range(5)]
    result = oracle_decoupling(proj, collapsed, reference)
    assert result["identity_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert result["expression_ratio"] == pytest.approx(0.0, abs=1e-6)
    # a perfectly decoupled model: fixed identity, expressions from the data distribution
    groups = [model.mesh(np.repeat(rng.normal(size=(1, 100)), 40, axis=0), ref_b[rng.choice(300, 40)]) for _ in range(5)]
    result = oracle_decoupling(proj, groups, reference, fixed="identity")
    assert result["fixed_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert 0.6 < result["free_ratio"] < 1.5
    # entangled: identity drifts as much as in the data
    drifting = [model.mesh(rng.normal(size=(40, 100)), ref_b[rng.choice(300, 40)]) for _ in range(5)]
    assert oracle_decoupling(proj, drifting, reference)["identity_ratio"] > 0.6


def test_registry_lists_and_rejects():
    names = metrics.list_metrics()
    for name in ("specificity", "diversity", "mmd", "coverage", "1-nna", "kid", "roughness", "oracle_decoupling", "decoupling",
                 "affine_span_residual"):
        assert name in names
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute("nope")


# --------------------------------------------------------------------------- span of the training faces


def naive_span_residual(faces, basis) -> list[float]:
    """Gram-Schmidt over the basis faces' offsets from their mean, one face at a time."""
    mean = basis.astype(np.float64).mean(axis=0).ravel()
    axes: list[np.ndarray] = []
    for b in basis:
        d = b.astype(np.float64).ravel() - mean
        for a in axes:
            d -= (d @ a) * a
        if np.linalg.norm(d) > 1e-6:
            axes.append(d / np.linalg.norm(d))
    out = []
    for f in faces:
        r = f.astype(np.float64).ravel() - mean
        for a in axes:
            r -= (r @ a) * a
        out.append(float(np.linalg.norm(r.reshape(-1, 3), axis=1).mean()))
    return out


def test_span_residual_matches_gram_schmidt():
    basis, faces = smooth_meshes(7, seed=1), smooth_meshes(5, seed=2)
    result = affine_span_residual(faces, basis)
    np.testing.assert_allclose(result["per_face"], naive_span_residual(faces, basis), rtol=1e-6)
    assert result["rank"] == 6 and result["mean"] == pytest.approx(result["per_face"].mean())
    curve = affine_span_residual(faces, basis, components=(0, 6, 99))["by_components"]
    assert curve[6] == curve[99] == pytest.approx(result["mean"])  # k >= rank: the whole hull
    assert curve[0] == pytest.approx(np.linalg.norm(faces - basis.astype(np.float64).mean(axis=0), axis=-1).mean())


def test_faces_in_the_affine_hull_are_reproduced_and_repeats_add_no_direction():
    basis = smooth_meshes(4, seed=3)
    weights = np.array([[0.2, 0.3, 0.1, 0.4], [1.5, -0.5, 0.25, -0.25]])  # affine: each row sums to 1
    inside = np.tensordot(weights, basis.astype(np.float64), axes=1)
    assert affine_span_residual(inside, basis)["per_face"].max() < 1e-5
    repeated = affine_span_residual(inside, np.concatenate([basis, basis[:2]]))
    assert repeated["rank"] == 3 and repeated["per_face"].max() < 1e-5
    one = affine_span_residual(inside, basis[:1])  # a single face: the distance to it
    assert one["rank"] == 0
    np.testing.assert_allclose(one["per_face"], np.linalg.norm(inside - basis[0], axis=-1).mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="differ in vertices"):
        affine_span_residual(inside[:, :10], basis)
