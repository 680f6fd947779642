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
    assert got["privacy_plan"] == cli["privacy_plan"] and set(got["privacy_plan"]["sites"]) == set(rows)
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
