"""Decoupling (paper Sec. 5.3, after Donahue et al.): does fixing a code fix the factor?

Identity decoupling: draw n faces x_i = G(z_id^i, z_exp^i, z_noise^i); for each, m more faces
with the *same* identity code and new expression and noise codes; an embedding network trained
on identity labels judges every (x_i, y_ij) pair "same" when the distance of their embeddings is
at most tau. The score is the percentage of "same" pairs (higher is better). Expression
decoupling swaps the roles. The paper uses n = m = 100 and tau = 0.14 (identity) / 0.226
(expression), chosen by :func:`calibrate_threshold` on the test split for *its* networks: our
networks have their own scale, so calibrate tau for them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from facegan.metrics import register
from facegan.metrics.embedding import make_validation_pairs, select_threshold

__all__ = ["decoupling_score", "calibrate_threshold"]

EmbedFn = Callable[[np.ndarray], np.ndarray]  # meshes (B, V, 3) -> embeddings (B, d)


@register("decoupling")
def decoupling_score(embed_fn: EmbedFn, anchors, groups: Iterable, tau: float) -> dict:
    """Percentage of (anchor, group member) pairs judged "same" (embedding distance <= tau).

    embed_fn: meshes (B, V, 3) -> (B, d) embeddings (e.g. a :class:`MeshEmbedder`);
    anchors: (n, V, 3) the x_i; groups: (n, m, V, 3) or n arrays (m_i, V, 3), the Y(x_i) sharing
    x_i's fixed code. Returns percent (0-100), same (n, m) bool and distances (n, m) (ragged
    groups: lists).
    """
    anchor_emb = np.asarray(embed_fn(np.asarray(anchors)))
    distances, same = [], []
    for i, group in enumerate(groups):
        if i >= len(anchor_emb):
            raise ValueError(f"more groups than anchors ({len(anchor_emb)})")
        emb = np.asarray(embed_fn(np.asarray(group)))
        d = np.linalg.norm(emb - anchor_emb[i], axis=1)
        distances.append(d)
        same.append(d <= tau)
    if len(distances) != len(anchor_emb):
        raise ValueError(f"{len(anchor_emb)} anchors but {len(distances)} groups")
    flat = np.concatenate(same)
    ragged = len({len(s) for s in same}) > 1
    return {
        "percent": float(100.0 * flat.mean()) if len(flat) else float("nan"),
        "same": same if ragged else np.stack(same),
        "distances": distances if ragged else np.stack(distances),
        "tau": float(tau),
    }


def calibrate_threshold(embed_fn: EmbedFn, meshes, labels, n_pairs: int = 2000, max_far: float = 0.10, rng=None) -> dict:
    """Select tau on a balanced validation pair set (the paper: from the test split).

    meshes: (N, V, 3); labels: (N,) int, -1 = missing. Embeds only the meshes the pairs use.
    Returns tau, accuracy, far, and the pairs' distances (K,) and same (K,).
    """
    first, second, same = make_validation_pairs(labels, n_pairs, rng)
    used, inverse = np.unique(np.r_[first, second], return_inverse=True)
    emb = np.asarray(embed_fn(np.asarray(meshes[used])))
    a, b = emb[inverse[: len(first)]], emb[inverse[len(first) :]]
    distances = np.linalg.norm(a - b, axis=1)
    tau, accuracy, far = select_threshold(distances, same, max_far)
    return {"tau": tau, "accuracy": accuracy, "far": far, "distances": distances, "same": same}
