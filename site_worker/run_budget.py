"""A whole run's privacy budget per site: noise from a total (ε, δ), the site's own rows and
the planned steps, never exceeded.

An experiment may state ``differential_privacy.total_epsilon``: the most ε (at the site's δ,
with the site's accountant) one site may spend on the whole run. Each site derives its own
noise multiplier from its own training rows and the plan: ``rounds × epochs ×
steps_per_epoch`` DP-SGD steps at sample rate ``1 / steps_per_epoch``, plus the steps of a
personalisation fine-tune after the rounds. What this run already spent is kept per run id
and dataset under ``state_dir/privacy/runs/`` (the file name is a hash: never a path built
from a wire name), so a late join, a retried round or a restarted site recomputes the noise
for what is left and the run still stays within its total.

Rule for each task (deterministic, so the plan shown before round 1 is what is spent):
the run keeps the noise it started with while that noise still fits the budget for the
steps left; otherwise (a retried round spent extra steps) it solves for the smallest noise
that fits the steps left. Nothing fits: the site declines (reason ``budget``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from site_worker.ledger import History, atomic_write_json, epsilon_of, simulate_steps

_SLACK = 1e-9  # ε comparisons: the accountant's own float noise
_MAX_NOISE = 1e4


class BudgetExhausted(Exception):
    """The run's total ε cannot cover the steps still planned; the site declines."""


@dataclass(frozen=True)
class RunPlan:
    """What one site will spend over a run, given its training rows."""

    n_train: int
    steps_per_epoch: int
    sample_rate: float
    round_steps: int  # DP-SGD steps per round (epochs × steps_per_epoch)
    rounds: int
    personalization_steps: int
    noise_multiplier: float
    total_epsilon: float
    delta: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.round_steps * self.rounds + self.personalization_steps

    @property
    def planned_epsilon(self) -> float:
        """ε at the end of the run if every planned step happens once."""
        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.total_steps)], delta=self.delta,
                          accountant=self.accountant)

    def to_json(self) -> dict[str, Any]:
        return {"n_train": self.n_train, "sample_rate": self.sample_rate, "steps": self.total_steps,
                "noise_multiplier": self.noise_multiplier, "total_epsilon": self.total_epsilon,
                "planned_epsilon": self.planned_epsilon, "delta": self.delta, "accountant": self.accountant}


def applies(experiment: Any) -> bool:
    """True when the experiment states a whole-run budget (``total_epsilon``) and DP is on."""
    dp = experiment.training.dp
    return dp is not None and getattr(dp, "total_epsilon", None) is not None


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """As Opacus' DPDataLoader: ``len(loader)`` batches per epoch, sample rate its inverse."""
    return max(1, math.ceil(n_train / batch_size))


def personalization_steps(experiment: Any, per_epoch: int) -> int:
    p = getattr(experiment.training, "personalization", None)
    return 0 if p is None else int(p.epochs) * per_epoch


def solve_noise(*, total_epsilon: float, delta: float, accountant: str, sample_rate: float, steps: int,
                spent: History = ()) -> float:
    """The smallest noise multiplier with ε(spent + steps at it) ≤ total (Opacus' search when
    nothing was spent yet; the same bisection on the composed history otherwise)."""
    if steps <= 0:
        return _MAX_NOISE
    spent = list(spent)
    if epsilon_of(spent, delta=delta, accountant=accountant) >= total_epsilon - _SLACK:
        raise BudgetExhausted(f"the run already spent its total epsilon {total_epsilon:g}")
    if not spent:
        try:
            return _fresh_noise(float(total_epsilon), float(delta), str(accountant), float(sample_rate), int(steps))
        except ValueError as e:
            raise BudgetExhausted(f"no noise reaches epsilon {total_epsilon:g} in {steps} steps: {e}") from None

    def eps(sigma: float) -> float:
        return epsilon_of(simulate_steps(spent, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps),
                          delta=delta, accountant=accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > total_epsilon:
        lo, hi = hi, hi * 2
        if hi > _MAX_NOISE:
            raise BudgetExhausted(f"no noise fits the {steps} steps left in epsilon {total_epsilon:g}")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= total_epsilon else (mid, hi)
    return hi


@functools.lru_cache(maxsize=256)
def _fresh_noise(total_epsilon: float, delta: float, accountant: str, sample_rate: float, steps: int) -> float:
    """Opacus' search, once per (budget, rate, steps): at sample rates below 1 each RDP
    evaluation costs ~0.5 s, and every task of a run asks the same question."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=total_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=1e-3))


def plan_run(experiment: Any, *, n_train: int, delta: float | None = None, accountant: str | None = None,
             min_noise: float | None = None) -> RunPlan:
    """The plan of a site with ``n_train`` training rows from round 1 (the one ``config validate``,
    the simulator and the report show); ``delta``/``accountant`` are the site policy's."""
    dp = experiment.training.dp
    assert dp is not None and dp.total_epsilon is not None
    delta = float(delta if delta is not None else dp.delta)
    accountant = str(accountant or dp.accountant)
    per_epoch = steps_per_epoch(n_train, int(experiment.training.batch_size))
    q = 1.0 / per_epoch
    round_steps = per_epoch * int(experiment.training.epochs)
    rounds = int(experiment.training.rounds)
    extra = personalization_steps(experiment, per_epoch)
    sigma = solve_noise(total_epsilon=float(dp.total_epsilon), delta=delta, accountant=accountant, sample_rate=q,
                        steps=round_steps * rounds + extra)
    if min_noise is not None:
        sigma = max(sigma, float(min_noise))
    return RunPlan(n_train=n_train, steps_per_epoch=per_epoch, sample_rate=q, round_steps=round_steps, rounds=rounds,
                   personalization_steps=extra, noise_multiplier=sigma, total_epsilon=float(dp.total_epsilon),
                   delta=delta, accountant=accountant)


class RunLedger:
    """What each run spent per dataset: its own accountant history, beside the site's ledger."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "privacy" / "runs"
        self._lock = threading.Lock()

    def _path(self, run_id: str, dataset: str) -> Path:
        digest = hashlib.sha256(f"{run_id}\0{dataset}".encode()).hexdigest()[:32]
        return self.dir / f"{digest}.json"

    def load(self, run_id: str, dataset: str) -> dict[str, Any]:
        p = self._path(run_id, dataset)
        with self._lock:
            if not p.exists():
                return {"run_id": run_id, "dataset": dataset, "history": [], "tasks": [], "noise_multiplier": None}
            doc = json.loads(p.read_text(encoding="utf-8"))
        doc["history"] = [(float(a), float(b), int(c)) for a, b, c in doc["history"]]
        return doc

    def history(self, run_id: str, dataset: str) -> History:
        return self.load(run_id, dataset)["history"]

    def spent(self, run_id: str, dataset: str, *, delta: float, accountant: str = "rdp") -> float:
        return epsilon_of(self.history(run_id, dataset), delta=delta, accountant=accountant)

    def record(self, run_id: str, dataset: str, *, noise_multiplier: float, sample_rate: float, steps: int,
               task_id: str | None, first_noise: float | None = None) -> None:
        """Add one task's steps (durable before the reply, like the site's ledger)."""
        doc = self.load(run_id, dataset)
        if task_id is not None and task_id in doc["tasks"]:
            return  # the same task recorded twice (a redelivery after a crash): count it once
        doc["history"] = simulate_steps(doc["history"], noise_multiplier=noise_multiplier,
                                        sample_rate=sample_rate, steps=steps)
        doc["tasks"] = [*doc["tasks"], task_id]
        if doc.get("noise_multiplier") is None:
            doc["noise_multiplier"] = float(first_noise if first_noise is not None else noise_multiplier)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            atomic_write_json(self._path(run_id, dataset),
                              {**doc, "history": [[float(a), float(b), int(c)] for a, b, c in doc["history"]]})


def noise_for_task(experiment: Any, ledger: RunLedger, *, run_id: str, dataset: str, round: int, n_train: int,
                   delta: float, accountant: str, min_noise: float | None = None,
                   remaining_steps: int | None = None) -> tuple[float, RunPlan]:
    """The noise this task trains with so the run ends within ``total_epsilon``.

    ``round`` is the task's round (1-based): the steps left are the rounds from it to the
    last, plus personalisation. ``remaining_steps`` overrides that (the fine-tune after the
    rounds passes its own steps). Raises ``BudgetExhausted``.
    """
    plan = plan_run(experiment, n_train=n_train, delta=delta, accountant=accountant, min_noise=min_noise)
    doc = ledger.load(run_id, dataset)
    spent = doc["history"]
    if remaining_steps is None:
        rounds_left = max(1, plan.rounds - int(round) + 1)
        remaining_steps = rounds_left * plan.round_steps + plan.personalization_steps
    kept = doc.get("noise_multiplier")
    if kept is None and not spent and remaining_steps == plan.total_steps:
        return plan.noise_multiplier, plan
    candidate = float(kept) if kept is not None else None
    if candidate is not None:
        after = simulate_steps(spent, noise_multiplier=candidate, sample_rate=plan.sample_rate, steps=remaining_steps)
        if epsilon_of(after, delta=delta, accountant=accountant) <= plan.total_epsilon + _SLACK:
            return candidate, plan
    sigma = solve_noise(total_epsilon=plan.total_epsilon, delta=delta, accountant=accountant,
                        sample_rate=plan.sample_rate, steps=remaining_steps, spent=spent)
    if min_noise is not None:
        sigma = max(sigma, float(min_noise))
    return sigma, replace(plan, noise_multiplier=sigma)


__all__ = ["BudgetExhausted", "RunLedger", "RunPlan", "applies", "noise_for_task", "plan_run", "solve_noise",
           "steps_per_epoch"]


def task_dp_plan(experiment: Any, spec: Any, ledger: RunLedger, *, run_id: str, dataset: str, round: int,
                 n_train: int, min_noise: float | None = None) -> Any:
    """The trainer's ``DPPlan`` for one round's task under the run budget (what the handler calls)."""
    from site_worker.trainer import DPPlan

    dp = spec.dp
    sigma, plan = noise_for_task(experiment, ledger, run_id=run_id, dataset=dataset, round=round, n_train=n_train,
                                 delta=dp.delta, accountant=dp.accountant, min_noise=min_noise)
    return DPPlan(noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=plan.round_steps,
                  max_grad_norm=dp.max_grad_norm, delta=dp.delta, accountant=dp.accountant)


def train_rows(experiment: Any, rows: int) -> int:
    """Training rows a site with ``rows`` announced rows trains on (minus its validation split,
    as ``site_worker.data.split_indices`` cuts it)."""
    n_val = max(1, int(round(rows * float(experiment.dataset.validation_fraction))))
    return max(1, rows - n_val)


def plan_catalogue(experiment: Any, rows_by_site: dict[str, int]) -> dict[str, Any]:
    """The run's plan per site from the rows each site announced (``config validate --catalogue``)."""
    dp = experiment.training.dp
    out = {"total_epsilon": float(dp.total_epsilon), "delta": float(dp.delta), "accountant": dp.accountant,
           "sites": {}}
    for site, rows in sorted(rows_by_site.items()):
        try:
            out["sites"][site] = {"rows": rows, **plan_run(experiment, n_train=train_rows(experiment, rows)).to_json()}
        except BudgetExhausted as e:
            out["sites"][site] = {"rows": rows, "error": str(e)}
    return out
