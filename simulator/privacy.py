"""The privacy block of a simulated run: the plan before round 1 and what each site spent.

The plan (``site_worker.run_budget.plan_run``) is what each site will derive from its own
training rows when the experiment states ``total_epsilon``; the spend is read back from each
site's own ledger after the run (rounds and the personalisation fine-tune), so the figures
are the sites' accountant's, not the coordinator's idea of them.
"""

from __future__ import annotations

from typing import Any

from site_worker import run_budget
from site_worker.config import load_site_config
from site_worker.data import prepare
from site_worker.ledger import PrivacyLedger


def _n_train(exp: Any, cfg: Any, input_shape: tuple[int, ...] | None) -> int:
    data = prepare(cfg.datasets[exp.dataset.name], exp.dataset, seed=int(exp.training.seed), input_shape=input_shape)
    return int(len(data.x_train))


def plan(exp: Any, ws: Any, *, input_shape: tuple[int, ...] | None) -> dict[str, Any] | None:
    """Per site: rows, noise and ε at the end of the run (None when DP is off or no budget)."""
    dp = exp.training.dp
    if dp is None or not run_budget.applies(exp):
        return None
    sites = {}
    for site, files in sorted(ws.sites.items()):
        cfg = load_site_config(files.config)
        p = run_budget.plan_run(exp, n_train=_n_train(exp, cfg, input_shape),
                                min_noise=cfg.policy.min_noise_multiplier)
        sites[site] = p.to_json()
    return {"total_epsilon": float(dp.total_epsilon), "delta": float(dp.delta), "accountant": dp.accountant,
            "sites": sites}


def spent(exp: Any, ws: Any, *, run_id: str, planned: dict[str, Any] | None,
          reported: dict[str, Any] | None) -> dict[str, Any] | None:
    """DESIGN.md's ``privacy`` block: δ, accountant, ε per site spent (site ledgers) and planned."""
    dp = exp.training.dp
    if dp is None:
        return None
    eps: dict[str, float] = {}
    run_eps: dict[str, float] = {}
    for site, files in sorted(ws.sites.items()):
        cfg = load_site_config(files.config)
        eps[site] = PrivacyLedger(cfg.state_dir).spent(exp.dataset.name, delta=float(dp.delta), accountant=dp.accountant)
        if run_budget.applies(exp):
            run_eps[site] = run_budget.RunLedger(cfg.state_dir).spent(run_id, exp.dataset.name, delta=float(dp.delta),
                                                                      accountant=dp.accountant)
    out: dict[str, Any] = {"delta": float(dp.delta), "accountant": dp.accountant, "epsilon": eps,
                           "epsilon_reported_with_updates": reported or {}}
    if planned is not None:
        out["total_epsilon"] = planned["total_epsilon"]
        out["planned_epsilon"] = {s: p["planned_epsilon"] for s, p in planned["sites"].items()}
        out["noise_multiplier"] = {s: p["noise_multiplier"] for s, p in planned["sites"].items()}
        out["run_epsilon"] = run_eps
    return out


def describe_plan(planned: dict[str, Any]) -> list[str]:
    """Lines for the terminal, before the first round."""
    lines = [f"privacy plan: total ε ≤ {planned['total_epsilon']:g} per site at δ = {planned['delta']:g} "
             f"({planned['accountant']} accountant)"]
    for s, p in planned["sites"].items():
        lines.append(f"  {s}: {p['n_train']} training rows, {p['steps']} DP-SGD steps at sample rate "
                     f"{p['sample_rate']:.3g}, noise σ = {p['noise_multiplier']:.3f} -> ε = {p['planned_epsilon']:.3f}")
    return lines
