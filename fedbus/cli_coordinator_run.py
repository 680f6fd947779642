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
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fedbus.cli_common import BROKER_PASSWORD_FILE, MLFLOW, broker_url, fail, log_to_mlflow, mlflow_uri

_PROG = "fedbus coordinator"
_err = Console(stderr=True)
LOG_FILE = "coordinator.log.jsonl"


def _fail(message: str, code: int = 2, *, json_out: bool = False, run_id: str | None = None) -> None:
    if json_out:  # a failed run still prints its document
        sys.stdout.write(json.dumps({"run_id": run_id, "status": "failed", "reason": message}) + "\n")
    fail(_PROG, message, code)


_NO_KEY = (
    "no coordinator key: pass --key FILE (a kit's coordinator/coordinator.key from `fedbus provision`, or "
    "--config coordinator/coordinator.toml). To make one: `fedbus keys generate coordinator --out DIR`, give "
    "DIR/coordinator.pub to every site (coordinator_pub in its site.toml), then pass --key DIR/coordinator.key"
)


def register(app: typer.Typer, runs_app: typer.Typer) -> None:
    @app.command()
    def run(
        experiment: Path = typer.Argument(..., help="Experiment JSON."),
        config: Optional[Path] = typer.Option(None, "--config", help="A kit's coordinator.toml (broker, key, state, federation)."),
        broker: Optional[str] = typer.Option(None, "--broker", help="memory://NAME or amqp://user[:pass]@host:5672/vhost"),
        broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
        state: Optional[Path] = typer.Option(None, "--state", help="Coordinator state directory (SQLite, checkpoints, log)."),
        key: Optional[Path] = typer.Option(None, "--key", help="Coordinator private key (the sites hold its .pub)."),
        federation: Optional[str] = typer.Option(None, "--federation", help="Federation name, as in the sites' site.toml (queues fedbus.updates.<F>)."),
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
        from fedbus.coordinator_lock import FederationLock, FederationLocked
        from fedbus.kits import ProjectError, load_coordinator_config
        from protocol.logs import add_log_file, configure_logging
        from coordinator.secagg import refuse_until_wired
        from protocol.config import ConfigError, load_experiment
        from protocol.signing import Signer
        from protocol.transport import BusError, BusPermissionError, open_bus

        # Until the broker has answered, only warnings: the start-up check's retries are not
        # news, and a broker that is not there is one line (below), not its retry chatter.
        configure_logging("cli", level="warning")
        tls = None
        if config is not None:
            try:
                cfg = load_coordinator_config(config)
            except ProjectError as e:
                _fail(f"--config {config}: {e}", json_out=json_out)
            broker = broker or cfg.broker_url
            state, key, federation, tls = state or cfg.state_dir, key or cfg.key_path, federation or cfg.federation, cfg.tls
        if broker is None:
            _fail("--broker URL is required (or --config coordinator.toml from a kit)", json_out=json_out)
        if state is None:
            _fail("--state DIR is required (or --config coordinator.toml from a kit)", json_out=json_out)
        if federation is None:
            _fail("--federation NAME is required: the federation the sites serve (federation = ... in their "
                  "site.toml); the coordinator's queues are fedbus.updates.<NAME>", json_out=json_out)
        broker = broker_url(broker, broker_password_file, prog=_PROG)
        tracking = mlflow_uri(mlflow, None, prog=_PROG)
        try:
            exp = load_experiment(experiment)
            refuse_until_wired(exp)
        except ConfigError as e:
            _fail(f"{experiment}: {e}", json_out=json_out)
        if exp.not_used:
            typer.echo(f"note: not used by fedbus: {', '.join(exp.not_used)}", err=True)
        if key is None:
            if not (state / "coordinator.key").exists():
                _fail(_NO_KEY, json_out=json_out)
            key = state / "coordinator.key"  # made on purpose earlier (fedbus keys generate ... --out STATE)
        try:
            signer = Signer.from_file(key)
        except (OSError, ValueError) as e:
            _fail(f"cannot load coordinator key {key}: {e}. {_NO_KEY}", json_out=json_out)
        typer.echo(f"signing tasks with coordinator key id {signer.kid} ({key}); sites must hold its .pub", err=True)
        if not broker.startswith("memory"):
            from protocol.transport.connector import reach

            try:  # before the start-up work: an absent broker fails in 10 s, whatever the load
                reach(broker, tls=tls)
            except BusPermissionError as e:
                _fail(str(e), json_out=json_out)
            except BusError as e:
                _fail(str(e), 1, json_out=json_out)
            except ValueError as e:  # a bad broker URL or TLS file
                _fail(f"cannot open broker: {e}", json_out=json_out)
        configure_logging("cli")  # the run's own events, from here on
        from coordinator.run import Coordinator  # (the start-up work: after the broker answered)
        from coordinator.state import StateError
        state.mkdir(parents=True, exist_ok=True)
        lock = FederationLock(state, federation)
        try:
            lock.acquire(state=str(state.resolve()), experiment=str(experiment))
        except FederationLocked as e:
            _fail(str(e), json_out=json_out)
        add_log_file(state / LOG_FILE)
        try:
            bus = open_bus(broker, tls=tls) if tls else open_bus(broker)
        except (BusError, ValueError, OSError) as e:
            lock.release()
            _fail(f"cannot open broker: {e}", json_out=json_out)
        try:
            coord = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=federation, sites=site or None,
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
