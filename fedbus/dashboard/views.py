"""The JSON documents behind each page (``/api/...``), built from a ``StateReader``.

Result keys follow docs/design.md and issue 11 ("privacy", ``final.per_site[site].personalized``,
``majority_class_accuracy``). Words mean one thing each: **test** is each site's fixed test
split, as the site scored it (``final``, per-round ``test`` with ``federated.test_every``);
**validation** is the sites' validation rows; **held-out** is the extra rows ``simulate``
keeps back from every site (``holdout`` in its ``result.json``), shown only under that name.
Keys a coordinator or site version does not report yet come back as ``None``, and the page
says "not reported" (or, during a live run, "known at the end of the run") instead of guessing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from coordinator import liveness
from fedbus.dashboard import results, run_privacy
from fedbus.dashboard.data import StateReader
from protocol import dp_figures

METRICS = ("loss", "accuracy", "auc", "f1")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# A site's trained update, plain or masked (secure aggregation): each is one round it trained and spent ε on.
UPDATE_KINDS = ("Update", "MaskedUpdate")
# Verdicts that are no rejection: an accepted reply, a site's signed decline (its own table), and a
# secure-aggregation protocol message (a key or an unmask answer) taken into the protocol.
NOT_REJECTED = ("accepted", "declined", "secagg")


def _pick(m: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The curve figures of one release; where the site released intervals (DP metrics:
    ``{name}_lo``/``_hi``, protocol/dp_figures.py) also ``ci`` and ``withheld`` as the result's blocks."""
    out: dict[str, Any] = {k: _num(m.get(prefix + k)) for k in METRICS}
    ci = {k: [float(lo), float(hi)] for k in METRICS if (lo := _num(m.get(f"{prefix}{k}_lo"))) is not None
          and (hi := _num(m.get(f"{prefix}{k}_hi"))) is not None}
    if not prefix and isinstance(m.get("ci"), dict):  # a result block (final figures): its ``ci`` as stored
        ci.update({k: [float(v[0]), float(v[1])] for k, v in m["ci"].items() if k in METRICS and len(v) == 2})
    if ci:
        out["ci"] = ci
        withheld = {k: dp_figures.TOO_FEW for k, (lo, hi) in ci.items() if dp_figures.too_wide(lo, hi)}
        if withheld:
            out["withheld"] = withheld
    return out


def _dataset_of(experiment: dict[str, Any]) -> str | None:
    ds = experiment.get("dataset") if isinstance(experiment, dict) else None
    return ds.get("name") if isinstance(ds, dict) else None


def _feature_types(d: dict[str, Any]) -> dict[str, int]:
    """{"numeric": 11, "categorical": 1}: a catalogue's per-column types, counted."""
    ft = d.get("feature_types") or {}
    if isinstance(ft, dict) and all(isinstance(v, int) for v in ft.values()):
        return dict(ft)
    counts: dict[str, int] = {}
    for t in (ft.values() if isinstance(ft, dict) else []):
        counts[str(t)] = counts.get(str(t), 0) + 1
    return counts


# -- sites -----------------------------------------------------------------------------
def sites_doc(reader: StateReader, *, now: float | None = None) -> dict[str, Any]:
    """Every enrolled site, its datasets (metadata only) and the ε each dataset has spent."""
    now = time.time() if now is None else now
    replies = reader.last_replies()
    beats, monitored = reader.liveness(), reader.listening(now)
    spent: dict[tuple[str, str | None], dict[str, Any]] = {}
    for line in reader.privacy_lines():  # oldest first: the last line is the site's latest report
        dataset = _dataset_of(json.loads(line["experiment_json"] or "{}"))
        if line["epsilon"] is not None:
            spent[(line["site"], dataset)] = {"epsilon": line["epsilon"], "delta": line["delta"],
                                              "run_id": line["run_id"], "round": line["round"],
                                              "reported_at": line["reported_at"]}
    out = []
    for s in reader.sites():
        hello = s["hello"] or {}
        policy = hello.get("policy") or {}
        beat = beats.get(s["site_id"])
        seen = [t for t in (s["hello_at"], replies.get(s["site_id"]), (beat or {}).get("seen_at")) if t]
        last_seen = max(seen) if seen else None
        state = liveness.status(beat, now=now, monitored=monitored)  # from heartbeats only, never a reply's age
        datasets = []
        for d in hello.get("datasets") or []:
            rep = spent.get((s["site_id"], d.get("name")), {})
            budget = _num(d.get("max_epsilon")) if d.get("max_epsilon") is not None else _num(policy.get("max_epsilon"))
            # The hello's ledger figure, unless an Update reported a newer one since (the hello is sent at start).
            said = _num(d.get("epsilon_spent"))
            newer = rep.get("epsilon") is not None and (said is None or (rep.get("reported_at") or 0) > (s["hello_at"] or 0))
            eps = _num(rep.get("epsilon")) if newer else said
            delta = _num(rep.get("delta")) if newer else _num(d.get("delta"))
            cols = d.get("columns") or []
            datasets.append({
                "name": d.get("name"), "rows": d.get("rows"), "columns": len(cols), "column_names": list(cols),
                "feature_types": _feature_types(d), "target": d.get("target"),
                "epsilon_spent": eps, "delta": delta if delta is not None else _num(policy.get("delta")),
                "epsilon_source": ("its latest update" if newer else "its hello") if eps is not None else None,
                "accountant": d.get("accountant") or policy.get("accountant"),
                "budget": budget, "budget_left": (budget - eps) if budget is not None and eps is not None else None,
                "last_report": rep or None,
            })
        out.append({
            "site_id": s["site_id"], "kid": s["kid"], "enrolled_at": s["enrolled_at"], "last_seen": last_seen,
            "online": state == "online", "liveness": state, "last_heartbeat": (beat or {}).get("seen_at"),
            "offline_after_s": liveness.offline_after_s(beat["every_s"]) if beat else liveness.MAX_OFFLINE_AFTER_S,
            "software_version": hello.get("software_version"), "datasets": datasets, "policy": policy or None,
        })
    return {"sites": out, "online_window_s": liveness.MAX_OFFLINE_AFTER_S, "monitored": monitored, "now": now}


# -- runs ------------------------------------------------------------------------------
def _duration(r: dict[str, Any], now: float) -> float | None:
    end = r.get("finished_at") or (now if r.get("status") == "running" else r.get("last_commit"))
    return (end - r["created_at"]) if end and r.get("created_at") else None


def runs_doc(reader: StateReader, *, status: str | None = None, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    rows = []
    for r in reader.runs(status):
        final = (r["result"] or {}).get("final") or {}
        rows.append({
            "run_id": r["run_id"], "status": r["status"], "reason": r["reason"], "aggregator": r["aggregator"],
            "federation": r["federation"], "dataset": _dataset_of(r["experiment"]),
            "experiment": (r["experiment"].get("basic_info") or {}).get("name"),
            "created_at": r["created_at"], "finished_at": r["finished_at"], "duration_s": _duration(r, now),
            "rounds_done": r["rounds_done"], "rounds_planned": r["rounds_planned"],
            # with their intervals and withheld figures, as the run page shows them (never a bare DP figure)
            "final": {**results.figures(final, METRICS, dp=results.under_dp(final)),
                      "majority_class_accuracy": results.weighted_baseline(final.get("per_site") or {})
                      if final.get("per_site") else _num(final.get("majority_class_accuracy"))} if final else None,
        })
    return {"runs": rows, "status": status, "statuses": ["running", "completed", "completed_with_gaps", "failed", "stopped"]}


def _round_row(r: dict[str, Any], created: float | None, overlay: dict[int, dict[str, Any]]) -> dict[str, Any]:
    m = r["metrics"] or {}
    status = m.get("test_status") or {}  # per site: "released", "declined: <reason>", ... (federated.test_every)
    test = m.get("test") if isinstance(m.get("test"), dict) else None
    holdout = overlay.get(int(r["round"]), {}).get("holdout")
    per_site = {}
    for site in sorted(set(m.get("per_site") or {}) | set(status)):
        sm = (m.get("per_site") or {}).get(site) or {}
        has_eval = any(f"eval_{k}" in sm for k in METRICS)
        has_train = any(k in sm for k in METRICS)
        per_site[site] = {"validation": _pick(sm, "eval_" if has_eval else "") if has_eval or has_train else None,
                          "test": _pick(sm, "test_") if any(f"test_{k}" in sm for k in METRICS) else None,
                          "test_status": status.get(site),
                          "epsilon": _num(sm.get("epsilon")), "n": _num(sm.get("eval_n", sm.get("n")))}
    return {
        "round": r["round"], "replies": r["replies"], "sampled": r["sampled"], "attempts": r["attempts"],
        "validation": _pick(m.get("aggregate") or {"loss": r["loss"], "accuracy": r["accuracy"], "auc": r["auc"]}),
        "test": _pick(test) if test else None,
        # "sites": released by the sites on their fixed test splits during the run (federated.test_every);
        # "final evaluation": the last round's test is the run's final one (``_final_as_last_round``).
        "test_source": "sites" if test else None,
        # Not a test split: ``simulate`` scored this round's checkpoint on the rows it kept from every site.
        "holdout": _pick(holdout) if isinstance(holdout, dict) else None,
        "test_evaluated": bool(status),
        "per_site": per_site, "wall_s": r["wall_s"], "train_s": r["train_s"],
        "communication_s": r["communication_s"], "aggregation_s": r["aggregation_s"],
        "committed_at": r["committed_at"], "t_s": (r["committed_at"] - created) if created else None,
    }


def simulator_overlay(state_dir: Path, run_id: str) -> dict[str, Any]:
    """What ``simulate --out`` adds beside the state (``../result.json``): its held-out rows' scores, baselines."""
    path = state_dir.parent / "result.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("run_id") == run_id else {}


def rounds_doc(reader: StateReader, run_id: str, *, after: int = 0) -> dict[str, Any]:
    """The rounds committed after ``after`` and the run's status: what a live page polls for."""
    run = reader.run(run_id)
    overlay = {int(r["round"]): r for r in simulator_overlay(reader.dir, run_id).get("rounds", [])}
    rows = [_round_row(r, run["created_at"], overlay) for r in reader.rounds(run_id, after)]
    return {"run_id": run_id, "status": run["status"], "rounds_planned": run["rounds_planned"], "rounds": rows,
            "test_every": _test_every(run["experiment"])}


def _privacy(result: dict[str, Any], msgs: list[dict[str, Any]]) -> dict[str, Any]:
    """ε per site with its δ and accountant: the result's ``privacy`` block, else the update log."""
    p = dict(result.get("privacy") or {})
    eps: dict[str, float | None] = {}
    deltas = set()
    for u in msgs:
        if u["kind"] in UPDATE_KINDS and u["verdict"] == "accepted" and u["site"]:
            if u["epsilon"] is not None:
                eps[u["site"]] = max(u["epsilon"], eps.get(u["site"]) or 0.0)
            else:
                eps.setdefault(u["site"], None)
            if u["delta"] is not None:
                deltas.add(u["delta"])
    p.setdefault("epsilon", result.get("epsilon") or eps)
    p.setdefault("delta", deltas.pop() if len(deltas) == 1 else (sorted(deltas) if deltas else None))
    p.setdefault("accountant", None)
    p.setdefault("planned_epsilon", None)
    return p


def _test_every(experiment: dict[str, Any]) -> int:
    """``federated.test_every`` of the experiment as run (0: the test split only at the end)."""
    v = (experiment.get("federated") or {}).get("test_every") if isinstance(experiment, dict) else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else 0


def _final_as_last_round(rounds: list[dict[str, Any]], final: Any, test_every: int) -> None:
    """With ``test_every`` the coordinator skips the last round's test: the final evaluation is it."""
    if not test_every or not rounds or not isinstance(final, dict) or rounds[-1]["test_source"] == "sites":
        return
    last = rounds[-1]
    last["test"], last["test_source"], last["test_evaluated"] = _pick(final), "final evaluation", True
    for site, fm in (final.get("per_site") or {}).items():
        row = last["per_site"].setdefault(site, {"validation": None, "epsilon": None, "n": None})
        row["test"], row["test_status"] = _pick(fm), "released"


def run_doc(reader: StateReader, run_id: str, *, now: float | None = None) -> dict[str, Any]:
    """Everything the run page shows: meta, rounds, per-site table, privacy, rejects, timing, experiment."""
    now = time.time() if now is None else now
    run = reader.run(run_id)
    result = run["result"] or {}
    overlay_doc = simulator_overlay(reader.dir, run_id)
    overlay = {int(r["round"]): r for r in overlay_doc.get("rounds", [])}
    rounds = [_round_row(r, run["created_at"], overlay) for r in reader.rounds(run_id)]
    msgs = reader.messages(run_id)
    test_every = _test_every(run["experiment"])
    _final_as_last_round(rounds, result.get("final"), test_every)
    final = dict(result.get("final") or {})
    if not final and (overlay_doc.get("final") or {}).get("split") == "test":  # the same sites' figures, as simulate saved them
        final = dict(overlay_doc["final"])
    final_sites = final.get("per_site") or {}
    privacy = _privacy({**result, "privacy": {**(overlay_doc.get("privacy") or {}), **(result.get("privacy") or {})}}, msgs)
    if not privacy.get("accountant"):  # the sites' policies fix it (docs/design.md "Trust"); say it when they agree
        named = {((s["hello"] or {}).get("policy") or {}).get("accountant") for s in reader.sites()
                 if s["site_id"] in (run["sites"] or [])}
        privacy["accountant"] = named.pop() if len(named) == 1 else None
    hellos = {sid: s["hello"] for s in reader.sites() if (sid := s["site_id"]) in (run["sites"] or [])}
    trained = {}
    for u in msgs:
        if u["kind"] in UPDATE_KINDS and u["verdict"] == "accepted" and u["site"]:
            trained[u["site"]] = trained.get(u["site"], 0) + 1
    privacy = run_privacy.run_privacy(run, privacy, hellos, trained)
    sites = sorted(set(run["sites"] or []) | set(final_sites) | {u["site"] for u in msgs if u["site"]}
                   | {s for r in rounds for s in r["per_site"]})
    budgets = results.site_budgets(reader.sites(), _dataset_of(run["experiment"]))
    table = []
    for s in sites:
        mine = [u for u in msgs if u["site"] == s]
        updates = [u for u in mine if u["kind"] in UPDATE_KINDS and u["verdict"] == "accepted"]
        fm = final_sites.get(s) or {}
        latest = None if fm else next((r for r in reversed(rounds) if (r["per_site"].get(s) or {}).get("test")), None)
        deltas = {u["delta"] for u in updates if u["delta"] is not None}
        eps = (privacy.get("epsilon") or {}).get(s) if isinstance(privacy.get("epsilon"), dict) else None
        eps = eps if eps is not None else _num(fm.get("epsilon"))
        eps = eps if eps is not None else (privacy.get("lifetime_epsilon") or {}).get(s)
        planned = privacy.get("planned_epsilon")
        row = {
            "site": s, "updates": len(updates),
            # a masked update's row count is inside the masked vector: the coordinator never sees it
            "examples": updates[-1]["num_examples"] if updates and updates[-1]["kind"] != "MaskedUpdate" else None,
            "epsilon": eps, "planned_epsilon": planned.get(s) if isinstance(planned, dict) else None,
            "run_spent_epsilon": (privacy.get("run_spent_epsilon") or {}).get(s),
            "delta": deltas.pop() if len(deltas) == 1 else privacy.get("delta") if not isinstance(privacy.get("delta"), list) else None,
            "budget": budgets.get(s), "budget_left": budgets[s] - eps if budgets.get(s) is not None and eps is not None else None,
            "declined": sum(u["verdict"] == "declined" for u in mine),
            "rejected": sum(u["verdict"] not in NOT_REJECTED for u in mine),
            # while running: the latest per-round test (federated.test_every), else the final evaluation
            "test_round": latest["round"] if latest else None,
            **results.site_block(fm),
        }
        if not fm:
            row["test"] = latest["per_site"][s]["test"] if latest else None
        table.append(row)
    timing = dict(result.get("timing") or {})
    if not timing and rounds:
        timing = {k: sum(r[k] or 0.0 for r in rounds) for k in ("wall_s", "train_s", "communication_s", "aggregation_s")}
    last_val = rounds[-1]["validation"] if rounds else None
    return {
        "run_id": run_id, "status": run["status"], "reason": run["reason"], "aggregator": run["aggregator"],
        "federation": run["federation"], "dataset": _dataset_of(run["experiment"]),
        "experiment_name": (run["experiment"].get("basic_info") or {}).get("name"),
        "description": (run["experiment"].get("basic_info") or {}).get("description"),
        "created_at": run["created_at"], "finished_at": run["finished_at"],
        "duration_s": _duration({**run, "last_commit": rounds[-1]["committed_at"] if rounds else None}, now),
        "rounds_done": len(rounds), "rounds_planned": run["rounds_planned"], "rounds": rounds, "sites": table,
        "test_every": test_every,
        "secure_aggregation": results.secure_of(run["experiment"], result.get("privacy")),
        "personalises": results.personalises(run["experiment"]),
        "final": results.final_doc(final, last_val),
        "holdout": results.holdout_doc(overlay_doc),
        "baselines": result.get("baselines") or overlay_doc.get("baselines"),
        "privacy": privacy,
        "rejected": [{"round": u["round"], "message_id": u["message_id"], "site": u["site"], "kind": u["kind"],
                      "verdict": u["verdict"], "reason": u["reason"], "received_at": u["received_at"]}
                     for u in msgs if u["verdict"] not in NOT_REJECTED],
        "declined": [{"round": u["round"], "site": u["site"], "reason": u["reason"]}
                     for u in msgs if u["verdict"] == "declined"],
        "gaps": list(result.get("gaps") or []),  # the finished run's declined and missed rounds (coordinator.rounds.result)
        "timing": timing, "experiment": run["experiment"],
    }


# -- compare ---------------------------------------------------------------------------
def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """{"training.batch_size": 32, "architecture.layers[1].params.out_features": 64, ...}."""
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(doc, list) and any(isinstance(v, (dict, list)) for v in doc):
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = doc
    return out


_BOOKKEEPING = ("metadata.", "job_config.")  # names and dates, not settings that change a model


def settings_diff(experiments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every setting that differs between the experiments: ``{"key", "path", "values", "text"}``.

    ``text`` reads as in MediNet's step 7: "batch_size 16 → 32". Bookkeeping (metadata,
    job names) comes last.
    """
    flat = [flatten(e) for e in experiments]
    paths = sorted(set().union(*flat), key=lambda p: (p.startswith(_BOOKKEEPING), p))
    out = []
    missing = object()
    for p in paths:
        values = [f.get(p, missing) for f in flat]
        if all(v == values[0] for v in values):
            continue
        shown = ["(absent)" if v is missing else json.dumps(v) if not isinstance(v, str) else v for v in values]
        key = p.rsplit(".", 1)[-1]
        out.append({"key": key, "path": p, "values": [None if v is missing else v for v in values],
                    "text": f"{key} {' → '.join(shown)}", "bookkeeping": p.startswith(_BOOKKEEPING)})
    return out


def compare_doc(reader: StateReader, run_ids: list[str]) -> dict[str, Any]:
    runs = []
    for rid in run_ids:
        d = run_doc(reader, rid)
        runs.append({"run_id": rid, "status": d["status"], "aggregator": d["aggregator"],
                     "rounds": [{"round": r["round"], "validation": r["validation"], "test": r["test"]} for r in d["rounds"]],
                     "final": d["final"], "privacy": d["privacy"], "timing": d["timing"]})
    exps = [reader.run(rid)["experiment"] for rid in run_ids]
    return {"runs": runs, "diff": settings_diff(exps)}
