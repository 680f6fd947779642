"""The run's privacy plan as the coordinator can know it: before round 1, from what each site announced.

Each site derives its own noise from its own rows (``site_worker.run_budget``); the
coordinator sees only the rows and the policy summary of each ``SiteHello``, so it plans
with the same function on the expected training rows of the site's keyed split
(``run_budget.train_rows``), at the site's δ and with the site's accountant. The figures
are therefore the plan *from announced rows*; what each site spent is its own ledger's.
Shown on the terminal and in the log before the first round and stored as the result's
``privacy`` block (``delta``, ``accountant``, ``planned_epsilon`` per site).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from site_worker import run_budget


def _policy(summary: dict[str, Any]) -> Any:
    """The parts of a site's policy the plan needs, from its hello (site defaults when left out)."""
    from site_worker.config import SitePolicy

    d = SitePolicy()
    return SimpleNamespace(
        accountant=str(summary.get("accountant") or d.accountant),
        delta=summary.get("delta"),
        min_noise_multiplier=summary.get("min_noise_multiplier", d.min_noise_multiplier),
        metrics=str(summary.get("metrics") or d.metrics),
        metrics_noise_multiplier=float(summary.get("metrics_noise_multiplier") or d.metrics_noise_multiplier),
        test_fraction=float(summary.get("test_fraction", d.test_fraction)),
    )


def site_delta(policy: Any, rows: int) -> float:
    """As ``SitePolicy.site_delta``: the site's own δ, else min(1e-5, 1 / (10·rows))."""
    return float(policy.delta) if policy.delta is not None else min(1e-5, 1.0 / (10.0 * max(1, rows)))


def plan(experiment: Any, hellos: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """``{total_epsilon, delta, accountant, sites: {site: plan}}`` or None (DP off, or no ``total_epsilon``).

    ``hellos`` maps each site of the run to its stored hello (``None``: not heard)."""
    dp = experiment.training.dp
    if dp is None:
        return None
    dataset = experiment.dataset.name
    sites: dict[str, Any] = {}
    deltas, accountants = set(), set()
    for site, hello in sorted(hellos.items()):
        named = [d for d in (hello or {}).get("datasets") or [] if not dataset or d.get("name") == dataset]
        rows = max((int(d.get("rows") or 0) for d in named), default=0)
        if not rows:
            sites[site] = {"error": f"no dataset {dataset!r} announced"}
            continue
        policy = _policy((hello or {}).get("policy") or {})
        delta = site_delta(policy, rows)
        deltas.add(delta)
        accountants.add(policy.accountant)
        entry: dict[str, Any] = {"rows": rows, "delta": delta, "accountant": policy.accountant}
        if run_budget.applies(experiment):
            try:
                p = run_budget.plan_run(experiment, n_train=run_budget.train_rows(
                    experiment, rows, test_fraction=policy.test_fraction), delta=delta, policy=policy)
                entry.update(p.to_json())
            except run_budget.BudgetExhausted as e:
                entry["error"] = str(e)
        sites[site] = entry
    out: dict[str, Any] = {
        "total_epsilon": float(dp.total_epsilon) if run_budget.applies(experiment) else None,
        "delta": deltas.pop() if len(deltas) == 1 else (sorted(deltas) or [float(dp.delta)])[-1],
        "accountant": accountants.pop() if len(accountants) == 1 else (", ".join(sorted(accountants)) or dp.accountant),
        "planned_from": "rows each site announced (expected training rows of its keyed split)",
        "sites": sites,
    }
    return out


def planned_epsilon(planned: dict[str, Any] | None) -> dict[str, float | None]:
    return {s: p.get("planned_epsilon") for s, p in ((planned or {}).get("sites") or {}).items()}


def describe(planned: dict[str, Any]) -> list[str]:
    """Lines for the terminal, before the first round (the simulator prints the same)."""
    if planned.get("total_epsilon") is None:
        return [f"privacy: DP-SGD at each site, ε per task from the experiment's noise; δ = {planned['delta']:g} "
                f"({planned['accountant']} accountant); no total_epsilon, so no whole-run plan"]
    lines = [f"privacy plan: total ε ≤ {planned['total_epsilon']:g} per site at δ = {planned['delta']:g} "
             f"({planned['accountant']} accountant)"]
    for s, p in planned["sites"].items():
        if "planned_epsilon" not in p:
            lines.append(f"  {s}: {p.get('error', 'no plan')}")
            continue
        lines.append(f"  {s}: {p['n_train']} training rows, {p['steps']} DP-SGD steps at sample rate "
                     f"{p['sample_rate']:.3g}, noise σ = {p['noise_multiplier']:.3f} -> ε = {p['planned_epsilon']:.3f}")
    return lines


__all__ = ["describe", "plan", "planned_epsilon"]
