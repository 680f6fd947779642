"""The hospital's own rules as data (``SitePolicy``) and the refusal they raise (``PolicyViolation``).

Read from the site's ``site.toml`` only (``site_worker.config``), never from the wire; the
coordinator sees the summary a site's hello carries and rebuilds the policy from it
(``SitePolicy.from_summary``) to plan each site's ε with the site's own arithmetic
(``protocol.privacy_plan``). Here, in the bottom layer, so the site and every planner share
one definition (issue 21).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

METRICS_MODES = ("dp", "exact", "none")
SECURE_AGGREGATION_MODES = ("required", "allowed", "off")  # issue 22: may the coordinator see my update?
MAX_ASSUMED_HONEST = 10_000  # assume_honest_sites: no sum holds more sites (secure_aggregation.max_sites)
ACCOUNTANTS = ("rdp", "prv")  # composable over tasks; Opacus' gdp keeps only its last entry


class PolicyViolation(Exception):
    """A task the site refuses; ``str(e)`` says which rule and what the task asked for."""


@dataclass(frozen=True)
class SitePolicy:
    """The hospital's own rules; a task that breaks one is declined, never run.

    The privacy settings here are the site's, not the experiment's: the experiment's
    accountant, delta, noise, epochs and batch size are requests checked against them.
    """

    allowed_layers: tuple[str, ...] | None = None  # None = every layer the builder knows
    max_parameters: int | None = None  # an explicit cap if the site wants one; memory is max_train_memory_mb's
    max_train_memory_mb: float = 2048.0  # one step: batch bound x (per-sample gradients + activations) x 4 B
    max_eval_memory_mb: float = 2048.0  # one inference pass (4096 rows) plus the outputs of every row
    max_release_values: int = 2**20  # values in one DP metrics release vector (a k-class model: k*k + 1)
    min_noise_multiplier: float = 0.5
    max_epsilon: float | None = None  # the site's privacy budget per dataset (at its own delta)
    allowed_aggregators: tuple[str, ...] | None = None  # None = any
    allow_no_dp: bool = False
    accountant: str = "rdp"  # "rdp" | "prv"
    delta: float | None = None  # None = min(1e-5, 1 / (10 x rows)) per dataset
    max_sample_rate: float = 0.5
    max_epochs: int = 50
    max_steps_per_task: int = 10_000
    metrics: str = "dp"  # "dp" | "exact" | "none": how released metrics are protected
    metrics_noise_multiplier: float = 5.0  # Gaussian std / L2 sensitivity of a metrics release
    metrics_loss_clip: float = 5.0  # per-example loss clipped to [0, C] in released sums
    # The final test's union release under secure aggregation (noise added once for the sum, not per
    # site): the figure a clinician reads first, so it gets less noise than the per-round curves. 1.5
    # keeps the README demo's union accuracy within about ±9 points (bench/union_interval.py).
    union_noise_multiplier: float = 1.5
    max_evaluations_per_run: int = 100
    stats: str = "dp"  # "dp" | "exact" | "none": how a cohort table (StatsTask) is released
    stats_noise_multiplier: float = 2.0  # Gaussian std / L2 sensitivity of a cohort release
    test_fraction: float = 0.2  # of each dataset's rows: the fixed test split, never trained on
    reproducible_dp: bool = False  # research only: DP noise from dp_seed, reported in every Update
    dp_seed: int | None = None  # site-local; required with reproducible_dp, never sent
    allow_unprotected_flower_client: bool = False
    require_approval: bool = False  # run only experiments the operator approved (site_worker/approvals.py)
    # "required": train only for runs under federated.secure_aggregation; "off": never join one.
    secure_aggregation: str = "allowed"
    secure_aggregation_min_contributors: int = 2  # the site's floor under any roster's min_contributors
    # Pooled DP (issue 22 item 4): the honest noise shares this site assumes in every sum. It adds
    # Sk(mu/m, mu/m) and unmasks no sum of fewer than m sites; 1 = the full noise from this site alone.
    assume_honest_sites: int = 1

    def site_delta(self, rows: int) -> float:
        """The delta every epsilon of a dataset with ``rows`` rows is reported at."""
        if self.delta is not None:
            return float(self.delta)
        return min(1e-5, 1.0 / (10.0 * max(1, rows)))

    def summary(self) -> dict[str, Any]:
        """What the site tells the coordinator in its hello (never secrets: no dp_seed)."""
        return {
            "allowed_layers": list(self.allowed_layers) if self.allowed_layers else None,
            "max_parameters": self.max_parameters,
            "max_train_memory_mb": self.max_train_memory_mb,
            "min_noise_multiplier": self.min_noise_multiplier,
            "max_epsilon": self.max_epsilon,
            "allowed_aggregators": list(self.allowed_aggregators) if self.allowed_aggregators else None,
            "allow_no_dp": self.allow_no_dp,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_sample_rate": self.max_sample_rate,
            "max_epochs": self.max_epochs,
            "max_steps_per_task": self.max_steps_per_task,
            "metrics": self.metrics,
            "metrics_noise_multiplier": self.metrics_noise_multiplier,  # the coordinator's privacy plan needs it
            "union_noise_multiplier": self.union_noise_multiplier,
            "test_fraction": self.test_fraction,
            "stats": self.stats,
            "stats_noise_multiplier": self.stats_noise_multiplier,  # the cohort's ε plan
            "max_evaluations_per_run": self.max_evaluations_per_run,
            "reproducible_dp": self.reproducible_dp,
            "secure_aggregation": self.secure_aggregation,
            "secure_aggregation_min_contributors": self.secure_aggregation_min_contributors,
            "assume_honest_sites": self.assume_honest_sites,
        }

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> SitePolicy:
        """The site's policy as its hello summarised it (``summary``; site defaults for what it
        left out), so a planner checks each task exactly as the site will. The summary is the
        site's word: a value of the wrong type raises here (``TypeError``/``ValueError``) or
        later, and the planner says so for that site."""
        names = {f.name for f in dataclasses.fields(cls)}
        given: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in summary.items() if k in names and v is not None}
        given.pop("reproducible_dp", None)  # needs the site's dp_seed, never sent; no bearing on ε
        return cls(**given)


__all__ = ["ACCOUNTANTS", "MAX_ASSUMED_HONEST", "METRICS_MODES", "SECURE_AGGREGATION_MODES", "PolicyViolation", "SitePolicy"]
