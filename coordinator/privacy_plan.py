"""The run's privacy plan as the coordinator can know it: before round 1, from what each site announced.

Each site derives its own noise from its own rows (``protocol.privacy_plan``: solved for a
whole-run ``total_epsilon``, or the experiment's noise multiplier / per-task target ε); the
coordinator sees only the rows and the policy summary of each ``SiteHello``, so it plans
with the same function on the expected training rows of the site's keyed split
(``privacy_plan.train_rows``), at the site's δ and with the site's accountant. The figures
are therefore the plan *from announced rows*; what each site spent is its own ledger's.
Shown on the terminal and in the log before the first round and stored as the result's
``privacy`` block (``delta``, ``accountant``, ``planned_epsilon`` per site). A site whose
policy would decline a task gets ``error`` (why) instead of a figure.
"""

from __future__ import annotations

from typing import Any

from protocol import privacy_plan as plans
from protocol.config import Experiment
from protocol.policy import SitePolicy


def plan(experiment: Experiment, hellos: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """``{total_epsilon, mode, delta, accountant, sites: {site: plan}}`` or None (DP off).

    Every DP mode is planned: a whole-run ``total_epsilon`` (σ solved per site), a fixed
    ``noise_multiplier`` or a ``target_epsilon`` per task (σ as the site derives it), each
    composed over the rounds, the fine-tune and the metrics releases the site's policy adds.
    ``hellos`` maps each site of the run to its stored hello (``None``: not heard)."""
    dp = experiment.training.dp
    if dp is None:
        return None
    dataset = experiment.dataset.name
    sites: dict[str, Any] = {}
    deltas, accountants = set(), set()
    for site, hello in sorted(hellos.items()):
        named = [d for d in (hello or {}).get("datasets") or [] if not dataset or d.get("name") == dataset]
        rows = max((d["rows"] for d in named if type(d.get("rows")) is int and d["rows"] > 0), default=0)
        if not rows:
            sites[site] = {"error": f"no dataset {dataset!r} announced"}
            continue
        try:
            policy = SitePolicy.from_summary((hello or {}).get("policy") or {})
            delta = policy.site_delta(rows)
            entry = plans.plan_entry(experiment, policy, rows=rows, n_train=plans.train_rows(
                experiment, rows, test_fraction=float(policy.test_fraction)))
        except Exception as e:  # noqa: BLE001 - one site's summary (its word) must never stop the run or its resume
            sites[site] = {"rows": rows, "error": f"its announced policy cannot be planned with: "
                                                  f"{type(e).__name__}: {e}"[:300]}
            continue
        deltas.add(delta)
        accountants.add(policy.accountant)
        sites[site] = {"delta": delta, "accountant": policy.accountant, **entry}
    out: dict[str, Any] = {
        "total_epsilon": plans.total_of(experiment),
        "mode": plans.mode(experiment),
        "delta": deltas.pop() if len(deltas) == 1 else (sorted(deltas) or [float(dp.delta)])[-1],
        "accountant": accountants.pop() if len(accountants) == 1 else (", ".join(sorted(accountants)) or dp.accountant),
        "planned_from": "rows each site announced (expected training rows of its keyed split)",
        "sites": sites,
    }
    bound = upper_bound(experiment)
    if bound:
        out["upper_bound"] = bound
    return out


def upper_bound(experiment: Experiment) -> str | None:
    """Why the plan is a bound rather than the spend: it counts every round's training and
    evaluation at every site, and a sampled site that sits a round out spends less."""
    fed = experiment.federated
    sampled = [f"{name} {value:g} < 1" for name, value in (("fraction_fit", float(fed.fraction_fit)),
                                                          ("fraction_eval", float(fed.fraction_eval)))
               if 0 < value < 1]
    if not sampled:
        return None
    return f"{' and '.join(sampled)}: the plan counts every round at every site; a site sampled less spends less"


def planned_epsilon(planned: dict[str, Any] | None) -> dict[str, float | None]:
    return {s: p.get("planned_epsilon") for s, p in ((planned or {}).get("sites") or {}).items()}


def describe(planned: dict[str, Any]) -> list[str]:
    """Lines for the terminal, before the first round (the simulator and ``config validate`` print the same)."""
    how = planned.get("mode") or ("total_epsilon" if planned.get("total_epsilon") is not None else "noise_multiplier")
    at = f"at δ = {planned['delta']:g} ({planned['accountant']} accountant)"
    if how == "total_epsilon":
        lines = [f"privacy plan: total ε ≤ {planned['total_epsilon']:g} per site {at}"]
    else:
        lines = [f"privacy plan: no total_epsilon; ε at the end of the run per site {at}, composed over every "
                 "round's DP-SGD steps, the fine-tune and the metrics releases"]
    for s, p in planned["sites"].items():
        if "planned_epsilon" not in p:
            lines.append(f"  {s}: {p.get('error', 'no plan')}")
            continue
        noise = f"noise σ = {p['noise_multiplier']:.3f}"
        if p.get("personalization_noise_multiplier") not in (None, p["noise_multiplier"]):
            noise += f" (fine-tune σ = {p['personalization_noise_multiplier']:.3f})"
        lines.append(f"  {s}: {p['n_train']} training rows, {p['steps']} DP-SGD steps at sample rate "
                     f"{p['sample_rate']:.3g}, {noise} -> ε = {p['planned_epsilon']:.3f}"
                     + (f" at δ = {p['delta']:g}" if p.get("delta") not in (None, planned["delta"]) else ""))
        if p.get("warning"):
            lines.append(f"  {s}: warning: {p['warning']}")
    if planned.get("upper_bound"):
        lines.append(f"  an upper bound: {planned['upper_bound']}")
    return lines


__all__ = ["describe", "plan", "planned_epsilon", "run_spent", "upper_bound"]


def run_spent(experiment: Experiment, hello: dict[str, Any] | None, *, rounds_trained: int, finished: bool) -> float | None:
    """ε this run has cost a site so far, by the same plan the site runs (``protocol.privacy_plan``):
    the releases of the ``rounds_trained`` rounds it trained, and once the run is ``finished`` its
    fine-tune and final evaluation. Apart from the site's lifetime ledger figure (every run it
    ever joined), which is what its updates report. None: DP off or the site cannot be planned."""
    import dataclasses

    from protocol.accounting import epsilon_of

    if experiment.training.dp is None:
        return None
    dataset = experiment.dataset.name
    named = [d for d in (hello or {}).get("datasets") or [] if not dataset or d.get("name") == dataset]
    rows = max((d["rows"] for d in named if type(d.get("rows")) is int and d["rows"] > 0), default=0)
    if not rows:
        return None
    try:
        policy = SitePolicy.from_summary((hello or {}).get("policy") or {})
        p = plans.site_run_plan(experiment, policy, rows=rows, n_train=plans.train_rows(
            experiment, rows, test_fraction=float(policy.test_fraction)))
    except Exception:  # noqa: BLE001 - the site's word; the page then says "not planned"
        return None
    if not finished:
        p = dataclasses.replace(p, personalization_steps=0)
    return epsilon_of(p.entries(rounds=min(rounds_trained, p.rounds), final=finished), delta=p.delta,
                      accountant=p.accountant)
