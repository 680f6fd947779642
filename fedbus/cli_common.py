"""Options and helpers several ``fedbus`` command groups share (one place for each)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional
import typer

from protocol.broker_url import BrokerURLError, with_password

BROKER_PASSWORD_FILE = typer.Option(
    None, "--broker-password-file",
    help="File holding the broker password for the --broker URL's user (a kit's broker.password, mode 0600).",
)


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
