"""Dataset synthesis from the ICT model: emotions, deformation transfer, labels and splits."""

from __future__ import annotations


import igl
import numpy as np
import pytest

from facegan.data import emotions as emo
from facegan.data.deformation_transfer import (
    DeformationTransfer,
    expressions_for_identity,
    gradient_operator,
    transfer_vs_additive,
)

from facegan.data.synth import PROFILES, plan_dataset, summarize, synthesize

from conftest import ICT_DIR, needs_ict  # the ICT data location and its skip mark


@pytest.fixture(scope="module")
def dt(ict):
    return DeformationTransfer(ict.narrow().neutral, ict.narrow_template().triangles)


@pytest.fixture(scope="module")
def small_plan():
    return plan_dataset(profile="small", seed=0)


# --- plan: labels, fractions, splits ----------------------------------------------------------


def test_small_plan_sizes_and_label_fraction(small_plan):
    s = summarize(small_plan)
    assert 2700 <= s["n_meshes"] <= 3300
    assert s["label_fraction"] == pytest.approx(0.07, abs=0.01)
    assert s["counts"]["motion/test"] + s["counts"]["spontaneous/test"] == pytest.approx(175, abs=10)
    assert set(s["counts"]) == {"static/train", "motion/train", "motion/test", "spontaneous/train", "spontaneous/test"}


def test_paper_profile_counts():
    c = PROFILES["paper"].counts()
    assert c["total"] == pytest.approx(30000, rel=0.05)
    assert c["labeled"] / c["total"] == pytest.approx(0.07, abs=0.005)
    assert c["test"] == pytest.approx(175, abs=5)


def test_identities_splits_and_parts(small_plan):
    lab = small_plan.labels
    ids, split, part = (np.asarray(lab[k]) for k in ("identity", "split", "part"))
    assert all(i.startswith("id") for i in ids)  # every mesh has an identity
    assert len(set(lab["mesh_id"])) == len(ids)
    train, test = set(ids[split == "train"]), set(ids[split == "test"])
    assert train and test and not train & test
    assert set(part[split == "test"]) == {"motion", "spontaneous"}
    # each identity belongs to exactly one part
    for i in np.unique(ids):
        assert len(set(part[ids == i])) == 1
    # identity factors are constant per identity and distinct across identities
    for rows in small_plan.identity_rows()[:5]:
        assert np.ptp(small_plan.identity_coeffs[rows], axis=0).max() == 0


def test_expression_labels_follow_the_paper(small_plan):
    lab = small_plan.labels
    expr, part, seq, frame = (np.asarray(lab[k]) for k in ("expression", "part", "sequence", "frame"))
    assert (expr[part == "static"] != "").all()
    assert set(expr[part == "static"]) == set(emo.EMOTIONS)
    for s in np.unique(seq[part == "motion"])[:10]:
        rows = np.flatnonzero(seq == s)
        labeled = rows[expr[rows] != ""]
        assert len(labeled) == 3
        assert expr[labeled[0]] == expr[labeled[-1]] == "neutral"
        assert expr[labeled[1]] == s.split("/")[-1]
        assert frame[labeled[0]] == 0
        peak = labeled[1]
        assert small_plan.intensity[peak] == small_plan.intensity[rows].max() > 0.5
    spont = part == "spontaneous"
    ids = np.asarray(lab["identity"])
    for i in np.unique(ids[spont]):
        rows = np.flatnonzero(ids == i)
        labeled = rows[expr[rows] != ""]
        assert len(labeled) == 1 and expr[labeled[0]] == "neutral"
        assert labeled[0] == rows[0] and not small_plan.expression_coeffs[labeled[0]].any()
    assert (small_plan.emotion[spont & (expr == "")] == -1).all()


def test_plan_is_deterministic():
    a, b = plan_dataset(profile="tiny", seed=5), plan_dataset(profile="tiny", seed=5)
    c = plan_dataset(profile="tiny", seed=6)
    np.testing.assert_array_equal(a.expression_coeffs, b.expression_coeffs)
    np.testing.assert_array_equal(a.identity_coeffs, b.identity_coeffs)
    assert a.labels == b.labels
    assert not np.array_equal(a.identity_coeffs, c.identity_coeffs)


# --- emotions -----------------------------------------------------------------------------------


def test_weights_valid_and_mouth_close_constraint(small_plan):
    names = list(emo.ICT_EXPRESSIONS)
    c, j = names.index("mouthClose"), names.index("jawOpen")
    rng = np.random.default_rng(0)
    mixes = np.stack([emo.random_mixture(rng) for _ in range(2000)])
    seqs = emo.mixture_sequence(rng, 300)
    for w in (small_plan.expression_coeffs, mixes, seqs):
        assert w.min() >= 0 and w.max() <= 1
        assert (w[:, c] <= w[:, j] + 1e-7).all()
    assert (mixes[:, c] > 0).any()  # mouthClose does get used, with jawOpen
    active = (mixes > 0).sum(axis=1)
    assert active.min() >= 1 and active.max() <= 8  # sparse: a few groups (pairs count twice)
    assert np.abs(np.diff(seqs, axis=0)).max() < 0.2  # smooth in time (<= 1.5 * 0.9 / 8 per frame)
    bad = np.zeros(53, np.float32)
    bad[c], bad[j] = 0.9, 0.2
    assert emo.constrain(bad)[c] == pytest.approx(0.2)


def test_recipes_are_symmetric_and_bounded():
    rng = np.random.default_rng(1)
    names = emo.ICT_EXPRESSIONS
    for e in emo.EMOTIONS[1:]:
        w, intensity = emo.sample_emotion(e, rng)
        assert 0.6 <= intensity <= 1.0 and 0 <= w.min() and w.max() <= 1
        for base in emo.RECIPES[e].primary:
            if base + "_L" in names:
                wl, wr = w[names.index(base + "_L")], w[names.index(base + "_R")]
                assert wl > 0 and wr > 0 and abs(wl - wr) <= 0.2 * max(wl, wr)
    w, intensity = emo.sample_emotion("neutral", rng)
    assert intensity == 0 and not w.any()


def test_intensity_curve():
    c = emo.intensity_curve(21, 8, hold=2)
    assert c[0] == 0 and c[-1] == 0 and c[8] == c[10] == 1
    assert (np.diff(c[:9]) >= 0).all() and (np.diff(c[10:]) <= 0).all()


@needs_ict
def test_emotions_move_the_right_regions(ict, dt):
    narrow, lm = ict.narrow(), ict.narrow_template().landmarks
    brows, corners = lm[17:27], lm[[48, 54]]
    a = np.random.default_rng(2).standard_normal(100)
    weights = np.stack([emo.nominal_weights(e) for e in emo.EMOTIONS])
    faces = expressions_for_identity(narrow, a, weights, "transfer", dt)
    d = faces - narrow.identity_neutral(a)
    move = np.linalg.norm(d, axis=-1)
    happy, surprise, sad = (emo.EMOTIONS.index(e) for e in ("happiness", "surprise", "sadness"))
    assert move[happy, corners].mean() > 3 * move[happy, brows].mean()
    assert d[happy, corners, 1].mean() > 2  # lip corners pulled up (mm)
    assert d[surprise, brows, 1].mean() > 2  # brows raised
    assert d[sad, lm[[21, 22]], 1].mean() > 0.5  # inner brows raised (AU1)
    assert np.abs(d[0]).max() < 1e-3  # neutral stays neutral


# --- deformation transfer ---------------------------------------------------------------------


def _bumpy_grid(n: int, rng: np.random.Generator, amp: float) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64)
    z = amp * np.sin(xs) * np.cos(0.7 * ys) + rng.normal(0, 0.05, xs.shape)
    verts = np.stack([xs.ravel(), ys.ravel(), z.ravel()], axis=1)
    tris = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            tris += [(a, a + 1, a + n + 1), (a, a + n + 1, a + n)]
    return verts, np.array(tris, np.int64)


def _naive_transfer(src0, src1, tgt0, tris, regularization):
    """Reference: per-triangle loop, dense matrices, gradients from the metric tensor."""
    n_v, n_t = len(tgt0), len(tris)
    A = np.zeros((3 * n_t, n_v))
    rhs = np.zeros((3 * n_t, 3))
    w = np.zeros(3 * n_t)

    def frame(p, i, j, k):
        e1, e2 = p[j] - p[i], p[k] - p[i]
        n = np.cross(e1, e2)
        return np.column_stack([e1, e2, n / np.sqrt(np.linalg.norm(n))])

    for t, (i, j, k) in enumerate(tris):
        Q = frame(src1, i, j, k) @ np.linalg.inv(frame(src0, i, j, k))
        E = np.column_stack([tgt0[j] - tgt0[i], tgt0[k] - tgt0[i]])
        g = E @ np.linalg.inv(E.T @ E)  # gradients of the hat functions of j and k
        area = 0.5 * np.linalg.norm(np.cross(E[:, 0], E[:, 1]))
        for c in range(3):
            A[3 * t + c, [i, j, k]] = [-g[c].sum(), g[c, 0], g[c, 1]]
            rhs[3 * t + c] = Q[:, c]
            w[3 * t + c] = area
    normal = A.T @ (w[:, None] * A)
    eps = regularization * np.diag(normal).mean()
    b = A.T @ (w[:, None] * rhs) + eps * (tgt0 + src1 - src0)
    return np.linalg.solve(normal + eps * np.eye(n_v), b)


def test_vectorized_transfer_matches_naive_loop():
    rng = np.random.default_rng(3)
    src0, tris = _bumpy_grid(6, rng, 0.5)
    tgt0 = _bumpy_grid(6, rng, 0.9)[0] * [1.2, 0.9, 1.0]
    theta = 0.4 * src0[:, :1] / 5  # a bend plus local noise: non-rigid, non-linear
    src1 = np.concatenate([src0[:, :1] * np.cos(theta), src0[:, 1:2], src0[:, 2:] + src0[:, :1] * np.sin(theta)], 1)
    src1 += rng.normal(0, 0.05, src1.shape)
    dtr = DeformationTransfer(src0, tris, regularization=1e-6)
    fast = dtr.transfer(np.stack([src1, src0]), tgt0)
    np.testing.assert_allclose(fast[0], _naive_transfer(src0, src1, tgt0, tris, 1e-6), atol=1e-6)
    np.testing.assert_allclose(fast[1], tgt0, atol=1e-6)  # source expression = neutral -> target neutral


def test_gradient_operator_gives_cotangent_laplacian():
    rng = np.random.default_rng(4)
    verts, tris = _bumpy_grid(5, rng, 0.7)
    G, areas = gradient_operator(verts, tris)
    L = (G.T @ (np.repeat(areas, 3)[:, None] * G.toarray())).astype(np.float64)
    np.testing.assert_allclose(L, -igl.cotmatrix(verts, tris).toarray(), atol=1e-10)


def test_rigid_motion_transfers_as_rigid_motion():
    rng = np.random.default_rng(5)
    src0, tris = _bumpy_grid(5, rng, 0.5)
    tgt0 = _bumpy_grid(5, rng, 1.0)[0]
    c, s = np.cos(0.3), np.sin(0.3)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    out = DeformationTransfer(src0, tris).transfer((src0 @ R.T)[None], tgt0)[0]
    expected = tgt0 @ R.T
    np.testing.assert_allclose(out - out.mean(0), expected - expected.mean(0), atol=1e-5)


@needs_ict
def test_transfer_identity_cases_on_ict(ict, dt):
    narrow = ict.narrow()
    a = np.random.default_rng(6).standard_normal(100)
    target = narrow.identity_neutral(a)
    w = np.stack([np.zeros(53, np.float32), emo.nominal_weights("surprise")])
    out = dt.transfer(narrow.neutral[None] + narrow.expression_offsets(w), target)
    assert np.abs(out[0] - target).max() < 1e-3  # neutral source -> target neutral, mm
    # target = source neutral: the source expression comes back unchanged
    same = dt.transfer(narrow.neutral[None] + narrow.expression_offsets(w[1:]), narrow.neutral)
    assert np.abs(same[0] - (narrow.neutral + narrow.expression_offsets(w[1]))).max() < 1e-3


@needs_ict
def test_transfer_and_additive_differ_but_are_close(ict):
    rng = np.random.default_rng(7)
    weights = np.stack([emo.sample_emotion(e, rng)[0] for e in emo.EMOTIONS[1:]])
    stats = transfer_vs_additive(ict.narrow(), ict.narrow_template().triangles, rng.standard_normal((2, 100)), weights)
    assert 0.02 < stats["mean"] < 0.5 * stats["mean_expression"]
    assert stats["max"] < 6.0  # mm


# --- end to end ---------------------------------------------------------------------------------


@needs_ict
@pytest.mark.parametrize("method", ["transfer", "additive"])
def test_synthesize_tiny(ict, method):
    res = synthesize(ict, profile="tiny", seed=1, method=method, progress=False)
    n = len(res.labels["mesh_id"])
    assert res.meshes.shape == (n, 6706, 3) and res.meshes.dtype == np.float32
    assert np.isfinite(res.meshes).all()
    assert res.factors["identity_coeffs"].shape == (n, 100)
    assert res.factors["expression_coeffs"].shape == (n, 53)
    assert res.factors["emotion"].shape == (n,) and res.factors["intensity"].shape == (n,)
    assert res.template.n_vertices == 6706
    assert res.info["method"] == method and res.info["n_meshes"] == n
    assert set(res.labels) == {"mesh_id", "identity", "expression", "part", "sequence", "frame", "split"}
    # the static neutral of an identity is exactly its ICT neutral face
    k = res.labels["mesh_id"].index("static/id000/neutral")
    expected = ict.narrow().identity_neutral(res.factors["identity_coeffs"][k])
    assert np.abs(res.meshes[k] - expected).max() < 1e-3


def test_unknown_profile_or_method_is_a_user_error(ict):
    from facegan.errors import FaceganError

    with pytest.raises(FaceganError, match="profile 'huge'"):
        plan_dataset(profile="huge")
    with pytest.raises(FaceganError, match="method 'magic'"):
        synthesize(ict, profile="tiny", method="magic", progress=False)
