"""Every ``/api/`` route over a state directory written by real ``fedbus simulate --out`` runs.

Oracles: the coordinator's SQLite database (read here with plain ``sqlite3``), the
checkpoint files and their sha256, and the experiment files the runs were made from.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pytest
from fastapi.testclient import TestClient

from fedbus.dashboard.app import create_app
from fedbus.dashboard.security import Access
from tests.dashboard.conftest import db_rows


def client(state, **kw) -> TestClient:
    access = Access(token=kw.pop("token", None), allow_actions=kw.pop("allow_actions", False),
                    loopback_only=kw.pop("loopback_only", True))
    return TestClient(create_app(state, access=access, **kw), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def api(state) -> TestClient:
    return client(state)


def test_pages_and_index(api):
    assert api.get("/", follow_redirects=False).headers["location"] == "/runs"
    for path in ("/sites", "/runs", "/compare", "/dead-letters", "/runs/anything"):
        r = api.get(path)
        assert r.status_code == 200 and 'name="fedbus-csrf"' in r.text, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
    js = api.get("/static/dashboard.js")
    assert js.status_code == 200 and "FedChart" in js.text


def test_everything_is_served_locally_no_cdn(api):
    """Every script, style and URL the pages name is our own /static file (the SVG namespace aside)."""
    import re
    from pathlib import Path

    page = api.get("/runs").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    static = Path(__file__).resolve().parents[2] / "fedbus" / "dashboard" / "static"
    for f in static.iterdir():
        urls = set(re.findall(r"https?://[^\s\"'`)]+", f.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)
        assert api.get(f"/static/{f.name}").status_code == 200


def test_sites_lists_every_enrolled_site_with_its_reported_epsilon(api, state):
    doc = api.get("/api/sites").json()
    enrolled = {r["site_id"]: r for r in db_rows(state, "SELECT site_id, kid, hello_json FROM sites")}
    assert {s["site_id"] for s in doc["sites"]} == set(enrolled) and len(enrolled) == 3
    latest = {}
    for line in db_rows(state, "SELECT site, epsilon, delta FROM privacy ORDER BY reported_at"):
        latest[line["site"]] = (line["epsilon"], line["delta"])
    for s in doc["sites"]:
        hello = json.loads(enrolled[s["site_id"]]["hello_json"])
        assert s["kid"] == enrolled[s["site_id"]]["kid"]
        assert s["software_version"] == hello["software_version"]
        [ds] = s["datasets"]
        [offered] = hello["datasets"]
        assert (ds["name"], ds["rows"], ds["columns"], ds["target"]) == (
            offered["name"], offered["rows"], len(offered["columns"]), offered["target"])
        assert sum(ds["feature_types"].values()) == len(offered["feature_types"])
        assert (ds["epsilon_spent"], ds["delta"]) == latest[s["site_id"]]
        assert ds["epsilon_spent"] > 0 and ds["delta"] == pytest.approx(1e-5)
        assert isinstance(s["online"], bool) and s["last_seen"] is not None


def test_runs_lists_and_filters_by_status(api, run_ids):
    doc = api.get("/api/runs").json()
    assert sorted(r["run_id"] for r in doc["runs"]) == sorted(run_ids)
    for r in doc["runs"]:
        assert (r["status"], r["aggregator"], r["rounds_done"], r["rounds_planned"]) == ("completed", "FedAvg", 2, 2)
        assert r["duration_s"] > 0 and r["created_at"] < r["finished_at"]
        assert 0 <= r["final"]["accuracy"] <= 1
    assert api.get("/api/runs?status=running").json()["runs"] == []
    assert len(api.get("/api/runs?status=completed").json()["runs"]) == 2
    assert api.get("/api/runs?status=bogus").status_code == 422


def test_run_document_matches_the_database(api, state, run_ids):
    rid = run_ids[0]
    doc = api.get(f"/api/runs/{rid}").json()
    rounds = db_rows(state, "SELECT round, accuracy, loss, metrics_json FROM rounds WHERE run_id=? ORDER BY round", (rid,))
    assert [r["round"] for r in doc["rounds"]] == [r["round"] for r in rounds] == [1, 2]
    for got, row in zip(doc["rounds"], rounds):
        assert got["validation"]["accuracy"] == row["accuracy"] and got["validation"]["loss"] == row["loss"]
        per_site = json.loads(row["metrics_json"])["per_site"]
        assert set(got["per_site"]) == set(per_site)
        for site, m in per_site.items():
            assert got["per_site"][site]["validation"]["accuracy"] == m["eval_accuracy"]
    eps = {r["site"]: r["e"] for r in db_rows(state, "SELECT site, MAX(epsilon) AS e FROM privacy WHERE run_id=? GROUP BY site", (rid,))}
    assert {s["site"]: s["epsilon"] for s in doc["sites"]} == eps
    assert doc["privacy"]["delta"] == pytest.approx(1e-5)
    assert {s["site"]: s["updates"] for s in doc["sites"]} == {s: 2 for s in eps}
    assert doc["experiment"]["training"]["batch_size"] == 32
    assert set(doc["timing"]) >= {"wall_s", "train_s", "communication_s", "aggregation_s"}
    assert doc["rejected"] == [] and doc["final"]["test"]["accuracy"] is not None
    assert doc["audit"] is None and doc["approvals"] == []
    assert api.get("/api/runs/no-such-run").status_code == 404


def test_rounds_after_returns_only_newer_rounds(api, run_ids):
    doc = api.get(f"/api/runs/{run_ids[0]}/rounds?after=1").json()
    assert [r["round"] for r in doc["rounds"]] == [2] and doc["status"] == "completed"
    assert api.get(f"/api/runs/{run_ids[0]}/rounds?after=2").json()["rounds"] == []


def test_exports(api, state, run_ids):
    rid = run_ids[1]
    exp = api.get(f"/api/runs/{rid}/export/experiment.json").json()
    assert exp["metadata"]["fedbus_run_id"] == rid and exp["training"]["batch_size"] == 16
    model = api.get(f"/api/runs/{rid}/export/model.safetensors")
    [row] = db_rows(state, "SELECT checkpoint_sha256 FROM rounds WHERE run_id=? AND round=2", (rid,))
    assert hashlib.sha256(model.content).hexdigest() == row["checkpoint_sha256"] == model.headers["x-checkpoint-sha256"]
    rows = list(csv.DictReader(io.StringIO(api.get(f"/api/runs/{rid}/export/metrics.csv").text)))
    assert [int(r["round"]) for r in rows] == [1, 2]


def test_compare_shows_the_settings_diff(api, run_ids):
    doc = api.get(f"/api/compare?runs={run_ids[0]},{run_ids[1]}").json()
    texts = [d["text"] for d in doc["diff"] if not d["bookkeeping"]]
    assert "batch_size 32 → 16" in texts
    assert [r["run_id"] for r in doc["runs"]] == run_ids[:2] and all(len(r["rounds"]) == 2 for r in doc["runs"])
    assert api.get(f"/api/compare?runs={run_ids[0]}").status_code == 400
    assert api.get(f"/api/compare?runs={run_ids[0]},nope").status_code == 404


def test_dead_letters_say_why_they_are_unavailable(state):
    assert "no broker configured" in client(state).get("/api/dead-letters").json()["reason"]
    doc = client(state, broker="amqp://guest:guest@127.0.0.1:1/%2F").get("/api/dead-letters").json()
    assert doc["available"] is False and doc["reason"].startswith("broker unreachable")


def test_audit_runs_on_a_read_only_server(api, run_ids):
    csrf = api.app.state.access.csrf
    r = api.post(f"/api/runs/{run_ids[0]}/audit", headers={"X-Fedbus-CSRF": csrf})
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["signatures_verified"] >= 6
    assert api.get(f"/api/runs/{run_ids[0]}").json()["audit"]["ok"] is True


def test_experiments_listing(api):
    assert api.get("/api/experiments").json()["experiments"] == []
    assert api.get("/api/session").json()["actions_allowed"] is False


def _site_tomls(sim_out) -> dict[str, dict]:
    """The site.toml each simulated hospital ran with (the newest simulate's), by site id."""
    import tomllib

    out = {}
    for path in sorted(sim_out.glob("work/*/sites/*/site.toml"), key=lambda p: p.stat().st_mtime):
        doc = tomllib.loads(path.read_text())
        out[doc["site_id"]] = doc
    return out


def test_rounds_carry_test_per_site_when_the_run_asks_for_it(api, state, run_ids):
    """Run B has ``federated.test_every`` 1: each round but the last holds the sites' own test scores,
    the last one is the final evaluation; run A (off) says so and holds no per-site test."""
    a, b = run_ids[:2]
    rows = db_rows(state, "SELECT round, metrics_json FROM rounds WHERE run_id=? ORDER BY round", (b,))
    [final_row] = db_rows(state, "SELECT result_json FROM runs WHERE run_id=?", (b,))
    final = json.loads(final_row["result_json"])["final"]
    doc = api.get(f"/api/runs/{b}/rounds").json()
    assert doc["test_every"] == 1 and [r["round"] for r in doc["rounds"]] == [1, 2]
    first, m = doc["rounds"][0], json.loads(rows[0]["metrics_json"])
    assert first["test_source"] == "sites" and first["test_evaluated"] is True
    assert first["test"] == {k: m["test"][k] for k in ("loss", "accuracy", "auc", "f1")}
    assert set(m["test_status"]) == set(first["per_site"]) and len(m["test_status"]) == 3
    for site, row in first["per_site"].items():
        assert row["test_status"] == m["test_status"][site] == "released"
        sm = m["per_site"][site]
        assert {k: row["test"][k] for k in ("loss", "accuracy", "auc", "f1")} == {
            k: sm[f"test_{k}"] for k in ("loss", "accuracy", "auc", "f1")}
        # each released figure's 95 % interval rides with it onto the curve (a whisker) and the tables
        assert row["test"]["ci"] == {k: [sm[f"test_{k}_lo"], sm[f"test_{k}_hi"]] for k in ("accuracy", "auc", "f1")
                                     if f"test_{k}_lo" in sm}
        assert row["test"]["ci"]["accuracy"][0] <= row["test"]["accuracy"] <= row["test"]["ci"]["accuracy"][1]
        assert row["validation"]["accuracy"] == m["per_site"][site]["eval_accuracy"]
    assert "test_status" not in json.loads(rows[1]["metrics_json"])  # the last round is the final evaluation
    last = api.get(f"/api/runs/{b}").json()["rounds"][-1]
    assert last["test_source"] == "final evaluation" and last["test"]["accuracy"] == final["accuracy"]
    assert {s: r["test"]["accuracy"] for s, r in last["per_site"].items()} == {
        s: v["accuracy"] for s, v in final["per_site"].items()}

    off = api.get(f"/api/runs/{a}").json()
    assert off["test_every"] == 0
    for r in off["rounds"]:
        assert r["test_evaluated"] is False and r["test_source"] is None
        assert all(s["test"] is None and s["test_status"] is None for s in r["per_site"].values())


def test_every_site_announces_its_budget_in_its_hello(api, state, sim_out):
    """Simulated sites say hello through the daemon's code: ledger ε spent, budget, δ, accountant per dataset."""
    tomls = _site_tomls(sim_out)
    doc = api.get("/api/sites").json()
    hellos = {r["site_id"]: json.loads(r["hello_json"]) for r in db_rows(state, "SELECT site_id, hello_json FROM sites")}
    assert set(tomls) == set(hellos) == {s["site_id"] for s in doc["sites"]}
    for s in doc["sites"]:
        [said] = hellos[s["site_id"]]["datasets"]
        [ds] = s["datasets"]
        policy = tomls[s["site_id"]]["policy"]
        assert said["max_epsilon"] == policy["max_epsilon"] == ds["budget"] > 0
        assert said["accountant"] == ds["accountant"] == hellos[s["site_id"]]["policy"]["accountant"]
        assert said["epsilon_spent"] == 0.0  # a fresh site's ledger when it said hello, before the run
        assert said["delta"] == pytest.approx(ds["delta"])
        assert ds["epsilon_source"] == "its latest update"  # the run's updates are newer than the hello
        assert ds["budget_left"] == pytest.approx(ds["budget"] - ds["epsilon_spent"]) and ds["budget_left"] >= 0


def test_a_restarted_sites_hello_is_newer_than_its_updates(sim_out, tmp_path):
    """A daemon that restarts after the run says hello with its ledger's total: the sites page shows that."""
    import shutil

    from coordinator.registry import hello_to_dict
    from coordinator.state import StateStore
    from protocol.transport import open_bus
    from site_worker.config import load_site_config
    from site_worker.daemon import SiteWorker
    from site_worker.ledger import PrivacyLedger

    out = tmp_path / "out"
    shutil.copytree(sim_out, out, symlinks=True)
    tomls = sorted(sim_out.glob("work/*/sites/*/site.toml"), key=lambda p: p.stat().st_mtime)[-3:]
    store = StateStore(out / "coordinator")
    spent = {}
    for toml in tomls:
        cfg = load_site_config(toml)
        worker = SiteWorker(cfg, bus=open_bus(f"memory://restart-{cfg.site_id}"))
        hello = worker.hello()  # the daemon's own hello, from its ledger on disk
        [info] = hello.datasets
        spent[cfg.site_id] = PrivacyLedger(cfg.state_dir).spent(info.name, delta=info.delta)
        store.record_hello(cfg.site_id, hello_to_dict(hello))
    store.close()
    doc = client(out / "coordinator").get("/api/sites").json()
    for s in doc["sites"]:
        [ds] = s["datasets"]
        assert ds["epsilon_source"] == "its hello"
        assert ds["epsilon_spent"] == pytest.approx(spent[s["site_id"]]) and ds["epsilon_spent"] > 0
        assert ds["budget_left"] == pytest.approx(ds["budget"] - ds["epsilon_spent"])


def _stored_final(state, run_id: str) -> dict:
    [row] = db_rows(state, "SELECT result_json FROM runs WHERE run_id=?", (run_id,))
    return json.loads(row["result_json"])["final"]


def test_final_is_the_sites_test_split_with_baselines_and_personalised_models(api, state, run_ids):
    """Run B personalises: every figure of the run page's headline and per-site table is the stored
    ``final`` (the sites' own test splits), never the simulator's held-out rows."""
    b = run_ids[1]
    final = _stored_final(state, b)
    assert final["split"] == "test" and set(final["per_site"]) and final["personalized"]
    doc = api.get(f"/api/runs/{b}").json()
    f = doc["final"]
    assert "test split" in f["source"] and "held-out" not in f["source"] and f["split"] == "test"
    assert f["test"]["accuracy"] == final["accuracy"] and f["test"]["auc"] == final["auc"]
    assert f["test"]["sensitivity"] == final["sensitivity"] and f["n_test"] == final["n_test"]
    # The headline baseline: the sites' baselines weighted by their test rows, labelled so.
    per = final["per_site"]
    weighted = sum(m["majority_class_accuracy"] * m["n_test"] for m in per.values()) / sum(m["n_test"] for m in per.values())
    assert f["majority_class_accuracy"] == pytest.approx(weighted) == pytest.approx(final["majority_class_accuracy"])
    assert "weighted by test rows" in f["majority_basis"]
    assert f["personalized"]["accuracy"] == final["personalized"]["accuracy"]
    assert f["personalized"]["auc"] == final["personalized"]["auc"] and f["personalized"]["method"] == final["personalized"]["method"]
    assert doc["personalises"] is True
    rows = {s["site"]: s for s in doc["sites"]}
    assert set(rows) == set(per)
    for site, m in per.items():
        row = rows[site]
        assert row["test"]["accuracy"] == m["accuracy"] and row["test"]["auc"] == m["auc"]
        assert (row["test"]["sensitivity"], row["test"]["specificity"]) == (m.get("sensitivity"), m.get("specificity"))
        assert row["majority_class_accuracy"] == m["majority_class_accuracy"] and row["n_test"] == m["n_test"]
        assert row["personalized"]["accuracy"] == m["personalized"]["accuracy"]
        assert row["personalized"]["auc"] == m["personalized"]["auc"]
        assert row["personalized"]["n_test"] == m["personalized"]["n_test"]
    # The runs list puts the same baseline beside the same accuracy.
    [listed] = [r for r in api.get("/api/runs").json()["runs"] if r["run_id"] == b]
    assert listed["final"]["accuracy"] == final["accuracy"]
    assert listed["final"]["majority_class_accuracy"] == pytest.approx(weighted)


def test_a_run_without_personalisation_has_no_personalised_figures(api, state, run_ids):
    a = run_ids[0]
    final = _stored_final(state, a)
    doc = api.get(f"/api/runs/{a}").json()
    assert doc["personalises"] is False and doc["final"]["personalized"] is None and "personalized" not in final
    assert all(s["personalized"] is None for s in doc["sites"])
    assert {s["site"]: s["majority_class_accuracy"] for s in doc["sites"]} == {
        s: m["majority_class_accuracy"] for s, m in final["per_site"].items()}


def test_held_out_rows_are_labelled_held_out_and_never_test(api, state, sim_out, run_ids, tmp_path):
    """``simulate``'s extra rows (``holdout`` in its result.json, ``rounds[i].holdout``) come back under
    ``holdout`` only; the rounds' ``test`` is what the sites released on their own splits."""
    a, b = run_ids[:2]
    sim = json.loads((sim_out / "result.json").read_text())
    assert sim["run_id"] == b and sim["holdout"]["accuracy"] is not None
    doc = api.get(f"/api/runs/{b}").json()
    h = doc["holdout"]
    assert "held-out" in h["source"] and "not any site's test split" in h["source"]
    assert h["metrics"]["accuracy"] == sim["holdout"]["accuracy"] and h["n"] == sim["holdout"]["n_test"]
    assert h["personalized"]["accuracy"] == sim["holdout"]["personalized"]["accuracy"]
    stored = db_rows(state, "SELECT round, metrics_json FROM rounds WHERE run_id=? ORDER BY round", (b,))
    for got, want, row in zip(doc["rounds"], sim["rounds"], stored):
        assert got["holdout"] == {k: want["holdout"][k] for k in ("loss", "accuracy", "auc", "f1")}
        m = json.loads(row["metrics_json"])
        if "test" in m:  # a round the sites scored on their test splits
            assert got["test"] == {k: m["test"][k] for k in ("loss", "accuracy", "auc", "f1")} != got["holdout"]
    # Run A had no per-round test (test_every 0). Where its simulate's result.json sits beside the state
    # (as when it was the latest simulate), its rounds show that file's held-out scores as held-out, no test.
    import shutil

    sim_a = json.loads((sim_out / f"result-{a}.json").read_text())
    assert all(r.get("holdout") for r in sim_a["rounds"]) and "test" not in sim_a["rounds"][0]
    out = tmp_path / "out"
    shutil.copytree(sim_out, out, symlinks=True)
    (out / "result.json").write_text(json.dumps(sim_a))
    doc_a = client(out / "coordinator").get(f"/api/runs/{a}").json()
    assert [r["holdout"] for r in doc_a["rounds"]] == [
        {k: r["holdout"][k] for k in ("loss", "accuracy", "auc", "f1")} for r in sim_a["rounds"]]
    assert all(r["test"] is None and r["test_source"] is None for r in doc_a["rounds"])
    assert doc_a["holdout"]["metrics"]["accuracy"] == sim_a["holdout"]["accuracy"]
    assert doc_a["final"]["test"]["accuracy"] == _stored_final(state, a)["accuracy"]
    assert "held-out" not in doc_a["final"]["source"] and "held-out" in doc_a["holdout"]["source"]


def test_epsilon_comes_with_delta_and_the_sites_budget(api, state, sim_out, run_ids):
    tomls = _site_tomls(sim_out)
    for rid in run_ids[:2]:
        doc = api.get(f"/api/runs/{rid}").json()
        deltas = {r["site"]: r["delta"] for r in db_rows(
            state, "SELECT site, delta FROM updates WHERE run_id=? AND kind='Update' AND verdict='accepted'", (rid,))}
        for s in doc["sites"]:
            assert s["budget"] == tomls[s["site"]]["policy"]["max_epsilon"] > 0
            assert s["delta"] == deltas[s["site"]] == pytest.approx(1e-5)
            assert s["budget_left"] == pytest.approx(s["budget"] - s["epsilon"])


def test_a_site_whose_model_predicts_one_class_is_flagged(state, sim_out, run_ids, tmp_path):
    """The warning follows the stored figures: a copy of the state where one site's stored result says
    its model predicts one class (its flag, or specificity 0) flags that site, and only it."""
    import shutil
    import sqlite3

    b = run_ids[1]
    clean = client(state).get(f"/api/runs/{b}").json()
    assert clean["final"]["one_class"] == {} and all(s["one_class"] is None for s in clean["sites"])
    out = tmp_path / "out"
    shutil.copytree(sim_out, out, symlinks=True)
    db = sqlite3.connect(out / "coordinator" / "coordinator.db")
    result = json.loads(db.execute("SELECT result_json FROM runs WHERE run_id=?", (b,)).fetchone()[0])
    first, second = sorted(result["final"]["per_site"])[:2]
    result["final"]["per_site"][first]["predicts_one_class"] = True
    result["final"]["per_site"][second].pop("predicts_one_class", None)
    result["final"]["per_site"][second]["personalized"]["specificity"] = 0.0
    result["final"]["per_site"][second]["personalized"].pop("predicts_one_class", None)
    db.execute("UPDATE runs SET result_json=? WHERE run_id=?", (json.dumps(result), b))
    db.commit()
    db.close()
    doc = client(out / "coordinator").get(f"/api/runs/{b}").json()
    assert set(doc["final"]["one_class"]) == {first}
    rows = {s["site"]: s for s in doc["sites"]}
    assert "same class" in rows[first]["one_class"] and rows[first]["personalized"]["one_class"] is None
    assert rows[second]["one_class"] is None and "specificity 0" in rows[second]["personalized"]["one_class"]
    assert all(r["one_class"] is None for s, r in rows.items() if s not in (first, second))
