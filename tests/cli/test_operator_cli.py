"""Operator commands: --version, -h, runs list (dates, durations, metrics, full ids), runs stop, logs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedbus.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_version_and_short_help() -> None:
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("fedbus ")
    for args in (["-h"], ["coordinator", "-h"], ["coordinator", "runs", "stop", "-h"], ["site", "check", "-h"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "Usage:" in r.stdout, args


def test_runs_list_stop_and_logs_on_a_finished_run(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    r = CliRunner().invoke(app, ["simulate", str(ROOT / "examples" / "heart_failure.json"), "--rounds", "1",
                                 "--sites", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    run_id = json.loads(r.stdout)["run_id"]
    state = str(out / "coordinator")
    r = CliRunner().invoke(app, ["coordinator", "runs", "list", "--state", state, "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["run_id"] == run_id  # the full id
    assert row["status"] == "completed" and row["rounds_done"] == 1 and row["created_at"] > 0
    assert row["duration_s"] >= 0 and row["final"]["accuracy"] is not None
    r = CliRunner().invoke(app, ["coordinator", "runs", "stop", run_id, "--state", state])
    assert r.exit_code == 2 and "is completed, not running" in r.stderr
    r = CliRunner().invoke(app, ["coordinator", "runs", "stop", "nope", "--state", state])
    assert r.exit_code == 2 and "no run 'nope'" in r.stderr
    r = CliRunner().invoke(app, ["coordinator", "logs", "nope", "--state", state])
    assert r.exit_code == 2


def test_a_sites_words_reach_the_operator_as_written_never_as_terminal_markup(capsys) -> None:
    # A declined reason comes from a site's message: rich markup in it must neither style the
    # operator's terminal nor vanish from it.
    from fedbus.cli_coordinator import _print_run

    reason = "[bold red]round accepted[/bold red] budget [epsilon, delta]"
    _print_run({"run_id": "r1", "rounds": [], "final": {}, "rejected": [],
                "declined": [{"site": "[blink]h1", "round": 2, "reason": reason}]})
    err = capsys.readouterr().err.replace("\n", " ")  # the console wraps long lines
    assert reason in err and "[blink]h1" in err
