"""The privacy block of a simulated run: the plan before round 1 and what each site spent.

The plan (``protocol.privacy_plan.site_run_plan``) is what each site will derive from its own
training rows: σ solved for a ``total_epsilon``, or the experiment's noise multiplier / per-task
target ε, composed over the run; the spend is read back from each
site's own ledger after the run (rounds and the personalisation fine-tune), so the figures
are the sites' accountant's, not the coordinator's idea of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coordinator.privacy_plan import upper_bound
from protocol import privacy_plan
from protocol.accounting import epsilon_of
from site_worker.config import load_site_config
from site_worker.ledger import PrivacyLedger
from site_worker.run_budget import run_spent

if TYPE_CHECKING:
    from protocol.config import Experiment


def _site(files: Any, exp: Experiment, input_shape: tuple[int, ...] | None) -> tuple[Any, Any]:
    from simulator.personal_eval import site_data

    cfg = load_site_config(files.config)
    return cfg, site_data(cfg, exp, input_shape)


def plan(exp: Experiment, ws: Any, *, input_shape: tuple[int, ...] | None) -> dict[str, Any] | None:
    """Per site: rows, noise and ε at the end of the run (None when DP is off)."""
    dp = exp.training.dp
    if dp is None:
        return None
    sites = {}
    accountant = dp.accountant
    delta = float(dp.delta)
    for site, files in sorted(ws.sites.items()):
        cfg, data = _site(files, exp, input_shape)
        delta = cfg.policy.site_delta(data.rows)
        accountant = cfg.policy.accountant
        sites[site] = privacy_plan.plan_entry(exp, cfg.policy, n_train=int(len(data.x_train)), rows=int(data.rows))
    out = {"total_epsilon": privacy_plan.total_of(exp),
           "mode": privacy_plan.mode(exp), "delta": delta, "accountant": accountant,
           "planned_from": "each site's own training rows (the simulator reads the sites' data)", "sites": sites}
    bound = upper_bound(exp)
    if bound:
        out["upper_bound"] = bound
    return out


def spent(exp: Experiment, ws: Any, *, run_id: str, planned: dict[str, Any] | None,
          reported: dict[str, Any] | None) -> dict[str, Any] | None:
    """docs/design.md's ``privacy`` block: δ, accountant, ε per site spent (site ledgers) and planned."""
    dp = exp.training.dp
    if dp is None:
        return None
    delta = float(planned["delta"]) if planned else float(dp.delta)
    accountant = planned["accountant"] if planned else dp.accountant
    eps: dict[str, float] = {}
    run_eps: dict[str, float] = {}
    for site, files in sorted(ws.sites.items()):
        ledger = PrivacyLedger(load_site_config(files.config).state_dir)
        eps[site] = ledger.spent(exp.dataset.name, delta=delta, accountant=accountant)
        run_eps[site] = epsilon_of(run_spent(ledger, exp.dataset.name, run_id), delta=delta,
                                   accountant=accountant)
    out: dict[str, Any] = {"delta": delta, "accountant": accountant, "epsilon": eps, "run_epsilon": run_eps,
                           "epsilon_reported_with_updates": reported or {}}
    if planned is not None:
        out["total_epsilon"] = planned["total_epsilon"]
        out["mode"] = planned.get("mode")
        if planned.get("upper_bound"):
            out["planned_is_upper_bound"] = planned["upper_bound"]
        out["planned_epsilon"] = {s: p.get("planned_epsilon") for s, p in planned["sites"].items()}
        out["noise_multiplier"] = {s: p.get("noise_multiplier") for s, p in planned["sites"].items()}
        errors = {s: p["error"] for s, p in planned["sites"].items() if p.get("error")}
        if errors:
            out["plan_errors"] = errors
    return out


def describe_plan(planned: dict[str, Any]) -> list[str]:
    """Lines for the terminal, before the first round (the coordinator's format)."""
    from coordinator.privacy_plan import describe

    return describe(planned)
