"""Options and helpers several ``fedbus`` command groups share (one place for each)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import click
import typer
from typer.core import TyperGroup

from protocol.broker_url import BrokerURLError, with_password

BROKER_PASSWORD_FILE = typer.Option(
    None, "--broker-password-file",
    help="File holding the broker password for the --broker URL's user (a kit's broker.password, mode 0600).",
)


class OneLineErrors(TyperGroup):
    """The top command group: bad usage (an unknown option, a value out of its range) is one line
    naming the option and exit 2, like every other bad input; typer's own error box is five."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # no arguments: the help, as typer shows it
            if not standalone_mode:
                raise
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            if not standalone_mode:
                raise
            path = e.ctx.command_path if e.ctx is not None else "fedbus"
            typer.echo(f"{path}: {e.format_message()} (see {path} -h)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            if not standalone_mode:
                raise
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            if not standalone_mode:
                raise
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        # without standalone mode typer returns a typer.Exit's code; a command's own return value is not one
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """Print ``prog: message`` on stderr and exit ``code`` (2: bad usage or input)."""
    typer.echo(f"{prog}: {message}", err=True)
    raise typer.Exit(code)


def broker_url(url: str, password_file: Optional[Path], *, prog: str) -> str:
    """``url`` with the password read from ``password_file`` (kept off the command line and out of `ps`)."""
    if password_file is None:
        return url
    try:
        password = password_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        fail(prog, f"--broker-password-file {password_file}: cannot read it ({e.strerror})")
    try:
        return with_password(url, password)
    except BrokerURLError as e:
        fail(prog, f"--broker-password-file: {e}")


MLFLOW = typer.Option(
    None, "--mlflow",
    help="Also log the run to MLflow at this tracking URI (file:///DIR, http(s)://HOST, sqlite:///FILE); "
         "`--mlflow` alone: a local file store (OUT/mlruns, else ./mlruns). Needs fedbus[mlflow].",
)


def mlflow_uri(value: Optional[str], base: Optional[Path], *, prog: str) -> Optional[str]:
    """The tracking URI ``--mlflow`` names (``default``: a local file store), checked now: a bad one is
    one line and exit 2, before any run starts."""
    if value is None:
        return None
    from coordinator.tracking import TrackingError, check_uri, default_uri

    uri = default_uri(base) if value == "default" else value
    try:
        check_uri(uri)
    except TrackingError as e:
        fail(prog, str(e))
    return uri


def log_to_mlflow(state: Path, run_id: str, uri: str, *, prog: str) -> None:
    """Log a finished run to MLflow and say where; a failure is one line and exit 2."""
    from coordinator.tracking import TrackingError, log_run

    try:
        done = log_run(state, run_id, uri)
    except TrackingError as e:
        fail(prog, str(e))
    typer.echo(f"mlflow: run {run_id} logged as {done['mlflow_run_id']} in {uri}", err=True)
