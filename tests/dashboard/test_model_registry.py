"""The model registry: ``models register`` / "Mark valid" make a signed entry whose every field comes from
the state database; ``audit`` reports a tampered entry; list/show/export; the model card; MLflow's registry."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3

import pytest

from coordinator.approvals import canonical
from protocol.signing import Signer
from tests.dashboard.conftest import db_rows, fedbus


@pytest.fixture()
def fresh(sim_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sim_out, out)
    return out / "coordinator"


def _register(state, run_id, *extra, check=True):
    r = fedbus("coordinator", "models", "register", run_id, "--state", str(state), "--approved-by", "ada", *extra,
               "--json", check=check, timeout=180)
    return r if not check else json.loads(r.stdout)


def _audit(state, run_id):
    r = fedbus("coordinator", "audit", run_id, "--state", str(state), "--json", check=False, timeout=120)
    return r.returncode, json.loads(r.stdout)


def test_register_signs_an_entry_from_the_database_and_audit_verifies_it(fresh, run_ids, tmp_path):
    rid = run_ids[0]
    out = _register(fresh, rid, "--name", "heart-mlp")
    rec = out["registry"]
    [run] = db_rows(fresh, "SELECT experiment_json, result_json, coordinator_kid FROM runs WHERE run_id=?", (rid,))
    [last] = db_rows(fresh, "SELECT round, checkpoint_path, checkpoint_sha256 FROM rounds WHERE run_id=? ORDER BY round DESC LIMIT 1", (rid,))
    result = json.loads(run["result_json"])
    assert (rec["name"], rec["version"], rec["run_id"], rec["approved_by"]) == ("heart-mlp", 1, rid, "ada")
    assert (rec["round"], rec["checkpoint"], rec["checkpoint_sha256"]) == (last["round"], last["checkpoint_path"], last["checkpoint_sha256"])
    assert hashlib.sha256((fresh / rec["checkpoint"]).read_bytes()).hexdigest() == rec["checkpoint_sha256"]
    assert rec["experiment_sha256"] == hashlib.sha256(canonical(json.loads(run["experiment_json"]))).hexdigest()
    assert rec["privacy"]["epsilon"] == result["privacy"]["epsilon"] and rec["privacy"]["delta"] == result["privacy"]["delta"]
    assert rec["privacy"]["accountant"] == result["privacy"]["accountant"]
    fin = result["final"]
    assert rec["metrics"]["overall"]["accuracy"] == {"value": fin["accuracy"], "ci95": fin["ci"]["accuracy"]}
    for site, m in fin["per_site"].items():
        assert rec["metrics"]["per_site"][site]["accuracy"]["ci95"] == m["ci"]["accuracy"]
    assert rec["coordinator_kid"] == run["coordinator_kid"]
    code, report = _audit(fresh, rid)
    assert code == 0 and report["registry_entries_verified"] == 1 and report["approvals_verified"] == 1
    # a second registration is version 2; list, show and export read them back
    assert _register(fresh, rid, "--name", "heart-mlp")["registry"]["version"] == 2
    listed = json.loads(fedbus("coordinator", "models", "list", "--state", str(fresh), "--json").stdout)["models"]
    assert [(m["name"], m["version"]) for m in listed] == [("heart-mlp", 1), ("heart-mlp", 2)]
    shown = json.loads(fedbus("coordinator", "models", "show", "heart-mlp", "--version", "1", "--state", str(fresh), "--json").stdout)
    assert shown["verified"] is True and shown["version"] == 1
    files = json.loads(fedbus("coordinator", "models", "export", "heart-mlp", "--state", str(fresh), "--out",
                              str(tmp_path / "exp"), "--json").stdout)
    from pathlib import Path

    assert hashlib.sha256(Path(files["model"]).read_bytes()).hexdigest() == rec["checkpoint_sha256"]
    md, page = Path(files["card_md"]).read_text(), Path(files["card_html"]).read_text()
    for title in ("Intended use", "Data", "Performance", "Privacy", "Limitations", "Audit trail"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in page
    assert "Cohort" not in md  # no cohort release in this state: the section is left out
    assert "the signature verifies" in md and "ada" in md and rec["checkpoint_sha256"] in md
    assert f"{100 * fin['accuracy']:.1f} % (95 % CI {100 * fin['ci']['accuracy'][0]:.1f}–{100 * fin['ci']['accuracy'][1]:.1f} %)" in md
    small = [s for s, m in fin["per_site"].items() if m["n_test"] < 30]
    assert all(f"{s}: {fin['per_site'][s]['n_test']} test rows" in md for s in small)


def _entry(state, name="heart-mlp", version=1):
    return state / "models" / name / f"v{version}.json"


def test_a_tampered_entry_fails_the_audit(fresh, run_ids):
    rid = run_ids[0]
    _register(fresh, rid, "--name", "heart-mlp")
    path = _entry(fresh)
    kept = path.read_text()
    doc = json.loads(kept)
    doc["record"]["metrics"]["overall"]["accuracy"]["value"] = 0.99
    path.write_text(json.dumps(doc))
    code, report = _audit(fresh, rid)
    assert code == 1 and any("registry entry heart-mlp v1" in p and "changed after signing" in p for p in report["problems"])
    shown = fedbus("coordinator", "models", "show", "heart-mlp", "--state", str(fresh), "--json", check=False)
    assert shown.returncode == 1 and json.loads(shown.stdout)["verified"] is False
    # re-signed by another key: the signature holds, the key is not the run's coordinator's
    other = Signer.generate()
    doc["record"]["coordinator_kid"] = other.kid
    doc.update(kid=other.kid, public_pem=other.public_pem().decode(),
               signature=base64.b64encode(other.sign(canonical(doc["record"]))).decode())
    path.write_text(json.dumps(doc))
    code, report = _audit(fresh, rid)
    assert code == 1 and any("coordinator key" in p for p in report["problems"])
    # a valid entry copied under another version's name
    path.write_text(kept)
    shutil.copy(path, _entry(fresh, version=2))
    code, report = _audit(fresh, rid)
    assert code == 1 and any("v1" in p and "not the file it is stored in" in p for p in report["problems"])
    _entry(fresh, version=2).unlink()
    assert _audit(fresh, rid)[0] == 0


def test_register_refuses_bad_input_in_one_line(fresh, run_ids):
    for args, word in ((("--name", "../etc"), "model name"), (("--name", "x" * 101), "model name")):
        r = _register(fresh, run_ids[0], *args, check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
    assert _register(fresh, run_ids[0], "--name", "x" * 100)["registry"]["name"] == "x" * 100  # just inside
    db = sqlite3.connect(fresh / "coordinator.db")
    db.execute("UPDATE runs SET status='running' WHERE run_id=?", (run_ids[1],))
    db.commit()
    db.close()
    r = _register(fresh, run_ids[1], "--name", "b", check=False)
    assert r.returncode == 2 and "once the run has finished" in r.stderr and not (fresh / "models" / "b").exists()
    r = _register(fresh, "no-such-run", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_register_into_mlflows_model_registry(fresh, run_ids, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    rec = _register(fresh, run_ids[0], "--name", "heart-mlp", "--mlflow", uri)["registry"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [mv] = client.search_model_versions("name='heart-mlp'")
    assert mv.tags["fedbus.checkpoint_sha256"] == rec["checkpoint_sha256"] and mv.tags["fedbus.version"] == "1"
    assert mv.tags["fedbus.approved_by"] == "ada" and mv.tags["fedbus.run_id"] == run_ids[0]
    run = client.get_run(mv.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(rec["metrics"]["overall"]["accuracy"]["value"])
    local = client.download_artifacts(mv.run_id, "model", str(tmp_path / "dl"))
    from pathlib import Path

    [ck] = list(Path(local).iterdir())
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == rec["checkpoint_sha256"]


def test_mark_valid_on_a_dashboard_served_with_mlflow_registers_there_too(fresh, run_ids, tmp_path):
    """``coordinator serve --mlflow URI``: the approver's "Mark valid" makes the signed entry and the same
    version in MLflow's model registry (read back with MlflowClient); a dashboard without it registers
    nothing there; a bad URI is refused when the dashboard starts, one line and exit 2."""
    pytest.importorskip("mlflow")
    from fastapi.testclient import TestClient
    from mlflow.tracking import MlflowClient

    from fedbus.dashboard.app import create_app
    from fedbus.dashboard.security import Access
    from fedbus.dashboard.server import ServeError, ServeOptions, build
    from fedbus.dashboard.users import MIN_PASSWORD, UsersFile

    users = UsersFile(tmp_path / "users.json")
    users.add("alan", "approver", "a" * MIN_PASSWORD)
    uri = (tmp_path / "mlruns").as_uri()

    def approve(mlflow: str | None, name: str) -> dict:
        c = TestClient(create_app(fresh, access=Access(token=None, allow_actions=True, loopback_only=True, users=users),
                                  mlflow=mlflow), base_url="http://127.0.0.1")
        assert c.post("/login", data={"user": "alan", "password": "a" * MIN_PASSWORD}, follow_redirects=False).status_code == 303
        r = c.post(f"/api/runs/{run_ids[0]}/approve", json={"name": name}, headers={"X-Fedbus-CSRF": c.app.state.access.csrf})
        assert r.status_code == 200, r.text
        return r.json()

    plain = approve(None, "no-mlflow")
    assert "mlflow" not in plain and not (tmp_path / "mlruns").exists()
    out = approve(uri, "heart-mlp")
    rec = out["registry"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [mv] = client.search_model_versions("name='heart-mlp'")
    assert out["mlflow"] == {"uri": uri, "mlflow_run_id": mv.run_id, "model": "heart-mlp", "mlflow_version": str(mv.version)}
    assert mv.tags["fedbus.checkpoint_sha256"] == rec["checkpoint_sha256"] and mv.tags["fedbus.approved_by"] == "alan"
    assert mv.tags["fedbus.run_id"] == run_ids[0] and mv.tags["fedbus.version"] == str(rec["version"]) == "1"
    assert client.search_model_versions("name='no-mlflow'") == []
    # an unusable URI: refused before the dashboard listens (the one-line message names --mlflow)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for bad in ("ftp://example.org/mlruns", blocker.resolve().as_uri() + "/store"):
        with pytest.raises(ServeError, match="--mlflow"):
            build(ServeOptions(state=fresh, port=0, mlflow=bad))
    r = fedbus("coordinator", "serve", "--state", str(fresh), "--port", "0", "--mlflow", "ftp://example.org/x", check=False, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--mlflow" in r.stderr, r.stderr
