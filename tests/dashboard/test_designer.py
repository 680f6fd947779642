"""The model designer's JSON endpoints: the same check as ``fedbus config validate`` (compared with the CLI's
own output), each site's ε plan from the catalogue, saving into STATE/experiments/ under a name the server
makes, and refusals (viewer, read-only, invalid, an existing file)."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from fedbus.dashboard.app import create_app
from fedbus.dashboard.security import Access
from fedbus.dashboard.users import MIN_PASSWORD, UsersFile
from protocol.layers import LAYER_TYPES
from tests.dashboard.conftest import db_rows, fedbus

PASSWORD = "p" * MIN_PASSWORD


@pytest.fixture()
def fresh(sim_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sim_out, out)
    # other tests act on the shared simulation (as 'local', the token's user): start this one's log empty
    (out / "coordinator" / "dashboard-actions.jsonl").unlink(missing_ok=True)
    return out / "coordinator"


def _client(state, tmp_path, role: str, *, allow_actions: bool = True) -> TestClient:
    users = UsersFile(tmp_path / f"users-{role}.json")
    users.add(f"{role}-1", role, PASSWORD)
    c = TestClient(create_app(state, access=Access(token=None, allow_actions=allow_actions, loopback_only=True, users=users)),
                   base_url="http://127.0.0.1")
    assert c.post("/login", data={"user": f"{role}-1", "password": PASSWORD}, follow_redirects=False).status_code == 303
    c.headers["X-Fedbus-CSRF"] = c.app.state.access.csrf
    return c


def test_the_designer_checks_as_config_validate_does(fresh, tmp_path):
    c = _client(fresh, tmp_path, "researcher")
    meta = c.get("/api/designer").json()
    assert set(meta["palette"]) == set(LAYER_TYPES) and set(meta["templates"]) == {"logistic", "mlp", "ecg_cnn"}
    hellos = {r["site_id"]: json.loads(r["hello_json"]) for r in db_rows(fresh, "SELECT site_id, hello_json FROM sites")}
    rows = {s: h["datasets"][0]["rows"] for s, h in hellos.items()}
    assert meta["catalogue"]["heart_failure"]["sites"] == rows
    doc = c.get("/api/designer/template", params={"kind": "mlp", "dataset": "heart_failure"}).json()
    got = c.post("/api/designer/check", json={"experiment": doc}).json()
    assert got["valid"], got
    path = tmp_path / "designed.json"
    path.write_text(json.dumps(doc))
    (tmp_path / "cat.json").write_text(json.dumps(rows))
    cli = json.loads(fedbus("config", "validate", str(path), "--json", "--catalogue", str(tmp_path / "cat.json")).stdout)
    assert got["parameters"] == cli["parameters"] and got["layers"] == cli["layers"]
    from coordinator.privacy_plan import plan
    from protocol.config import load_experiment

    assert got["privacy_plan"] == plan(load_experiment(doc), hellos) and set(got["privacy_plan"]["sites"]) == set(rows)
    # Adding a layer changes the count by exactly its weights (Linear 32 -> 8 before the output: 32*8+8, 8*1+1 vs 32*1+1).
    bigger = json.loads(json.dumps(doc))
    bigger["architecture"]["layers"].insert(-2, {"name": "Linear", "type": "Linear", "params": {"out_features": 8}})
    assert c.post("/api/designer/check", json={"experiment": bigger}).json()["parameters"] == got["parameters"] + 32 * 8 + 8 + 9 - 33


def test_an_invalid_layer_is_named_at_its_edge(fresh, tmp_path):
    c = _client(fresh, tmp_path, "researcher")
    doc = c.get("/api/designer/template", params={"kind": "logistic", "dataset": "heart_failure"}).json()
    doc["architecture"]["layers"].insert(1, {"name": "Dropout", "type": "Dropout", "params": {"p": 1.0}})
    bad = c.post("/api/designer/check", json={"experiment": doc}).json()
    assert bad["valid"] is False and bad["error"]["path"].startswith("architecture.layers[1]")
    doc["architecture"]["layers"][1]["params"]["p"] = 0.99  # just inside
    assert c.post("/api/designer/check", json={"experiment": doc}).json()["valid"] is True
    doc["architecture"]["layers"][1]["type"] = "Conv2d"
    assert "not an allowed layer type" in c.post("/api/designer/check", json={"experiment": doc}).json()["error"]["message"]


def test_save_writes_a_validated_file_under_a_server_made_name(fresh, tmp_path):
    c = _client(fresh, tmp_path, "researcher")
    doc = c.get("/api/designer/template", params={"kind": "logistic", "dataset": "heart_failure"}).json()
    doc["basic_info"]["name"] = "../../escape me"
    r = c.post("/api/designer/save", json={"experiment": doc})
    assert r.status_code == 200 and r.json()["saved"] == "escape-me.json", r.text
    saved = fresh / "experiments" / "escape-me.json"
    assert json.loads(saved.read_text()) == doc and not (fresh.parent.parent / "escape me.json").exists()
    assert c.post("/api/designer/save", json={"experiment": doc}).status_code == 409  # never overwritten unasked
    doc["architecture"]["layers"][1]["params"]["out_features"] = 0
    doc["basic_info"]["name"] = "broken"
    r = c.post("/api/designer/save", json={"experiment": doc})
    assert r.status_code == 400 and "architecture.layers[1]" in r.json()["error"] and not (fresh / "experiments" / "broken.json").exists()
    log = [json.loads(x) for x in (fresh / "dashboard-actions.jsonl").read_text().splitlines()]
    assert [(x["user"], x["action"], x["status"]) for x in log] == [("researcher-1", "design", 200), ("researcher-1", "design", 409),
                                                                    ("researcher-1", "design", 400)]


@pytest.mark.parametrize("role,allow", [("viewer", True), ("approver", True), ("researcher", False)])
def test_viewers_approvers_and_read_only_dashboards_cannot_save_or_start(fresh, tmp_path, role, allow):
    c = _client(fresh, tmp_path, role, allow_actions=allow)
    doc = c.get("/api/designer/template", params={"kind": "mlp", "dataset": "heart_failure"}).json()
    assert c.post("/api/designer/check", json={"experiment": doc}).json()["valid"]  # checking changes nothing: allowed
    assert c.post("/api/designer/save", json={"experiment": doc}).status_code == 403
    assert c.post("/api/runs/start", json={"experiment": "x.json"}).status_code == 403
    assert not (fresh / "experiments").exists()


def _announce(state, site: str, **policy) -> None:
    """Change what ``site``'s stored hello announced about its policy (the state a later hello would leave)."""
    import sqlite3

    db = sqlite3.connect(state / "coordinator.db")
    try:
        hello = json.loads(db.execute("SELECT hello_json FROM sites WHERE site_id=?", (site,)).fetchone()[0])
        hello["policy"] = {**(hello.get("policy") or {}), **policy}
        db.execute("UPDATE sites SET hello_json=? WHERE site_id=?", (json.dumps(hello), site))
        db.commit()
    finally:
        db.close()


def test_the_eps_plan_is_each_sites_own_from_its_announced_policy(fresh, tmp_path):
    """The designer plans each site with the policy its hello announced (the run's own plan before round 1),
    not the site defaults: a site's own δ shows, and its sample-rate cap declines at its edge."""
    c = _client(fresh, tmp_path, "researcher")
    doc = c.get("/api/designer/template", params={"kind": "logistic", "dataset": "heart_failure"}).json()
    before = c.post("/api/designer/check", json={"experiment": doc}).json()["privacy_plan"]["sites"]
    site, other = sorted(before)[:2]
    rate = before[site]["sample_rate"]
    _announce(fresh, site, delta=5e-5, max_sample_rate=rate)  # just inside its cap: the site runs it, at its own δ
    after = c.post("/api/designer/check", json={"experiment": doc}).json()["privacy_plan"]["sites"]
    assert "planned_epsilon" in after[site], after[site]
    assert after[site]["delta"] == 5e-5 and after[site]["planned_epsilon"] == pytest.approx(doc["training"]["optimizer"][
        "differential_privacy"]["total_epsilon"], rel=1e-3)
    assert after[site]["noise_multiplier"] < before[site]["noise_multiplier"]  # the same ε at a larger δ needs less noise
    assert after[other] == before[other]
    for policy, word in (({"max_sample_rate": rate * 0.999}, "max_sample_rate"), ({"delta": 1e-7, "max_sample_rate": rate}, "delta")):
        _announce(fresh, site, **policy)  # just outside: the site would decline, and the plan says why
        declined = c.post("/api/designer/check", json={"experiment": doc}).json()["privacy_plan"]["sites"][site]
        assert "planned_epsilon" not in declined and "declines" in declined["error"] and word in declined["error"], declined


def test_tabular_templates_leave_out_the_columns_that_leak_the_outcome(fresh, tmp_path):
    """heart_failure's follow-up ``time`` (known only after the outcome) is not a template feature, and the
    description says why; every other column but the target is; a researcher who asks for it gets it."""
    c = _client(fresh, tmp_path, "researcher")
    cat = c.get("/api/designer").json()["catalogue"]["heart_failure"]
    assert "time" in cat["columns"]
    for kind in ("logistic", "mlp"):
        doc = c.get("/api/designer/template", params={"kind": kind, "dataset": "heart_failure"}).json()
        assert doc["dataset"]["features"] == [x for x in cat["columns"] if x not in (cat["target"], "time")], kind
        assert "left out as outcome leaks: time (a follow-up / time-to-event duration" in doc["basic_info"]["description"]
        assert doc["architecture"]["layers"][0]["params"]["features"] == len(doc["dataset"]["features"])
        assert c.post("/api/designer/check", json={"experiment": doc}).json()["valid"]
    asked = c.get("/api/designer/template", params={"kind": "logistic", "dataset": "heart_failure", "features": "age,time"}).json()
    assert asked["dataset"]["features"] == ["age", "time"] and "left out" not in asked["basic_info"]["description"]
