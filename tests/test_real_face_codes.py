"""The reconstruction of the real faces (beyond the paper; facegan.train.reconstruction): the loss, the pinned
codes, the refinement of the free codes, and training with it."""

import contextlib
import csv

import pytest
import torch

from facegan.errors import FaceganError
from facegan.nn.losses import reconstruction_loss
from facegan.nn.networks import Generator
from facegan.model import FaceModel
from facegan.train.checkpoint import export_model_from_checkpoint, load_checkpoint
from facegan.train.data import MISSING, blend, novel_identity_faces
from facegan.train.loop import draw_fixed_codes, train
from facegan.train.reconstruction import limit_to_prior, pinned_codes, refine_codes
from test_train import synth, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reconstruction_loss_is_the_mean_absolute_error_over_the_chart():
    mask = torch.tensor([[True, False], [True, True]])  # 3 chart pixels, 9 values per face
    real = torch.zeros(2, 3, 2, 2)
    fake = torch.zeros(2, 3, 2, 2)
    fake[0, :, 0, 0] = torch.tensor([0.3, -0.3, 0.3])  # face 0: |error| sum 0.9 over the chart
    fake[0, :, 0, 1] = 5.0  # outside the chart: ignored
    fake[1, 2, 1, 1] = -1.8  # face 1: 1.8
    expected = (0.9 / 9 + 1.8 / 9) / 2
    assert reconstruction_loss(fake, real, mask).item() == pytest.approx(expected)


def test_pinned_codes_are_the_fixed_codes_of_the_labeled_factors_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    fixed = [torch.randn(4, 3, generator=g), torch.randn(5, 2, generator=g)]
    labels = [torch.tensor([2, 0, 3]), torch.tensor([MISSING, 4, MISSING])]
    values, pinned = pinned_codes(labels, fixed, noise_size=2)
    assert values.shape == pinned.shape == (3, 3 + 2 + 2)
    for i in range(3):  # the definition, face by face and factor by factor
        column = 0
        for lab, table in zip(labels, fixed):
            size = table.shape[1]
            block = slice(column, column + size)
            if lab[i] == MISSING:
                assert not pinned[i, block].any() and not values[i, block].any()
            else:
                assert pinned[i, block].all() and torch.equal(values[i, block], table[lab[i]])
            column += size
        assert not pinned[i, column:].any()  # the noise is always free


def test_codes_are_limited_to_the_prior_ball_block_by_block():
    g = torch.Generator().manual_seed(2)
    codes = 3 * torch.randn(6, 3 + 2, generator=g)
    codes[0] = 0.01  # inside every ball: unchanged
    limited = limit_to_prior(codes, [3, 2], radius=1.0)
    for i in range(6):  # the definition, block by block
        for block, size in ((slice(0, 3), 3), (slice(3, 5), 2)):
            norm = codes[i, block].norm().item()
            expected = codes[i, block] * min(1.0, size ** 0.5 / norm)
            assert torch.allclose(limited[i, block], expected, atol=1e-6)
    assert torch.equal(limited[0], codes[0])
    assert torch.equal(limit_to_prior(codes, [3, 2], radius=0.0), codes)  # 0 = no limit


def tiny_generator() -> tuple[Generator, torch.Tensor]:
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[:2] = False
    torch.manual_seed(0)
    return Generator([3, 2], 2, mask, base_channels=4), mask


def test_refining_moves_only_the_free_codes_lowers_the_loss_and_leaves_g_alone():
    generator, mask = tiny_generator()
    generator.eval()
    g = torch.Generator().manual_seed(1)
    start = torch.randn(4, 7, generator=g)
    pinned = torch.zeros(4, 7, dtype=torch.bool)
    pinned[:, :3] = True
    with torch.no_grad():  # faces G reproduces exactly from codes that agree with start where it is pinned
        real = generator(torch.where(pinned, start, torch.randn(4, 7, generator=g)))
    before = reconstruction_loss(generator(start), real, mask).item()
    weights = [p.detach().clone() for p in generator.parameters()]

    refined = refine_codes(generator, start, pinned, real, mask, steps=30, lr=0.05, autocast=contextlib.nullcontext,
                           sizes=[3, 2, 2], radius=0.0)

    assert torch.equal(refined[pinned], start[pinned])
    assert not torch.equal(refined[~pinned], start[~pinned])
    far = refine_codes(generator, 10 * start, pinned, real, mask, steps=3, lr=0.05,
                       autocast=contextlib.nullcontext, sizes=[3, 2, 2], radius=1.0)
    assert torch.equal(far[pinned], 10 * start[pinned])  # pinned codes are never limited
    assert (far[:, 3:5].norm(dim=1) <= 2 ** 0.5 + 1e-5).all() and (far[:, 5:].norm(dim=1) <= 2 ** 0.5 + 1e-5).all()
    assert reconstruction_loss(generator(refined), real, mask).item() < 0.5 * before
    assert all(p.grad is None for p in generator.parameters())
    assert all(torch.equal(p, w) for p, w in zip(generator.parameters(), weights))


def test_training_reproduces_the_real_faces_from_codes_pinned_to_their_labels(tmp_path):
    data = synth()
    run = tmp_path / "run"
    train(data, tiny_config("lambda_rec=1.0"), run)
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    codes = tensors["real_codes"]
    assert codes.shape == (len(data), sum(meta["code_sizes"]) + meta["noise_size"])

    visited = codes.abs().sum(dim=1) > 0  # the table starts at 0; each G step refines one real batch
    assert 0 < visited.sum() < len(data)
    labels = [data.labels[f] for f in meta["factors"]]
    fixed = [tensors[f"fixed_codes.{f}"] for f in meta["factors"]]
    values, pinned = pinned_codes(labels, fixed, meta["noise_size"])
    assert torch.equal(codes[visited][pinned[visited]], values[visited][pinned[visited]])

    with (run / "log.csv").open() as fh:
        rec = [float(row["g_rec"]) for row in csv.DictReader(fh)]
    assert len(rec) == 4 and all(r > 0 for r in rec)


def test_novel_identity_faces_wear_one_blend_of_the_shapes_and_of_their_codes():
    """rec_novel: a chosen face k becomes x_k - a[id_k] + (mean + sum_i c_i (A_i - mean)), coded by
    mean + sum_i c_i (T_i - mean) with the same c ~ N(0, I / m); checked by a loop over faces and identities."""
    g = torch.Generator().manual_seed(0)
    shapes, codes = 0.1 * torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 4, generator=g)
    novel_from, novel_codes = shapes[[0, 2, 4]], codes[[0, 2, 4]]  # the identities that have images
    identity = torch.tensor([0, 2, 4, MISSING, 2, 0, 4, 2])
    x = 0.1 * torch.randn(8, 3, 8, 8, generator=g)  # small values: nothing is clamped

    out, new_codes, chosen = novel_identity_faces(x, identity, shapes, 0.6, torch.Generator().manual_seed(3),
                                                  novel_from, novel_codes)

    replay = torch.Generator().manual_seed(3)  # the same draws, in the same order
    expected_chosen = (torch.rand(8, generator=replay) < 0.6) & (identity >= 0)
    weights = torch.randn(8, 3, generator=replay) / 3 ** 0.5
    assert torch.equal(chosen, expected_chosen) and not chosen[3] and 0 < chosen.sum() < 8
    for k in range(8):
        if not chosen[k]:
            assert torch.equal(out[k], x[k]) and not new_codes[k].any()
            continue
        shape, code = novel_from.mean(0).clone(), novel_codes.mean(0).clone()
        for i in range(3):
            shape += weights[k, i] * (novel_from[i] - novel_from.mean(0))
            code += weights[k, i] * (novel_codes[i] - novel_codes.mean(0))
        torch.testing.assert_close(out[k], x[k] - shapes[identity[k]] + shape)
        torch.testing.assert_close(new_codes[k], code)
    # a training identity is the blend with c = e_j: its own shape and its own code
    one_hot = torch.eye(3)
    torch.testing.assert_close(blend(one_hot, novel_from), novel_from)
    torch.testing.assert_close(blend(one_hot, novel_codes), novel_codes)


@pytest.mark.parametrize("n", [6, 12])  # fewer identities than code dimensions, and more
def test_isotropic_identity_codes_make_blends_spread_as_the_prior(n):
    """The blends of the identity codes with c ~ N(0, I / n) have covariance (T - mean)^T (T - mean) / n: with
    isotropic_identity_codes it is the identity on the codes' span (a projection), with Gaussian codes it is
    stretched. The other factors' codes, and the drawn identity codes' mean, are those of the default draw."""
    gaussian = draw_fixed_codes(3, [n, 4], [8, 5])
    isotropic = draw_fixed_codes(3, [n, 4], [8, 5], isotropic_identity=True)
    assert torch.equal(gaussian[1], isotropic[1])
    torch.testing.assert_close(isotropic[0].mean(0), gaussian[0].mean(0))
    for codes, spread_evenly in ((isotropic[0], True), (gaussian[0], False)):
        deviations = (codes - codes.mean(0)).double()
        covariance = deviations.T @ deviations / n
        eigenvalues = torch.linalg.eigvalsh(covariance)
        rank = min(n - 1, 8)
        if spread_evenly:
            torch.testing.assert_close(covariance @ covariance, covariance)  # a projection
            torch.testing.assert_close(eigenvalues[-rank:], torch.ones(rank, dtype=torch.float64))
        else:
            assert eigenvalues[-1] > 1.5 * eigenvalues[-rank]


def test_training_with_new_identities_in_the_reconstruction(tmp_path):
    run = tmp_path / "run"
    train(synth(), tiny_config("lambda_rec=1.0", "rec_novel=0.5", "isotropic_identity_codes=true"), run)
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    assert tensors["real_codes"].abs().sum() > 0
    # a sampling model that draws z_exp and the noise from the faces' codes
    export_model_from_checkpoint(run / "checkpoint.safetensors", run / "banked.safetensors", ["expression", "noise"])
    model = FaceModel.load(run / "banked.safetensors")
    assert sorted(model.code_bank) == sorted(model.bank_bandwidth) == ["expression", "noise"]
    assert model.code_bank["expression"].shape[1] == model.code_sizes[1]
    images, _ = model.sample(2, fix="identity", m=2, seed=0)
    assert images.shape[0] == 4 and torch.isfinite(images).all()
    with pytest.raises(FaceganError, match="rec_novel needs exactly two factors"):
        train(synth(n_classes=(4, 3, 2)), tiny_config("lambda_rec=1.0", "rec_novel=0.5"), tmp_path / "three")


def test_reconstruction_settings_are_checked():
    with pytest.raises(FaceganError, match="rec_novel needs lambda_rec"):
        tiny_config("rec_novel=0.5")
    with pytest.raises(FaceganError, match="rec_novel=2"):
        tiny_config("lambda_rec=1", "rec_novel=2")
    with pytest.raises(FaceganError, match="lambda_rec"):
        tiny_config("lambda_rec=-1")
    with pytest.raises(FaceganError, match="rec_lr"):
        tiny_config("lambda_rec=1", "rec_lr=0")
    with pytest.raises(FaceganError, match="rec_radius"):
        tiny_config("lambda_rec=1", "rec_radius=-1")
