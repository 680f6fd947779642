"""``fedbus site run --config SITE.toml``: the hospital daemon.

Runs until SIGTERM/SIGINT, then stops taking tasks, finishes or abandons the current
one within ``grace_s`` (an abandoned task is not acked, so the broker redelivers it),
closes cleanly and logs its counts; SIGTERM during start-up (imports, connecting)
exits at once. Exit 2 on a bad config or a broker that refuses us (login, TLS,
permissions: systemd's RestartPreventExitStatus=2 stops the loop), 1 when it cannot
run for now (broker unreachable within the connect timeout).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Run a site worker (the daemon a hospital installs next to its data).",
                  no_args_is_help=True)


def _configure_logging(level: str) -> None:
    try:
        from protocol.logs import configure_logging
    except ImportError:  # logging module not landed: structlog defaults still print lines
        return
    configure_logging(mode="daemon", level=level)


@app.command("run")
def run(config: Path = typer.Option(..., "--config", "-c", help="Path to site.toml")) -> None:
    """Announce the site, consume its task queue, train with DP and reply with signed updates."""
    from site_worker.config import SiteConfigError, load_site_config

    try:
        cfg = load_site_config(config)
    except SiteConfigError as e:
        typer.echo(f"fedbus site run: {config}: {e}", err=True)
        raise typer.Exit(2) from None
    _configure_logging(cfg.log_level)
    import structlog

    log = structlog.get_logger("fedbus.site")
    from protocol.transport.base import BusError, exit_code

    stop = threading.Event()
    received: list[str] = []
    starting = [True]

    class _StopDuringStartup(BaseException):
        """SIGTERM while importing, connecting or announcing: leave at once."""

    def _on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()
        if starting[0]:
            raise _StopDuringStartup()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if not cfg.broker_url.startswith("memory:"):
            from protocol.transport.connector import reach

            reach(cfg.broker_url, tls=cfg.tls)  # before torch's imports: an absent broker fails in 10 s
        from site_worker.daemon import SiteWorker

        worker = SiteWorker(cfg)
        worker.start()
        starting[0] = False
    except _StopDuringStartup:
        # Nothing was taken yet (no task is acked before its reply is confirmed): exit now.
        log.info("site_stopped_during_startup", site_id=cfg.site_id, signal=received[0] if received else None)
        logging.shutdown()
        os._exit(0)
    except BusError as e:  # one line: what, where, the likely cause
        starting[0] = False
        typer.echo(f"fedbus site run: cannot start: {e}", err=True)
        raise typer.Exit(exit_code(e)) from None
    except (OSError, ValueError) as e:
        starting[0] = False
        log.error("site_failed_to_start", site_id=cfg.site_id, error=f"{type(e).__name__}: {e}")
        typer.echo(f"fedbus site run: cannot start: {e}", err=True)
        raise typer.Exit(2 if isinstance(e, ValueError) else 1) from None
    while not stop.wait(3600):
        pass
    log.info("site_stopping", site_id=cfg.site_id, signal=received[0] if received else None, grace_s=cfg.grace_s)
    worker.stop(grace_s=cfg.grace_s)
    # Everything is closed and durable (bus, ledger, replay log). Skip the interpreter's
    # teardown of torch & co., which takes seconds on a busy host and would push the exit
    # past the grace period that systemd (TimeoutStopSec) and operators expect.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


approvals_app = typer.Typer(help="The experiments this site approved (policy.require_approval).",
                            no_args_is_help=True)
app.add_typer(approvals_app, name="approvals")


def _site_and_experiment(command: str, config: Path, experiment: Path | None) -> tuple[Any, Any]:
    """The site config and (when given) the validated experiment; exit 2 with one line otherwise."""
    from protocol.config import ConfigError, load_experiment
    from site_worker.config import SiteConfigError, load_site_config

    try:
        cfg = load_site_config(config)
    except SiteConfigError as e:
        typer.echo(f"fedbus site {command}: {config}: {e}", err=True)
        raise typer.Exit(2) from None
    if experiment is None:
        return cfg, None
    try:
        exp = load_experiment(experiment)
    except ConfigError as e:
        typer.echo(f"fedbus site {command}: {experiment}: {e}", err=True)
        raise typer.Exit(2) from None
    if exp.dataset.name not in cfg.datasets:
        typer.echo(f"fedbus site {command}: {experiment}: dataset.name: {exp.dataset.name!r} is not offered by this "
                   f"site (offered: {', '.join(sorted(cfg.datasets))})", err=True)
        raise typer.Exit(2)
    return cfg, exp


@app.command("approve")
def approve(
    experiment: Path = typer.Argument(..., help="The experiment JSON to approve"),
    config: Path = typer.Option(..., "--config", "-c", help="Path to site.toml"),
) -> None:
    """Approve what this site would run for EXPERIMENT (architecture, training, DP request, dataset)."""
    from site_worker.approvals import Approvals, experiment_hash

    cfg, exp = _site_and_experiment("approve", config, experiment)
    digest = experiment_hash(exp.to_wire(), exp.dataset.name)
    Approvals(cfg.state_dir).approve(digest, name=exp.name, dataset=exp.dataset.name)
    typer.echo(f"approved {digest} ({exp.name} on dataset {exp.dataset.name})")


@approvals_app.command("list")
def approvals_list(config: Path = typer.Option(..., "--config", "-c", help="Path to site.toml")) -> None:
    """The approved experiment hashes, with the experiment and dataset each was approved for."""
    from site_worker.approvals import Approvals

    cfg, _ = _site_and_experiment("approvals list", config, None)
    for digest, info in sorted(Approvals(cfg.state_dir).all().items()):
        typer.echo(f"{digest}  {info.get('name', '?')}  dataset {info.get('dataset', '?')}")


@approvals_app.command("revoke")
def approvals_revoke(
    digest: str = typer.Argument(..., help="The hash to revoke (as `approvals list` prints it)"),
    config: Path = typer.Option(..., "--config", "-c", help="Path to site.toml"),
) -> None:
    """Revoke an approval: the site declines that experiment's tasks again."""
    from site_worker.approvals import Approvals

    cfg, _ = _site_and_experiment("approvals revoke", config, None)
    if not Approvals(cfg.state_dir).revoke(digest):
        typer.echo(f"fedbus site approvals revoke: HASH: {digest!r} is not approved at this site "
                   "(see `fedbus site approvals list`)", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {digest}")


@app.command("check")
def check(
    config: Path = typer.Option(..., "--config", "-c", help="Path to site.toml"),
    experiment: Path = typer.Option(None, "--experiment", help="Also check the data and the privacy cost of this experiment."),
) -> None:
    """Pre-flight: config, key files and modes, broker login, coordinator key, data vs experiment, ε; exit 0/1
    (2: the site.toml itself cannot be read, one line naming the key)."""
    import warnings

    from fedbus.site_check import print_checks, run_checks

    import io

    from protocol.logs import configure_logging

    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
    configure_logging("cli", level="error", stream=io.StringIO())  # each check reports its own failure
    checks = run_checks(config, experiment)
    if len(checks) == 1 and checks[0].name == "config" and not checks[0].ok:  # bad input: nothing else can be checked
        typer.echo(f"fedbus site check: {checks[0].detail}", err=True)
        raise typer.Exit(2)
    ok = print_checks(checks, lambda line: typer.echo(line))
    typer.echo("site check: all passed" if ok else "site check: FAILED (fix the lines marked FAIL)", err=True)
    raise typer.Exit(0 if ok else 1)
