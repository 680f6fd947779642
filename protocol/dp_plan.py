"""What a DP task will spend, fixed by the site's policy before anything is trained.

The experiment's differential-privacy block is a *request*: noise multiplier or target
epsilon, delta, accountant, and (through the training block and per-round overrides)
epochs and batch size, hence sample rate and steps. ``site_plan`` checks every request
against the site's policy and either returns the plan the site will run, accounted at the
site's own delta with the site's own accountant, or raises ``PolicyViolation`` naming the
policy setting that refused it. It never weakens a setting to make a request fit.

``DPPlan`` is the one object the trainer, the ledger and the handler share; callers that
derive noise differently (a per-run budget) build it with ``plan_dp(..., noise_multiplier=)``.
In ``protocol/`` so the site and every planner (``protocol.privacy_plan``, the coordinator's
plan, ``fedbus site check``) run the same checks (issue 21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from protocol.accounting import History
from protocol.config import DPConfig
from protocol.policy import PolicyViolation, SitePolicy
from protocol.train_spec import DPSpec, TrainSpec


@dataclass(frozen=True)
class DPPlan:
    """Noise, sampling and steps of one DP task, with the delta/accountant it is reported at."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epochs: int = 1
    reproducible: bool = False  # noise from the site's dp_seed (research), else from os.urandom

    def entries(self) -> History:
        """The accountant history entries this task adds (Opacus ``(σ, q, steps)``)."""
        return [(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def plan_dp(spec: TrainSpec, n_train: int, *, delta: float | None = None, accountant: str | None = None,
            noise_multiplier: float | None = None) -> DPPlan:
    """Sample rate and steps as Opacus derives them (1 / len(loader)); noise from
    ``noise_multiplier``, else the spec's σ, else the spec's target ε at ``delta``."""
    assert spec.dp is not None
    delta = float(spec.dp.delta if delta is None else delta)
    accountant = str(spec.dp.accountant if accountant is None else accountant)
    per_epoch = batches_per_epoch(n_train, spec.batch_size)
    sample_rate = 1.0 / per_epoch
    noise = noise_multiplier if noise_multiplier is not None else spec.dp.noise_multiplier
    if noise_multiplier is None and spec.dp.target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        noise = get_noise_multiplier(target_epsilon=spec.dp.target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, epochs=spec.epochs, accountant=accountant)
    assert noise is not None
    return DPPlan(noise_multiplier=float(noise), sample_rate=sample_rate, steps=per_epoch * spec.epochs,
                  max_grad_norm=spec.dp.max_grad_norm, delta=delta, accountant=accountant, epochs=spec.epochs)


def check_accountant(policy: SitePolicy, dp: DPConfig | DPSpec) -> None:
    """The experiment's accountant is the site's: every epsilon is reported with the site's own."""
    asked = str(getattr(dp, "accountant", "rdp") or "rdp")
    if asked != policy.accountant:
        raise PolicyViolation(
            f"accountant: the experiment asks for {asked!r}; this site's policy.accountant is "
            f"{policy.accountant!r} and the site reports every epsilon with it "
            f"(set training.optimizer.differential_privacy.accountant to {policy.accountant!r})")


def check_dp_request(policy: SitePolicy, dp: DPConfig | DPSpec, *, rows: int) -> float:
    """The experiment's accountant and delta against the policy; returns the site's delta."""
    check_accountant(policy, dp)
    site_delta = policy.site_delta(rows)
    if float(dp.delta) > site_delta:
        raise PolicyViolation(
            f"delta: the experiment asks for delta {float(dp.delta):g}, above this site's policy.delta "
            f"{site_delta:g} for {rows} rows (set training.optimizer.differential_privacy.delta <= {site_delta:g})")
    return site_delta


def check_epochs(policy: SitePolicy, epochs: int) -> None:
    """Local epochs per task (the experiment's or a per-round override), DP or not."""
    if epochs > policy.max_epochs:
        raise PolicyViolation(f"max_epochs: the task asks for {epochs} local epochs, this site's "
                              f"policy.max_epochs is {policy.max_epochs}")


def site_plan(policy: SitePolicy, spec: TrainSpec, *, n_train: int, rows: int,
              noise_multiplier: float | None = None) -> DPPlan:
    """The plan this site will run for ``spec`` on ``n_train`` training rows, or PolicyViolation."""
    assert spec.dp is not None
    delta = check_dp_request(policy, spec.dp, rows=rows)
    check_epochs(policy, spec.epochs)
    plan = plan_dp(spec, n_train, delta=delta, accountant=policy.accountant, noise_multiplier=noise_multiplier)
    # The sample rate, steps and a target-ε noise follow from the training rows this site holds:
    # a refusal names the setting and the experiment's own numbers, never those (issue 20, class 2).
    if plan.sample_rate > policy.max_sample_rate:
        raise PolicyViolation(
            f"max_sample_rate: batch size {spec.batch_size} samples this site's training rows at a rate above its "
            f"policy.max_sample_rate {policy.max_sample_rate:g} (use a smaller training.batch_size)")
    if plan.steps > policy.max_steps_per_task:
        raise PolicyViolation(f"max_steps_per_task: {spec.epochs} epoch(s) at batch size {spec.batch_size} take more "
                              f"DP-SGD steps than this site's policy.max_steps_per_task {policy.max_steps_per_task}")
    if plan.noise_multiplier < policy.min_noise_multiplier:
        fixed = noise_multiplier is None and spec.dp.target_epsilon is None  # the experiment's own σ: public
        asked = f" {plan.noise_multiplier:g}" if fixed else ""
        raise PolicyViolation(f"min_noise_multiplier: noise multiplier{asked} is below this "
                              f"site's policy.min_noise_multiplier {policy.min_noise_multiplier:g}")
    return replace(plan, reproducible=policy.reproducible_dp)


def release_entries(policy: SitePolicy) -> History:
    """Ledger entries of one metrics release under ``policy`` (none unless ``dp``; ``site_worker.release``)."""
    return [(float(policy.metrics_noise_multiplier), 1.0, 1)] if policy.metrics == "dp" else []


def union_release_entries(policy: SitePolicy) -> History:
    """Ledger entries of the final test's union release under secure aggregation (none unless the
    site's metrics are ``dp``; ``site_worker.secure_metrics``): one Gaussian mechanism of multiplier
    ``union_noise_multiplier``, the noise of the K honest shares together."""
    return [(float(policy.union_noise_multiplier), 1.0, 1)] if policy.metrics == "dp" else []


def stats_entries(policy: SitePolicy) -> History:
    """Ledger entries of one cohort-table release under ``policy`` (none unless ``dp``;
    ``site_worker.stats``): one Gaussian mechanism with noise multiplier ``stats_noise_multiplier``
    on a vector of L2 sensitivity Δ (``protocol.cohort``), i.e. the entry (σ_s, 1, 1)."""
    return [(float(policy.stats_noise_multiplier), 1.0, 1)] if policy.stats == "dp" else []


__all__ = ["DPPlan", "batches_per_epoch", "check_dp_request", "check_epochs", "plan_dp", "release_entries",
           "site_plan", "stats_entries"]
