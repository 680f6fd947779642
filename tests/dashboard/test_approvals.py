"""Mark valid: a signed approval that ``fedbus coordinator audit`` verifies, and tampering that fails it."""

from __future__ import annotations

import json
import shutil

import pytest

from protocol.signing import Signer
from tests.dashboard.conftest import fedbus
from tests.dashboard.test_api import client


@pytest.fixture()
def fresh(sim_out, tmp_path):
    """A private copy of the simulated state, so tampering here touches no other test."""
    out = tmp_path / "out"
    shutil.copytree(sim_out, out)
    return out / "coordinator"


def _approve(state, run_id, who="Dr. Ada Example"):
    api = client(state, allow_actions=True)
    r = api.post(f"/api/runs/{run_id}/approve", json={"who": who, "note": "checked on the test split"},
                 headers={"X-Fedbus-CSRF": api.app.state.access.csrf})
    assert r.status_code == 200, r.text
    return api, r.json()


def _audit(state, run_id):
    r = fedbus("coordinator", "audit", run_id, "--state", str(state), "--json", check=False, timeout=120)
    return r.returncode, json.loads(r.stdout)


def test_mark_valid_signs_a_record_that_audit_verifies(fresh, run_ids):
    rid = run_ids[0]
    api, signed = _approve(fresh, rid)
    rec = signed["record"]
    from tests.dashboard.conftest import db_rows

    [row] = db_rows(fresh, "SELECT checkpoint_path, checkpoint_sha256 FROM rounds WHERE run_id=? AND round=2", (rid,))
    [run] = db_rows(fresh, "SELECT coordinator_kid FROM runs WHERE run_id=?", (rid,))
    assert (rec["checkpoint"], rec["checkpoint_sha256"], rec["round"]) == (row["checkpoint_path"], row["checkpoint_sha256"], 2)
    assert rec["approved_by"] == "Dr. Ada Example" and rec["coordinator_kid"] == run["coordinator_kid"]
    assert api.get(f"/api/runs/{rid}").json()["approvals"][0]["approved_by"] == "Dr. Ada Example"
    code, report = _audit(fresh, rid)
    assert code == 0 and report["ok"] and report["approvals_verified"] == 1


def _tamper(state, run_id, change):
    path = state / "approvals" / f"{run_id}.json"
    doc = json.loads(path.read_text())
    change(doc["approvals"][0])
    path.write_text(json.dumps(doc))


def test_editing_the_record_fails_the_audit(fresh, run_ids):
    rid = run_ids[0]
    _approve(fresh, rid)
    _tamper(fresh, rid, lambda a: a["record"].update(approved_by="Mallory"))
    code, report = _audit(fresh, rid)
    assert code == 1 and any("changed after signing" in p for p in report["problems"])


def test_re_signing_with_another_key_fails_the_audit(fresh, run_ids):
    from coordinator.approvals import canonical
    import base64

    rid = run_ids[0]
    _approve(fresh, rid)
    other = Signer.generate()

    def resign(a):
        a["record"].update(approved_by="Mallory", coordinator_kid=other.kid)
        a.update(kid=other.kid, public_pem=other.public_pem().decode(),
                 signature=base64.b64encode(other.sign(canonical(a["record"]))).decode())

    _tamper(fresh, rid, resign)
    code, report = _audit(fresh, rid)
    assert code == 1 and any("coordinator key" in p for p in report["problems"])


def test_swapping_the_checkpoint_fails_the_audit(fresh, run_ids):
    rid = run_ids[0]
    _, signed = _approve(fresh, rid)
    ck = fresh / signed["record"]["checkpoint"]
    ck.write_bytes(ck.read_bytes()[:-1] + b"\x00")
    code, report = _audit(fresh, rid)
    assert code == 1 and any("approval 1" in p for p in report["problems"])


def test_approval_needs_a_name_and_a_known_run(fresh, run_ids):
    api = client(fresh, allow_actions=True)
    h = {"X-Fedbus-CSRF": api.app.state.access.csrf}
    assert api.post(f"/api/runs/{run_ids[0]}/approve", json={"who": "  "}, headers=h).status_code == 400
    assert api.post("/api/runs/nope/approve", json={"who": "x"}, headers=h).status_code == 404
    assert not (fresh / "approvals" / f"{run_ids[0]}.json").exists()
