"""Config, data validation, checkpoints, the training loop (variants, three factors, exact resume, DDP) and
the sampling model, on tiny synthetic geometry images."""

import hashlib
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from facegan.errors import FaceganError
from facegan.fit.fitting import FoldedGenerator, fitting_network
from facegan.model import FaceModel
from facegan.train import loop
from facegan.train.board import scalar_tag
from facegan.train.checkpoint import load_checkpoint, save_checkpoint
from facegan.train.config import TrainConfig, apply_overrides, config_differences, make_config
from facegan.train.curves import plot_training_log
from facegan.train.data import (TrainingImages, chart_vectors, fit_linear_descriptor, gaussian_identities,
                                identity_shape_images, recombine_identities, residual_descriptors,
                                shared_expression_pairs, to_network, to_uint8)
from facegan.train.loop import logged_training_seconds, lr_scale, train


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["g_channels=4", "d_channels=4", "feature_size=16", "batch_size=8", "max_iters=0", "epochs=2",
        "log_every=2", "sample_grid=2", "ckpt_every_iters=3", "ckpt_every_epochs=1", "sample_every_epochs=1",
        "progress=false"]


def synth(n: int = 96, r: int = 16, n_classes=(4, 3), seed: int = 0) -> TrainingImages:
    """Smooth images whose slopes depend on the classes of each factor; half the expression labels missing."""
    g = torch.Generator().manual_seed(seed)
    names = ["identity", "expression", "age"][: len(n_classes)]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
    img = 0.05 * torch.randn(n, 3, r, r, generator=g)
    labels, class_names = {}, {}
    for k, (name, c) in enumerate(zip(names, n_classes)):
        lab = torch.arange(n) % c if k == 0 else torch.randint(0, c, (n,), generator=g)
        img += 0.3 * torch.randn(c, 3, 1, 1, generator=g)[lab] * (xx if k % 2 == 0 else yy)
        if k > 0:
            lab = lab.clone()
            lab[::2] = -1
        labels[name], class_names[name] = lab.long(), [f"{name}{i}" for i in range(c)]
    u8 = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return TrainingImages(u8, xx ** 2 + yy ** 2 < 0.9, labels, class_names)


def tiny_config(*extra: str) -> TrainConfig:
    return make_config("small", overrides=[*TINY, *extra])


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ config


def test_config_unknown_key():
    with pytest.raises(FaceganError, match=r"unknown config key 'x' \(known: profile, variant, seed"):
        make_config(overrides=["x=1"])


@pytest.mark.parametrize("override, problem", [
    ("batch_size=0", "batch_size=0: must be positive"),
    ("descriptor_ridge=0", "descriptor_ridge=0.0: must be positive"),
    ("lambda_rec=-1", r"lambda_rec=-1.0: must be >= 0 \(0 = off\)"),
    ("max_iters=-1", r"max_iters=-1: must be >= 0"),
    ("rec_novel=1.5", r"rec_novel=1.5: must be a fraction in \[0, 1\]"),
    ("ema_beta=1", r"ema_beta=1.0: must be in \[0, 1\)"),
])
def test_config_values_no_run_can_use_are_refused(override, problem):
    with pytest.raises(FaceganError, match=f"config {problem}"):
        make_config(overrides=[override])


def test_config_types_profiles_toml(tmp_path):
    cfg = make_config("small", overrides=["lr_d=1e-3", "code_sizes=[10, 5, 3]", "channels_last=false", "amp=none"])
    assert cfg.lr_d == 1e-3 and cfg.code_sizes == [10, 5, 3] and cfg.channels_last is False
    assert cfg.code_sizes_for(4) == [10, 5, 3, cfg.extra_code_size]
    with pytest.raises(FaceganError, match="batch_size=abc"):
        make_config(overrides=["batch_size=abc"])
    with pytest.raises(FaceganError, match="variant"):
        make_config(overrides=["variant=bogus"])
    paper = make_config("paper")
    assert (paper.g_channels, paper.d_channels, paper.feature_size, paper.epochs, paper.max_iters) == (64, 64, 2048, 200, 0)
    toml = tmp_path / "run.toml"
    toml.write_text('profile = "paper"\nvariant = "no-tv"\nlambda_tv = 0\n')
    cfg = make_config(toml_path=toml, overrides=["seed=3"])
    assert (cfg.profile, cfg.variant, cfg.lambda_tv, cfg.seed, cfg.g_channels) == ("paper", "no-tv", 0.0, 3, 64)
    toml.write_text('batch_size = "big"\n')
    with pytest.raises(FaceganError, match="batch_size"):
        make_config(toml_path=toml)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert apply_overrides(cfg, ["epochs=5"]).epochs == 5 and cfg.epochs == 200


# -------------------------------------------------------------------------------------------- data


def test_to_network_range_mask_and_layout():
    data = synth(4)
    x = to_network(data.images, data.mask)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert torch.all(x[:, :, ~data.mask] == 0) and x.abs().max() <= 1
    assert x.is_contiguous(memory_format=torch.channels_last)
    back = to_uint8(x)
    assert torch.equal(back[:, data.mask], data.images[:, data.mask])


def test_dataset_without_identity_labels_is_refused(tmp_path):
    data = synth()
    data.labels["identity"][:] = -1
    with pytest.raises(FaceganError, match="'identity': no sample is labeled"):
        train(data, tiny_config(), tmp_path / "run")


def test_single_class_factor_is_refused(tmp_path):
    data = synth()
    data.class_names["expression"] = ["neutral"]
    data.labels["expression"] = torch.where(data.labels["expression"] >= 0, 0, -1)
    with pytest.raises(FaceganError, match="'expression': 1 class"):
        train(data, tiny_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_refusals(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"a": torch.arange(5), "b": torch.ones(2, 3)}, {"iteration": 7})
    tensors, meta = load_checkpoint(path)
    assert meta == {"iteration": 7} and torch.equal(tensors["a"], torch.arange(5))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))  # a pickle payload, as torch.save would write
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    for bad in (evil, truncated, garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(FaceganError) as info:
            load_checkpoint(bad)
        message = str(info.value)
        assert str(bad) in message and "\n" not in message


# ------------------------------------------------------------------------------------------- train


def test_train_writes_run_and_model_samples(tmp_path):
    run = tmp_path / "run"
    model_path = train(synth(), tiny_config(), run)
    assert model_path == run / "model.safetensors"
    assert {p.name for p in run.iterdir()} >= {"config.json", "log.csv", "curves.png", "checkpoint.safetensors",
                                               "model.safetensors", "samples"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch0001.png", "epoch0002.png"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, *rows = (run / "log.csv").read_text().splitlines()
    assert header.startswith("iteration,epoch,seconds,img_per_s,d_loss,d_wdist,d_gp,d_class_identity,d_acc_identity")
    assert [r.split(",")[0] for r in rows] == ["2", "4", "6", "8"]

    model = FaceModel.load(run)
    assert model.factors == ["identity", "expression"] and model.code_sizes == [65, 15]
    images, codes = model.sample(3, fix="expression", m=4, seed=0)
    assert images.shape == (12, 3, 16, 16) and torch.all(images[:, :, ~model.mask] == 0)
    assert torch.equal(codes["expression"][0], codes["expression"][3])
    assert not torch.equal(codes["expression"][3], codes["expression"][4])
    assert not torch.equal(codes["identity"][0], codes["identity"][1])
    again, _ = model.sample(3, fix="expression", m=4, seed=0)
    assert torch.equal(images, again)
    z = [codes["identity"][:2].clone().requires_grad_(True), codes["expression"][:2], codes["noise"][:2]]
    model.generate(z[:2], z[2]).sum().backward()  # differentiable in the codes (model fitting)
    assert z[0].grad is not None and z[0].grad.abs().sum() > 0
    torch.testing.assert_close(model.fixed_codes["identity"], load_checkpoint(run / "checkpoint.safetensors")[0][
        "fixed_codes.identity"])
    with pytest.raises(FaceganError, match="already holds a training run"):
        train(synth(), tiny_config(), run)


def test_three_factor_training(tmp_path):
    run = tmp_path / "run"
    train(synth(n_classes=(4, 3, 2)), tiny_config("epochs=1"), run)
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert {"d_class_age", "d_acc_age", "g_class_age", "g_feat_age"} <= set(header)
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["factors"] == ["identity", "expression", "age"]
    assert meta["code_sizes"] == [65, 15, 15]
    assert tensors["D.class_heads.2.logits.weight"].shape[0] == 2
    model = FaceModel.load(run)
    assert model.sample(2, fix="age", m=2)[0].shape == (4, 3, 16, 16)


@pytest.mark.parametrize("variant", ["acgan", "no-alternate", "no-tv", "no-feature", "id-only"])
def test_variants_train(tmp_path, variant):
    run = tmp_path / variant
    train(synth(n=48), tiny_config(f"variant={variant}", "epochs=1"), run)
    header = set((run / "log.csv").read_text().splitlines()[0].split(","))
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    n_branches = len({k.split(".")[2] for k in tensors if k.startswith("D.class_heads.")})
    assert n_branches == (1 if variant in ("acgan", "id-only") else 2)
    assert ("g_tv" in header) == (variant not in ("acgan", "no-tv"))
    assert any(c.startswith("g_feat") for c in header) == (variant in ("no-tv", "id-only"))
    assert ("d_class_fake_identity" in header) == (variant == "acgan")


# ------------------------------------------------------------------------------ expression descriptor


def additive_faces(r: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images x = shape[identity] + effect[expression], exactly (integer pixel values): 5 identities
    wearing each of 4 expressions twice; identity 4 has no expression label, others miss some."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.randint(40, 100, (5, r, r, 3), generator=g)
    effects = torch.randint(0, 100, (4, r, r, 3), generator=g)
    identity = torch.arange(5).repeat_interleave(8)
    expression = torch.arange(4).repeat(10)
    images = (shapes[identity] + effects[expression]).to(torch.uint8)
    labels = expression.clone()
    labels[identity == 4] = -1
    labels[[1, 4, 10, 11, 21]] = -1  # and a few more labels missing
    return images, identity, labels, expression


def test_expression_descriptor_depends_on_the_expression_only():
    """On exactly additive data the residual from the identity's expression-free shape is the expression
    effect: the descriptor of an image is the same whoever wears the expression, labeled or not."""
    images, identity, labels, truth = additive_faces()
    mask = torch.ones(16, 16, dtype=torch.bool)
    targets, valid = residual_descriptors(images, mask, identity, labels, 3)
    assert targets.shape == (40, 3) and bool(valid.all())
    torch.testing.assert_close(targets.var(0), torch.ones(3))
    for e in range(4):
        same = targets[truth == e]
        torch.testing.assert_close(same, same[:1].expand_as(same), atol=1e-4, rtol=0)
    assert torch.cdist(targets[truth == 0][:1], targets[truth == 1][:1]).item() > 0.5


def test_expression_descriptor_is_deterministic_and_skips_unlabeled_identities():
    images, identity, labels, _ = additive_faces()
    identity = identity.clone()
    identity[:3] = -1
    mask = torch.ones(16, 16, dtype=torch.bool)
    torch.manual_seed(1)
    a, valid = residual_descriptors(images, mask, identity, labels, 3)
    torch.manual_seed(2)
    b, _ = residual_descriptors(images, mask, identity, labels, 3)
    assert torch.equal(a, b)  # a resumed run computes the same targets
    assert valid.tolist() == [False] * 3 + [True] * 37 and not a[:3].any()
    with pytest.raises(FaceganError, match="no image has an identity label"):
        residual_descriptors(images, mask, torch.full_like(identity, -1), labels, 3)
    with pytest.raises(FaceganError, match="the data supports"):
        residual_descriptors(images[:3], mask, torch.tensor([0, 0, 1]), labels[:3], 3)


def test_training_with_an_expression_descriptor(tmp_path):
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1", "descriptor_size=3"), run)
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert "d_descriptor_expression" in header and "g_feat_expression" in header
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    assert tensors["D.class_heads.1.descriptor.weight"].shape == (3, 16)
    assert not any(k.startswith("D.class_heads.0.descriptor") for k in tensors)
    with pytest.raises(FaceganError, match="needs exactly two factors"):
        train(synth(n_classes=(4, 3, 2)), tiny_config("epochs=1", "descriptor_size=3"), tmp_path / "three")
    with pytest.raises(FaceganError, match="variant 'id-only' has none"):
        train(synth(), tiny_config("epochs=1", "descriptor_size=3", "variant=id-only"), tmp_path / "id-only")
    with pytest.raises(FaceganError, match="descriptor_size=-1"):
        tiny_config("descriptor_size=-1")


def test_linear_descriptor_reads_the_expression_off_the_image_alone():
    """The ridge map from an image to its descriptor cancels the identity: on additive faces it returns the
    residual descriptor without being told who wears the expression, and each class's prototype is that
    class's descriptor."""
    images, identity, labels, truth = additive_faces()
    mask = torch.ones(16, 16, dtype=torch.bool)
    targets, valid = residual_descriptors(images, mask, identity, labels, 3)
    linear = fit_linear_descriptor(images, mask, targets, valid, labels, ridge=1e-9, prototypes=True)
    assert linear.weights.shape == (3, 3, 16, 16) and linear.prototypes.shape == (4, 3)
    predicted = linear(to_network(images, mask))
    torch.testing.assert_close(predicted, targets, atol=1e-3, rtol=0)
    for e in range(4):
        torch.testing.assert_close(linear.prototypes[e], targets[truth == e][0], atol=1e-4, rtol=0)


def test_linear_descriptor_is_a_weighted_sum_of_the_chart_pixels():
    """descriptor = sum over chart pixels and channels of weight * value + bias; outside the chart the
    weights are 0, so what G writes there (0, by its mask) cannot matter."""
    images, identity, labels, _ = additive_faces()
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:14, 3:12] = True
    targets, valid = residual_descriptors(images, mask, identity, labels, 2)
    linear = fit_linear_descriptor(images, mask, targets, valid, labels, ridge=1e-3, prototypes=False)
    assert linear.prototypes is None and not linear.weights[:, :, ~mask].any()
    x = to_network(images[:3], mask)
    for b in range(3):
        for k in range(2):
            by_loop = sum(float(linear.weights[k, c, i, j]) * float(x[b, c, i, j])
                          for c in range(3) for i in range(16) for j in range(16) if mask[i, j])
            assert linear(x)[b, k].item() == pytest.approx(by_loop + float(linear.bias[k]), abs=1e-3)
    assert chart_vectors(images[:3], mask).shape == (3, 3 * int(mask.sum()))


def test_training_with_a_linear_descriptor_and_prototypes(tmp_path):
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1", "descriptor_size=3", "descriptor=linear", "descriptor_prototypes=true"),
          run)
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert "g_proto_expression" in header and "g_feat_expression" in header
    assert "d_descriptor_expression" not in header  # D learns no descriptor head
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    assert not any(".descriptor." in k for k in tensors)
    with pytest.raises(FaceganError, match="descriptor_prototypes needs"):
        tiny_config("descriptor_size=3", "descriptor_prototypes=true")
    with pytest.raises(FaceganError, match="descriptor=.pca.: expected one of head, linear"):
        tiny_config("descriptor=pca")


# ------------------------------------------------------------------------------- recombined faces


def test_recombined_face_is_the_expression_on_the_other_identity():
    """On additive faces x = a[identity] + b[expression], face k recombined with face j's identity is exactly
    the face of (identity j, expression k), labeled identity j; unlabeled identities are never recombined."""
    images, identity, labels, truth = additive_faces()
    mask = torch.ones(16, 16, dtype=torch.bool)
    shapes = identity_shape_images(images, mask, identity, labels)
    assert shapes.shape == (5, 3, 16, 16)
    x = to_network(images, mask)
    known = identity.clone()
    known[::7] = -1
    out, new_identity = recombine_identities(x, known, shapes, 1.0, torch.Generator().manual_seed(0))
    changed = new_identity != known
    assert bool(changed.any()) and not bool(changed[known < 0].any())
    for k in range(len(x)):  # the face of (new identity, same expression), by a loop over the images
        if known[k] < 0:
            assert torch.equal(out[k], x[k])
            continue
        twin = next(j for j in range(len(x)) if identity[j] == new_identity[k] and truth[j] == truth[k])
        torch.testing.assert_close(out[k], x[twin], atol=1e-4, rtol=0)
    none, same = recombine_identities(x, identity, shapes, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none, x) and torch.equal(same, identity)


def test_recombined_fraction_and_chart():
    """About ``fraction`` of the faces get another identity, and nothing is written outside the chart."""
    images, identity, labels, _ = additive_faces()
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:14, 3:12] = True
    shapes = identity_shape_images(images, mask, identity, labels)
    assert not shapes[:, :, ~mask].any()
    x = to_network(images, mask).repeat(25, 1, 1, 1)
    out, new_identity = recombine_identities(x, identity.repeat(25), shapes, 0.5, torch.Generator().manual_seed(0))
    moved = (new_identity != identity.repeat(25)).float().mean().item()
    assert 0.3 < moved < 0.5  # 0.5 chosen, of which 1 in 5 draw a partner with the same identity
    assert not out[:, :, ~mask].any()


def test_gaussian_identities_follow_the_linear_model_of_the_shapes():
    """A new identity is mean + sum_i c_i (a_i - mean), c ~ N(0, I / m): checked against that sum by a loop,
    and over many draws it has the shapes' mean and (population) covariance."""
    shapes = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    drawn = gaussian_identities(shapes, 3, torch.Generator().manual_seed(1))
    weights = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 6 ** 0.5
    mean = shapes.mean(0)
    for n in range(3):
        expected = mean.clone()
        for i in range(6):
            expected += weights[n, i] * (shapes[i] - mean)
        torch.testing.assert_close(drawn[n], expected)
    many = gaussian_identities(shapes, 200_000, torch.Generator().manual_seed(2)).flatten(1)
    flat = shapes.flatten(1)
    torch.testing.assert_close(many.mean(0), flat.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(many.T.cov(correction=0), flat.T.cov(correction=0), atol=0.02, rtol=0)


def test_novel_recombined_faces_keep_the_expression_and_lose_the_identity_label():
    """recombine_novel: a recombined face wears a new identity of the shapes' linear model, labeled -1,
    over its own expression residual; without it, the draws (and so the faces) are those of plain recombination."""
    g = torch.Generator().manual_seed(0)
    shapes, effects = 0.1 * torch.randn(5, 3, 8, 8, generator=g), 0.1 * torch.randn(4, 3, 8, 8, generator=g)
    identity, expression = torch.arange(5).repeat_interleave(4), torch.arange(4).repeat(5)
    x = shapes[identity] + effects[expression]  # small values: nothing is clamped
    # by default new identities come from all the shapes; with novel_from (e.g. the identities that have
    # images) from those shapes' model only
    for novel_from, model in ((None, shapes), (shapes[:3], shapes[:3])):
        out, new_identity = recombine_identities(x, identity, shapes, 1.0, torch.Generator().manual_seed(0), 1.0,
                                                 novel_from)
        assert bool((new_identity == -1).any())
        basis = (model - model.mean(0)).flatten(1).T  # (pixels, identities): the span of the linear model
        for k in torch.nonzero(new_identity == -1).flatten().tolist():
            worn = out[k] - effects[expression[k]]  # the face minus its own expression
            offset = (worn - model.mean(0)).flatten()[:, None]
            torch.testing.assert_close(basis @ torch.linalg.lstsq(basis, offset).solution, offset)
            assert all(not torch.allclose(worn, a) for a in shapes)  # none of the training identities
    plain = recombine_identities(x, identity, shapes, 0.5, torch.Generator().manual_seed(3))
    off = recombine_identities(x, identity, shapes, 0.5, torch.Generator().manual_seed(3), novel=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, off))


def test_training_with_recombined_faces(tmp_path):
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1", "recombine=0.5", "descriptor_size=3"), run)
    assert (run / "checkpoint.safetensors").exists()
    train(synth(), tiny_config("epochs=1", "recombine=0.5", "recombine_critic=true"), tmp_path / "critic")
    assert (tmp_path / "critic" / "checkpoint.safetensors").exists()
    with pytest.raises(FaceganError, match="recombine_critic needs recombine"):
        tiny_config("recombine_critic=true")
    with pytest.raises(FaceganError, match="recombine needs exactly two factors"):
        train(synth(n_classes=(4, 3, 2)), tiny_config("epochs=1", "recombine=0.5"), tmp_path / "three")
    with pytest.raises(FaceganError, match="variant 'acgan' classifies fakes"):
        train(synth(), tiny_config("epochs=1", "recombine=0.5", "variant=acgan"), tmp_path / "acgan")
    with pytest.raises(FaceganError, match="recombine=1.5"):
        tiny_config("recombine=1.5")
    train(synth(), tiny_config("epochs=1", "recombine=0.5", "recombine_novel=0.5", "descriptor_size=3"),
          tmp_path / "novel")
    assert (tmp_path / "novel" / "checkpoint.safetensors").exists()
    with pytest.raises(FaceganError, match="recombine_novel needs recombine"):
        tiny_config("recombine_novel=0.5")
    with pytest.raises(FaceganError, match="recombine_novel=2"):
        tiny_config("recombine=0.5", "recombine_novel=2")


# ----------------------------------------------------------------------------------- pair critic


def test_a_real_pair_is_one_expression_on_two_identities():
    """Each member of a real pair for the pair critic is the face of (its identity, face k's expression); a
    face without an identity label is paired with itself."""
    images, identity, labels, truth = additive_faces()
    mask = torch.ones(16, 16, dtype=torch.bool)
    shapes = identity_shape_images(images, mask, identity, labels)
    x = to_network(images, mask)
    known = identity.clone()
    known[::7] = -1
    pairs, members = shared_expression_pairs(x, known, shapes, torch.Generator().manual_seed(0))
    assert pairs.shape == (len(x), 6, 16, 16) and members.shape == (2, len(x))
    assert bool((members[0] != members[1]).any())
    for k in range(len(x)):
        for m in range(2):
            member = pairs[k, 3 * m: 3 * m + 3]
            if known[k] < 0:
                assert torch.equal(member, x[k]) and members[m, k] == -1
                continue
            twin = next(j for j in range(len(x)) if identity[j] == members[m, k] and truth[j] == truth[k])
            torch.testing.assert_close(member, x[twin], atol=1e-4, rtol=0)


def test_training_with_a_pair_critic(tmp_path):
    """pair_critic: D holds a 6-channel critic of pairs, trained and logged; bad setups are refused."""
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1", "pair_critic=true", "random_critic=true", "recombine=0.5",
                               "recombine_novel=0.5"), run)
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    assert tensors["D.pairs.trunk.0.weight"].shape[1] == 6
    rows = (run / "log.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    for column in ("d_pair_wdist", "d_pair_gp", "g_pair"):
        assert last[header.index(column)] != "", column
    train(synth(), tiny_config("epochs=1", "pair_critic=true"), tmp_path / "plain")  # without recombination
    assert "D.pairs.trunk.0.weight" in load_checkpoint(tmp_path / "plain" / "checkpoint.safetensors")[0]
    with pytest.raises(FaceganError, match="variant 'no-feature' never pairs expression codes"):
        train(synth(), tiny_config("epochs=1", "pair_critic=true", "variant=no-feature"), tmp_path / "nofeat")
    with pytest.raises(FaceganError, match="pair_critic needs exactly two factors"):
        train(synth(n_classes=(4, 3, 2)), tiny_config("epochs=1", "pair_critic=true"), tmp_path / "three")
    with pytest.raises(FaceganError, match="lambda_pair=-1"):
        tiny_config("pair_critic=true", "lambda_pair=-1")


def test_training_and_fitting_with_an_additive_generator(tmp_path):
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1", "generator=additive"), run)
    model = FaceModel.load(run)
    assert model.generator.additive == 1
    assert not isinstance(fitting_network(model), FoldedGenerator)  # the folding knows the paper's generator only
    with pytest.raises(FaceganError, match="generator='additive' needs an expression factor"):
        train(synth(n_classes=(4,)), tiny_config("epochs=1", "generator=additive"), tmp_path / "one")
    with pytest.raises(FaceganError, match="generator"):
        tiny_config("generator=stacked")


@pytest.mark.parametrize("critic", [False, True])
def test_recombined_faces_reach_the_classifiers_or_every_branch(tmp_path, monkeypatch, critic):
    """recombine: the classifiers get recombined faces beside the real batch the critic sees; with
    recombine_critic the recombined faces are D's real batch for every branch."""
    seen = []
    original = loop.FaceGANLoss.discriminator_loss

    def spy(self, d_sync, d_plain, real, real_labels, fake, fake_labels, alpha, descriptors=None, classified=None,
            *rest):
        seen.append((real.clone(), None if classified is None else classified.clone()))
        return original(self, d_sync, d_plain, real, real_labels, fake, fake_labels, alpha, descriptors, classified,
                        *rest)

    monkeypatch.setattr(loop.FaceGANLoss, "discriminator_loss", spy)
    data = synth()
    options = ["epochs=1", "max_iters=1", "recombine=1.0"] + (["recombine_critic=true"] if critic else [])
    train(data, tiny_config(*options), tmp_path / "run")
    real, classified = seen[0]
    raw = to_network(data.images, data.mask)
    matches_raw = lambda x: bool((x[:, None] - raw[None]).abs().flatten(2).amax(-1).min(1).values.lt(1e-6).all())
    assert (classified is None) == critic
    assert matches_raw(real) != critic  # the critic's real faces are dataset images unless recombined
    if not critic:
        assert not matches_raw(classified)


def _killed_at(iteration: int):
    def hook(i: int) -> None:
        if i == iteration:
            raise KeyboardInterrupt("simulated kill")
    return hook


@pytest.mark.parametrize("options", [(), ("lr_decay_iters=5",), ("lambda_rec=1.0", "rec_novel=0.5")],
                         ids=["constant-rates", "lr-decay", "real-face-codes"])
def test_resume_is_bit_for_bit(tmp_path, monkeypatch, options):
    data = synth()
    cfg = tiny_config(*options)  # 4 iterations per epoch, 8 in all; checkpoints at 3, 4, 6, 8; bf16 autocast
    train(data, cfg, tmp_path / "straight")

    monkeypatch.setattr(loop, "_after_iteration", _killed_at(7))  # last checkpoint: iteration 6, mid-epoch
    with pytest.raises(KeyboardInterrupt):
        train(data, cfg, tmp_path / "resumed")
    monkeypatch.setattr(loop, "_after_iteration", None)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")[1]["iteration"] == 6
    train(data, cfg, tmp_path / "resumed", resume=True)

    for name in ("checkpoint.safetensors", "model.safetensors"):
        a, meta_a = load_checkpoint(tmp_path / "straight" / name)
        b, meta_b = load_checkpoint(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and meta_a == meta_b
        for key in a:
            assert torch.equal(a[key], b[key]), key
    strip = lambda p: [r.split(",")[:2] + r.split(",")[4:] for r in p.read_text().splitlines()]
    assert strip(tmp_path / "straight" / "log.csv") == strip(tmp_path / "resumed" / "log.csv")


def test_config_differences_ignore_speed_keys_and_count_new_keys_as_their_default():
    """A run resumes with another allocator setting, and a run saved before a key existed trained with
    that key's default; any other change is a difference."""
    saved = tiny_config("epochs=1").to_dict()
    assert config_differences(saved, tiny_config("epochs=1", "retain_heap=false")) == []
    older = {k: v for k, v in saved.items() if k not in ("descriptor", "descriptor_prototypes")}
    assert config_differences(older, tiny_config("epochs=1")) == []
    assert config_differences(older, tiny_config("epochs=1", "descriptor_size=3", "descriptor=linear")) == [
        "descriptor", "descriptor_size"]


def test_resume_with_other_config_or_data_is_refused(tmp_path):
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1"), run)
    before = file_digests(run)
    with pytest.raises(FaceganError, match=r"different config \(lr_d: 0.0002 -> 0.001\)"):
        train(synth(), tiny_config("epochs=1", "lr_d=1e-3"), run, resume=True)
    with pytest.raises(FaceganError, match="other data"):
        train(synth(seed=1), tiny_config("epochs=1"), run, resume=True)
    assert file_digests(run) == before
    with pytest.raises(FaceganError, match="no checkpoint.safetensors"):
        train(synth(), tiny_config(), tmp_path / "empty", resume=True)
    # longer training is allowed: it continues from iteration 4
    train(synth(), tiny_config("epochs=2"), run, resume=True)
    assert load_checkpoint(run / "checkpoint.safetensors")[1]["iteration"] == 8


def test_lr_scale_is_constant_then_falls_linearly_over_the_last_decay_iters():
    total, decay = 10, 4
    for i in range(total):
        remaining = total - i  # updates left, this one included
        expected = 1.0 if remaining > decay else remaining / decay
        assert lr_scale(i, total, decay) == pytest.approx(expected)
    assert [lr_scale(i, total, 0) for i in range(total)] == [1.0] * total  # the paper's constant rates
    assert lr_scale(0, 3, 6) == pytest.approx(0.5)  # a decay longer than the run starts part-way down


def test_resume_with_a_learning_rate_decay(tmp_path):
    """A constant-rate run resumed with a decay: the decay falls at the end of the longer run, the log
    keeps the first segment's whole rows under the new columns, and the last update used 1/decay of the
    rates."""
    run = tmp_path / "run"
    train(synth(), tiny_config("epochs=1"), run)  # 4 iterations at constant rates
    with (run / "log.csv").open("a") as fh:
        fh.write("1")  # a row cut short by a kill while it was written (iteration 1x): dropped on resume
    train(synth(), tiny_config("epochs=2", "lr_decay_iters=3"), run, resume=True)
    meta = load_checkpoint(run / "checkpoint.safetensors")[1]
    cfg = tiny_config()
    assert meta["iteration"] == 8
    assert meta["opt_D"][0]["lr"] == pytest.approx(cfg.lr_d / 3) and meta["opt_G"][0]["lr"] == pytest.approx(cfg.lr_g / 3)
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    scale = [r[header.index("lr_scale")] for r in rows]
    d_loss = [r[header.index("d_loss")] for r in rows]
    iterations = [int(r[0]) for r in rows]
    assert iterations == sorted(iterations) and iterations[-1] == 8 and all(d_loss)
    for it, s in zip(iterations, scale):  # logged: the factor of the row's last update
        assert s == "" if it <= 4 else float(s) == pytest.approx(lr_scale(it - 1, 8, 3), abs=1e-5)


def test_a_log_that_is_not_a_training_log_is_refused(tmp_path):
    (tmp_path / "notes.csv").write_text("name,value\nx,1\n")
    (tmp_path / "torn.csv").write_text("iteration,d_loss\n2,0.5\n4,abc\n")
    with pytest.raises(FaceganError, match=r"notes.csv: not a facegan training log"):
        plot_training_log(tmp_path / "notes.csv", tmp_path / "curves.png")
    with pytest.raises(FaceganError, match=r"torn.csv: a row is not numbers"):
        plot_training_log(tmp_path / "torn.csv", tmp_path / "curves.png")
    with pytest.raises(FaceganError, match=r"missing.csv: cannot read the training log"):
        plot_training_log(tmp_path / "missing.csv", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_tensorboard_events_hold_the_log_and_a_resume_drops_the_killed_process_events(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("tensorboard=true", "log_every=1")  # checkpoints at 3, 4, 6, 8
    monkeypatch.setattr(loop, "_after_iteration", _killed_at(7))  # iteration 7 is logged, then lost
    with pytest.raises(KeyboardInterrupt):
        train(synth(), cfg, tmp_path / "run")
    monkeypatch.setattr(loop, "_after_iteration", None)
    train(synth(), cfg, tmp_path / "run", resume=True)

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    header, *rows = [r.split(",") for r in (tmp_path / "run" / "log.csv").read_text().splitlines()]
    for column in ("d_wdist", "g_gan", "d_acc_identity"):
        logged = [(int(r[0]), float(r[header.index(column)])) for r in rows]
        assert [(e.step, pytest.approx(e.value, rel=1e-4)) for e in events.Scalars(scalar_tag(column))] == logged
    assert [e.step for e in events.Scalars("run/img_per_s")] == list(range(1, 9))
    assert len(events.Images("samples/geometry_images")) == 2  # one grid per epoch


def test_tensorboard_without_the_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(FaceganError, match=r"tensorboard=true needs the tensorboard package: pip install"):
        train(synth(), tiny_config("tensorboard=true"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_codec_state_is_stored_with_the_model(tmp_path):
    codec = ({"uv": torch.rand(10, 2), "faces": torch.arange(6).view(2, 3)}, {"scale_mm": 2.5})
    train(synth(n=48), tiny_config("epochs=1"), tmp_path / "run", codec_state=codec,
          preview=lambda x: (torch.zeros(x.shape[0], 5, 5, 3, dtype=torch.uint8)).numpy())
    model = FaceModel.load(tmp_path / "run" / "model.safetensors")
    assert model.codec_meta == {"scale_mm": 2.5}
    assert torch.equal(model.codec_tensors["faces"], codec[0]["faces"])
    assert (tmp_path / "run" / "samples" / "epoch0001_meshes.png").exists()


# -------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, options: tuple[str, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # checkpoints every 3 iterations also check that the replicas' parameters agree across ranks
    train(synth(), tiny_config(*options), Path(out))


@pytest.mark.parametrize("options", [(), ("pair_critic=true", "recombine=0.5"), ("lambda_rec=1.0",)],
                         ids=["paper", "pair-critic", "real-face-codes"])
def test_ddp_two_processes(tmp_path, options):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), options), nprocs=2, join=True)
    tensors, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["world_size"] == 2 and meta["iteration"] == 8
    assert not torch.equal(tensors["rng.sample.rank0"], tensors["rng.sample.rank1"])  # own fake streams
    assert FaceModel.load(tmp_path / "run").sample(2)[0].shape == (2, 3, 16, 16)


def test_logged_training_seconds_sums_the_segments_of_a_resumed_run(tmp_path):
    # the clock restarts at each resume; rows after the resumed checkpoint were dropped
    (tmp_path / "log.csv").write_text("iteration,epoch,seconds\n25,1,40.0\n50,2,80.5\n75,3,30.0\n100,4,61.0\n")
    assert logged_training_seconds(tmp_path) == pytest.approx(80.5 + 61.0)
    assert logged_training_seconds(tmp_path / "missing") == 0.0
