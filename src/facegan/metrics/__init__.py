"""Model-independent evaluation metrics, registered by name (like stylegan2-ada's ``metric_main``).

    from facegan import metrics
    metrics.list_metrics()                       # ['coverage', 'decoupling', ...]
    metrics.compute("specificity", samples=S, train=T)   # -> dict of floats / arrays

Every metric is a function of keyword arguments returning a dict; ``compute`` adds
``seconds`` (wall-clock). Meshes are float32 arrays (N, V, 3) in mm in the template's topology.

==========================  ==========================================================
name                        function
==========================  ==========================================================
specificity                 :func:`facegan.metrics.specificity.specificity`
diversity                   :func:`facegan.metrics.diversity.diversity`
paired_diversity            :func:`facegan.metrics.diversity.paired_diversity`
training_diversity          :func:`facegan.metrics.diversity.training_diversity`
mmd                         :func:`facegan.metrics.distribution.minimum_matching_distance`
coverage                    :func:`facegan.metrics.distribution.coverage`
1-nna                       :func:`facegan.metrics.distribution.one_nearest_neighbor_accuracy`
distribution                :func:`facegan.metrics.distribution.distribution_metrics` (the three at once)
kid                         :func:`facegan.metrics.distribution.kernel_inception_distance`
roughness                   :func:`facegan.metrics.roughness.roughness`
oracle_decoupling           :func:`facegan.metrics.oracle.oracle_decoupling`
decoupling                  :func:`facegan.metrics.decoupling.decoupling_score`
affine_span_residual        :func:`facegan.metrics.span.affine_span_residual`
==========================  ==========================================================
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["register", "compute", "list_metrics", "get_metric"]

_METRICS: dict[str, Callable[..., dict]] = {}


def register(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator: make a metric function available as ``compute(name, ...)``."""

    def add(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in _METRICS and _METRICS[name] is not fn:
            raise ValueError(f"metric {name!r} is already registered")
        _METRICS[name] = fn
        return fn

    return add


def list_metrics() -> list[str]:
    """Names of the registered metrics, sorted."""
    return sorted(_METRICS)


def get_metric(name: str) -> Callable[..., dict]:
    """The function registered as ``name`` (ValueError listing the known names otherwise)."""
    try:
        return _METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(list_metrics())}") from None


def compute(name: str, **kwargs: Any) -> dict:
    """Run metric ``name`` with keyword arguments; its result dict plus ``seconds`` (wall-clock)."""
    fn = get_metric(name)
    start = time.perf_counter()
    result = dict(fn(**kwargs))
    result["seconds"] = time.perf_counter() - start
    return result


# Importing the modules registers their metrics (they import ``register`` from here).
from facegan.metrics import (  # noqa: E402,F401
    decoupling,
    distribution,
    diversity,
    oracle,
    roughness,
    span,
    specificity,
)
