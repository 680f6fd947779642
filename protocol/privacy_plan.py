"""A run's privacy plan per site: what each site will release, and, under a whole-run budget,
its noise from a total (ε, δ), the site's own rows and the planned releases, never exceeded.

In ``protocol/`` (issue 21) so the site (``site_worker.run_budget``: each task's noise from
what its ledger says the run spent), the coordinator (``coordinator.privacy_plan``: the plan
from what each site announced), the simulator and ``fedbus site check`` run one arithmetic.

An experiment may state ``differential_privacy.total_epsilon``: the most ε one site spends
on the whole run, at the site's δ with the site's accountant (its policy's, never the
experiment's). Everything the run releases counts: per round, the DP-SGD steps of training
(``epochs × steps_per_epoch`` at sample rate ``1 / steps_per_epoch``), the metrics released
with the update and with the round's evaluation (``site_worker.release``: fixed by the
policy), the final test evaluation, and the personalisation fine-tune after the rounds. The
fixed releases are known, so each site solves for the one free quantity, its training noise
σ, with Opacus' ``get_noise_multiplier`` search on its own row count.

What this run already spent is read from the site's own ledger (its releases carry the run
id; ``site_worker.run_budget.noise_for_task``), so a late join, a retried round or a restarted site recomputes σ for what is left and
the run still stays within its total. Rule for each task, deterministic so the plan shown
before round 1 is what is spent: keep the run's first σ while it still fits the budget for
the releases left; otherwise (a retry spent extra) solve for the smallest σ that fits.
Nothing fits: the site declines (reason ``budget``).

Without ``total_epsilon`` the experiment fixes each task's noise itself: a
``noise_multiplier``, or a ``target_epsilon`` per task that the site solves on the task's own
steps (``protocol.dp_plan.plan_dp``: the rounds' epochs and, separately, the fine-tune's). ``plan_run``
then takes those σ from the same function the site trains with and composes the run's
entries; ``site_run_plan`` also checks every task against the site's policy
(``protocol.dp_plan.site_plan``), so a planner says "declines" where the site would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.accounting import History, epsilon_of, merge, simulate_steps
from protocol.config import Experiment
from protocol.dp_plan import plan_dp, release_entries, site_plan, union_release_entries
from protocol.secagg.union import union_planned
from protocol.policy import PolicyViolation, SitePolicy
from protocol.train_spec import TrainSpec, personalization_spec

if TYPE_CHECKING:
    from protocol.secagg.skellam import SkellamEntry

SLACK = 1e-9  # ε comparisons: the accountant's own float noise
_MAX_NOISE = 1e4


class BudgetExhausted(Exception):
    """The run's total ε cannot cover the releases still planned; the site declines."""


@dataclass(frozen=True)
class RunPlan:
    """What one site will release over a run, given its training rows and policy."""

    n_train: int
    steps_per_epoch: int
    sample_rate: float
    round_steps: int  # DP-SGD steps per round (epochs × steps_per_epoch)
    rounds: int
    personalization_steps: int
    per_round_fixed: tuple[tuple[float, float, int], ...]  # metrics released per round (policy's σ)
    final_fixed: tuple[tuple[float, float, int], ...]  # the final test evaluation
    noise_multiplier: float  # the rounds' σ
    total_epsilon: float | None  # None: the experiment fixes each task's noise (``mode``)
    delta: float
    accountant: str
    personalization_noise: float | None = None  # the fine-tune's σ when it differs (target_epsilon per task)
    test_fixed: tuple[tuple[float, float, int], ...] = ()  # test evaluations during the rounds (test_every)
    mode: str = "total_epsilon"  # "total_epsilon" | "noise_multiplier" | "target_epsilon"

    @property
    def total_steps(self) -> int:
        return self.round_steps * self.rounds + self.personalization_steps

    def _fixed(self, rounds: int) -> list[tuple[float, float, int]]:
        return [*(e for e in self.per_round_fixed for _ in range(rounds)), *self.test_fixed]

    def entries(self, *, rounds: int | None = None, sigma: float | None = None, final: bool = True) -> History:
        """Accountant entries of ``rounds`` rounds (default all), the fine-tune and the final evaluation."""
        rounds = self.rounds if rounds is None else rounds
        sigma = self.noise_multiplier if sigma is None else sigma
        tune = sigma if self.personalization_noise is None else self.personalization_noise
        out: list[tuple[float, float, int]] = [(sigma, self.sample_rate, self.round_steps * rounds),
                                               (tune, self.sample_rate, self.personalization_steps)]
        out += self._fixed(rounds)
        if final:
            out += list(self.final_fixed)
        return merge([e for e in out if e[2] > 0])

    @property
    def planned_epsilon(self) -> float:
        """ε at the end of the run if every planned release happens once."""
        return epsilon_of(self.entries(), delta=self.delta, accountant=self.accountant)

    def to_json(self) -> dict[str, Any]:
        fixed = epsilon_of(merge([*self._fixed(self.rounds), *self.final_fixed]), delta=self.delta,
                           accountant=self.accountant)
        out = {"n_train": self.n_train, "sample_rate": self.sample_rate, "steps": self.total_steps,
               "noise_multiplier": self.noise_multiplier, "total_epsilon": self.total_epsilon,
               "planned_epsilon": self.planned_epsilon, "metrics_epsilon": fixed, "delta": self.delta,
               "accountant": self.accountant, "mode": self.mode}
        if self.personalization_noise is not None and self.personalization_steps:
            out["personalization_noise_multiplier"] = self.personalization_noise
        return out


def total_of(experiment: Experiment) -> float | None:
    """The run's whole budget per site (``total_epsilon``) when DP is on and states one, else None."""
    dp = experiment.training.dp
    total = None if dp is None else getattr(dp, "total_epsilon", None)
    return None if total is None else float(total)


def applies(experiment: Experiment) -> bool:
    """True when the experiment states a whole-run budget (``total_epsilon``) and DP is on."""
    dp = experiment.training.dp
    return dp is not None and getattr(dp, "total_epsilon", None) is not None


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """As Opacus' DPDataLoader: ``len(loader)`` batches per epoch, sample rate its inverse."""
    return max(1, math.ceil(n_train / batch_size))


def personalization_steps(experiment: Experiment, per_epoch: int) -> int:
    p = getattr(experiment.training, "personalization", None)
    return 0 if p is None else int(p.epochs) * per_epoch


def metrics_entries(policy: SitePolicy | None) -> list[tuple[float, float, int]]:
    """One metrics release under the site policy (``site_worker.release``); none without a policy."""
    if policy is None:
        return []
    return [(float(a), float(b), int(c)) for a, b, c in release_entries(policy)]


def union_entries(experiment: Experiment, policy: SitePolicy | None) -> list[tuple[float, float, int]]:
    """The final test's union release under secure aggregation (``protocol.secagg.union``): one more
    metrics release, at the policy's ``union_noise_multiplier``, charged by a site whose metrics
    policy is dp (``site_worker.secure_metrics``)."""
    if policy is None or policy.metrics != "dp" or not union_planned(experiment):
        return []
    return [(float(a), float(b), int(c)) for a, b, c in union_release_entries(policy)]


def secure_dp_plan(experiment: Experiment, policy: SitePolicy | None, *,
                   sites: int | None = None) -> tuple[History, list[SkellamEntry]]:
    """What a run under ``secure_aggregation.dp = "pooled"`` or ``"central"`` charges one site's ledger
    at most: (its Gaussian metrics releases, its Skellam releases). Pooled: T steps at the records'
    Poisson rate q (``protocol.secagg.rules.pooled_entry``), in either loop. Central
    (``central_entry``): sync, T sampled rounds at q = k/N of ``sites`` roster sites (default
    ``min_available_clients``, the fewest a run starts with: the largest q); FedBuff, at most T
    un-subsampled masked updates (q = 1). Metrics: sync, each round's evaluation and test releases
    and the final test; FedBuff, the final test only (its versions evaluate nothing). The site
    charges these entries (``site_worker.pooled_task``, ``site_worker.central_task``) and ``fedbus
    site check`` shows their ε on top of the ledger."""
    from protocol.secagg.rules import central_entry, pooled_entry

    fed = experiment.federated
    sa = fed.secure_aggregation
    assert sa is not None and sa.dp in ("pooled", "central")
    roster = int(sites if sites is not None else max(1, int(fed.min_available_clients)))
    one = metrics_entries(policy)
    fixed = one + union_entries(experiment, policy)  # the final test
    if fed.name != "FedBuff":  # the sync loop's evaluations (FedBuff's versions evaluate nothing)
        rounds = int(experiment.training.rounds)
        fixed += [e for _ in range(_eval_rounds(experiment) * rounds + test_rounds(experiment)) for e in one]
    steps = central_entry(experiment, roster) if sa.dp == "central" else pooled_entry(experiment)
    return merge(fixed), [steps]


def secure_dp_epsilon(experiment: Experiment, policy: SitePolicy | None, *, delta: float, sites: int | None = None,
                      spent: Iterable[tuple[float, float, int]] = (),
                      spent_skellam: Iterable[SkellamEntry] = ()) -> float:
    """ε at ``delta`` after the whole ``secure_dp_plan`` on top of a ledger's history (``spent``: its
    Gaussian entries, ``spent_skellam``: its Skellam ones), composed in RDP as the ledger does."""
    from protocol.accounting import rdp_of
    from protocol.secagg import skellam

    gaussian, steps = secure_dp_plan(experiment, policy, sites=sites)
    history = merge([*spent, *gaussian])
    return skellam.epsilon_of([*spent_skellam, *steps], delta=delta, gaussian_rdp=rdp_of(history) if history else None)


def _eval_rounds(experiment: Experiment) -> int:
    return 1 if float(experiment.federated.fraction_eval) > 0 else 0


def test_rounds(experiment: Experiment, *, first: int = 1) -> int:
    """Test evaluations from round ``first`` on (``federated.test_every``; the last round's is the final one)."""
    every = int(getattr(experiment.federated, "test_every", 0) or 0)
    rounds = int(experiment.training.rounds)
    return 0 if not every else sum(1 for r in range(max(1, first), rounds) if r % every == 0)


def mode(experiment: Experiment) -> str | None:
    """How the experiment sets the noise: a whole-run budget, a fixed σ, or a target ε per task (None: DP off)."""
    dp = experiment.training.dp
    if dp is None:
        return None
    if getattr(dp, "total_epsilon", None) is not None:
        return "total_epsilon"
    return "target_epsilon" if dp.noise_multiplier is None and dp.target_epsilon is not None else "noise_multiplier"


def task_specs(experiment: Experiment) -> tuple[TrainSpec, TrainSpec | None]:
    """The training spec of a round's task and of the fine-tune after the rounds (None without
    one), built as the site builds them (``TrainSpec.from_experiment``, ``personalize.personalization_spec``)."""
    tune = personalization_spec(experiment, 0) if getattr(experiment.training, "personalization", None) else None
    return TrainSpec.from_experiment(experiment, seed=0), tune


def _fresh(total: float, delta: float, accountant: str, sample_rate: float, steps: int,
           fixed: tuple[tuple[float, float, int], ...]) -> float:
    if not fixed:
        return _fresh_noise(total, delta, accountant, sample_rate, steps)
    return solve_noise(total_epsilon=total, delta=delta, accountant=accountant, sample_rate=sample_rate, steps=steps,
                       spent=list(fixed))


@functools.lru_cache(maxsize=256)
def _fresh_noise(total_epsilon: float, delta: float, accountant: str, sample_rate: float, steps: int) -> float:
    """Opacus' search, once per (budget, rate, steps): at sample rates below 1 each RDP
    evaluation costs ~0.5 s, and every task of a run asks the same question."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=total_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=1e-3))


@functools.lru_cache(maxsize=256)
def _solve_cached(total_epsilon: float, delta: float, accountant: str, sample_rate: float, steps: int,
                  spent: tuple[tuple[float, float, int], ...]) -> float:
    spent_l = list(spent)

    def eps(sigma: float) -> float:
        return epsilon_of(simulate_steps(spent_l, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps),
                          delta=delta, accountant=accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > total_epsilon:
        lo, hi = hi, hi * 2
        if hi > _MAX_NOISE:
            raise BudgetExhausted(f"no noise fits the DP-SGD steps left in total epsilon {total_epsilon:g}")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= total_epsilon else (mid, hi)
    return hi


def solve_noise(*, total_epsilon: float, delta: float, accountant: str, sample_rate: float, steps: int,
                spent: Iterable[tuple[float, float, int]] = ()) -> float:
    """The smallest noise multiplier with ε(spent + steps at it) ≤ total (Opacus' search when
    nothing else is in the history; a bisection on the composed history otherwise)."""
    if steps <= 0:
        return _MAX_NOISE
    history = merge(spent)
    if epsilon_of(history, delta=delta, accountant=accountant) >= total_epsilon - SLACK:
        raise BudgetExhausted(f"the run's other releases already spend its total epsilon {total_epsilon:g} "
                              "(metrics releases: raise policy.metrics_noise_multiplier or lower fraction_eval)")
    if not history:
        try:
            return _fresh_noise(float(total_epsilon), float(delta), str(accountant), float(sample_rate), int(steps))
        except ValueError:
            raise BudgetExhausted(f"no noise reaches epsilon {total_epsilon:g} in the steps left") from None
    return _solve_cached(float(total_epsilon), float(delta), str(accountant), float(sample_rate), int(steps),
                         tuple((float(a), float(b), int(c)) for a, b, c in history))


def plan_run(experiment: Experiment, *, n_train: int, delta: float | None = None, accountant: str | None = None,
             policy: SitePolicy | None = None) -> RunPlan:
    """The plan of a site with ``n_train`` training rows from round 1 (the one ``config validate``,
    the simulator and the report show); ``delta``/``accountant``/``policy`` are the site's.
    Under ``total_epsilon`` the rounds' σ is solved for the budget; otherwise each task's σ is
    the experiment's, as ``dp.plan_dp`` derives it for the site."""
    dp = experiment.training.dp
    assert dp is not None
    delta = float(delta if delta is not None else dp.delta)
    accountant = str(accountant or (policy.accountant if policy is not None else dp.accountant))
    per_epoch = steps_per_epoch(n_train, int(experiment.training.batch_size))
    q = 1.0 / per_epoch
    round_steps = per_epoch * int(experiment.training.epochs)
    rounds = int(experiment.training.rounds)
    extra = personalization_steps(experiment, per_epoch)
    one = metrics_entries(policy)
    per_round = tuple(one * (1 + _eval_rounds(experiment)))
    final = tuple(one + union_entries(experiment, policy))
    tests = tuple(e for _ in range(test_rounds(experiment)) for e in one)
    how = mode(experiment)
    total = total_of(experiment)
    tune_sigma = None
    if total is not None:  # how == "total_epsilon"
        fixed = tuple(merge([*(e for e in per_round for _ in range(rounds)), *tests, *final]))
        sigma = _fresh(total, delta, accountant, q, round_steps * rounds + extra, fixed)
        if policy is not None and getattr(policy, "min_noise_multiplier", None) is not None:
            sigma = max(sigma, float(policy.min_noise_multiplier))
    else:
        spec, tune = task_specs(experiment)
        sigma = plan_dp(spec, n_train, delta=delta, accountant=accountant).noise_multiplier
        if tune is not None:
            tune_sigma = plan_dp(tune, n_train, delta=delta, accountant=accountant).noise_multiplier
    return RunPlan(n_train=n_train, steps_per_epoch=per_epoch, sample_rate=q, round_steps=round_steps, rounds=rounds,
                   personalization_steps=extra, per_round_fixed=per_round, final_fixed=final, noise_multiplier=sigma,
                   total_epsilon=total, delta=delta,
                   accountant=accountant, personalization_noise=tune_sigma, test_fixed=tests, mode=str(how))


def site_run_plan(experiment: Experiment, policy: SitePolicy, *, n_train: int, rows: int) -> RunPlan:
    """The plan a site with this policy and ``rows`` rows (``n_train`` for training) will run, at
    its own δ and accountant, every task checked as the site checks it (``protocol.dp_plan.site_plan``).
    Raises ``PolicyViolation`` (the site would decline a task) or ``BudgetExhausted``."""
    plan = plan_run(experiment, n_train=n_train, delta=policy.site_delta(rows), policy=policy)
    spec, tune = task_specs(experiment)
    fixed = plan.mode == "total_epsilon"  # the site passes its run-budget σ; otherwise the spec's own
    site_plan(policy, spec, n_train=n_train, rows=rows, noise_multiplier=plan.noise_multiplier if fixed else None)
    if tune is not None and plan.personalization_steps:
        try:
            site_plan(policy, tune, n_train=n_train, rows=rows,
                      noise_multiplier=plan.noise_multiplier if fixed else None)
        except PolicyViolation as e:
            raise PolicyViolation(f"personalisation: {e}") from None
    return plan


def plan_entry(experiment: Experiment, policy: SitePolicy, *, n_train: int, rows: int, assumed: bool = False) -> dict[str, Any]:
    """One site's line of a run plan (JSON): the plan, or ``error`` saying why the site would
    not run it, and ``warning`` when the plan passes the site's own ``max_epsilon``. With
    ``assumed`` (a policy the planner guessed, not the site's) a refusal is a ``warning`` beside
    the figure instead."""
    out: dict[str, Any] = {"rows": rows}
    try:
        p = site_run_plan(experiment, policy, n_train=n_train, rows=rows)
    except PolicyViolation as e:
        if not assumed:
            return {**out, "error": f"the site declines: {e}"}
        out["warning"] = f"a site with the policy assumed here (the site defaults) declines: {e}"
        try:
            p = plan_run(experiment, n_train=n_train, delta=policy.site_delta(rows), policy=policy)
        except BudgetExhausted as e2:
            return {**out, "error": f"total_epsilon: {e2}"}
    except BudgetExhausted as e:
        return {**out, "error": f"total_epsilon: {e}"}
    out.update(p.to_json())
    cap = getattr(policy, "max_epsilon", None)
    if cap is not None and p.planned_epsilon > float(cap) + SLACK:
        out["warning"] = (f"above the site's policy.max_epsilon {float(cap):g}: it declines its tasks once its "
                          "ledger reaches that budget (earlier runs included), before the run ends")
    return out


def train_rows(experiment: Experiment, rows: int, *, test_fraction: float = 0.2) -> int:
    """Expected training rows of a site with ``rows`` announced rows: its keyed split
    (``site_worker.splits.assign``) sends each row to test with probability ``test_fraction``,
    then to validation with ``validation_fraction``; the site's own plan uses its real count."""
    return max(1, int(round(rows * (1 - test_fraction) * (1 - float(experiment.dataset.validation_fraction)))))


def plan_catalogue(experiment: Experiment, rows_by_site: dict[str, int], *, policy: SitePolicy | None = None) -> dict[str, Any]:
    """The run's plan per site from the rows each site announced (``config validate --catalogue``),
    for sites with ``policy`` (default: the site defaults; what such a site would refuse is a warning,
    since the real sites' policies are theirs)."""
    if policy is None:
        policy = SitePolicy()
    dp = experiment.training.dp
    assert dp is not None, "plan_catalogue plans a run with differential privacy"
    sites = {site: plan_entry(experiment, policy, rows=rows, assumed=True,
                              n_train=train_rows(experiment, rows, test_fraction=policy.test_fraction))
             for site, rows in sorted(rows_by_site.items())}
    deltas = sorted({p["delta"] for p in sites.values() if "delta" in p}) or [float(dp.delta)]
    return {"total_epsilon": total_of(experiment), "mode": mode(experiment),
            "delta": deltas[-1], "accountant": policy.accountant, "sites": sites}


__all__ = ["BudgetExhausted", "RunPlan", "SLACK", "applies", "metrics_entries", "secure_dp_epsilon", "secure_dp_plan", "union_entries", "mode", "plan_catalogue", "plan_entry", "plan_run",
           "site_run_plan", "total_of", "solve_noise", "steps_per_epoch", "task_specs", "test_rounds", "train_rows"]
