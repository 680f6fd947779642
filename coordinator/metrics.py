"""Weighted means of the metrics sites report (validation after training, evaluation results)."""

from __future__ import annotations

import math
from typing import Mapping

_NOT_METRICS = {"n", "n_val", "n_test", "train_s", "samples_per_s", "steps"}


def weighted_mean(items: list[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Per key, Σ wᵢ·mᵢ / Σ wᵢ over the items that report a finite value for that key."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, w in items:
        for k, v in metrics.items():
            if k in _NOT_METRICS or not isinstance(v, (int, float)) or isinstance(v, bool) or _released_part(k):
                continue
            if not math.isfinite(float(v)) or w <= 0:
                continue
            sums[k] = sums.get(k, 0.0) + float(v) * w
            weights[k] = weights.get(k, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums}


def _released_part(key: str) -> bool:
    """A key that is part of a release rather than a figure to average: an interval bound, a
    released confusion cell or its noise SD (``protocol.dp_figures``)."""
    return key.endswith(("_lo", "_hi", "noise_sd")) or key.startswith("cm_") or "_cm_" in key


def after_training(metrics: Mapping[str, float]) -> dict[str, float]:
    """The ``after_*`` validation metrics of an Update, without the prefix."""
    return {k[len("after_"):]: v for k, v in metrics.items() if k.startswith("after_")}


def validation_weight(metrics: Mapping[str, float], num_examples: int) -> float:
    for key in ("n_val", "n"):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return float(num_examples)
