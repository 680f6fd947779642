"""A site's contribution to union metrics under secure aggregation (``protocol/secagg/union.py``).

The site computes the same statistics vector as its own DP release (``site_worker/release.py``),
adds only its share of the union's noise (SD σ·Δ/√K, from its secret stream) and scales it for the
field; ``SiteSecAgg.mask`` then masks it like an update, and the coordinator sees only the sum
of at least K sites. The site's ledger charges it as one Gaussian release of multiplier σ
(``union_release_entries``), a release of its own, apart from its per-site figures.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from protocol.dp_plan import History, release_entries
from protocol.policy import SitePolicy
from protocol.secagg.union import noise_share_sd, to_field
from site_worker.release import statistics


class NormalStream(Protocol):
    def standard_normal(self, n: int) -> np.ndarray: ...


def union_contribution(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str,
                       policy: SitePolicy, rng: NormalStream, min_contributors: int) -> tuple[str, np.ndarray, float]:
    """(layout, field values to mask, this share's noise SD) of the site's statistics on (x, y)."""
    if policy.metrics != "dp":
        raise ValueError("union metrics from secure sums are a DP release: the site's metrics policy must be dp")
    layout, v, sens = statistics(model, x, y, loss_name=loss_name, task=task, clip=policy.metrics_loss_clip)
    sd = noise_share_sd(policy.metrics_noise_multiplier, sens, min_contributors)
    return layout, to_field(v + rng.standard_normal(len(v)) * sd), sd


def union_release_entries(policy: SitePolicy) -> History:
    """One union release: a Gaussian mechanism of multiplier σ (the noise of K honest shares)."""
    return release_entries(policy)


__all__ = ["union_contribution", "union_release_entries"]
