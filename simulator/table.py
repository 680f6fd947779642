"""The results table ``fedbus simulate`` prints on stderr (rich), from the result document."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return str(v)


def print_results(doc: dict[str, Any], *, console: Console | None = None, max_sites: int = 25) -> None:
    """Per round (aggregated), per site at the end, epsilon per site, time split, baselines."""
    con = console or Console(stderr=True)
    rounds = Table(title=f"{doc.get('aggregator')} · {len(doc.get('sites', []))} sites · run {doc.get('run_id')}")
    for col in ("round", "loss", "accuracy", "auc", "replies", "wall s"):
        rounds.add_column(col, justify="right")
    for r in doc.get("rounds", []):
        rounds.add_row(str(r.get("round")), _f(r.get("loss")), _f(r.get("accuracy")), _f(r.get("auc")),
                       _f(r.get("replies")), _f(r.get("wall_s"), 2))
    con.print(rounds)

    final = doc.get("final") or {}
    base = doc.get("baselines") or {}
    local = base.get("local") or {}
    eps = doc.get("epsilon") or {}
    sites = Table(title="Final model on each site's held-out test split")
    sites.add_column("site", no_wrap=True)
    for col in ("n_test", "acc", "auc", "f1", "ε"):
        sites.add_column(col, justify="right")
    if local:
        sites.add_column("local acc", justify="right")
        sites.add_column("local auc", justify="right")
    per_site = final.get("per_site") or {}
    names = list(doc.get("sites") or sorted(per_site))
    for s in names[:max_sites]:
        m = per_site.get(s, {})
        row = [s, _f(m.get("n_test")), _f(m.get("accuracy")), _f(m.get("auc")), _f(m.get("f1")), _f(eps.get(s), 2)]
        if local:
            row += [_f(local.get(s, {}).get("accuracy")), _f(local.get(s, {}).get("auc"))]
        sites.add_row(*row)
    if len(names) > max_sites:
        sites.caption = f"{len(names) - max_sites} more sites in the JSON / report"
    con.print(sites)

    summary = Table(title="Union of all test splits")
    summary.add_column("model", no_wrap=True)
    for col in ("loss", "accuracy", "auc", "f1"):
        summary.add_column(col, justify="right")
    summary.add_row("federated", *(_f(final.get(k)) for k in ("loss", "accuracy", "auc", "f1")))
    if base.get("pooled"):
        summary.add_row("pooled (centralized)", *(_f(base["pooled"].get(k)) for k in ("loss", "accuracy", "auc", "f1")))
    if local.get("_union"):
        summary.add_row("local only", *(_f(local["_union"].get(k)) for k in ("loss", "accuracy", "auc", "f1")))
    con.print(summary)

    t = doc.get("timing") or {}
    timing = Table(title="Time (s)")
    for col in ("wall", "training", "communication", "aggregation"):
        timing.add_column(col, justify="right")
    timing.add_row(_f(t.get("wall_s"), 2), _f(t.get("train_s"), 2), _f(t.get("communication_s"), 2),
                   _f(t.get("aggregation_s"), 2))
    con.print(timing)
    central = (doc.get("privacy") or {}).get("central")
    if central:
        con.print(f"central DP: ε = {_f(central.get('epsilon'), 3)} at δ = {central.get('delta')} "
                  f"({central.get('accountant')} accountant, z = {central.get('noise_multiplier')}, "
                  f"{central.get('rounds')} rounds)")
    rejected = doc.get("rejected") or []
    if rejected:
        con.print(f"[yellow]{len(rejected)} message(s) rejected[/yellow] (reasons in the JSON / report)")
