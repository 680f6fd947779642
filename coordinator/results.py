"""Reading runs back: list, show, compare and export (model, experiment, metrics CSV, plots)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from coordinator.state import StateStore


def show_run(store: StateStore, run_id: str) -> dict[str, Any]:
    """The run document (docs/design.md shape) plus per-round per-site metrics and the privacy ledger."""
    run = store.run(run_id)
    rounds = store.rounds(run_id)
    doc = dict(run["result"] or {})
    if not doc:  # an unfinished run: build what is known
        doc = {"run_id": run_id, "aggregator": run["aggregator"], "sites": run["sites"], "final": {}, "epsilon": {},
               "timing": {}, "rejected": [], "status": run["status"], "reason": run["reason"]}
        doc["rounds"] = [{"round": r["round"], "loss": r["loss"], "accuracy": r["accuracy"], "auc": r["auc"],
                          "replies": r["replies"], "wall_s": r["wall_s"]} for r in rounds]
    doc["status"] = run["status"]
    doc["reason"] = run["reason"]
    doc["federation"] = run["federation"]
    doc["rounds_planned"] = run["rounds_planned"]
    per = {r["round"]: r["metrics"].get("per_site", {}) for r in rounds}
    for row in doc.get("rounds", []):
        row["per_site"] = per.get(row["round"], {})
    doc["privacy_ledger"] = store.privacy(run_id)
    _label(doc)
    return doc


def _label(doc: dict[str, Any]) -> None:
    """Say what the figures are: rounds hold validation metrics, ``final`` the sites' fixed test
    splits; ε with the δ the sites reported it at; the best round by validation loss."""
    doc["rounds_split"] = "validation"
    if isinstance(doc.get("final"), dict) and doc["final"]:
        doc["final"].setdefault("split", "test")
    deltas = sorted({r.get("delta") for r in doc.get("privacy_ledger") or [] if r.get("delta") is not None})
    if doc.get("epsilon") and any(v is not None for v in doc["epsilon"].values()):
        priv = doc["privacy"] = dict(doc.get("privacy") or {})
        priv.setdefault("epsilon", doc["epsilon"])
        priv.setdefault("delta", deltas[0] if len(deltas) == 1 else deltas)
        priv.setdefault("source", "as the sites reported with their updates")
    rows = [r for r in doc.get("rounds", []) if isinstance(r.get("loss"), (int, float))]
    if rows:
        best = min(rows, key=lambda r: r["loss"])
        doc["best_round"] = {"round": best["round"], "validation_loss": best["loss"],
                             "validation_accuracy": best.get("accuracy")}


def list_runs(store: StateStore) -> list[dict[str, Any]]:
    return store.runs()


def compare_runs(store: StateStore, a: str, b: str) -> dict[str, Any]:
    """Two runs side by side: per round and final metrics, timing, ε."""
    ra, rb = show_run(store, a), show_run(store, b)
    n = max(len(ra.get("rounds", [])), len(rb.get("rounds", [])))

    def at(doc: dict, i: int) -> dict:
        rows = doc.get("rounds", [])
        return rows[i] if i < len(rows) else {}

    return {
        "runs": [a, b],
        "aggregator": [ra.get("aggregator"), rb.get("aggregator")],
        "rounds": [
            {"round": i + 1, **{f"{k}_{tag}": at(doc, i).get(k) for tag, doc in (("a", ra), ("b", rb))
                                for k in ("loss", "accuracy", "auc", "replies")}}
            for i in range(n)
        ],
        "final": {**{k: [ra.get("final", {}).get(k), rb.get("final", {}).get(k)]
                     for k in ("loss", "accuracy", "auc", "f1", "majority_class_accuracy")},
                  **{f"personalized_{k}": [(ra.get("final", {}).get("personalized") or {}).get(k),
                                           (rb.get("final", {}).get("personalized") or {}).get(k)]
                     for k in ("accuracy", "auc")}},
        "timing": {k: [ra.get("timing", {}).get(k), rb.get("timing", {}).get(k)]
                   for k in ("wall_s", "train_s", "communication_s", "aggregation_s")},
        "epsilon": [ra.get("epsilon", {}), rb.get("epsilon", {})],
        "delta": [(ra.get("privacy") or {}).get("delta"), (rb.get("privacy") or {}).get("delta")],
        "best_round": [ra.get("best_round"), rb.get("best_round")],
        "rounds_split": "validation",
        "final_split": "test",
    }


def export_run(store: StateStore, run_id: str, out: Path) -> dict[str, str]:
    """Write the final model, its spec, the experiment as run, metrics CSV and plots into ``out``."""
    from protocol.config import load_experiment
    from protocol.model import summarize

    run = store.run(run_id)
    rounds = store.rounds(run_id)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if rounds:
        src = store.dir / rounds[-1]["checkpoint_path"]
    elif run.get("initial_checkpoint"):
        src = store.dir / run["initial_checkpoint"]
    else:
        raise FileNotFoundError(f"run {run_id} has no checkpoint to export")
    shutil.copyfile(src, out / "model.safetensors")
    files["model"] = str(out / "model.safetensors")
    experiment = dict(run["experiment"])
    exp = load_experiment(experiment)
    summary = summarize(exp.architecture.layers)
    spec = {"architecture": experiment.get("architecture"), "parameters": summary.parameters,
            "layers": summary.layers, "input_shape": list(summary.input_shape or []),
            "format": "safetensors state_dict; keys in module order, float32"}
    (out / "model_spec.json").write_text(json.dumps(spec, indent=2, default=list))
    files["model_spec"] = str(out / "model_spec.json")
    as_run = json.loads(json.dumps(experiment))
    as_run.setdefault("training", {})["rounds"] = run["rounds_planned"]
    as_run.setdefault("metadata", {}).update({"fedbus_run_id": run_id, "fedbus_status": run["status"]})
    (out / "experiment.json").write_text(json.dumps(as_run, indent=4))
    files["experiment"] = str(out / "experiment.json")
    final = (run.get("result") or {}).get("final") or {}
    files["metrics"] = str(_metrics_csv(rounds, out / "metrics.csv", final=final,
                                        test_every=int(exp.federated.test_every or 0)))
    if final.get("per_site"):
        files["final_test"] = str(_final_csv(final, out / "final_test.csv"))
    files.update(_plots(rounds, out, title=run_id))
    return files


ROUND_METRICS = ("loss", "accuracy", "auc", "f1")


def _pick(m: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """The figures, and beside each its 95 % interval as ``{k}_ci_lo``/``{k}_ci_hi`` where the site
    released one (flat ``{k}_lo``/``_hi``, or a result block's ``ci``), as the dashboard shows it."""
    m = m or {}
    out = {k: m.get(prefix + k) for k in ROUND_METRICS}
    stored = m.get("ci")
    block: dict[str, Any] = stored if not prefix and isinstance(stored, dict) else {}
    for k in ROUND_METRICS:
        lo, hi = (block.get(k) or (m.get(f"{prefix}{k}_lo"), m.get(f"{prefix}{k}_hi")))
        if lo is not None and hi is not None:
            out[f"{k}_ci_lo"], out[f"{k}_ci_hi"] = lo, hi
    return out


def round_figures(r: dict[str, Any]) -> dict[str, Any]:
    """One round's figures under the dashboard's names (``fedbus.dashboard.views``): "validation"
    is the sites' validation rows (each site's evaluation of the global model when it ran one,
    else the figures its update reported), "test" each site's fixed test split (``test_every``)."""
    m = r["metrics"] or {}
    out: dict[str, Any] = {"validation (all sites)": _pick(m.get("aggregate") or {"loss": r["loss"],
                                                                                  "accuracy": r["accuracy"],
                                                                                  "auc": r["auc"]}),
                           "test (all sites)": _pick(m["test"]) if isinstance(m.get("test"), dict) else _pick(None)}
    for site, sm in sorted((m.get("per_site") or {}).items()):
        has_eval = any(f"eval_{k}" in sm for k in ROUND_METRICS)
        has_train = any(k in sm for k in ROUND_METRICS)
        out[f"{site} validation"] = _pick(sm, "eval_" if has_eval else "") if has_eval or has_train else _pick(None)
        out[f"{site} test"] = _pick(sm, "test_")
        out[f"{site} n"] = sm.get("eval_n", sm.get("n"))
        out[f"{site} lifetime epsilon"] = sm.get("epsilon")
    return out


def _final_as_last_round(figs: list[dict[str, Any]], rounds: list[dict[str, Any]], final: dict[str, Any],
                         test_every: int) -> None:
    """With ``test_every`` the coordinator skips the last round's test: the final evaluation is it
    (as the dashboard shows it)."""
    if not test_every or not figs or not final or isinstance((rounds[-1]["metrics"] or {}).get("test"), dict):
        return
    figs[-1]["test (all sites)"] = _pick(final)
    for site, fm in (final.get("per_site") or {}).items():
        figs[-1][f"{site} test"] = _pick(fm)


def _metrics_csv(rounds: list[dict[str, Any]], path: Path, *, final: dict[str, Any] | None = None,
                 test_every: int = 0) -> Path:
    """Per round: the dashboard's curves under its labels (``round_figures``), then the timing."""
    figs = [round_figures(r) for r in rounds]
    _final_as_last_round(figs, rounds, final or {}, test_every)
    cols: list[str] = []
    for fig_ in figs:
        for name, v in fig_.items():
            for c in ([f"{name} {k}" for k in v] if isinstance(v, dict) else [name]):
                if c not in cols:
                    cols.append(c)
    timing = ["wall_s", "train_s", "communication_s", "aggregation_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "replies", *cols, *timing])
        for r, fig in zip(rounds, figs):
            flat = {f"{name} {k}": x for name, v in fig.items() if isinstance(v, dict) for k, x in v.items()}
            flat.update({name: v for name, v in fig.items() if not isinstance(v, dict)})
            w.writerow([r["round"], r["replies"], *(flat.get(c) for c in cols), *(r[k] for k in timing)])
    return path


FINAL_FIGURES = ("accuracy", "auc", "f1", "sensitivity", "specificity", "majority_class_accuracy")


def _final_csv(final: dict[str, Any], path: Path) -> Path:
    """The final model on each site's fixed test split and on their union, each figure with its
    95 % interval (``ci``) and, where the interval spans the range, the dashboard's words."""
    from protocol.dp_figures import shown

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "site", "split", "n_test"]
                   + [c for k in FINAL_FIGURES for c in (k, f"{k}_ci_lo", f"{k}_ci_hi", f"{k}_shown")])

        def row(model: str, site: str, m: dict[str, Any]) -> None:
            ci = m.get("ci") or {}
            w.writerow([model, site, "test", m.get("n_test")]
                       + [x for k in FINAL_FIGURES
                          for x in (m.get(k), *(ci.get(k) or (None, None)), shown(m, k, percent=k == "accuracy"))])

        row("global", "union of sites", final)
        for site, m in sorted((final.get("per_site") or {}).items()):
            row("global", site, m)
            if isinstance(m.get("personalized"), dict):
                row("personalised", site, m["personalized"])
    return path


def _plots(rounds: list[dict[str, Any]], out: Path, *, title: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for metric in ("loss", "accuracy"):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["round"] for r in rounds]
        ax.plot(xs, [r[metric] for r in rounds], marker="o", label="aggregated", linewidth=2)
        sites = sorted({s for r in rounds for s in r["metrics"].get("per_site", {})})
        for s in sites:
            ys = [r["metrics"].get("per_site", {}).get(s, {}).get(metric) for r in rounds]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], alpha=0.5, label=s)
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files[f"{metric}_plot"] = str(path)
    return files
