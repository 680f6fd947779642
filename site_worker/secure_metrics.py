"""A site's contribution to union metrics under secure aggregation (``protocol/secagg/union.py``).

The site computes the same statistics vector as its own DP release (``site_worker/release.py``),
adds only its share of the union's noise (SD σ_u·Δ/√K, σ_u = ``policy.union_noise_multiplier``, from its secret stream) and scales it for the
field; ``SiteSecAgg.mask`` then masks it like an update, and the coordinator sees only the sum
of at least K sites. The site's ledger charges it as one Gaussian release of multiplier σ_u
(``protocol.dp_plan.union_release_entries``), a release of its own, apart from its per-site figures.

In a run (``masked_union``): the final test ``EvalTask`` of a secure sync run carries ``union_tag``;
the handler reserves both releases, releases the site's own figures as ever, and adds the masked
union vector and its sealed shares to the same ``EvalResult``; a refusal of the masking (no
roster, a vector the roster cannot hold) cancels the whole reservation and declines the task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from protocol.messages import Envelope, EvalTask
from protocol.policy import SitePolicy
from protocol.secagg import field as F
from protocol.secagg.union import noise_share_sd, pack, to_field
from site_worker.release import statistics
from site_worker.secagg import SecAggRefused

if TYPE_CHECKING:
    from site_worker.secagg_handlers import SecAggSite


class NormalStream(Protocol):
    def standard_normal(self, n: int) -> np.ndarray: ...


def union_contribution(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_name: str, task: str,
                       policy: SitePolicy, rng: NormalStream, min_contributors: int) -> tuple[str, np.ndarray, float]:
    """(layout, field values to mask, this share's noise SD) of the site's statistics on (x, y)."""
    if policy.metrics != "dp":
        raise ValueError("union metrics from secure sums are a DP release: the site's metrics policy must be dp")
    layout, v, sens = statistics(model, x, y, loss_name=loss_name, task=task, clip=policy.metrics_loss_clip)
    sd = noise_share_sd(policy.union_noise_multiplier, sens, min_contributors)
    return layout, to_field(v + rng.standard_normal(len(v)) * sd), sd


def union_wanted(task: EvalTask, policy: SitePolicy) -> bool:
    """The coordinator asked for this site's union vector and the site's policy releases DP metrics
    (an exact or withheld policy sends none: its union share would be no DP release)."""
    return task.union_tag > 0 and task.split == "test" and policy.metrics == "dp"


def check_union(secagg: SecAggSite | None, env: Envelope) -> None:
    """Before anything is reserved: this site takes part in the run's secure aggregation."""
    if secagg is None or not secagg.enabled:
        raise SecAggRefused("not_enabled", "the final test asks for a masked union vector and this site does not "
                                           "take part in secure aggregation")
    secagg.state.roster(env.run_id)  # SecAggRefused("roster_missing") without a committed roster


def masked_union(secagg: SecAggSite, env: Envelope, task: EvalTask, model: torch.nn.Module, x: torch.Tensor,
                 y: torch.Tensor, *, loss_name: str, task_kind: str, policy: SitePolicy,
                 rng: NormalStream) -> tuple[dict[str, Any], dict[str, float]]:
    """(EvalResult fields, public metrics) of the site's masked union vector: its share of the
    noise from ``rng`` (the secret stream), packed to the roster's length and clip, masked under
    a fresh key with a tag past every tag the site used, one sealed share per other roster site.
    The metrics say the share's noise SD and the loss clip (public: the policy's)."""
    roster = secagg.state.roster(env.run_id)
    _layout, values, sd = union_contribution(model, x, y, loss_name=loss_name, task=task_kind, policy=policy,
                                             rng=rng, min_contributors=roster.min_contributors)
    try:
        packed = pack(values, roster.length, roster.clip)
    except ValueError as e:
        raise SecAggRefused("roster_mismatch", str(e)) from None
    tag = secagg.state.next_tag(env.run_id, task.union_tag)
    out = secagg.state.mask(env.run_id, tag, packed)
    fields = {"union_tag": tag, "union_masked": (("masked", F.to_bytes_array(out.masked)),),
              "union_shares": tuple((site, np.frombuffer(sealed, dtype=np.uint8))
                                    for site, sealed in sorted(out.sealed.items()))}
    return fields, {"union_share_sd": float(sd), "union_loss_clip": float(policy.metrics_loss_clip)}


__all__ = ["check_union", "masked_union", "union_contribution", "union_wanted"]
