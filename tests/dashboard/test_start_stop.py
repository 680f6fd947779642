"""Actions on runs: start one from an experiment file already in the state directory, stop one."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time

import pytest

from tests.dashboard.conftest import EXAMPLE
from tests.dashboard.test_api import client


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture()
def fresh(sim_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sim_out, out)
    return out / "coordinator"


def test_start_runs_only_experiments_in_the_state_directory(fresh):
    from protocol.signing import generate_keypair

    key, _pub = generate_keypair("coordinator", fresh / "keys")  # the key `serve --key` is given
    tracking = (fresh.parent / "mlruns").as_uri()  # `serve --mlflow`: the runs it starts are logged there
    api = client(fresh, allow_actions=True, broker="memory://dash-start", federation="dash-start", key=key, mlflow=tracking)
    h = {"X-Fedbus-CSRF": api.app.state.access.csrf}
    assert api.post("/api/runs/start", json={"experiment": "../../etc/passwd"}, headers=h).status_code == 404
    (fresh / "experiments").mkdir()
    shutil.copy(EXAMPLE, fresh / "experiments" / "heart_failure.json")
    assert api.get("/api/experiments").json()["experiments"] == ["heart_failure.json"]
    r = api.post("/api/runs/start", json={"experiment": "heart_failure.json"}, headers=h)
    assert r.status_code == 200, r.text
    started = r.json()
    assert api.app.state.actions._children[-1].args[-2:] == ["--mlflow", tracking]
    try:
        # The coordinator process creates its run (then waits for sites, which this memory broker has none of).
        _wait(lambda: any(x["run_id"] == started["run_id"] for x in api.get("/api/runs?status=running").json()["runs"]),
              120, "the started run to appear as running")
        # Stop it from the dashboard: the flag is in the state, for the coordinator to honour.
        s = api.post(f"/api/runs/{started['run_id']}/stop", json={"who": "Dr. B"}, headers=h)
        assert s.status_code == 200 and s.json()["stop_requested"] is True
        db = sqlite3.connect(fresh / "coordinator.db")
        try:
            [(reason,)] = db.execute("SELECT value FROM meta WHERE key=?", (f"stop:{started['run_id']}",)).fetchall()
        finally:
            db.close()
        assert reason == "stopped from the dashboard by Dr. B"
    finally:
        try:
            os.killpg(started["pid"], signal.SIGTERM)  # the process this test started, in its own session
        except ProcessLookupError:
            pass
    assert api.post(f"/api/runs/{api.get('/api/runs').json()['runs'][-1]['run_id']}/stop", json={},
                    headers=h).status_code == 409  # a finished run cannot be stopped


def test_start_needs_a_broker(fresh):
    (fresh / "experiments").mkdir()
    shutil.copy(EXAMPLE, fresh / "experiments" / "x.json")
    api = client(fresh, allow_actions=True)
    r = api.post("/api/runs/start", json={"experiment": "x.json"}, headers={"X-Fedbus-CSRF": api.app.state.access.csrf})
    assert r.status_code == 409 and "--broker" in r.json()["error"]
