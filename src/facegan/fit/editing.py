"""Face editing in latent space (supplementary, "Latent Space Manipulation"; Figures 9 and 10).

Codes are dicts {factor name: (B, size), ..., "noise": (B, noise_size)} as returned by
``FaceModel.sample`` and :func:`facegan.fit.fit_meshes`. For a target face
G(z_id^t, z_exp^t, z_noise^t) and a source face G(z_id^s, z_exp^s, z_noise^s):

- replace (transfer): G(z_id^t, z_exp^s, z_noise^t) -- the target takes the source's expression;
- add:                G(z_id^t, z_exp^s + z_exp^t, z_noise^t);
- interpolate:        G(..., (1 - t) z_f^a + t z_f^b, ...) for t = 0 .. 1 in the chosen factor f,
                      every other code kept from a.

Every function works for any factor name (identity, expression, or an extra factor). Row counts
broadcast: B target rows against B source rows, or either side with a single row.
The functions here only combine codes; :func:`edit_meshes` decodes the results to meshes, and
:func:`keep_detail` applies an edit to a fitted mesh as a displacement (beyond the paper).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from facegan.errors import FaceganError, check_known
from facegan.model import NOISE, FaceModel

Codes = Mapping[str, torch.Tensor]


def check_codes(codes: Codes, model: FaceModel | None = None, what: str = "codes") -> dict[str, torch.Tensor]:
    """Codes as float32 (B, size) tensors with one row count; with ``model``, its factors + noise with
    its sizes. FaceganError naming the problem otherwise."""
    if not codes:
        raise FaceganError(f"{what}: no codes")
    out = {name: torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).to(torch.float32)
           for name, value in codes.items()}
    if model is not None:
        expected = dict(zip([*model.factors, NOISE], [*model.code_sizes, model.noise_size]))
        missing = [name for name in expected if name not in out]
        if missing:
            raise FaceganError(f"{what}: no {missing[0]!r} codes (the model has {', '.join(expected)})")
        check_known(out, expected, "code", what)
        for name, size in expected.items():
            if out[name].ndim != 2 or out[name].shape[1] != size:
                raise FaceganError(f"{what}: {name!r} codes of shape {tuple(out[name].shape)}, "
                                   f"the model needs (B, {size})")
        out = {name: out[name] for name in expected}  # the model's order
    rows = {len(v) if v.ndim else 0 for v in out.values()}
    if len(rows) != 1 or any(v.ndim != 2 for v in out.values()):
        raise FaceganError(f"{what}: codes must all be (B, size) with one B, got "
                           + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()))
    if 0 in rows:
        raise FaceganError(f"{what}: no rows")
    if not all(bool(torch.isfinite(v).all()) for v in out.values()):
        raise FaceganError(f"{what}: codes contain NaN or infinite values")
    return out


def n_rows(codes: Codes) -> int:
    return len(next(iter(codes.values())))


def _pair(target: Codes, source: Codes, factor: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Broadcast target and source rows; returns (target codes (B, .), target factor code, source factor code)."""
    target, source = check_codes(target, what="target codes"), check_codes(source, what="source codes")
    for side, codes in (("target", target), ("source", source)):
        if factor not in codes:
            raise FaceganError(f"{side} codes have no {factor!r} code (they have {', '.join(codes)})")
    nt, ns = n_rows(target), n_rows(source)
    if nt != ns and 1 not in (nt, ns):
        raise FaceganError(f"{nt} target rows and {ns} source rows: give as many of each, or one of either")
    n = max(nt, ns)
    target = {k: v.expand(n, -1).clone() for k, v in target.items()}
    return target, target[factor], source[factor].expand(n, -1)


def replace_factor(target: Codes, source: Codes, factor: str) -> dict[str, torch.Tensor]:
    """Target codes with ``factor``'s code taken from the source: G(z^t with z_f = z_f^s)."""
    out, _, source_code = _pair(target, source, factor)
    out[factor] = source_code.clone()
    return out


def add_factor(target: Codes, source: Codes, factor: str) -> dict[str, torch.Tensor]:
    """Target codes with ``factor``'s code replaced by the sum z_f^s + z_f^t."""
    out, target_code, source_code = _pair(target, source, factor)
    out[factor] = source_code + target_code
    return out


def transfer_expression(codes_target: Codes, codes_source: Codes,
                        factor: str = "expression") -> dict[str, torch.Tensor]:
    """G(z_id^target, z_exp^source, z_noise^target): the target face with the source's expression."""
    return replace_factor(codes_target, codes_source, factor)


def add_expression(codes_target: Codes, codes_source: Codes, factor: str = "expression") -> dict[str, torch.Tensor]:
    """G(z_id^target, z_exp^source + z_exp^target, z_noise^target)."""
    return add_factor(codes_target, codes_source, factor)


def interpolate(codes_a: Codes, codes_b: Codes, factor: str = "identity", steps: int = 5) -> dict[str, torch.Tensor]:
    """Linear interpolation of ``factor``'s code from a to b, other codes kept from a.

    codes_a, codes_b: B rows each (or one of them a single row). Returns codes of B * steps rows,
    row b * steps + k at t_k = k / (steps - 1): row b*steps equals a's row b exactly, and the last
    row of each group has b's ``factor`` code exactly.
    """
    if steps < 2:
        raise FaceganError(f"interpolate: steps={steps}, need at least 2 (the two ends)")
    a, code_a, code_b = _pair(codes_a, codes_b, factor)
    n = n_rows(a)
    t = torch.linspace(0, 1, steps)[None, :, None]
    # (1 - t) a + t b, not a + t (b - a): exact at both ends
    mixed = (1 - t) * code_a[:, None] + t * code_b[:, None]
    out = {name: code.repeat_interleave(steps, dim=0) for name, code in a.items()}
    out[factor] = mixed.reshape(n * steps, -1)
    return out


def keep_detail(edited: torch.Tensor, fitted: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The edit applied to the fitted mesh itself: ``inputs + (edited - fitted)``, (B, V, 3) mm.

    edited: meshes of the edited codes; fitted: meshes of the unedited fitted codes, decoded the same way;
    inputs: the meshes that were fitted (all (B, V, 3), or broadcastable). What the model could not fit
    (``inputs - fitted``: scan detail, an identity beyond the model's reach) stays; the edit adds only the
    change it makes to the model's face.
    """
    return inputs + (edited - fitted)


def edit_meshes(model: FaceModel, codes: Codes, method: str = "dense") -> torch.Tensor:
    """Meshes (N, V, 3) mm of edited codes (N rows): G(z) decoded by the model's codec
    (``method`` "dense", the Laplacian reconstruction of Eq. 4, or "sparse")."""
    from facegan.fit.fitting import decode_codes

    return decode_codes(model, check_codes(codes, model), method)
