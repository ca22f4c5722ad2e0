"""Generator and discriminator: shapes, the UV mask, branch structure, per-sample independence."""

import pytest
import torch

from facegan.nn.networks import N_SHARED_BLOCKS, Discriminator, Generator, stack_pairs


pytestmark = pytest.mark.usefixtures("one_thread")


def disk_mask(r: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
    return xx ** 2 + yy ** 2 < 0.8


@pytest.mark.parametrize("resolution", [16, 64])
def test_generator_shape_range_and_mask(resolution):
    torch.manual_seed(0)
    mask = disk_mask(resolution)
    g = Generator([65, 15], 5, mask, base_channels=4).eval()
    z = torch.randn(3, g.z_dim) * 5
    x = g(z)
    assert g.z_dim == 85
    assert x.shape == (3, 3, resolution, resolution)
    assert x.abs().max() <= 1
    assert torch.all(x[:, :, ~mask] == 0)
    assert x[:, :, mask].abs().sum() > 0


def test_generator_128_has_one_more_upsampling_block():
    g64 = Generator([4, 2], 1, disk_mask(64), base_channels=4)
    g128 = Generator([4, 2], 1, disk_mask(128), base_channels=4)
    assert len(g128.widths) == len(g64.widths) + 1
    assert g128(torch.randn(1, 7)).shape == (1, 3, 128, 128)


def test_generator_any_number_of_factors():
    g = Generator([8, 4, 3], 2, disk_mask(16), base_channels=4)
    z = g.join([torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 3)], torch.randn(2, 2))
    assert z.shape == (2, 17) and g(z).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError):
        g.join([torch.randn(2, 8)], torch.randn(2, 2))


def test_additive_generator_adds_the_expression_trunk_before_the_tanh():
    """additive=1: G(z_id, z_exp, n) = tanh(T(z_id, n) + T_exp(z_exp)), so in logits (atanh, eval mode)
    changing z_exp moves every identity by the same image."""
    torch.manual_seed(0)
    mask = disk_mask(16)
    g = Generator([6, 4], 2, mask, base_channels=4, additive=1).eval()
    z_id, z_noise, z_exp = torch.randn(2, 6), torch.randn(2, 2), torch.randn(2, 4)
    with torch.no_grad():
        logits = [torch.atanh(g(g.join([z_id, z_exp[[k, k]]], z_noise)))[:, :, mask] for k in range(2)]
        torch.testing.assert_close(logits[1] - logits[0], (logits[1] - logits[0])[[1, 0]], atol=1e-4, rtol=1e-4)
        expected = torch.tanh(g.separate_trunk(z_exp[:1]) + super(Generator, g).forward(torch.cat([z_id, z_noise], 1)))
        torch.testing.assert_close(g(g.join([z_id, z_exp[[0, 0]]], z_noise)), expected * mask)
    assert g.stem.in_features == 8 and g.separate_trunk.stem.in_features == 4
    joint = Generator([6, 4], 2, mask, base_channels=4)
    assert set(joint.state_dict()) < set(g.state_dict())  # the paper's generator keeps its parameter names


def test_discriminator_outputs_and_branch_selection():
    torch.manual_seed(0)
    d = Discriminator(32, [5, 3, 4], base_channels=4, feature_size=16)
    x = torch.randn(6, 3, 32, 32)
    out = d(x)
    assert out.critic.shape == (6,)
    assert [t.shape for t in out.logits] == [(6, 5), (6, 3), (6, 4)]
    assert all(f.shape == (6, 16) for f in out.features)
    part = d(x, critic=False, branches=[1], n_classify=2)
    assert part.critic is None and part.logits[0] is None and part.logits[2] is None
    assert part.logits[1].shape == (2, 3)
    torch.testing.assert_close(part.logits[1], out.logits[1][:2])
    torch.testing.assert_close(d.critic(x), out.critic)
    split = d(x, n_classify=2, critic_from=2)  # classify the first rows, score the others
    torch.testing.assert_close(split.critic, out.critic[2:])
    torch.testing.assert_close(split.logits[0], out.logits[0][:2])


def test_discriminator_shares_first_two_blocks_only():
    d = Discriminator(64, [5, 3], base_channels=4, feature_size=8)
    convs = lambda m: [l for l in m.modules() if isinstance(l, torch.nn.Conv2d)]
    assert len(convs(d.trunk)) == N_SHARED_BLOCKS == 2
    assert len(convs(d.critic_convs)) == 2  # 64 px: 4 stride-2 blocks in total
    assert all(len(convs(b)) == 2 for b in d.class_convs)
    # branches are copies, not shared modules
    assert d.class_convs[0][0][0].weight.data_ptr() != d.class_convs[1][0][0].weight.data_ptr()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    d128 = Discriminator(128, [5], base_channels=4, feature_size=8)
    assert len(convs(d128.critic_convs)) == 3


@pytest.mark.parametrize("norm", ["layer", "instance", "none"])
def test_discriminator_samples_are_independent(norm):
    """No batch statistics: a sample's critic value does not depend on the rest of the batch (GP needs it)."""
    torch.manual_seed(0)
    d = Discriminator(16, [3], base_channels=4, feature_size=8, norm=norm)
    x = torch.randn(4, 3, 16, 16)
    together = d.critic(x)
    alone = torch.cat([d.critic(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_same_result():
    torch.manual_seed(0)
    g = Generator([4, 2], 1, disk_mask(16), base_channels=4).eval()
    d = Discriminator(16, [3], base_channels=4, feature_size=8)
    z = torch.randn(2, 7)
    ref = d.critic(g(z))
    g_cl, d_cl = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    torch.testing.assert_close(d_cl.critic(g_cl(z)), ref, rtol=1e-4, atol=1e-5)


def test_pair_critic_scores_two_images_stacked_on_channels():
    """stack_pairs puts pair i's two images on channels 0-2 and 3-5 (as a loop does); the pair critic is a
    critic of its own over such 6-channel inputs, absent unless asked for."""
    torch.manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    first, second = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4])
    pairs = stack_pairs(images, first, second)
    for i in range(3):
        assert torch.equal(pairs[i], torch.cat([images[first[i]], images[second[i]]]))
    d = Discriminator(16, [3], base_channels=4, feature_size=8, pair_critic=True)
    assert d.pair_critic(pairs).shape == (3,)
    assert d.pairs.trunk[0].in_channels == 6 and len(d.pairs.class_heads) == 0
    plain = Discriminator(16, [3], base_channels=4, feature_size=8)
    assert plain.pairs is None and not any(k.startswith("pairs.") for k in plain.state_dict())
