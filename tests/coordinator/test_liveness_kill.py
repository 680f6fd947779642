"""A killed site turns "offline" on the sites page within 30 s (issue 24, Build 7).

``fedbus simulate --broker RABBITMQ`` runs the production coordinator and one ``fedbus site
run`` OS process per site, each beating every 10 s (the default ``alive_every_s``). Once every
site's beat is on record, the test SIGKILLs one site process and polls the dashboard's
``/api/sites`` document (``sites_doc`` over the state directory) until that site reads
"offline": it must within 30 s (plus the poll's own step), not before 19 s (the last beat
is at most 10 s and its publish old at the kill), while the others stay online.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedbus.dashboard.data import StateReader
from fedbus.dashboard.views import sites_doc
from tests.dashboard.test_liveness_between_runs import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "heart_failure.json"
SLACK_S = 0.25  # allowed past the bound for reading the page itself

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]


def _site_process(sim: psutil.Process, site: str) -> psutil.Process | None:
    for p in sim.children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "site" in cmd and "run" in cmd and any(site in part for part in cmd):
            return p
    return None


def test_a_killed_site_reads_offline_within_30_s(tmp_path: Path, amqp_url: str) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sim = subprocess.Popen([sys.executable, "-m", "fedbus.cli", "simulate", str(EXAMPLE), "--sites", "2",
                            "--rounds", "200", "--broker", amqp_url, "--out", str(out), "--round-timeout", "60"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sim.err", "wb"),
                           start_new_session=True)
    try:
        reader = StateReader(out / "coordinator")

        def all_alive():
            assert sim.poll() is None, (tmp_path / "sim.err").read_text()[-3000:]
            doc = sites_doc(reader)
            states = {s["site_id"]: s["liveness"] for s in doc["sites"]}
            return states if len(states) == 2 and set(states.values()) == {"online"} else None

        t0 = time.monotonic()
        sites = sorted(wait_for(all_alive, 180, "both sites online by their heartbeats"))
        print(f"both online {time.monotonic() - t0:.1f} s after simulate started")
        victim = sites[1]  # site-2
        proc = wait_for(lambda: _site_process(psutil.Process(sim.pid), victim), 30, f"{victim}'s process")
        proc.send_signal(signal.SIGKILL)
        killed = time.time()
        wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 30, f"{victim} dead")

        def offline():
            doc = sites_doc(reader)
            return doc if {s["site_id"]: s["liveness"] for s in doc["sites"]}[victim] == "offline" else None

        doc = wait_for(offline, 30 + 2 * SLACK_S + 5, f"{victim} offline")
        after = time.time() - killed
        states = {s["site_id"]: s["liveness"] for s in doc["sites"]}
        print(f"{victim} offline {after:.1f} s after SIGKILL; {states}")
        assert 19.0 <= after <= 30.0 + 2 * SLACK_S, after
        assert all(st == "online" for s, st in states.items() if s != victim), states
        assert doc["monitored"] is True
    finally:
        try:
            os.killpg(sim.pid, signal.SIGTERM)
            sim.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(sim.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            sim.wait(timeout=30)
