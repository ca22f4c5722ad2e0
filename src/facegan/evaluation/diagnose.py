"""Why a GAN's codes are (not) decoupled: what each code moves, and how far the feature loss can go.

Measurements beyond Table 1 (docs/evaluation.md, "Diagnosing decoupling"):

* **Code effects** (data synthesized from ICT: the oracle reads identity and expression off the meshes):
  groups of samples in which one code varies while every other code and the noise stay fixed. The
  within-group identity and expression variance, over the training data's, says what that code moves.
  In a decoupled model z_id moves only the identity, z_exp only the expression, the noise neither.
* **Feature floors** (any dataset; needs a training checkpoint, which holds D): the feature loss of each
  classifier branch (Eq. 10's 1 - cos, or the expression-descriptor distance) over pairs of real training
  images that share one factor's label and differ in another's, over random pairs, and over generated
  pairs that share one code. If real faces with the same expression on different identities are already
  as far apart in C_exp's features as random faces, the loss cannot tell a code that changes the
  identity (allowed) from one that changes the expression (not). With two factors (identity, expression),
  also pairs that wear one real face's expression on two new identities drawn from the linear model of the
  training identities' shapes: how the features respond to identities beyond the training ones, which is
  what G's random identity codes make.
* **Fixed-code accuracy**: D's classifier of each factor on samples made with that factor's fixed codes
  T^k_c, the other codes random: does G make what the labeled codes ask for?
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from facegan.data.dataset import open_dataset
from facegan.errors import FaceganError
from facegan.fileio import atomic_path, write_json
from facegan.metrics.oracle import OracleProjector, oracle_decoupling
from facegan.model import NOISE, FaceModel
from facegan.nn.losses import descriptor_distance, pair_distance
from facegan.nn.networks import Discriminator, DOutput
from facegan.train.checkpoint import bank_bandwidths, code_bank, load_checkpoint, load_module
from facegan.train.config import TrainConfig
from facegan.train.data import (EXPRESSION, LinearDescriptor, TrainingImages, gaussian_identities, identity_shape_images,
                                to_network)

__all__ = ["code_effects", "feature_floors", "fixed_code_accuracy", "load_discriminator", "diagnose"]


def _generate(model: FaceModel, codes: dict[str, torch.Tensor], chunk: int = 256) -> torch.Tensor:
    """(N, 3, R, R) images of ``codes`` (factor name -> (N, size), plus "noise"), in chunks."""
    n = len(codes[NOISE])
    with torch.no_grad():
        return torch.cat([model.generate([codes[f][s:s + chunk] for f in model.factors], codes[NOISE][s:s + chunk])
                          for s in range(0, n, chunk)])


def _classify(discriminator: Discriminator, images: torch.Tensor, chunk: int = 256) -> DOutput:
    """D's classifier outputs (logits, features, descriptors of every branch) for (N, 3, R, R) images, in chunks."""
    with torch.no_grad():
        outs = [discriminator(images[s:s + chunk], critic=False) for s in range(0, len(images), chunk)]

    def joined(field: str) -> list[torch.Tensor | None]:
        per_branch = zip(*[getattr(o, field) for o in outs])
        return [None if parts[0] is None else torch.cat(parts) for parts in per_branch]

    return DOutput(None, joined("logits"), joined("features"), joined("descriptors"))


def code_effects(model: FaceModel, to_meshes, projector: OracleProjector, reference: dict, groups: int = 40,
                 size: int = 40, seed: int = 0) -> dict[str, dict[str, float]]:
    """For each code (every factor, then the noise): identity and expression ratios of groups in which that
    code varies and all others are fixed.

    to_meshes: (B, 3, R, R) images -> (B, V, 3) mm; reference: oracle coefficients of the training data.
    Returns code name -> {"identity": ratio, "expression": ratio} (0 = does not move it, ~1 = as much as
    the data varies).
    """
    gen = torch.Generator().manual_seed(seed)
    names = [*model.factors, NOISE]
    effects = {}
    for varied in names:
        codes = {name: model.draw(name, groups * size, gen) if name == varied
                 else model.draw(name, groups, gen).repeat_interleave(size, 0) for name in names}
        images = _generate(model, codes)
        meshes = np.concatenate([to_meshes(images[s:s + 256]) for s in range(0, len(images), 256)])
        result = oracle_decoupling(projector, meshes.reshape(groups, size, *meshes.shape[1:]), reference)
        effects[varied] = {"identity": result["identity_ratio"], "expression": result["expression_ratio"]}
    return effects


def load_discriminator(checkpoint: str | os.PathLike, data: TrainingImages
                       ) -> tuple[Discriminator, list[int], LinearDescriptor | None]:
    """D of a training checkpoint, built for ``data``'s factors and classes; returns (D, the factor index of
    each classifier branch, the run's fixed linear expression descriptor or None)."""
    from facegan.train.loop import build_networks, linear_descriptor

    tensors, meta = load_checkpoint(checkpoint, "cpu")
    if "opt_D" not in meta:
        raise FaceganError(f"{checkpoint}: a model file holds no discriminator; give the run's checkpoint.safetensors")
    if meta.get("class_names") != data.class_names:
        raise FaceganError(f"{checkpoint}: trained with other factors or classes than the dataset's")
    config = TrainConfig.from_dict(meta["config"], source=str(checkpoint))
    spec = config.variant_spec(len(data.factors))
    _, discriminator = build_networks(config, spec, data.mask, data.n_classes)
    load_module(discriminator, "D", tensors, str(checkpoint))
    return discriminator.eval(), list(spec.classified), linear_descriptor(config, data)


def _real_pairs(labels: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of real images: for each factor k and other factor j, "same k, other j" (both labels known,
    k equal, j different), plus "random". Each kind has up to ``n`` pairs."""
    names = list(labels)
    count = len(labels[names[0]])
    kinds = {}
    for k in names:
        for j in names:
            if j == k:
                continue
            a, b = torch.randint(count, (2, 50 * n), generator=gen)
            keep = ((labels[k][a] >= 0) & (labels[k][a] == labels[k][b]) & (labels[j][a] >= 0) & (labels[j][b] >= 0)
                    & (labels[j][a] != labels[j][b]))
            kinds[f"real: same {k}, other {j}"] = (a[keep][:n], b[keep][:n])
    a, b = torch.randint(count, (2, n), generator=gen)
    kinds["real: random pairs"] = (a, b)
    return kinds


def _new_identity_pairs(data: TrainingImages, n: int, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2n, 3, R, R) images: rows i and n + i wear the expression residual of one real face (its image minus its
    identity's expression-free shape) on two new identities from :func:`gaussian_identities`; and the pair
    indices (0..n-1, n..2n-1)."""
    identity, expression = data.labels[data.factors[0]], data.labels[data.factors[EXPRESSION]]
    shapes = identity_shape_images(data.images, data.mask, identity, expression)
    known = torch.nonzero(identity >= 0).flatten()
    pick = known[torch.randint(len(known), (n,), generator=gen)]
    residual = to_network(data.images[pick], data.mask) - shapes[identity[pick]]
    present = shapes[torch.bincount(identity[known], minlength=len(shapes)) > 0]  # identities with images
    images = torch.cat([residual + gaussian_identities(present, n, gen) for _ in range(2)]).clamp_(-1.0, 1.0)
    index = torch.arange(n)
    return images.contiguous(), index, index + n


def feature_floors(model: FaceModel, discriminator: Discriminator, branch_factors: list[int], data: TrainingImages,
                   pairs: int = 2000, seed: int = 0, linear: LinearDescriptor | None = None) -> dict[str, dict[str, float]]:
    """The feature loss of each classifier branch over real and generated pairs.

    Returns pair kind -> {factor of the branch: mean pair distance}. Kinds: the real kinds of
    :func:`_real_pairs`, with two factors "recombined: one expression, two new identities"
    (:func:`_new_identity_pairs`), and "generated: shared z_<factor>" (pairs sharing that code, every other code
    and the noise drawn per sample). With ``linear`` (a run trained with the fixed linear descriptor) the
    expression column is the distance of those descriptors, the loss that run's G minimized.
    """
    gen = torch.Generator().manual_seed(seed)
    branches = {data.factors[k]: b for b, k in enumerate(branch_factors)}
    described = data.factors[EXPRESSION] if linear is not None else None

    def distances(images: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
        out = _classify(discriminator, images)
        table = {f: float(pair_distance(out, b, first, second)) for f, b in branches.items()}
        if described is not None:
            table[described] = float(descriptor_distance(linear(images), first, second))
        return table

    table = {}
    for kind, (a, b) in _real_pairs(data.labels, pairs, gen).items():
        if len(a) == 0:
            continue
        order = torch.cat([a, b])
        images = to_network(data.images[order], data.mask).contiguous()
        index = torch.arange(len(a))
        table[kind] = distances(images, index, index + len(a))
    if len(data.factors) == 2:
        table["recombined: one expression, two new identities"] = distances(*_new_identity_pairs(data, pairs, gen))
    for shared in model.factors:
        images, _ = model.sample(pairs, fix=shared, m=2, seed=seed)  # rows 2i, 2i+1 share the code
        index = torch.arange(0, 2 * pairs, 2)
        table[f"generated: shared z_{shared}"] = distances(images.cpu(), index, index + 1)
    return table


def fixed_code_accuracy(model: FaceModel, discriminator: Discriminator, branch_factors: list[int], factors: list[str],
                        per_class: int = 20, seed: int = 0) -> dict[str, float]:
    """For each classified factor k: the accuracy of D's classifier k on samples generated with the fixed code
    T^k_c of each class c (``per_class`` samples per class, every other code and the noise random)."""
    gen = torch.Generator().manual_seed(seed)
    names = [*model.factors, NOISE]
    accuracy = {}
    for branch, k in enumerate(branch_factors):
        factor = factors[k]
        table = model.fixed_codes[factor].cpu()
        classes = torch.arange(len(table)).repeat_interleave(per_class)
        codes = {name: table[classes] if name == factor else model.draw(name, len(classes), gen) for name in names}
        logits = _classify(discriminator, _generate(model, codes).cpu()).logits[branch]
        accuracy[factor] = float((logits.argmax(1) == classes).float().mean())
    return accuracy


def _markdown(run: str, effects: dict | None, floors: dict, accuracy: dict[str, float], prior: str) -> str:
    lines = [f"# Decoupling diagnosis of {run}", "", f"Random codes: {prior}.", ""]
    if effects is None:
        lines += ["Code effects: skipped (the dataset was not synthesized from the ICT model: no oracle).", ""]
    else:
        lines += ["Code effects: within-group variance over the training data's when only this code varies "
                  "(0 = the code does not move it).", "", "| code varied | identity | expression |", "|---|---|---|"]
        lines += [f"| {code} | {v['identity']:.3f} | {v['expression']:.3f} |" for code, v in effects.items()]
        lines.append("")
    factors = list(next(iter(floors.values())))
    lines += ["Feature floors: the feature loss of each classifier branch over pairs (0 = identical features).", "",
              "| pairs | " + " | ".join(f"C_{f}" for f in factors) + " |", "|---" * (len(factors) + 1) + "|"]
    lines += [f"| {kind} | " + " | ".join(f"{v[f]:.3f}" for f in factors) + " |" for kind, v in floors.items()]
    lines += ["", "Fixed-code accuracy: D's classifier on samples made with each class's fixed code T^k_c "
              "(other codes random).", ""]
    lines += [f"- C_{f}: {a:.1%}" for f, a in accuracy.items()]
    return "\n".join(lines) + "\n"


def diagnose(checkpoint: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, pairs: int = 2000,
             groups: int = 40, size: int = 40, seed: int = 0, bank: list[str] = (),
             bandwidth: float | dict[str, float] | None = None) -> Path:
    """``facegan diagnose``: code effects and feature floors of a training checkpoint on a dataset; writes
    ``out``/diagnosis.md and diagnosis.json and returns the markdown path. ``bank``/``bandwidth``: draw
    those codes as the model exported with them would (:func:`~facegan.train.checkpoint.code_bank`)."""
    from facegan.evaluation.evaluate import EvaluationData
    from facegan.sampling import codec_of, images_to_meshes
    from facegan.train.prepare import ensure_encoded, training_images

    model = FaceModel.load(checkpoint)
    if bank:
        tensors, meta = load_checkpoint(checkpoint, "cpu")
        model.code_bank = code_bank(tensors, meta, list(bank), str(checkpoint))
        model.bank_bandwidth = bank_bandwidths(model.code_bank, bandwidth)
    dataset = open_dataset(data)
    images = training_images(dataset, ensure_encoded(dataset, model.resolution))
    discriminator, branch_factors, linear = load_discriminator(checkpoint, images)
    floors = feature_floors(model, discriminator, branch_factors, images, pairs, seed, linear)
    accuracy = fixed_code_accuracy(model, discriminator, branch_factors, images.factors, seed=seed)
    oracle = EvaluationData(dataset, progress=False).oracle
    effects = None
    if oracle is not None:
        codec = codec_of(model)
        effects = code_effects(model, lambda x: images_to_meshes(codec, x).cpu().numpy(), *oracle, groups, size, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diagnosis.json", {"checkpoint": str(checkpoint), "data": str(data),
                                        "code_bank_bandwidth": model.bank_bandwidth or None,
                                        "code_effects": effects,
                                        "feature_floors": floors, "fixed_code_accuracy": accuracy})
    with atomic_path(out / "diagnosis.md") as tmp:
        widths = ", ".join(f"{n} (bandwidth {h:.2f})" for n, h in model.bank_bandwidth.items())
        prior = f"{widths} from the training faces' codes, the rest N(0, I)" if bank else "N(0, I)"
        tmp.write_text(_markdown(str(checkpoint), effects, floors, accuracy, prior))
    return out / "diagnosis.md"
