"""Each task's noise under a whole-run budget, from what the site's own ledger says the run spent.

The plan itself (``RunPlan``, ``plan_run``, ``solve_noise``: what a run releases and the noise
that fits its ``total_epsilon``) is ``protocol.privacy_plan``, shared with the coordinator and
every planner (issue 21). Here is the site's side of it: the releases the ledger holds under
this run's id. Rule for each task, deterministic so the plan shown before round 1 is what is
spent: keep the run's first σ while it still fits the budget for the releases left; otherwise
(a retry spent extra) solve for the smallest σ that fits. Nothing fits: ``BudgetExhausted``,
and the site declines (reason ``budget``).
"""

from __future__ import annotations

from protocol.accounting import History, epsilon_of, merge, simulate_steps
from protocol.config import Experiment
from protocol.policy import SitePolicy
from protocol.privacy_plan import SLACK, metrics_entries, plan_run, solve_noise, test_rounds
from site_worker.ledger import PrivacyLedger


def run_spent(ledger: PrivacyLedger, dataset: str, run_id: str) -> History:
    """This run's accountant history in the site's ledger (every release carrying its run id)."""
    return merge([e for r in ledger.releases(dataset) if r.get("run_id") == run_id for e in r["entries"]])


def noise_for_task(experiment: Experiment, ledger: PrivacyLedger, *, run_id: str, dataset: str, round: int,
                   n_train: int, delta: float, accountant: str, policy: SitePolicy | None = None,
                   remaining_steps: int | None = None) -> float:
    """The noise this task trains with so the run ends within ``total_epsilon``.

    ``round`` is the task's round (1-based): what is left is the rounds from it to the last
    (training and their metrics), the fine-tune and the final evaluation. ``remaining_steps``
    (the fine-tune after the rounds) leaves only those steps.
    Raises ``BudgetExhausted``.
    """
    plan = plan_run(experiment, n_train=n_train, delta=delta, accountant=accountant, policy=policy)
    total = plan.total_epsilon
    assert total is not None, "noise_for_task runs only under a total_epsilon (privacy_plan.applies)"
    spent = run_spent(ledger, dataset, run_id)
    if remaining_steps is None:
        rounds_left = max(1, plan.rounds - int(round) + 1)
        steps = rounds_left * plan.round_steps + plan.personalization_steps
        tests = [e for _ in range(test_rounds(experiment, first=int(round))) for e in metrics_entries(policy)]
        fixed = [e for e in plan.per_round_fixed for _ in range(rounds_left)] + tests + list(plan.final_fixed)
    else:
        steps, fixed = remaining_steps, []  # after the run: its rounds and final evaluation are spent
    base = merge([*spent, *fixed])

    def fits(sigma: float) -> bool:
        after = simulate_steps(base, noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=steps)
        return epsilon_of(after, delta=delta, accountant=accountant) <= total + SLACK

    trained = [r for r in ledger.releases(dataset) if r.get("run_id") == run_id and r.get("kind") == "train"]
    if trained and trained[0]["entries"]:
        first = float(trained[0]["entries"][0][0])  # the run's noise so far
        if fits(first):
            return first
    elif remaining_steps is None and int(round) <= 1 and fits(plan.noise_multiplier):
        return plan.noise_multiplier  # round 1: the plan itself
    sigma = solve_noise(total_epsilon=total, delta=delta, accountant=accountant,
                        sample_rate=plan.sample_rate, steps=steps, spent=base)
    if policy is not None and getattr(policy, "min_noise_multiplier", None) is not None:
        sigma = max(sigma, float(policy.min_noise_multiplier))
    return sigma


__all__ = ["noise_for_task", "run_spent"]
