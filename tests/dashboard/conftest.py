"""Fixtures for the dashboard: coordinator state written by real ``fedbus simulate --out`` runs.

Two runs of the heart-failure example share one state directory (the second with
``batch_size`` 16 instead of 32), so compare has a settings difference to show. The
documents the API returns are checked against the SQLite database itself and against
the files on disk, never against numbers typed into the test.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "heart_failure.json"
PERSONALIZE = {"mode": "last_layer", "epochs": 1}  # each site's own fine-tune after the rounds (issue 11)


def fedbus(*args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """The ``fedbus`` command as a user runs it (this tree first on the path)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedbus {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def experiment_with(tmp: Path, name: str, federated: dict | None = None, **training) -> Path:
    doc = json.loads(EXAMPLE.read_text())
    doc["training"].update(training)
    doc["federated"].update(federated or {})
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, one per test module (tests/dashboard/chromium.py)."""
    from tests.dashboard.chromium import launch

    with launch() as b:
        yield b


@pytest.fixture(scope="session")
def sim_out(tmp_path_factory) -> Path:
    """``simulate --out OUT`` twice into one OUT: runs A (batch 32) and B (batch 16, ``federated.test_every``
    1: the sites score every round on their test split; each site fine-tunes a personalised model at the
    end), 2 rounds each, 3 sites. Each run's ``result.json`` is kept as ``OUT/result-<run_id>.json``
    (the next simulate overwrites ``OUT/result.json``)."""
    tmp = tmp_path_factory.mktemp("dash-sim")
    out = tmp / "out"
    for name, batch, fed, extra in (("a.json", 32, {}, {}),
                                    ("b.json", 16, {"test_every": 1}, {"personalization": PERSONALIZE})):
        fedbus("simulate", str(experiment_with(tmp, name, federated=fed, batch_size=batch, **extra)), "--sites", "3",
               "--rounds", "2", "--out", str(out), "--site-budget", "10")
        doc = json.loads((out / "result.json").read_text())
        (out / f"result-{doc['run_id']}.json").write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="session")
def state(sim_out) -> Path:
    return sim_out / "coordinator"


@pytest.fixture(scope="session")
def run_ids(state) -> list[str]:
    """Run ids oldest first, read from the database directly."""
    db = sqlite3.connect(state / "coordinator.db")
    try:
        return [r[0] for r in db.execute("SELECT run_id FROM runs ORDER BY created_at")]
    finally:
        db.close()


def db_rows(state: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    db = sqlite3.connect(state / "coordinator.db")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()
