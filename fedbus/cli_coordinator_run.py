"""``fedbus coordinator run`` and the operator's run commands (``runs list|stop``, ``logs``).

``run`` never guesses a signing key: it takes ``--key`` (or the kit's, via ``--config
coordinator.toml``), or fails saying how to make one and hand it to the sites. One
coordinator per federation (``fedbus/coordinator_lock.py``). The run's structured log
goes to ``STATE/coordinator.log.jsonl`` as well as stderr; ``logs RUN`` reads it back.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedbus.cli_common import BROKER_PASSWORD_FILE, MLFLOW, fail, log_to_mlflow, mlflow_uri
from fedbus.cli_federation import BROKER, CONFIG, FEDERATION, KEY, STATE

_PROG = "fedbus coordinator"
_err = Console(stderr=True)
LOG_FILE = "coordinator.log.jsonl"


def _fail(message: str, code: int = 2, *, json_out: bool = False, run_id: str | None = None) -> None:
    if json_out:  # a failed run still prints its document
        sys.stdout.write(json.dumps({"run_id": run_id, "status": "failed", "reason": message}) + "\n")
    fail(_PROG, message, code)




def register(app: typer.Typer, runs_app: typer.Typer) -> None:
    @app.command()
    def run(
        experiment: Path = typer.Argument(..., help="Experiment JSON."),
        config: Optional[Path] = CONFIG,
        broker: Optional[str] = BROKER,
        broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
        state: Optional[Path] = STATE,
        key: Optional[Path] = KEY,
        federation: Optional[str] = FEDERATION,
        resume: bool = typer.Option(False, "--resume", help="Continue the latest unfinished run (or --run-id)."),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of the run (new) or the run to resume."),
        rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Override training.rounds."),
        round_timeout: Optional[float] = typer.Option(None, "--round-timeout", help="Override federated.round_timeout_s."),
        site: Optional[list[str]] = typer.Option(None, "--site", help="Run with exactly these enrolled sites (repeat)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Round progress on stderr."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (also when the run fails)."),
        model_inline_below: Optional[int] = typer.Option(
            None, "--model-inline-below", min=0,
            help="Models of at least this many bytes are published once and fetched by hash (default 1 MiB; 0: always)."),
        mlflow: Optional[str] = MLFLOW,
    ) -> None:
        """Run EXPERIMENT.json over the broker; with --resume, continue after a crash."""
        from fedbus import cli_federation
        from protocol.logs import add_log_file, configure_logging
        from coordinator.secagg import refuse_until_wired
        from protocol.config import ConfigError, load_experiment
        from protocol.transport import BusError, BusPermissionError

        # Until the broker has answered, only warnings: the start-up check's retries are not
        # news, and a broker that is not there is one line (below), not its retry chatter.
        configure_logging("cli", level="warning")

        def on_error(message: str, code: int = 2) -> NoReturn:
            _fail(message, code, json_out=json_out)

        fed = cli_federation.resolve(config=config, broker=broker, password_file=broker_password_file, state=state,
                                     key=key, federation=federation, prog=_PROG, on_error=on_error)
        tracking = mlflow_uri(mlflow, None, prog=_PROG)
        try:
            exp = load_experiment(experiment)
            refuse_until_wired(exp)
        except ConfigError as e:
            _fail(f"{experiment}: {e}", json_out=json_out)
        if exp.not_used:
            typer.echo(f"note: not used by fedbus: {', '.join(exp.not_used)}", err=True)
        signer, key = cli_federation.signer(fed, on_error=on_error)
        typer.echo(f"signing tasks with coordinator key id {signer.kid} ({key}); sites must hold its .pub", err=True)
        if not fed.broker.startswith("memory"):
            from protocol.transport.connector import reach

            try:  # before the start-up work: an absent broker fails in 10 s, whatever the load
                reach(fed.broker, tls=fed.tls)
            except BusPermissionError as e:
                _fail(str(e), json_out=json_out)
            except BusError as e:
                _fail(str(e), 1, json_out=json_out)
            except ValueError as e:  # a bad broker URL or TLS file
                _fail(f"cannot open broker: {e}", json_out=json_out)
        configure_logging("cli")  # the run's own events, from here on
        from coordinator.run import Coordinator  # (the start-up work: after the broker answered)
        from coordinator.state import StateError
        state = fed.state
        lock, bus = cli_federation.lock_and_open(fed, what=str(experiment), on_error=on_error)
        add_log_file(state / LOG_FILE)
        try:
            coord = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=fed.federation, sites=site or None,
                                run_id=run_id, resume=resume, progress=progress, round_timeout_s=round_timeout,
                                rounds=rounds, model_inline_below=model_inline_below)
            result = coord.run()
        except (StateError, ValueError) as e:
            _fail(str(e), json_out=json_out, run_id=run_id)
        except BusPermissionError as e:  # auth or permissions: restarting will not help
            _fail(str(e), json_out=json_out, run_id=run_id)
        except BusError as e:
            _fail(str(e), 1, json_out=json_out, run_id=run_id)
        finally:
            bus.close()
            lock.release()
        doc = result.to_json()
        if json_out:
            sys.stdout.write(json.dumps(doc, default=str) + "\n")
        from fedbus.cli_coordinator import _print_run

        _print_run(doc)
        if tracking is not None:
            log_to_mlflow(state, result.run_id, tracking, prog=_PROG)
        for d in doc.get("declined", []):
            if str(d.get("reason", "")).startswith("untrusted_task"):
                typer.echo(f"site {d['site']} rejected our tasks: {d['reason'].split(': ', 1)[-1]}", err=True)
        if result.status == "stopped":
            typer.echo(f"run {result.run_id} stopped: {result.reason}", err=True)
            return
        if not result.ok:
            typer.echo(f"run {result.run_id} failed: {result.reason}", err=True)
            raise typer.Exit(1)
        from coordinator.rounds.result import COMPLETED_WITH_GAPS, EXIT_WITH_GAPS

        if result.status == COMPLETED_WITH_GAPS:  # ran to its end, without some sites' rounds: say so, exit 3
            typer.echo(f"run {result.run_id} {result.reason}", err=True)
            raise typer.Exit(EXIT_WITH_GAPS)

    @runs_app.command("list")
    def runs_list(state: Path = typer.Option(..., "--state", help="Coordinator state directory."),
                  json_out: bool = typer.Option(False, "--json", help="Print one JSON document (full run ids).")) -> None:
        """Every run: created, duration, status, rounds, final metrics."""
        from fedbus.cli_coordinator import _store

        store = _store(state)
        rows = []
        for r in store.runs():
            result = store.run(r["run_id"]).get("result") or {}
            final = result.get("final") or {}
            end = r["finished_at"] or time.time()
            rows.append({**r, "duration_s": round(end - r["created_at"], 1),
                         "final": {k: final.get(k) for k in ("loss", "accuracy", "auc", "f1")}})
        if json_out:
            sys.stdout.write(json.dumps(rows, default=str) + "\n")
        table = Table(title=f"runs in {state}")
        for col in ("run", "federation", "created (UTC)", "duration", "status", "rounds", "accuracy", "auc", "loss"):
            table.add_column(col, overflow="fold")
        for r in rows:
            f = r["final"]
            table.add_row(r["run_id"], r["federation"], time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"])),
                          f"{r['duration_s']:.0f} s", r["status"], f"{r['rounds_done']}/{r['rounds_planned']}",
                          *(("-" if f[k] is None else f"{f[k]:.3f}") for k in ("accuracy", "auc", "loss")))
        Console(stderr=True, width=200).print(table)

    @runs_app.command("stop")
    def runs_stop(run_id: str = typer.Argument(..., help="The run to stop (full id from `runs list --json`)."),
                  state: Path = typer.Option(..., "--state", help="Coordinator state directory."),
                  reason: str = typer.Option("stopped by the operator", "--reason", help="Recorded with the run.")) -> None:
        """Ask the coordinator running RUN to stop after the current round (status: stopped)."""
        from coordinator.state import StateError
        from fedbus.cli_coordinator import _store

        store = _store(state)
        try:
            run = store.run(run_id)
            if run["status"] != "running":
                fail(_PROG, f"run {run_id} is {run['status']}, not running: nothing to stop")
            store.request_stop(run_id, reason)
        except StateError as e:
            fail(_PROG, str(e))
        typer.echo(f"asked run {run_id} to stop; its coordinator stops before the next round", err=True)

    @app.command("logs")
    def logs(run_id: str = typer.Argument(..., help="The run whose log lines to print."),
             state: Path = typer.Option(..., "--state", help="Coordinator state directory."),
             json_out: bool = typer.Option(False, "--json", help="Print the JSON lines as stored.")) -> None:
        """The run's structured log, kept in STATE/coordinator.log.jsonl."""
        from coordinator.state import StateError
        from fedbus.cli_coordinator import _store

        try:
            _store(state).run(run_id)
        except StateError as e:
            fail(_PROG, str(e))
        path = state / LOG_FILE
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        n = 0
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("run_id") != run_id:
                continue
            n += 1
            if json_out:
                sys.stdout.write(line + "\n")
            else:
                extra = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("event", "timestamp", "level", "logger"))
                typer.echo(f"{rec.get('timestamp')} [{rec.get('level')}] {rec.get('event')} {extra}")
        if n == 0:
            typer.echo(f"no log lines for run {run_id} in {path}", err=True)
