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
        assert row["test"] == {k: m["per_site"][site][f"test_{k}"] for k in ("loss", "accuracy", "auc", "f1")}
        assert row["validation"]["accuracy"] == m["per_site"][site]["eval_accuracy"]
    assert "test_status" not in json.loads(rows[1]["metrics_json"])  # the last round is the final evaluation
    last = api.get(f"/api/runs/{b}").json()["rounds"][-1]
    assert last["test_source"] == "final evaluation" and last["test"]["accuracy"] == final["accuracy"]
    assert {s: r["test"]["accuracy"] for s, r in last["per_site"].items()} == {
        s: v["accuracy"] for s, v in final["per_site"].items()}

    off = api.get(f"/api/runs/{a}").json()
    assert off["test_every"] == 0
    for r in off["rounds"]:
        assert r["test_evaluated"] is False and r["test_source"] in (None, "simulator")
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
