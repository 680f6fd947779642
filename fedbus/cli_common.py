"""Options and helpers several ``fedbus`` command groups share (one place for each)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import typer

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
    p = urlsplit(url)
    if p.scheme not in ("amqp", "amqps"):
        fail(prog, f"--broker-password-file needs an amqp:// or amqps:// --broker URL, got {url!r}")
    user = unquote(p.username or "")
    if not user:
        fail(prog, f"--broker {url!r} names no user; write it as amqp://USER@host:5672/vhost")
    host = p.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{p.port}" if p.port else "")
    return urlunsplit((p.scheme, netloc, p.path, p.query, ""))
