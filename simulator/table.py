"""The results table ``fedbus simulate`` prints on stderr (rich), from the result document."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.dp_figures import shown


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


def best_round(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The round with the lowest aggregated validation loss (None without rounds)."""
    rows = [r for r in doc.get("rounds") or [] if isinstance(r.get("loss"), (int, float))]
    return min(rows, key=lambda r: r["loss"]) if rows else None


def print_results(doc: dict[str, Any], *, console: Console | None = None, max_sites: int = 25) -> None:
    """Per round (aggregated), per site at the end, epsilon per site, time split, baselines."""
    con = console or Console(stderr=True)
    if not con.is_terminal:  # a log or a pipe has no width to fit: never cut a figure's interval to "(0.52–…"
        con.width = max(con.width, 160)
    rounds = Table(title=f"{doc.get('aggregator')} · {len(doc.get('sites', []))} sites · run {doc.get('run_id')}")
    for col in ("round", "val loss", "val accuracy", "val auc", "replies", "wall s"):
        rounds.add_column(col, justify="right")
    for r in doc.get("rounds", []):
        rounds.add_row(str(r.get("round")), _f(r.get("loss")), _f(r.get("accuracy")), _f(r.get("auc")),
                       _f(r.get("replies")), _f(r.get("wall_s"), 2))
    con.print(rounds)

    final = doc.get("final") or {}
    base = doc.get("baselines") or {}
    local = base.get("local") or {}
    eps = doc.get("epsilon") or {}
    priv = doc.get("privacy") or {}
    per_site = final.get("per_site") or {}
    names = list(doc.get("sites") or sorted(per_site))
    personal = any("personalized" in (per_site.get(s) or {}) for s in names)
    sites = Table(title="Final global model on each site's fixed test split (rows never trained on)")
    sites.add_column("site", no_wrap=True)
    # Narrow columns (2 decimals); on a narrow terminal a figure's interval folds onto the next
    # line rather than being cut (rich's default ellipsis hid the upper bound).
    for col in ("n", "acc", "auc", "f1", "sens", "spec", "maj", "ε"):
        sites.add_column(col, justify="right", overflow="fold")
    if personal:
        sites.add_column("p.acc", justify="right", overflow="fold")
        sites.add_column("p.auc", justify="right", overflow="fold")
    sites.caption = ("as each site reported it, with its 95 % interval (DP noise and test-set size); "
                     "maj: accuracy of predicting the site's majority class; "
                     + ("p.: the site's personalised model; " if personal else "") + "ε at the δ below")
    from coordinator.final import one_class_warnings

    warnings = one_class_warnings({"per_site": {s: per_site[s] for s in names[:max_sites] if s in per_site}})
    for s in names[:max_sites]:
        m = per_site.get(s, {})
        row = [s, _f(m.get("n_test"))] + [shown(m, k, percent=k == "accuracy") for k in (
            "accuracy", "auc", "f1", "sensitivity", "specificity", "majority_class_accuracy")] + [_f(eps.get(s), 2)]
        if personal:
            pm = m.get("personalized") or {}
            row += [shown(pm, "accuracy", percent=True), shown(pm, "auc")]
        sites.add_row(*row)
    if len(names) > max_sites:
        sites.caption += f"; {len(names) - max_sites} more sites in the JSON / report"
    con.print(sites)
    for w in warnings:
        con.print(f"[yellow]warning[/yellow] {escape(w)}")
    if priv and priv.get("delta") is not None:  # DP off: no ε, no δ (privacy.central is shown below)
        line = f"privacy: ε per site at δ = {priv.get('delta'):g} ({priv.get('accountant')} accountant)"
        planned = {s: v for s, v in (priv.get("planned_epsilon") or {}).items() if v is not None}
        if priv.get("total_epsilon") is not None:
            line += f", run budget ε ≤ {priv['total_epsilon']:g}"
        if planned:
            line += "; planned " + ", ".join(f"{s} {v:.3f}" for s, v in sorted(planned.items())[:max_sites])
        con.print(line)
    elif eps and all(v is None for v in eps.values()):
        con.print("privacy: DP off (ε = ∞)")

    summary = Table(title="Union of the sites' fixed test splits (means over sites, weighted by test rows)")
    summary.add_column("model")
    cols = ("loss", "accuracy", "auc", "f1", "sensitivity", "specificity")
    for col in ("loss", "acc", "auc", "f1", "sens", "spec"):
        summary.add_column(col, justify="right", overflow="fold")
    summary.add_row("federated (global)", *(shown(final, k, percent=k == "accuracy") for k in cols))
    for w in one_class_warnings({"predicts_one_class": final.get("predicts_one_class")}):
        con.print(f"[yellow]warning[/yellow] {escape(w)}")
    if final.get("personalized"):
        summary.add_row(f"personalised on own sites: {final['personalized'].get('method')}",
                        *(shown(final["personalized"], k, percent=k == "accuracy") for k in cols))
    if final.get("majority_class_accuracy") is not None:
        summary.add_row("majority class of each site", "-", _f(final.get("majority_class_accuracy")), "-", "-", "-", "-")
    con.print(summary)
    held = doc.get("holdout") or {}
    if held:
        ht = Table(title="Simulator's held-out rows (never at any site): federated vs baselines")
        ht.add_column("model")
        for col in ("loss", "acc", "auc", "f1", "sens", "spec"):
            ht.add_column(col, justify="right")
        ht.add_row("federated (global)", *(_f(held.get(k)) for k in cols))
        if held.get("personalized"):
            ht.add_row("personalised, own sites", *(_f(held["personalized"].get(k)) for k in cols))
        if base.get("pooled"):
            ht.add_row("pooled (centralized)", *(_f(base["pooled"].get(k)) for k in cols))
        if local.get("_union"):
            ht.add_row("local only, own sites", *(_f(local["_union"].get(k)) for k in cols))
        con.print(ht)
    best = best_round(doc)
    if best is not None:
        con.print(f"best round by validation loss: {best['round']} (validation loss {_f(best.get('loss'))}"
                  + (f", held-out accuracy {_f((best.get('holdout') or {}).get('accuracy'))})"
                     if best.get("holdout") else ")"))

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
