"""Facial expressions as ICT blendshape weights: the basic emotions as FACS recipes, and random
spontaneous mixtures.

Weights are vectors over the 53 ICT expression shapes (ARKit-style names, in the order of
:data:`ICT_EXPRESSIONS` or of the loaded model), each in [0, 1]. Recipes name shapes by their base
name; a base name with ``_L``/``_R`` variants stands for both sides (faces are near-symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

#: The seven expression classes labeled in the static datasets (paper, Sec. 5.2); index = label.
EMOTIONS = ("neutral", "happiness", "sadness", "surprise", "fear", "anger", "disgust")
NEUTRAL = 0

#: ICT-FaceKit expression shapes, in the order of ``vertex_indices.json`` ``expressions``.
ICT_EXPRESSIONS = (
    "browDown_L", "browDown_R", "browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R",
    "cheekPuff_L", "cheekPuff_R", "cheekSquint_L", "cheekSquint_R", "eyeBlink_L", "eyeBlink_R",
    "eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L", "eyeLookIn_R", "eyeLookOut_L", "eyeLookOut_R",
    "eyeLookUp_L", "eyeLookUp_R", "eyeSquint_L", "eyeSquint_R", "eyeWide_L", "eyeWide_R",
    "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose", "mouthDimple_L", "mouthDimple_R",
    "mouthFrown_L", "mouthFrown_R", "mouthFunnel", "mouthLeft", "mouthLowerDown_L", "mouthLowerDown_R",
    "mouthPress_L", "mouthPress_R", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper",
    "mouthShrugLower", "mouthShrugUpper", "mouthSmile_L", "mouthSmile_R", "mouthStretch_L",
    "mouthStretch_R", "mouthUpperUp_L", "mouthUpperUp_R", "noseSneer_L", "noseSneer_R",
)  # fmt: skip

# Shapes that pull in opposite directions: never both active in a random mixture.
_OPPOSITES = (("jawLeft", "jawRight"), ("mouthLeft", "mouthRight"))


@dataclass(frozen=True)
class Recipe:
    """An emotion as FACS action units mapped to ICT shapes.

    primary: base shape name -> nominal weight at full intensity (always on);
    secondary: base shape name -> (nominal weight, probability that an individual shows it).
    """

    facs: str
    primary: dict[str, float]
    secondary: dict[str, tuple[float, float]] = field(default_factory=dict)


# FACS prototypes (Ekman & Friesen, EMFACS) mapped to ARKit-style shapes:
# AU1 browInnerUp, AU2 browOuterUp, AU4 browDown, AU5 eyeWide, AU6 cheekSquint, AU7 eyeSquint,
# AU9 noseSneer, AU10 mouthUpperUp, AU12 mouthSmile, AU14 mouthDimple, AU15 mouthFrown,
# AU17 mouthShrugLower, AU20 mouthStretch, AU23/24 mouthPress, AU25/26 jawOpen, AU43 eyeBlink.
RECIPES: dict[str, Recipe] = {
    "neutral": Recipe("no action units", {}),
    "happiness": Recipe(
        "AU6 + AU12 (+ AU7, AU10, AU14, AU25)",
        {"cheekSquint": 0.8, "mouthSmile": 0.9},
        {"eyeSquint": (0.4, 0.5), "mouthUpperUp": (0.25, 0.3), "mouthDimple": (0.4, 0.3), "jawOpen": (0.15, 0.4)},
    ),
    "sadness": Recipe(
        "AU1 + AU4 + AU15 (+ AU17, AU43)",
        {"browInnerUp": 0.9, "browDown": 0.4, "mouthFrown": 0.9},
        {"mouthShrugLower": (0.4, 0.5), "eyeBlink": (0.2, 0.3), "mouthPress": (0.3, 0.3)},
    ),
    "surprise": Recipe(
        "AU1 + AU2 + AU5 + AU26 (+ AU25 funnel)",
        {"browInnerUp": 0.9, "browOuterUp": 0.9, "eyeWide": 0.8, "jawOpen": 0.5},
        {"mouthFunnel": (0.25, 0.3), "mouthLowerDown": (0.3, 0.3)},
    ),
    "fear": Recipe(
        "AU1 + AU2 + AU4 + AU5 + AU20 + AU26",
        {"browInnerUp": 0.9, "browOuterUp": 0.5, "browDown": 0.4, "eyeWide": 0.8, "mouthStretch": 0.8, "jawOpen": 0.3},
        {"mouthLowerDown": (0.3, 0.4), "eyeSquint": (0.2, 0.2)},
    ),
    "anger": Recipe(
        "AU4 + AU5 + AU7 + AU23/24 (+ AU9, AU17)",
        {"browDown": 0.9, "eyeWide": 0.3, "eyeSquint": 0.6, "mouthPress": 0.8},
        {"noseSneer": (0.3, 0.4), "mouthShrugLower": (0.3, 0.4), "mouthRollLower": (0.2, 0.2)},
    ),
    "disgust": Recipe(
        "AU9 + AU10 + AU15 (+ AU4, AU6, AU17)",
        {"noseSneer": 0.8, "mouthUpperUp": 0.7, "mouthFrown": 0.5},
        {"browDown": (0.4, 0.5), "cheekSquint": (0.4, 0.4), "mouthShrugLower": (0.4, 0.4), "eyeSquint": (0.3, 0.3)},
    ),
}


def expand(base_weights: dict[str, float], names: Sequence[str] = ICT_EXPRESSIONS) -> np.ndarray:
    """Weights (len(names),) float32 from base names (``mouthSmile`` sets ``mouthSmile_L`` and ``_R``)."""
    w = np.zeros(len(names), np.float32)
    for base, value in base_weights.items():
        idx = _indices(base, names)
        w[idx] = value
    return w


def _indices(base: str, names: Sequence[str]) -> list[int]:
    idx = [i for i, n in enumerate(names) if n == base or n in (base + "_L", base + "_R")]
    if not idx:
        raise KeyError(f"no ICT expression shape named {base!r}")
    return idx


def nominal_weights(emotion: str, names: Sequence[str] = ICT_EXPRESSIONS) -> np.ndarray:
    """The recipe's primary shapes at full intensity, (len(names),) float32."""
    return expand(RECIPES[emotion].primary, names)


def constrain(weights: np.ndarray, names: Sequence[str] = ICT_EXPRESSIONS) -> np.ndarray:
    """Clip weights (..., 53) to [0, 1] and enforce mouthClose <= jawOpen (a corrective shape that
    on its own pushes the lips ~4 cm out of place). Returns a new float32 array."""
    w = np.clip(np.asarray(weights, np.float32), 0.0, 1.0)
    names = list(names)
    if "mouthClose" in names and "jawOpen" in names:
        c, j = names.index("mouthClose"), names.index("jawOpen")
        w[..., c] = np.minimum(w[..., c], w[..., j])
    return w


def sample_emotion(
    emotion: str,
    rng: np.random.Generator,
    names: Sequence[str] = ICT_EXPRESSIONS,
    intensity_range: tuple[float, float] = (0.6, 1.0),
    jitter: float = 0.2,
    asymmetry: float = 0.08,
) -> tuple[np.ndarray, float]:
    """One individual's way of showing ``emotion``: (weights (len(names),) float32, intensity).

    Primary weights are jittered multiplicatively (log-normal, sigma ``jitter``), left and right
    sides differ by up to ``asymmetry``, each secondary shape is on with its probability at a
    random fraction of its weight, and everything is scaled by an intensity drawn uniformly from
    ``intensity_range`` (0 for neutral). The weights returned already include the intensity.
    """
    recipe = RECIPES[emotion]
    if not recipe.primary:
        return np.zeros(len(names), np.float32), 0.0
    w = np.zeros(len(names), np.float32)
    for base, value in recipe.primary.items():
        idx = _indices(base, names)
        scale = np.exp(rng.normal(0.0, jitter)) * (1.0 + rng.uniform(-asymmetry, asymmetry, len(idx)))
        w[idx] = value * scale
    for base, (value, prob) in recipe.secondary.items():
        if rng.random() < prob:
            idx = _indices(base, names)
            w[idx] = value * rng.uniform(0.5, 1.0) * (1.0 + rng.uniform(-asymmetry, asymmetry, len(idx)))
    intensity = float(rng.uniform(*intensity_range))
    return constrain(w * intensity, names), intensity


def intensity_curve(n_frames: int, peak: int, hold: int = 0) -> np.ndarray:
    """Onset-apex-offset curve (n_frames,) float32: 0 at the first and last frame, 1 from frame
    ``peak`` to ``peak + hold``, smoothstep ramps (zero slope at both ends, like a real onset)."""
    t = np.arange(n_frames, dtype=np.float64)
    last = n_frames - 1
    if not (0 < peak and peak + hold < last):
        raise ValueError(f"peak {peak} (+ hold {hold}) must lie strictly inside 0..{last}")
    up = _smoothstep(t / peak)
    down = _smoothstep((last - t) / (last - peak - hold))
    return np.where(t <= peak, up, np.where(t <= peak + hold, 1.0, down)).astype(np.float32)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _groups(names: Sequence[str]) -> list[list[int]]:
    """Shape indices grouped by base name (an _L/_R pair is one group); mouthClose excluded (it
    only ever accompanies jawOpen)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n == "mouthClose":
            continue
        base = n[:-2] if n.endswith(("_L", "_R")) else n
        groups.setdefault(base, []).append(i)
    return list(groups.values())


def random_mixture(
    rng: np.random.Generator,
    names: Sequence[str] = ICT_EXPRESSIONS,
    n_active: tuple[int, int] = (1, 4),
    weight_range: tuple[float, float] = (0.2, 0.9),
) -> np.ndarray:
    """A sparse random expression (len(names),) float32, like one frame of spontaneous behaviour.

    Between ``n_active[0]`` and ``n_active[1]`` shape groups are on; a left/right pair is usually
    symmetric (75%), else one-sided or uneven. Opposites (jawLeft/jawRight, mouthLeft/mouthRight)
    never combine; mouthClose may join jawOpen, never exceeding it.
    """
    names = list(names)
    groups = _groups(names)
    w = np.zeros(len(names), np.float32)
    k = int(rng.integers(n_active[0], n_active[1] + 1))
    for g in rng.choice(len(groups), size=min(k, len(groups)), replace=False):
        idx = groups[g]
        value = rng.uniform(*weight_range)
        if len(idx) == 2 and rng.random() >= 0.75:
            side = rng.uniform(0.0, 1.0, 2)  # one-sided or uneven
            w[idx] = value * side / side.max()
        else:
            w[idx] = value
    for a, b in _OPPOSITES:
        if a in names and b in names and w[names.index(a)] > 0 and w[names.index(b)] > 0:
            w[names.index(b)] = 0.0
    if "jawOpen" in names and "mouthClose" in names and w[names.index("jawOpen")] > 0 and rng.random() < 0.3:
        w[names.index("mouthClose")] = rng.uniform(0.0, 1.0) * w[names.index("jawOpen")]
    return constrain(w, names)


def mixture_sequence(
    rng: np.random.Generator,
    n_frames: int,
    names: Sequence[str] = ICT_EXPRESSIONS,
    key_spacing: tuple[int, int] = (8, 20),
    start: np.ndarray | None = None,
) -> np.ndarray:
    """A smooth spontaneous sequence (n_frames, len(names)) float32.

    Keyframes are :func:`random_mixture` draws (or ``start`` for the first frame, e.g. zeros for
    an exactly neutral first frame) every ``key_spacing`` frames; frames between two keys are
    smoothstep blends, so weights are continuous with zero velocity at the keys. Convex blends of
    valid keys keep weights in [0, 1] and mouthClose <= jawOpen.
    """
    first = random_mixture(rng, names) if start is None else constrain(start, names)
    if n_frames == 1:
        return first[None]
    keys, positions = [first], [0]
    while positions[-1] < n_frames - 1:
        # The last key may lie past the end: a clipped, short last segment would jump.
        positions.append(positions[-1] + int(rng.integers(key_spacing[0], key_spacing[1] + 1)))
        keys.append(random_mixture(rng, names))
    keys_arr, pos = np.stack(keys), np.asarray(positions)
    t = np.arange(n_frames)
    seg = np.clip(np.searchsorted(pos, t, side="right") - 1, 0, len(pos) - 2)
    alpha = _smoothstep((t - pos[seg]) / np.maximum(pos[seg + 1] - pos[seg], 1))[:, None]
    return ((1.0 - alpha) * keys_arr[seg] + alpha * keys_arr[seg + 1]).astype(np.float32)
