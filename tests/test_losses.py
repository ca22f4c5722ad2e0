"""Loss terms against hand-computed values, the gradient penalty against a per-sample loop, the alternating
schedule and pairing, and the switches of each variant."""

import math

import pytest
import torch

from facegan.errors import FaceganError
from facegan.nn.losses import (BatchPlan, FaceGANLoss, LossWeights, class_weights, correct_and_count,
                               critic_loss_d, critic_loss_g, descriptor_distance, descriptor_regression, feature_loss,
                               gradient_penalty, plan_batch, prototype_distance, sample_codes, total_variation,
                               variant_spec, weighted_nll)
from facegan.nn.networks import Discriminator, Generator, stack_pairs
from facegan.train.data import LinearDescriptor


pytestmark = pytest.mark.usefixtures("one_thread")


def test_critic_losses_by_hand():
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, 0.0, 4.0])
    assert critic_loss_d(real, fake).item() == pytest.approx(1.0 - 2.0)
    assert critic_loss_g(fake).item() == pytest.approx(-1.0)


def test_gradient_penalty_of_linear_critic_by_hand():
    w = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # ||grad|| = 5 everywhere -> (5 - 1)^2 = 16
    critic = lambda x: (x * w).sum((1, 2, 3))
    real, fake = torch.randn(4, 2, 1, 1), torch.randn(4, 2, 1, 1)
    gp = gradient_penalty(critic, real, fake, torch.rand(4))
    assert gp.item() == pytest.approx(16.0)


def test_gradient_penalty_matches_naive_per_sample_loop():
    torch.manual_seed(0)
    d = Discriminator(16, [3, 2], base_channels=4, feature_size=8)
    real, fake, alpha = torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16), torch.rand(5)
    gp = gradient_penalty(d.critic, real, fake, alpha)
    naive = []
    for i in range(5):
        x = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (g,) = torch.autograd.grad(d.critic(x).sum(), x)
        naive.append((g.norm() - 1) ** 2)
    torch.testing.assert_close(gp, torch.stack(naive).mean(), rtol=1e-5, atol=1e-7)


def test_gradient_penalty_only_reaches_trunk_and_critic():
    torch.manual_seed(0)
    d = Discriminator(16, [3, 2], base_channels=4, feature_size=8)
    gp = gradient_penalty(d.critic, torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.rand(2))
    gp.backward()
    assert all(p.grad is not None for p in d.trunk.parameters())
    assert all(p.grad is not None for p in d.critic_convs.parameters())
    assert all(p.grad is None for p in d.class_convs.parameters())
    assert all(p.grad is None for p in d.class_heads.parameters())


def test_class_weights_by_hand():
    w = class_weights(torch.tensor([0, 0, 0, 1, -1, -1]), 3)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0, 0.0]))
    labeled = torch.tensor([0, 0, 0, 1])
    assert w[labeled].mean().item() == pytest.approx(1.0)  # normalized to mean 1 over labeled samples


def test_weighted_nll_by_hand_and_skips_missing():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]], requires_grad=True)
    labels = torch.tensor([0, 1, -1])
    weights = torch.tensor([0.5, 2.0])
    nll0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    nll1 = -math.log(math.e / (math.e + 1))
    loss = weighted_nll(logits, labels, weights)
    assert loss.item() == pytest.approx((0.5 * nll0 + 2.0 * nll1) / 2)
    assert weighted_nll(logits, labels).item() == pytest.approx((nll0 + nll1) / 2)
    loss.backward()
    assert torch.all(logits.grad[2] == 0)  # the unlabeled sample contributes nothing
    assert weighted_nll(logits, torch.tensor([-1, -1, -1])).item() == 0.0
    correct, count = correct_and_count(logits, labels)
    assert (correct.item(), count.item()) == (2, 2)


def test_feature_loss_by_hand():
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    loss = feature_loss(f, torch.tensor([0, 2]), torch.tensor([1, 3]))
    # Eq. 9: 2/N * sum over pairs (1 - cos): N = 4, pairs cos = 1 and 1/sqrt(2)
    assert loss.item() == pytest.approx(2 / 4 * ((1 - 1) + (1 - 1 / math.sqrt(2))))


def test_total_variation_by_hand_inside_the_chart_only():
    x = torch.zeros(2, 3, 3, 3)
    x[0, 0] = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.ones(3, 3, dtype=torch.bool)
    # horizontal: row 0 |1-0| + |3-1| = 3, row 2 |0-2| = 2; vertical: |1-0| + |3-0| + |2-0| = 6
    # -> 11 for image 0, 0 for image 1, mean over the batch 5.5
    assert total_variation(x, mask).item() == pytest.approx(11 / 2)
    mask[2, 0] = False  # pairs touching pixel (2, 0) no longer count: drops |0-2| and |2-0|
    assert total_variation(x, mask).item() == pytest.approx(7 / 2)


# ------------------------------------------------------------------------------------ schedule


def test_alternating_schedule_two_and_three_factors():
    full = variant_spec("full", 2)
    assert plan_batch(full, 0) == BatchPlan(labeled=(0,), paired=(1,))
    assert plan_batch(full, 1) == BatchPlan(labeled=(1,), paired=(0,))
    assert plan_batch(full, 2) == plan_batch(full, 0)
    assert plan_batch(full, 1, for_discriminator=True) == BatchPlan(labeled=(1,), paired=())
    three = variant_spec("full", 3)
    assert [plan_batch(three, i) for i in range(3)] == [
        BatchPlan((0,), (1, 2)), BatchPlan((1,), (0, 2)), BatchPlan((2,), (0, 1))]


def test_random_phase_adds_an_unlabeled_batch_and_random_critic_keeps_labeled_codes_from_the_critic():
    spec = variant_spec("full", 2, random_phase=True)
    assert spec.n_phases == 3
    assert [plan_batch(spec, i) for i in range(4)] == [
        BatchPlan((0,), (1,)), BatchPlan((1,), (0,)), BatchPlan((), (0, 1)), BatchPlan((0,), (1,))]
    assert [plan_batch(spec, i, for_discriminator=True) for i in range(3)] == [
        BatchPlan((0,), ()), BatchPlan((1,), ()), BatchPlan((), ())]
    both = variant_spec("full", 2, random_phase=True, random_critic=True)
    assert [plan_batch(both, i) for i in range(3)] == [plan_batch(spec, i) for i in range(3)]
    assert {plan_batch(both, i, for_discriminator=True) for i in range(3)} == {BatchPlan((), ())}
    assert variant_spec("no-feature", 2, random_phase=True).n_phases == 3
    with pytest.raises(FaceganError, match="random_phase needs alternate training"):
        variant_spec("acgan", 2, random_phase=True)


def test_sample_codes_labels_pairs_and_sharing():
    gen = torch.Generator().manual_seed(0)
    tables = [torch.randn(4, 6), torch.randn(3, 2), torch.randn(5, 3)]
    choices = [torch.tensor([0, 2, 3]), torch.arange(3), torch.arange(5)]
    batch = sample_codes(8, BatchPlan((0,), (1, 2)), tables, choices, 2, gen)
    assert batch.z().shape == (8, 6 + 2 + 3 + 2)
    assert batch.labels[1] is None and batch.labels[2] is None
    assert set(batch.labels[0].tolist()) <= {0, 2, 3}  # classes without labeled data are never drawn
    torch.testing.assert_close(batch.codes[0], tables[0][batch.labels[0]])
    for k in (1, 2):
        first, second = batch.pairs[k]
        assert len(first) == 4 and set(first.tolist()) | set(second.tolist()) == set(range(8))
        torch.testing.assert_close(batch.codes[k][first], batch.codes[k][second])  # shared within a pair
        other = 3 - k
        assert not torch.allclose(batch.codes[other][first], batch.codes[other][second])  # others differ
        assert not torch.allclose(batch.noise[first], batch.noise[second])
    with pytest.raises(FaceganError):
        sample_codes(6, BatchPlan((0,), (1, 2)), tables, choices, 2, gen)


# ------------------------------------------------------------------------------------ variants

EXPECTED = {  # classified, alternate, feature, tv, classify fakes in D
    "full": ((0, 1), True, True, True, False),
    "acgan": ((0,), False, False, False, True),
    "no-alternate": ((0, 1), False, False, True, False),
    "no-tv": ((0, 1), True, True, False, False),
    "no-feature": ((0, 1), True, False, True, False),
    "id-only": ((0,), True, True, True, False),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_variant_switches(name):
    spec = variant_spec(name, 2)
    assert (spec.classified, spec.alternate, spec.feature_loss, spec.tv, spec.classify_fakes_in_d) == EXPECTED[name]


def _loss_keys(name: str, iteration: int, random_phase: bool = False) -> tuple[set, set]:
    torch.manual_seed(0)
    spec = variant_spec(name, 2, random_phase)
    mask = torch.ones(16, 16, dtype=torch.bool)
    g = Generator([4, 3], 2, mask, base_channels=4)
    d = Discriminator(16, [[4, 3][k] for k in spec.classified], base_channels=4, feature_size=8)
    weights = [torch.ones([4, 3][k]) for k in spec.classified]
    loss = FaceGANLoss(spec, LossWeights(), ["identity", "expression"], weights, mask)
    tables, choices = [torch.randn(4, 4), torch.randn(3, 3)], [torch.arange(4), torch.arange(3)]
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(4, 3, 16, 16)
    labels = [torch.tensor([0, 1, 2, -1]), torch.tensor([-1, 2, -1, 0])]
    d_codes = sample_codes(4, plan_batch(spec, iteration, True), tables, choices, 2, gen)
    _, d_stats = loss.discriminator_loss(d, d, real, labels, g(d_codes.z()).detach(), d_codes.labels, torch.rand(4))
    g_codes = sample_codes(4, plan_batch(spec, iteration), tables, choices, 2, gen)
    _, g_stats = loss.generator_loss(g, d, g_codes)
    return set(d_stats), set(g_stats)


@pytest.mark.parametrize("name,iteration,d_keys,g_keys", [
    ("full", 0, {"d_class_identity", "d_class_expression"}, {"g_class_identity", "g_feat_expression", "g_tv"}),
    ("full", 1, {"d_class_identity", "d_class_expression"}, {"g_class_expression", "g_feat_identity", "g_tv"}),
    ("acgan", 1, {"d_class_identity", "d_class_fake_identity"}, {"g_class_identity"}),
    ("no-alternate", 1, {"d_class_identity", "d_class_expression"}, {"g_class_identity", "g_class_expression", "g_tv"}),
    ("no-tv", 0, {"d_class_identity", "d_class_expression"}, {"g_class_identity", "g_feat_expression"}),
    ("no-feature", 0, {"d_class_identity", "d_class_expression"}, {"g_class_identity", "g_tv"}),
    ("id-only", 0, {"d_class_identity"}, {"g_class_identity", "g_tv"}),
    ("id-only", 1, {"d_class_identity"}, {"g_feat_identity", "g_tv"}),
])
def test_variant_loss_terms(name, iteration, d_keys, g_keys):
    """Each variant computes exactly its terms (keys of the loss statistics)."""
    d_stats, g_stats = _loss_keys(name, iteration)
    base_d = {"d_wdist", "d_gp", "d_loss"} | {k.replace("class", "acc") for k in d_keys if "fake" not in k}
    assert d_stats == base_d | d_keys
    assert g_stats == {"g_gan", "g_loss"} | g_keys


def test_random_phase_batch_has_feature_losses_on_both_factors_and_no_classification():
    d_stats, g_stats = _loss_keys("full", 2, random_phase=True)
    assert {"d_class_identity", "d_class_expression"} <= d_stats  # D still classifies the real images
    assert g_stats == {"g_gan", "g_loss", "g_feat_identity", "g_feat_expression", "g_tv"}


def test_descriptor_regression_by_hand_skips_unlabeled_identities():
    predicted = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]])
    targets = torch.tensor([[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    assert descriptor_regression(predicted, targets, valid).item() == pytest.approx(((1 + 4) / 2 + (1 + 9) / 2) / 2)
    assert descriptor_regression(predicted, targets, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_descriptor_distance_by_hand():
    d = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    first, second = torch.tensor([0, 2]), torch.tensor([1, 3])
    assert descriptor_distance(d, first, second).item() == pytest.approx((4 / 2 / 2 + 0) / 2)


def test_expression_descriptor_replaces_the_cosine_feature_loss_of_its_factor():
    """D regresses the descriptor of real images; G's feature loss on expression pairs compares
    descriptors, the identity pairs keep the cosine of the paper."""
    torch.manual_seed(0)
    spec = variant_spec("full", 2)
    mask = torch.ones(16, 16, dtype=torch.bool)
    g = Generator([4, 3], 2, mask, base_channels=4)
    d = Discriminator(16, [4, 3], base_channels=4, feature_size=8, descriptor_sizes=[0, 5])
    loss = FaceGANLoss(spec, LossWeights(), ["identity", "expression"], [torch.ones(4), torch.ones(3)], mask)
    tables, choices = [torch.randn(4, 4), torch.randn(3, 3)], [torch.arange(4), torch.arange(3)]
    gen = torch.Generator().manual_seed(0)
    real, labels = torch.randn(4, 3, 16, 16), [torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 2, -1, 0])]
    codes = sample_codes(4, plan_batch(spec, 0, True), tables, choices, 2, gen)
    targets = (torch.randn(4, 5), torch.tensor([True, True, False, True]))
    _, d_stats = loss.discriminator_loss(d, d, real, labels, g(codes.z()).detach(), codes.labels, torch.rand(4), targets)
    out = d(real, critic=False)
    assert out.descriptors[0] is None and out.descriptors[1].shape == (4, 5)
    assert d_stats["d_descriptor_expression"][0].item() == pytest.approx(
        descriptor_regression(out.descriptors[1], *targets).item(), rel=1e-5)
    batch = sample_codes(4, plan_batch(spec, 0), tables, choices, 2, gen)  # expression codes paired
    _, g_stats = loss.generator_loss(g, d, batch)
    fake_out = d(g(batch.z()), critic=False)
    expected = descriptor_distance(fake_out.descriptors[1], *batch.pairs[1])
    assert g_stats["g_feat_expression"][0].item() == pytest.approx(expected.item(), rel=1e-5)
    batch = sample_codes(4, plan_batch(spec, 1), tables, choices, 2, gen)  # identity codes paired
    _, g_stats = loss.generator_loss(g, d, batch)
    expected = feature_loss(d(g(batch.z()), critic=False).features[0], *batch.pairs[0])
    assert g_stats["g_feat_identity"][0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_classifiers_see_the_recombined_faces_and_the_critic_the_real_ones():
    """With classified_real, D's loss is the same as if the classifiers had been given those images and the
    critic the real ones: one forward over [classified, real, fake], the critic on the last two thirds."""
    torch.manual_seed(0)
    spec = variant_spec("full", 2)
    d = Discriminator(16, [4, 3], base_channels=4, feature_size=8)
    loss = FaceGANLoss(spec, LossWeights(), ["identity", "expression"], [torch.ones(4), torch.ones(3)],
                       torch.ones(16, 16, dtype=torch.bool))
    real, fake, classified = torch.randn(3, 4, 3, 16, 16)
    labels = [torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 2, -1, 0])]
    alpha = torch.rand(4)
    total, stats = loss.discriminator_loss(d, d, real, labels, fake, [None, None], alpha, classified_real=classified)
    scores, logits = d.critic(torch.cat([real, fake])), d(classified, critic=False).logits
    expected = (critic_loss_d(scores[:4], scores[4:]) + 10.0 * gradient_penalty(d.critic, real, fake, alpha)
                + 0.1 * sum(weighted_nll(lg, lab, w) for lg, lab, w in zip(logits, labels, loss.real_class_weights)))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["d_class_identity"][0].item() == pytest.approx(weighted_nll(logits[0], labels[0]).item(), rel=1e-5)
    with pytest.raises(ValueError, match="AC-GAN"):
        acgan = FaceGANLoss(variant_spec("acgan", 2), LossWeights(), ["identity", "expression"], [torch.ones(4)],
                            torch.ones(16, 16, dtype=torch.bool))
        acgan.discriminator_loss(d, d, real, labels, fake, [None, None], alpha, classified_real=classified)


def test_pair_critic_terms_of_d_and_g():
    """D adds the pair critic's own WGAN-GP loss on (real pairs, fake pairs); G adds lambda_pair times
    -E[C_pair] over its pairs of fakes sharing the expression code, and nothing in batches without them."""
    torch.manual_seed(0)
    spec = variant_spec("full", 2)
    mask = torch.ones(16, 16, dtype=torch.bool)
    g = Generator([4, 3], 2, mask, base_channels=4)
    d = Discriminator(16, [4, 3], base_channels=4, feature_size=8, pair_critic=True)
    weights = LossWeights(lambda_pair=0.7)
    loss = FaceGANLoss(spec, weights, ["identity", "expression"], [torch.ones(4), torch.ones(3)], mask,
                       pair_factor=1)
    real, fake = torch.randn(2, 4, 3, 16, 16)
    real_pairs, fake_pairs = torch.randn(2, 2, 6, 16, 16)
    labels = [torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 2, -1, 0])]
    alpha = torch.rand(4)
    without, _ = loss.discriminator_loss(d, d, real, labels, fake, [None, None], alpha)
    total, stats = loss.discriminator_loss(d, d, real, labels, fake, [None, None], alpha,
                                           pairs=(real_pairs, fake_pairs))
    scores = d.pair_critic(torch.cat([real_pairs, fake_pairs]))
    pair_term = critic_loss_d(scores[:2], scores[2:]) + 10.0 * gradient_penalty(d.pair_critic, real_pairs,
                                                                                 fake_pairs, alpha[:2])
    assert (total - without).item() == pytest.approx(pair_term.item(), rel=1e-4)
    assert stats["d_pair_wdist"][0].item() == pytest.approx(-critic_loss_d(scores[:2], scores[2:]).item(), rel=1e-5)
    tables, choices = [torch.randn(4, 4), torch.randn(3, 3)], [torch.arange(4), torch.arange(3)]
    gen = torch.Generator().manual_seed(0)
    batch = sample_codes(4, plan_batch(spec, 0), tables, choices, 2, gen)  # expression codes paired
    plain = FaceGANLoss(spec, weights, ["identity", "expression"], [torch.ones(4), torch.ones(3)], mask)
    with_pairs, g_stats = loss.generator_loss(g, d, batch)
    without, _ = plain.generator_loss(g, d, batch)
    expected = -d.pair_critic(stack_pairs(g(batch.z()), *batch.pairs[1])).mean()
    assert g_stats["g_pair"][0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert (with_pairs - without).item() == pytest.approx(0.7 * expected.item(), rel=1e-4)
    batch = sample_codes(4, plan_batch(spec, 1), tables, choices, 2, gen)  # expression labeled: no pairs
    assert "g_pair" not in loss.generator_loss(g, d, batch)[1]


def test_prototype_distance_by_hand():
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert prototype_distance(d, p).item() == pytest.approx((1 / 2 / 2 + 0) / 2)


def test_linear_descriptor_drives_the_expression_terms_of_g():
    """With a fixed linear descriptor, the expression feature loss compares the fakes' linear descriptors
    (not D's), and fakes of a labeled expression code are compared to their class's prototype."""
    torch.manual_seed(0)
    spec = variant_spec("full", 2)
    mask = torch.ones(16, 16, dtype=torch.bool)
    g = Generator([4, 3], 2, mask, base_channels=4)
    d = Discriminator(16, [4, 3], base_channels=4, feature_size=8)
    linear = LinearDescriptor(torch.randn(5, 3, 16, 16) / 30, torch.randn(5), torch.randn(3, 5))
    loss = FaceGANLoss(spec, LossWeights(), ["identity", "expression"], [torch.ones(4), torch.ones(3)], mask,
                       linear_descriptor=(1, linear))
    tables, choices = [torch.randn(4, 4), torch.randn(3, 3)], [torch.arange(4), torch.arange(3)]
    gen = torch.Generator().manual_seed(0)
    batch = sample_codes(4, plan_batch(spec, 0), tables, choices, 2, gen)  # identity labeled, expression paired
    _, g_stats = loss.generator_loss(g, d, batch)
    expected = descriptor_distance(linear(g(batch.z())), *batch.pairs[1])
    assert g_stats["g_feat_expression"][0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "g_proto_expression" not in g_stats
    batch = sample_codes(4, plan_batch(spec, 1), tables, choices, 2, gen)  # expression labeled
    _, g_stats = loss.generator_loss(g, d, batch)
    expected = prototype_distance(linear(g(batch.z())), linear.prototypes[batch.labels[1]])
    assert g_stats["g_proto_expression"][0].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = feature_loss(d(g(batch.z()), critic=False).features[0], *batch.pairs[0])
    assert g_stats["g_feat_identity"][0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_discriminator_loss_ignores_fake_labels_unless_acgan():
    torch.manual_seed(0)
    spec = variant_spec("full", 2)
    d = Discriminator(16, [4, 3], base_channels=4, feature_size=8)
    mask = torch.ones(16, 16, dtype=torch.bool)
    loss = FaceGANLoss(spec, LossWeights(), ["identity", "expression"], [torch.ones(4), torch.ones(3)], mask)
    real, fake, alpha = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.rand(4)
    labels = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])]
    a, _ = loss.discriminator_loss(d, d, real, labels, fake, [torch.tensor([0, 0, 0, 0]), None], alpha)
    b, _ = loss.discriminator_loss(d, d, real, labels, fake, [torch.tensor([1, 1, 1, 1]), None], alpha)
    assert a.item() == b.item()


def test_unknown_variant():
    with pytest.raises(FaceganError, match="unknown variant"):
        variant_spec("wgan", 2)
