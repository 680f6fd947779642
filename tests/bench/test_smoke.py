"""Benches that cannot rot: every script in bench/ runs its ``--smoke`` mode here.

A bench is a script (``bench/*.py`` not starting with ``_``: those are its helper modules);
each must take ``--smoke`` and finish it in seconds, exiting 0. A new bench without a smoke
mode fails here (argparse exits 2 on the unknown flag), and so does a protocol change that
breaks a bench. Benches that talk to RabbitMQ (they read ``FEDBUS_AMQP_URL``) get the test
broker through that variable (those on the chaos harness a broker this machine controls with
``rabbitmqctl``), and skip or fail without one as every broker test does.
Each runs as its own process, as a user runs it, importing this checkout's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHES = sorted(p for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 280  # under pytest-timeout's 300 s; the smoke runs take seconds to tens of seconds


def needs_broker(script: Path) -> bool:
    return "FEDBUS_AMQP_URL" in script.read_text(encoding="utf-8")


def needs_rabbitmqctl(script: Path) -> bool:
    """The chaos harness's federations live in their own vhosts, made with rabbitmqctl."""
    return "tests.chaos.harness" in script.read_text(encoding="utf-8")


def marks_for(script: Path) -> list[pytest.MarkDecorator]:
    """Broker benches are broker tests; those on the chaos harness restart the node: serial."""
    marks = [pytest.mark.broker] if needs_broker(script) else []
    return marks + ([pytest.mark.serial] if needs_rabbitmqctl(script) else [])


def test_every_bench_script_is_found() -> None:
    names = {p.stem for p in BENCHES}
    assert {"scale", "vs_flower", "soak", "codec", "union_interval"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("script", [pytest.param(p, id=p.stem, marks=marks_for(p))
                                    for p in BENCHES])
def test_bench_smoke_mode_runs(script: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg", TMPDIR=str(tmp_path))
    if needs_broker(script):
        fixture = "local_broker" if needs_rabbitmqctl(script) else "amqp_broker_url"
        env["FEDBUS_AMQP_URL"] = request.getfixturevalue(fixture)
    r = subprocess.run([sys.executable, str(script), "--smoke"], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{script.name} --smoke exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
