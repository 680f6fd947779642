"""Files a simulated run leaves in ``--out DIR``: metrics CSV/JSON, PNG plots, ``report.html``.

The input is the docs/design.md result document (``simulate(...)`` returns it), optionally
with ``rounds[i]["per_site"]`` (per-site validation metrics of that round). The HTML
page is self-contained (plots embedded as base64 PNG) so it can be mailed to a
colleague or attached to an ethics board submission as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from protocol import dp_figures  # noqa: E402

METRICS = ("loss", "accuracy", "auc", "f1")


def write_report(doc: dict[str, Any], out: Path, *, experiment: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write every report file under ``out``; returns name -> path of what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["result.json"] = _write_json(out / "result.json", doc)
    if experiment is not None:
        written["experiment.json"] = _write_json(out / "experiment.json", experiment)
    written["rounds.csv"] = _write_rounds_csv(out / "rounds.csv", doc)
    written["sites.csv"] = _write_sites_csv(out / "sites.csv", doc)
    per_site = _per_site_rounds(doc)
    if per_site:
        written["site_rounds.csv"] = _write_site_rounds_csv(out / "site_rounds.csv", per_site)
    plots = {
        "loss.png": _plot_metric(doc, per_site, "loss", "Validation loss per round"),
        "accuracy_auc.png": _plot_accuracy_auc(doc, per_site),
        "epsilon.png": _plot_epsilon(doc),
        "baselines.png": _plot_baselines(doc),
    }
    for name, fig in plots.items():
        if fig is None:
            continue
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[name] = path
    written["report.html"] = _write_html(out / "report.html", doc, {k: v for k, v in written.items() if k.endswith(".png")})
    return written


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _write_rounds_csv(path: Path, doc: dict[str, Any]) -> Path:
    cols = ["round", "loss", "accuracy", "auc", "f1", "replies", "wall_s", "t_s"]
    held_cols = ["holdout_loss", "holdout_accuracy", "holdout_auc", "holdout_f1"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols + held_cols)
        for r in doc.get("rounds", []):
            t = r.get("holdout") or {}
            w.writerow([_cell(r.get(c)) for c in cols] + [_cell(t.get(c[len("holdout_"):])) for c in held_cols])
    return path


def _write_sites_csv(path: Path, doc: dict[str, Any]) -> Path:
    figs = ("accuracy", "auc", "f1", "sensitivity", "specificity", "majority_class_accuracy")
    cols = ["site", *[c for k in figs for c in (k, f"{k}_ci_lo", f"{k}_ci_hi")], "loss", "n_test",
            "epsilon", "personalized_accuracy", "personalized_auc", "holdout_accuracy", "holdout_auc",
            "local_holdout_accuracy", "local_holdout_auc"]
    per_site = (doc.get("final") or {}).get("per_site") or {}
    eps = doc.get("epsilon") or {}
    local = ((doc.get("baselines") or {}).get("local")) or {}
    held = ((doc.get("holdout") or {}).get("per_site")) or {}
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for site in doc.get("sites", sorted(per_site)):
            m = per_site.get(site, {})
            lm = local.get(site, {})
            pm = m.get("personalized") or {}
            w.writerow(
                [site]
                + [_cell(x) for k in figs for x in (m.get(k), *((m.get("ci") or {}).get(k) or (None, None)))]
                + [_cell(m.get(c)) for c in ("loss", "n_test")]
                + [_cell(eps.get(site)), _cell(pm.get("accuracy")), _cell(pm.get("auc")),
                   _cell(held.get(site, {}).get("accuracy")), _cell(held.get(site, {}).get("auc")),
                   _cell(lm.get("accuracy")), _cell(lm.get("auc"))]
            )
    return path


def _write_site_rounds_csv(path: Path, per_site: dict[str, dict[int, dict[str, float]]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["site", "round", *METRICS])
        for site in sorted(per_site):
            for rnd in sorted(per_site[site]):
                w.writerow([site, rnd, *(_cell(per_site[site][rnd].get(m)) for m in METRICS)])
    return path


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _per_site_rounds(doc: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """site -> round -> metrics, from ``rounds[i]["per_site"]`` where the run recorded them."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in doc.get("rounds", []):
        for site, m in (r.get("per_site") or {}).items():
            out.setdefault(site, {})[int(r["round"])] = m
    return out


def _series(doc: dict[str, Any], metric: str, *, holdout: bool = False) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in doc.get("rounds", []):
        v = (r.get("holdout") or {}).get(metric) if holdout else r.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["round"]))
            ys.append(float(v))
    return xs, ys


def _plot_metric(doc: dict[str, Any], per_site: dict, metric: str, title: str):
    xs, ys = _series(doc, metric)
    if not xs and not per_site:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _site_lines(ax, per_site, metric)
    if xs:
        ax.plot(xs, ys, "k-o", lw=2.2, ms=4, label="global (aggregated validation)")
    tx, ty = _series(doc, metric, holdout=True)
    if tx:
        ax.plot(tx, ty, "--s", color="tab:green", lw=2, ms=4, label="global model on held-out rows")
    ax.set(title=title, xlabel="round", ylabel=metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def _site_lines(ax, per_site: dict, metric: str, style: str = "-") -> None:
    if len(per_site) > 12:  # a thousand thin lines say nothing: show the spread instead
        rounds = sorted({r for s in per_site.values() for r in s})
        lo, hi = [], []
        for rnd in rounds:
            vals = [s[rnd][metric] for s in per_site.values() if rnd in s and s[rnd].get(metric) is not None]
            lo.append(min(vals) if vals else float("nan"))
            hi.append(max(vals) if vals else float("nan"))
        ax.fill_between(rounds, lo, hi, alpha=0.2, label=f"sites min-max ({len(per_site)})")
        return
    for site in sorted(per_site):
        pts = sorted((r, m.get(metric)) for r, m in per_site[site].items() if m.get(metric) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1, alpha=0.7, label=site)


def _plot_accuracy_auc(doc: dict[str, Any], per_site: dict):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    drew = False
    for ax, metric in zip(axes, ("accuracy", "auc")):
        xs, ys = _series(doc, metric)
        _site_lines(ax, per_site, metric)
        if xs:
            ax.plot(xs, ys, "k-o", lw=2.2, ms=4, label="global (aggregated validation)")
            drew = True
        tx, ty = _series(doc, metric, holdout=True)
        if tx:
            ax.plot(tx, ty, "--s", color="tab:green", lw=2, ms=4, label="global model on held-out rows")
            drew = True
        base = (doc.get("baselines") or {}).get("pooled") or {}
        if isinstance(base.get(metric), (int, float)):
            ax.axhline(base[metric], color="tab:red", ls="--", label="pooled baseline (held-out rows)")
        ax.set(title=f"{'Accuracy' if metric == 'accuracy' else 'ROC AUC'} per round", xlabel="round", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    if not drew and not per_site:
        plt.close(fig)
        return None
    return fig


def _plot_epsilon(doc: dict[str, Any]):
    eps = {s: v for s, v in (doc.get("epsilon") or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if not eps:
        return None
    sites = sorted(eps)
    fig, ax = plt.subplots(figsize=(max(5, min(14, 0.5 * len(sites) + 3)), 3.5))
    ax.bar(range(len(sites)), [eps[s] for s in sites], color="tab:purple")
    if len(sites) <= 30:
        ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
    ax.set(title="Privacy spent per site (epsilon, cumulative)", ylabel="epsilon")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_baselines(doc: dict[str, Any]):
    """Federated vs pooled vs each site alone, on the same rows the simulator held back from every site."""
    final = doc.get("holdout") or {}
    base = doc.get("baselines") or {}
    bars: list[tuple[str, dict]] = [("federated (global)", final)]
    if base.get("pooled"):
        bars.append(("pooled", base["pooled"]))
    local = base.get("local") or {}
    if local.get("_union"):
        bars.append(("local only (each site's model on its own held-out rows)", local["_union"]))
    if len(bars) == 1:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bars)
    metrics = ("accuracy", "auc", "f1")
    for i, (label, m) in enumerate(bars):
        vals = [m.get(k) if isinstance(m.get(k), (int, float)) else 0.0 for k in metrics]
        pos = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(metrics))]
        rects = ax.bar(pos, vals, width, label=label)
        ax.bar_label(rects, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set(title="Federated vs baselines (union of the simulator's held-out rows)", ylim=(0, 1.1))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(bars), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return html.escape(str(v))


def _central_dp_line(doc: dict[str, Any]) -> str:
    c = (doc.get("privacy") or {}).get("central")
    if not c:
        return ""
    return (f"<p><b>central DP</b>: ε = {_fmt(c.get('epsilon'))} at δ = {_fmt(c.get('delta'))} "
            f"({html.escape(str(c.get('accountant')))} accountant; noise multiplier {_fmt(c.get('noise_multiplier'))}, "
            f"clip {_fmt(c.get('clip_norm'))}, {_fmt(c.get('rounds'))} rounds)</p>")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_UNION = ("loss", "accuracy", "auc", "f1", "sensitivity", "specificity")


def _warnings_html(doc: dict[str, Any]) -> list[str]:
    """A model that predicts one class is a majority-class predictor, whatever its accuracy."""
    from coordinator.final import one_class_warnings

    return [f"<p class='warn'>⚠ {html.escape(n)}</p>" for n in one_class_warnings(doc.get("final") or {})]


def _privacy_html(doc: dict[str, Any]) -> list[str]:
    priv = doc.get("privacy")
    if not priv or (priv.get("delta") is None and not priv.get("epsilon")):  # only central DP / flags: shown above
        return ["<h2>Privacy</h2><p>DP off: nothing bounds what the updates reveal (ε = ∞).</p>"]
    rows = [[s, v, (priv.get("planned_epsilon") or {}).get(s), priv.get("total_epsilon"),
             (priv.get("noise_multiplier") or {}).get(s)] for s, v in sorted((priv.get("epsilon") or {}).items())]
    return [f"<h2>Privacy</h2><p>ε per site at δ = {_fmt(priv.get('delta'))}, accountant {_fmt(priv.get('accountant'))}; "
            "spent = the site's own ledger after the run (rounds and any personalisation fine-tune); "
            "planned = what the site derived before round 1 from its rows and the whole-run budget (or, without "
            "one, the experiment's noise per task composed over the run).</p>",
            _table(["site", "ε spent", "ε planned", "budget (total ε)", "noise σ"], rows)]


def _best_round_html(doc: dict[str, Any]) -> list[str]:
    from simulator.table import best_round

    best = best_round(doc)
    if best is None:
        return []
    held = best.get("holdout") or {}
    return [f"<p><b>Best round</b> by aggregated validation loss: {best['round']} (validation loss "
            f"{_fmt(best.get('loss'))}; its global model on the held-out rows: accuracy {_fmt(held.get('accuracy'))}, "
            f"auc {_fmt(held.get('auc'))}). The final model above is the last round's.</p>"]


def _write_html(path: Path, doc: dict[str, Any], pngs: dict[str, Path]) -> Path:
    final = doc.get("final") or {}
    timing = doc.get("timing") or {}
    eps = doc.get("epsilon") or {}
    base = doc.get("baselines") or {}
    sections = [
        f"<h1>fedbus simulation — {html.escape(str(doc.get('experiment', '')))}</h1>",
        "<p>"
        + " · ".join(
            f"<b>{html.escape(k)}</b>: {_fmt(doc.get(k))}"
            for k in ("run_id", "aggregator", "dataset", "partition", "broker", "seed")
            if doc.get(k) is not None
        )
        + f" · <b>sites</b>: {len(doc.get('sites', []))}</p>"
        + ("<p><b>reproducible DP</b>: site noise was drawn from a seed (--reproducible-dp), not secret; "
           "a research run only</p>" if doc.get("reproducible_dp") else "")
        + _central_dp_line(doc),
        "<h2>Final model on the sites' fixed test splits (reported by each site; rows it never trained on)</h2>",
        _table(
            ["", *_UNION],
            [["federated (global)", *(dp_figures.shown(final, k, percent=k == "accuracy") for k in _UNION)]]
            + ([[f"personalised, each site on its own split ({final['personalized'].get('method')})",
                 *(dp_figures.shown(final["personalized"], k, percent=k == "accuracy") for k in _UNION)]]
               if final.get("personalized") else [])
            + ([["majority class of each site", None, final.get("majority_class_accuracy")] + [None] * (len(_UNION) - 2)]
               if final.get("majority_class_accuracy") is not None else []),
        ),
        "<p>Each site scores the final model on its own fixed test split and releases the figures as its policy "
        "says (with <code>metrics = \"dp\"</code>, one noisy confusion matrix per model, accounted). Each figure "
        "has its 95 % interval in brackets (DP noise and test-set size, by Monte Carlo post-processing); a figure "
        "whose interval spans nearly the whole range reads \"too few test rows for this budget\". The union's "
        "figures come from the sites' summed confusion matrices where every site released one, else from the "
        "means over sites weighted by their test rows.</p>",
    ]
    held = doc.get("holdout") or {}
    if held:
        sections += [
            "<h2>Simulator's held-out rows (never at any site): federated vs baselines</h2>",
            _table(
                ["", *_UNION],
                [["federated (global)", *(held.get(k) for k in _UNION)]]
                + ([["personalised, each site on its own held-out rows", *(held["personalized"].get(k) for k in _UNION)]]
                   if held.get("personalized") else [])
                + ([["pooled baseline", *(base["pooled"].get(k) for k in _UNION)]] if base.get("pooled") else [])
                + ([["local only", *(base["local"]["_union"].get(k) for k in _UNION)]]
                   if (base.get("local") or {}).get("_union") else [])
                + ([["majority class of each site", None, held.get("majority_class_accuracy")]
                    + [None] * (len(_UNION) - 2)] if held.get("majority_class_accuracy") is not None else []),
            ),
        ]
    sections += _warnings_html(doc) + _privacy_html(doc) + _best_round_html(doc)
    if base.get("pooled"):
        sections.append(
            f"<p>Baselines use the same model, optimizer, batch size and DP settings for "
            f"{_fmt(base.get('epochs'))} epochs (rounds × local epochs): <i>pooled</i> trains on every site's "
            "training rows together; <i>local only</i> is each site's own model on its own held-out rows.</p>"
        )
    for name, title in (("baselines.png", "Federated vs baselines"), ("loss.png", "Loss"), ("accuracy_auc.png", "Accuracy and AUC"), ("epsilon.png", "Privacy")):
        if name in pngs:
            data = base64.b64encode(pngs[name].read_bytes()).decode("ascii")
            sections.append(f"<h2>{title}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    rounds = doc.get("rounds", [])
    sections.append("<h2>Rounds</h2><p>val: the aggregated validation metrics sites reported; "
                    "held-out: that round's global model on the union of the simulator's held-out rows.</p>")
    sections.append(
        _table(["round", "val loss", "val accuracy", "val auc", "held-out accuracy", "held-out auc", "replies",
                "wall s"],
               [[r.get("round"), r.get("loss"), r.get("accuracy"), r.get("auc"),
                 (r.get("holdout") or {}).get("accuracy"), (r.get("holdout") or {}).get("auc"), r.get("replies"),
                 r.get("wall_s")] for r in rounds])
    )
    per_site = final.get("per_site") or {}
    local = base.get("local") or {}
    sites = list(doc.get("sites") or sorted(per_site))
    shown = sites[:200]
    sections.append("<h2>Per site (final model, site's test split)</h2>")
    personal = any("personalized" in (per_site.get(s) or {}) for s in shown)
    headers = ["site", "n_test", "accuracy", "auc", "f1", "sensitivity", "specificity", "majority-class accuracy",
               "epsilon"]
    if personal:
        headers += ["personalised accuracy", "personalised auc"]
    if local:
        headers += ["global on held-out accuracy", "local-only on held-out accuracy"]
    sections.append(
        _table(
            headers,
            [[s, per_site.get(s, {}).get("n_test")]
             + [dp_figures.shown(per_site.get(s), k, percent=k == "accuracy") for k in (
                 "accuracy", "auc", "f1", "sensitivity", "specificity", "majority_class_accuracy")] + [eps.get(s)]
             + ([dp_figures.shown(per_site.get(s, {}).get("personalized"), k, percent=k == "accuracy") for k in ("accuracy", "auc")]
                if personal else [])
             + ([(held.get("per_site") or {}).get(s, {}).get("accuracy"), local.get(s, {}).get("accuracy")]
                if local else [])
             for s in shown],
        )
    )
    if len(sites) > len(shown):
        sections.append(f"<p>{len(sites) - len(shown)} more sites in sites.csv.</p>")
    sections.append("<h2>Time</h2>")
    sections.append(_table(["wall s", "training s", "communication s", "aggregation s"],
                           [[timing.get("wall_s"), timing.get("train_s"), timing.get("communication_s"), timing.get("aggregation_s")]]))
    rejected = doc.get("rejected") or []
    sections.append(f"<h2>Rejected messages ({len(rejected)})</h2>")
    if rejected:
        sections.append(_table(["message id", "site", "reason"], [[r.get("message_id"), r.get("site"), r.get("reason")] for r in rejected[:200]]))
    faults = doc.get("faults")
    if faults:
        sections.append("<h2>Injected faults</h2><pre>" + html.escape(json.dumps(faults, indent=2)) + "</pre>")
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1250px;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}"
        "th{background:#f0f0f0}td:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
        ".warn{color:#a60;font-weight:bold}"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedbus simulation report</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
