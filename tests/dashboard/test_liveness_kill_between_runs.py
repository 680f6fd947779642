"""Between runs, a SIGKILLed site reads "offline" on the dashboard's sites page (issue 24, Build 7).

Real processes on real RabbitMQ, and no coordinator run at all: ``fedbus coordinator serve
--broker`` (its liveness monitor on ``fedbus.liveness.<federation>``) and one ``fedbus site run``
beating every second. The site reads "online"; after ``kill -9`` it must read "offline" within
its three missed intervals (3 s, plus the poll), and not before three intervals have passed
since its last recorded beat. Then the dashboard itself is SIGKILLed: its last tick in
the state must stop claiming "monitored" within three ticks (6 s), never forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from coordinator import liveness
from coordinator.liveness_monitor import TICK_S
from coordinator.state import StateStore
from fedbus.dashboard.data import StateReader
from protocol.transport import open_bus
from protocol.transport.base import Topology
from tests.dashboard.test_liveness_between_runs import POLL_S, states, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "fedbus.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)


def _kill9(proc: subprocess.Popen) -> float:
    os.killpg(proc.pid, signal.SIGKILL)
    at = time.time()
    proc.wait(timeout=30)
    return at


def test_a_killed_site_reads_offline_between_runs_and_a_killed_dashboard_stops_claiming(
        tmp_path: Path, amqp_url: str) -> None:
    from tests.site_worker.support import heart_failure_csv, make_keys, site_toml

    fed, site_id = f"fed-{uuid.uuid4().hex[:8]}", f"h-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    keys = make_keys(tmp_path, site_id)
    store = StateStore(state)
    store.enroll(site_id, keys.site_pub.read_bytes())
    store.close()
    admin = open_bus(amqp_url)
    admin.declare(Topology(sites=[site_id], federations=[fed]))  # `fedbus broker provision`
    admin.close()
    config = site_toml(tmp_path, site_id=site_id, federation=fed, broker_url=amqp_url, keys=keys,
                       datasets={"hf": {"path": str(heart_failure_csv(tmp_path / "hf.csv")), "target": "DEATH_EVENT"}},
                       extra={"alive_every_s": 1})
    dash = _spawn(["coordinator", "serve", "--state", str(state), "--broker", amqp_url, "--federation", fed,
                   "--port", "0"], tmp_path / "serve.err")
    site = None
    try:
        def alive(proc: subprocess.Popen, name: str):
            assert proc.poll() is None, (tmp_path / name).read_text()[-3000:]
            return True

        wait_for(lambda: alive(dash, "serve.err") and states(state) == ({site_id: "offline"}, True), 60,
                 "the dashboard monitoring (no run, no beat yet: offline)")
        site = _spawn(["site", "run", "--config", str(config)], tmp_path / "site.err")
        wait_for(lambda: alive(site, "site.err") and states(state)[0] == {site_id: "online"}, 60,
                 "the site online by its beats")
        assert not StateReader(state).runs()
        killed = _kill9(site)
        wait_for(lambda: states(state)[0][site_id] == "offline", 30, "the killed site offline")
        seen = time.time()
        after, quiet = seen - killed, seen - StateReader(state).liveness()[site_id]["seen_at"]
        print(f"site offline {after:.2f} s after SIGKILL, {quiet:.2f} s after its last beat (beats every 1 s)")
        assert after <= liveness.offline_after_s(1.0) + 2 * POLL_S + 0.5, after
        assert liveness.offline_after_s(1.0) < quiet <= liveness.offline_after_s(1.0) + 2 * POLL_S + 0.5, quiet
        assert states(state)[1] is True

        dash_killed = _kill9(dash)
        wait_for(lambda: states(state) == ({site_id: "not monitored"}, False), 30,
                 "the killed dashboard no longer claiming it monitors")
        gone = time.time() - dash_killed
        print(f"'not monitored' {gone:.2f} s after the dashboard's SIGKILL (ticks every {TICK_S} s)")
        assert gone <= liveness.offline_after_s(TICK_S) + 2 * POLL_S + 0.5, gone
    finally:
        for proc in (site, dash):
            if proc is not None and proc.poll() is None:
                _kill9(proc)
