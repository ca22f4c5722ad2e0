"""Losses of Abrevaya et al. (ICCV 2019), Sec. 4.1, as pure terms plus a two-phase driver (D, then G).

Notation: K factors (identity, expression, ...), each with a code z_k and fixed labeled codes T^k
(one per class). Every tensor of images is (B, 3, R, R) in the normalized network space.

* D minimizes  E[C(fake)] - E[C(real)] + gp_weight * GP  +  lambda_c * sum_k NLL_k(real)       (Eq. 5)
  (the negation of "D maximizes L_GAN + lambda_c sum_k L_k"; WGAN-GP replaces Eq. 1's log terms).
* G minimizes  lambda_gan * (-E[C(fake)]) + lambda_class * sum_{labeled k} NLL_k(fake)
               + lambda_feat * sum_{paired k} L_FEAT_k + lambda_tv * L_TV                        (Eq. 7)

Alternate training (Sec. 4.1.3) decides per generator batch which factors are *labeled* (codes from T^k,
classification loss) and which are *paired* (random codes shared by the two samples of a pair,
feature loss); see :func:`plan_batch` and :func:`sample_codes`.

Beyond the paper, a classifier branch may also regress an *expression descriptor* (the identity-normalized
residual of :func:`facegan.train.data.residual_descriptors`): D learns it on real images, and the feature
loss of that factor compares descriptors instead of cosine features (docs/training.md). With a *pair critic*,
D also holds a second WGAN-GP critic of image pairs: real pairs wear one face's expression residual on two
identities, fake pairs share the expression code; G adds lambda_pair * (-E[C_pair(fake pairs)]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, ContextManager

import torch
import torch.nn.functional as F

from facegan.errors import FaceganError, lookup
from facegan.nn.networks import Discriminator, DOutput, stack_pairs

if TYPE_CHECKING:
    from facegan.train.data import LinearDescriptor

# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class VariantSpec:
    """What a training variant switches on. Factor indices refer to the dataset's factor order.

    classified: factors with a classifier branch in D (branch b classifies factor classified[b]);
    alternate: cycle the labeled factor over the factors, batch by batch (Sec. 4.1.3);
    feature_loss: feature loss (Eq. 9-10) on the paired (unlabeled) factors;
    tv: total-variation regularizer (Eq. 11);
    classify_fakes_in_d: D also classifies fakes (plain AC-GAN, Eq. 3);
    random_phase: beyond the paper (docs/training.md, "Random-code phase"): the alternation gains a phase
    with every code random (feature loss on every factor's pairs), the codes faces are sampled with;
    random_critic: D's critic sees fakes from random codes only, so labeled batches are not pushed to cover
    the whole data distribution.
    """

    name: str
    n_factors: int
    classified: tuple[int, ...]
    alternate: bool
    feature_loss: bool
    tv: bool
    classify_fakes_in_d: bool
    random_phase: bool = False
    random_critic: bool = False

    @property
    def n_phases(self) -> int:
        """Length of the alternation cycle (1 without alternation)."""
        return self.n_factors + self.random_phase if self.alternate else 1

    def branch_of(self, factor: int) -> int:
        return self.classified.index(factor)


def variant_spec(name: str, n_factors: int, random_phase: bool = False, random_critic: bool = False) -> VariantSpec:
    """The switches of variant ``name`` (see docs/training.md for the table and reasons).

    full: all factors classified, alternation, feature loss, TV. acgan: one classifier (the first factor,
    identity), fakes classified by D and G, no alternation, no feature loss, no TV. no-alternate: labeled
    codes for all factors in every batch (so no unlabeled codes and hence no feature loss). no-tv,
    no-feature: full minus that term. id-only: full with only the identity classifier.
    """
    everything = tuple(range(n_factors))
    specs = {
        "full": VariantSpec(name, n_factors, everything, True, True, True, False),
        "acgan": VariantSpec(name, n_factors, (0,), False, False, False, True),
        "no-alternate": VariantSpec(name, n_factors, everything, False, False, True, False),
        "no-tv": VariantSpec(name, n_factors, everything, True, True, False, False),
        "no-feature": VariantSpec(name, n_factors, everything, True, False, True, False),
        "id-only": VariantSpec(name, n_factors, (0,), True, True, True, False),
    }
    spec = lookup(specs, name, "variant")
    if random_phase and not spec.alternate:
        raise FaceganError(f"random_phase needs alternate training; variant {name!r} does not alternate")
    return replace(spec, random_phase=random_phase, random_critic=random_critic)


# ------------------------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class BatchPlan:
    """Which factors of one generated batch get labeled codes, and which are shared within pairs."""

    labeled: tuple[int, ...]
    paired: tuple[int, ...]


def plan_batch(spec: VariantSpec, iteration: int, for_discriminator: bool = False) -> BatchPlan:
    """The code plan of the generator batch at ``iteration``.

    With alternation, phase k = iteration mod n_phases: factor k gets labeled codes if it has a classifier,
    the other factors get random codes, and those with a classifier (and the feature loss on) are paired;
    the extra phase of ``random_phase`` (k = K) has no labeled factor. Without alternation every classified
    factor is labeled and nothing is paired. The fakes shown to D use the same plan without pairs (pairs
    only matter to the feature loss), or no labeled codes at all with ``random_critic``.
    """
    if for_discriminator and spec.random_critic:
        return BatchPlan((), ())
    if spec.alternate:
        phase = iteration % spec.n_phases
        labeled = (phase,) if phase in spec.classified else ()
        paired = tuple(k for k in spec.classified if k != phase) if spec.feature_loss else ()
    else:
        labeled, paired = spec.classified, ()
    return BatchPlan(labeled, () if for_discriminator else paired)


@dataclass
class CodeBatch:
    """Latent codes of one generated batch of n samples.

    codes[k]: (n, size_k); noise: (n, noise_size); labels[k]: (n,) int64 class of the T^k code used, or
    None when factor k's codes are random; pairs[k] = (first, second): (n/2,) int64 indices of the samples
    sharing factor k's code (pair i = first[i], second[i]); only for paired factors.
    """

    codes: list[torch.Tensor]
    noise: torch.Tensor
    labels: list[torch.Tensor | None]
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def z(self) -> torch.Tensor:
        return torch.cat([*self.codes, self.noise], dim=1)


def sample_codes(n: int, plan: BatchPlan, fixed_codes: list[torch.Tensor], class_choices: list[torch.Tensor],
                 noise_size: int, generator: torch.Generator) -> CodeBatch:
    """Draw the codes of a batch of ``n`` samples following ``plan``.

    fixed_codes[k]: (n_classes_k, size_k) the fixed codes T^k; class_choices[k]: (m,) int64 classes that
    labeled fakes are drawn from, uniformly (classes with at least one labeled real sample).
    Pairing: the j-th paired factor pairs sample i with sample i XOR 2^j, so every paired factor has its own
    pairing and two samples sharing one factor's code differ in every other factor's code and in noise.
    ``n`` must be divisible by 2^len(plan.paired). Random codes and noise are standard normal.
    """
    device = fixed_codes[0].device
    if n % (2 ** len(plan.paired)):
        raise FaceganError(f"batch of {n} cannot hold pairs for {len(plan.paired)} factors "
                           f"(needs a multiple of {2 ** len(plan.paired)})")
    index = torch.arange(n, device=device)
    codes: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, table in enumerate(fixed_codes):
        if k in plan.labeled:
            choices = class_choices[k]
            pick = torch.randint(len(choices), (n,), generator=generator, device=device)
            labels.append(choices[pick])
            codes.append(table[labels[-1]])
            continue
        labels.append(None)
        code = torch.randn(n, table.shape[1], generator=generator, device=device)
        if k in plan.paired:
            bit = 1 << plan.paired.index(k)
            code = code[index & ~bit]  # i and i ^ bit read the same row
            half = index[: n // 2]
            first = ((half // bit) * 2 * bit) + half % bit  # the indices with that bit clear, in order
            pairs[k] = (first, first + bit)
        codes.append(code)
    noise = torch.randn(n, noise_size, generator=generator, device=device)
    return CodeBatch(codes, noise, labels, pairs)


# -------------------------------------------------------------------------------------- loss terms


def critic_loss_d(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss to minimize: E[C(fake)] - E[C(real)]; scores (B,)."""
    return fake_scores.float().mean() - real_scores.float().mean()


def critic_loss_g(fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss to minimize: -E[C(fake)]."""
    return -fake_scores.float().mean()


def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x_hat = alpha * real + (1 - alpha) * fake, alpha (B,) in [0, 1] per sample."""
    a = alpha.to(real.dtype).view(-1, 1, 1, 1)
    return a * real + (1 - a) * fake


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al.): E[(||grad_x C(x_hat)||_2 - 1)^2] over x_hat between real and fake.

    critic: (B, 3, R, R) -> (B,); it should be the critic path only (shared trunk + C_real), so the double
    backward never touches the classifier branches. Returns a differentiable scalar (create_graph=True).
    """
    x_hat = interpolate(real.detach(), fake.detach(), alpha).requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.float().sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).square().sum(1).add(1e-12).sqrt()  # eps: finite gradient at 0
    return (norm - 1).square().mean()


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class weights for imbalanced labels (King & Zeng): w_c proportional to 1 / count_c, scaled so
    that the mean weight over the labeled samples is 1; classes without samples get 0.

    labels: (N,) int64 with -1 for missing. Returns (n_classes,) float32.
    """
    labeled = labels[labels >= 0]
    counts = torch.bincount(labeled, minlength=n_classes).to(torch.float64)
    present = counts > 0
    weights = torch.zeros(n_classes, dtype=torch.float64)
    weights[present] = len(labeled) / (present.sum() * counts[present])
    return weights.to(torch.float32)


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class negative log-likelihood, averaged over the labeled samples of the batch.

    logits: (B, C); labels: (B,) int64, -1 = missing (skipped); weights: (C,) per-class weights or None.
    Returns sum_i w_{y_i} * NLL_i / (number of labeled samples), 0 when none is labeled (no host sync).
    """
    labeled = labels >= 0
    safe = labels.clamp_min(0)
    nll = F.cross_entropy(logits.float(), safe, reduction="none")
    w = labeled.to(nll.dtype) if weights is None else weights[safe] * labeled
    return (w * nll).sum() / labeled.sum().clamp_min(1)


def correct_and_count(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of labeled samples classified correctly, number of labeled samples) as float tensors."""
    labeled = labels >= 0
    correct = (logits.argmax(1) == labels) & labeled
    return correct.sum().float(), labeled.sum().float()


def feature_loss(features: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Eq. 9-10: 2/N * sum over the N/2 pairs of (1 - cos(f_first, f_second)) = mean over pairs.

    features: (N, F) classifier features; first, second: (N/2,) sample indices of the pairs.
    """
    f = features.float()
    return (1 - F.cosine_similarity(f[first], f[second], dim=1, eps=1e-8)).mean()


def descriptor_regression(predicted: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """D's expression-descriptor loss: mean over the valid samples of the mean squared error per component.

    predicted, targets: (B, K); valid: (B,) bool (samples whose identity is labeled). 0 when none is valid.
    """
    error = (predicted.float() - targets).square().mean(1) * valid
    return error.sum() / valid.sum().clamp_min(1)


def descriptor_distance(descriptors: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The feature loss on expression descriptors: mean over pairs of 1/(2K) ||d_first - d_second||^2.

    With unit-variance descriptors, two independent samples score about 1 and two equal ones 0, the
    range of the cosine loss it replaces. descriptors: (N, K); first, second: (N/2,) pair indices.
    """
    d = descriptors.float()
    return (d[first] - d[second]).square().mean(1).mul(0.5).mean()


def prototype_distance(descriptors: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Labeled fakes against their class's prototype descriptor: mean over samples of 1/(2K) ||d - p||^2
    (the scale of :func:`descriptor_distance`). descriptors, prototypes: (N, K)."""
    return (descriptors.float() - prototypes).square().mean(1).mul(0.5).mean()


def pair_distance(out: DOutput, branch: int, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The feature loss of classifier ``branch`` over pairs: on its expression descriptors when it has them,
    else Eq. 10's cosine on its penultimate features. out: a D pass over the N samples the pairs index."""
    if out.descriptors[branch] is not None:
        return descriptor_distance(out.descriptors[branch], first, second)
    return feature_loss(out.features[branch], first, second)


def total_variation(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 11, anisotropic L1: sum over pixels (and channels) of |p[i+1,j] - p[i,j]| + |p[i,j+1] - p[i,j]|,
    averaged over the batch.

    Only neighbour pairs with both pixels inside the UV chart count: across the chart border the value
    jumps to the forced 0 outside, and penalizing that would pull the border of the face to the mean.
    Sum, not mean, over pixels: lambda_tv = 1e-4 is tuned for it (a 64x64 face sums ~2*64*64*3 terms;
    with a mean the regularizer would be ~1e-4 times weaker than the other terms, i.e. absent).
    images: (B, 3, R, R); mask: (R, R) bool or float.
    """
    x = images.float()
    m = mask.to(x.dtype)
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs() * (m[1:, :] * m[:-1, :])
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs() * (m[:, 1:] * m[:, :-1])
    return (dy.sum() + dx.sum()) / x.shape[0]


def reconstruction_loss(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over the chart's pixels and channels of each pair (fake_i, real_i), averaged
    over the batch (beyond the paper: ``lambda_rec``, facegan.train.reconstruction). L1 like Eq. 12's
    per-vertex norms rather than squared: a few hard pixels do not dominate.
    fake, real: (B, 3, R, R) network space; mask: (R, R) bool or float.
    """
    m = mask.to(torch.float32)
    per_face = ((fake.float() - real.float()).abs() * m).sum(dim=(1, 2, 3)) / (3 * m.sum())
    return per_face.mean()


# ------------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class LossWeights:
    """Scalar weights of Eq. 5 and 7 and the gradient penalty."""

    lambda_c: float = 0.1
    lambda_gan: float = 1.0
    lambda_class: float = 1.0
    lambda_feat: float = 0.5
    lambda_tv: float = 1e-4
    gp_weight: float = 10.0
    lambda_pair: float = 1.0


Stats = dict[str, tuple[torch.Tensor, torch.Tensor | float]]  # name -> (numerator, denominator), on device


class FaceGANLoss:
    """The two phases of one iteration, in the spirit of stylegan2-ada's loss module.

    spec: the variant; weights: loss weights; factor_names: names for the stats; real_class_weights[b]:
    (n_classes,) class weights of classifier branch b (real data only); mask: (R, R) UV-chart mask;
    autocast: a factory of the mixed-precision context (a no-op context for float32);
    linear_descriptor: (factor, descriptor): the feature loss of that factor's pairs compares the fixed linear
    descriptors of the fakes, and with prototypes its labeled fakes are pulled to their class's prototype;
    pair_factor: the factor whose pairs of fakes D's pair critic scores in the G phase (None: no pair critic).
    """

    def __init__(self, spec: VariantSpec, weights: LossWeights, factor_names: list[str],
                 real_class_weights: list[torch.Tensor], mask: torch.Tensor,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 linear_descriptor: tuple[int, LinearDescriptor] | None = None, pair_factor: int | None = None):
        self.spec = spec
        self.w = weights
        self.names = factor_names
        self.real_class_weights = real_class_weights
        self.mask = mask
        self.autocast = autocast
        self.linear_descriptor = linear_descriptor
        self.pair_factor = pair_factor

    def discriminator_loss(self, d_sync: torch.nn.Module, d_plain: Discriminator, real: torch.Tensor,
                           real_labels: list[torch.Tensor], fake: torch.Tensor,
                           fake_labels: list[torch.Tensor | None], alpha: torch.Tensor,
                           real_descriptors: tuple[torch.Tensor, torch.Tensor] | None = None,
                           classified_real: torch.Tensor | None = None,
                           pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, Stats]:
        """D phase. real, fake: (B, 3, R, R); real_labels[k]: (B,) labels of factor k (-1 = missing);
        fake_labels[k]: labels of the fake codes (used only by AC-GAN); alpha: (B,) GP mixing weights;
        real_descriptors: (targets (B, K), valid (B,) bool) of the real images, for the branches with an
        expression descriptor (trained like the classifiers: real images only, weight lambda_c);
        classified_real: (B, 3, R, R) images the classifiers see instead of ``real`` (recombined faces,
        labeled by real_labels), while the critic still sees ``real``; not with AC-GAN;
        pairs: (real pairs, fake pairs), each (P, 6, R, R) with P <= B, for D's pair critic (WGAN-GP of its
        own, mixing weights alpha[:P]).

        d_sync is the module whose forward registers gradient synchronisation (DDP) and d_plain the bare
        module: real and fake go through d_sync in one forward, the gradient penalty through
        d_plain.critic, and the single backward of the returned loss reduces all gradients once.
        """
        spec, w = self.spec, self.w
        n = real.shape[0]
        n_classify = None if spec.classify_fakes_in_d else n
        batch, critic_from = [real, fake.detach()], 0
        if classified_real is not None:  # one forward: [classified, real, fake], the critic on the last 2B
            if spec.classify_fakes_in_d:
                raise ValueError("classified_real: AC-GAN classifies real and fake images in one pass")
            batch, critic_from = [classified_real, *batch], n
        with self.autocast():
            out = d_sync(torch.cat(batch), critic=True, n_classify=n_classify, critic_from=critic_from)
            gp = gradient_penalty(d_plain.critic, real, fake, alpha)
        wgan = critic_loss_d(out.critic[:n], out.critic[n:])
        loss = wgan + w.gp_weight * gp
        stats: Stats = {"d_wdist": (-wgan.detach(), 1.0), "d_gp": (gp.detach(), 1.0)}
        if pairs is not None:
            real_pairs, fake_pairs = pairs[0], pairs[1].detach()
            with self.autocast():
                scores = d_plain.pair_critic(torch.cat([real_pairs, fake_pairs]))
                pair_gp = gradient_penalty(d_plain.pair_critic, real_pairs, fake_pairs, alpha[:len(real_pairs)])
            pair_wgan = critic_loss_d(scores[:len(real_pairs)], scores[len(real_pairs):])
            loss = loss + pair_wgan + w.gp_weight * pair_gp
            stats["d_pair_wdist"] = (-pair_wgan.detach(), 1.0)
            stats["d_pair_gp"] = (pair_gp.detach(), 1.0)
        for b, k in enumerate(spec.classified):
            logits = out.logits[b]
            nll = weighted_nll(logits[:n], real_labels[k], self.real_class_weights[b])
            loss = loss + w.lambda_c * nll
            stats[f"d_class_{self.names[k]}"] = (nll.detach(), 1.0)
            stats[f"d_acc_{self.names[k]}"] = correct_and_count(logits[:n].detach(), real_labels[k])
            if out.descriptors[b] is not None:
                mse = descriptor_regression(out.descriptors[b][:n], *real_descriptors)
                loss = loss + w.lambda_c * mse
                stats[f"d_descriptor_{self.names[k]}"] = (mse.detach(), 1.0)
            if spec.classify_fakes_in_d and fake_labels[k] is not None:
                nll_fake = weighted_nll(logits[n:], fake_labels[k])
                loss = loss + w.lambda_c * nll_fake
                stats[f"d_class_fake_{self.names[k]}"] = (nll_fake.detach(), 1.0)
        stats["d_loss"] = (loss.detach(), 1.0)
        return loss, stats

    def generator_loss(self, g_sync: torch.nn.Module, d_plain: Discriminator,
                       batch: CodeBatch) -> tuple[torch.Tensor, Stats]:
        """G phase: generate from ``batch`` with g_sync and score with d_plain (whose parameters should
        have requires_grad off). Classification on the labeled factors, feature loss on the paired ones, and
        the pair critic on the pairs of ``pair_factor`` when the batch has them."""
        spec, w = self.spec, self.w
        labeled = [k for k in spec.classified if batch.labels[k] is not None]
        paired = [k for k in batch.pairs if k in spec.classified]
        branches = sorted(spec.branch_of(k) for k in set(labeled) | set(paired))
        with self.autocast():
            fake = g_sync(batch.z())
            out = d_plain(fake, critic=True, branches=branches)
        gan = critic_loss_g(out.critic)
        loss = w.lambda_gan * gan
        stats: Stats = {"g_gan": (gan.detach(), 1.0)}
        if self.pair_factor in batch.pairs:
            with self.autocast():
                scores = d_plain.pair_critic(stack_pairs(fake, *batch.pairs[self.pair_factor]))
            pair_gan = critic_loss_g(scores)
            loss = loss + w.lambda_pair * pair_gan
            stats["g_pair"] = (pair_gan.detach(), 1.0)
        described, descriptor = self.linear_descriptor or (None, None)
        descriptors = descriptor(fake) if described in set(labeled) | set(paired) else None
        for k in labeled:
            nll = weighted_nll(out.logits[spec.branch_of(k)], batch.labels[k])
            loss = loss + w.lambda_class * nll
            stats[f"g_class_{self.names[k]}"] = (nll.detach(), 1.0)
            if k == described and descriptor.prototypes is not None:
                proto = prototype_distance(descriptors, descriptor.prototypes[batch.labels[k]])
                loss = loss + w.lambda_feat * proto
                stats[f"g_proto_{self.names[k]}"] = (proto.detach(), 1.0)
        for k in paired:
            if k == described:
                feat = descriptor_distance(descriptors, *batch.pairs[k])
            else:
                feat = pair_distance(out, spec.branch_of(k), *batch.pairs[k])
            loss = loss + w.lambda_feat * feat
            stats[f"g_feat_{self.names[k]}"] = (feat.detach(), 1.0)
        if spec.tv:
            tv = total_variation(fake, self.mask)
            loss = loss + w.lambda_tv * tv
            stats["g_tv"] = (tv.detach(), 1.0)
        stats["g_loss"] = (loss.detach(), 1.0)
        return loss, stats
