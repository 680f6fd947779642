"""A run's own ε, apart from each site's lifetime budget, from the run's first second.

The sites' updates report their lifetime ledger (every run on the dataset), so "26.28
(planned 21)" read as an overspend. Here the run page gets, per site: this run's plan (the
coordinator's, ``coordinator.privacy_plan.plan``: the one planner ``site check`` and the sites
use) and this run's spend by that plan for the rounds the site trained, beside the site's
lifetime figure and budget. A running run has no result yet: its plan is made here from the
experiment and the sites' hellos, so a DP run shows its plan before round 1.
"""

from __future__ import annotations

from typing import Any

_PLANS: dict[str, dict[str, Any] | None] = {}  # run_id -> plan (a run's plan never changes once its sites said hello)


def _experiment(doc: dict[str, Any]) -> Any:
    from protocol.config import ConfigError, load_experiment

    try:
        return load_experiment(doc)
    except (ConfigError, ValueError, TypeError):
        return None


def _dp(doc: dict[str, Any]) -> bool:
    opt = ((doc.get("training") or {}).get("optimizer") or {}) if isinstance(doc, dict) else {}
    dp = opt.get("differential_privacy")
    return isinstance(dp, dict) and dp.get("enabled", True) is not False


def plan_of(run: dict[str, Any], hellos: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """The run's privacy plan: the finished run's own (its result), else the coordinator's planner
    on the experiment and the hellos (cached once every site of the run has said hello)."""
    result_privacy = (run.get("result") or {}).get("privacy") or {}
    unheard = [s for s, p in (result_privacy.get("plan") or {}).items()  # planned before its hello arrived
               if isinstance(p, dict) and "planned_epsilon" not in p and hellos.get(s)]
    if result_privacy.get("plan") and not unheard:
        return {"total_epsilon": result_privacy.get("total_epsilon"), "delta": result_privacy.get("delta"),
                "accountant": result_privacy.get("accountant"), "sites": result_privacy["plan"]}
    if not _dp(run.get("experiment") or {}):
        return None
    rid = run["run_id"]
    if rid in _PLANS:
        return _PLANS[rid]
    exp = _experiment(run["experiment"])
    if exp is None or exp.training.dp is None:
        return None
    from coordinator import privacy_plan as plans

    plan = plans.plan(exp, hellos)
    if all(h for h in hellos.values()):
        _PLANS[rid] = plan
    return plan


def run_privacy(run: dict[str, Any], privacy: dict[str, Any], hellos: dict[str, dict[str, Any] | None],
                trained: dict[str, int]) -> dict[str, Any]:
    """``privacy`` with ``planned_epsilon``, ``total_epsilon`` (from the plan while the run goes on)
    and ``run_spent_epsilon`` per site (this run only, by the plan, for the rounds each site trained);
    ``epsilon`` stays what the sites reported: their lifetime ledger, renamed ``lifetime_epsilon``."""
    out = dict(privacy)
    lifetime = dict(privacy.get("epsilon") or {}) if isinstance(privacy.get("epsilon"), dict) else {}
    dataset = ((run.get("experiment") or {}).get("dataset") or {}).get("name")
    for site, hello in hellos.items():  # before its first update: the ledger figure its hello announced
        if lifetime.get(site) is None:
            said = [d.get("epsilon_spent") for d in (hello or {}).get("datasets") or [] if d.get("name") == dataset]
            if said and isinstance(said[0], (int, float)):
                lifetime[site] = float(said[0])
    out["lifetime_epsilon"] = lifetime
    plan = plan_of(run, hellos)
    if plan is None:
        out.setdefault("run_spent_epsilon", {})
        return out
    sites = plan.get("sites") or {}
    stored = out.get("planned_epsilon") if isinstance(out.get("planned_epsilon"), dict) else {}
    # the result's figure where it has one, else the one planner's on the site's hello (a site the
    # coordinator planned before its hello arrived: the README deployment starts them together)
    out["planned_epsilon"] = {s: stored.get(s) if stored.get(s) is not None else p.get("planned_epsilon")
                              for s, p in sites.items()} or dict(stored)
    if out.get("total_epsilon") is None:
        out["total_epsilon"] = plan.get("total_epsilon")
    for k in ("delta", "accountant"):
        if out.get(k) is None:
            out[k] = plan.get(k)
    exp = _experiment(run["experiment"])
    finished = run.get("status") not in ("running",)
    from coordinator import privacy_plan as plans

    out["run_spent_epsilon"] = {s: plans.run_spent(exp, hellos.get(s), rounds_trained=trained.get(s, 0), finished=finished)
                                if exp is not None else None for s in sorted(set(sites) | set(trained))}
    return out
