"""``fedbus coordinator dead-letters``: what the federation rejected, and why.

Lists, shows, requeues or purges the federation's frames in ``fedbus.dead`` (see
``protocol/transport/dead_letters.py``: peeking never removes anything).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from fedbus.cli_common import BROKER_PASSWORD_FILE, broker_url, fail

app = typer.Typer(help="Frames the federation rejected (fedbus.dead), with the reasons.", no_args_is_help=True)
_PROG = "fedbus coordinator dead-letters"

BROKER = typer.Option(..., "--broker", help="memory://NAME or amqp://user[:pass]@host:5672/vhost")
FEDERATION = typer.Option(..., "--federation", help="Federation whose dead letters to handle.")
JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")
TIMEOUT = typer.Option(30.0, "--timeout", help="Seconds to wait for the broker to hand the queue over.")


@app.callback()
def _group() -> None:
    """Frames the federation rejected (fedbus.dead), with the reasons."""


def _run(url: str, password_file: Optional[Path], federation: str, timeout: float, op: str, *args: Any) -> Any:
    from protocol.transport import BusError, BusPermissionError, open_bus
    from protocol.transport.dead_letters import DeadLetterError, DeadLetters

    try:
        bus = open_bus(broker_url(url, password_file, prog=_PROG))
    except (ValueError, OSError) as e:
        fail(_PROG, f"cannot open broker {url}: {e}")
    try:
        dead = DeadLetters(bus, federation, timeout_s=timeout)
        result = getattr(dead, op)(*args)
        if dead.truncated:
            typer.echo(f"note: only the first {dead.limit} letters in fedbus.dead were looked at; "
                       "purge or requeue some to see the rest", err=True)
        return result
    except (DeadLetterError, BusPermissionError) as e:
        fail(_PROG, str(e))
    except BusError as e:
        fail(_PROG, str(e), code=1)
    finally:
        bus.close()


def _line(d: Any) -> str:
    env = d.envelope or {}
    what = f"{env.get('type')} from {env.get('sender')} run {env.get('run_id')} round {env.get('round')}" if env else "undecodable frame"
    return f"{d.message_id}  {d.queue or '-'}  {what} (unverified)  {d.size} B\n    reason: {d.reason or '(none)'}"


@app.command("list")
def list_cmd(broker: str = BROKER, broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
             federation: str = FEDERATION, timeout: float = TIMEOUT, json_out: bool = JSON) -> None:
    """Every dead letter of the federation, oldest first, with its reason; removes nothing."""
    letters = _run(broker, broker_password_file, federation, timeout, "list")
    if json_out:
        sys.stdout.write(json.dumps([d.to_json() for d in letters], default=str) + "\n")
    for d in letters:
        typer.echo(_line(d), err=True)
    typer.echo(f"{len(letters)} dead letter(s) for federation {federation!r}", err=True)


@app.command("show")
def show_cmd(message_id: str = typer.Argument(..., help="Message id (from `dead-letters list`)."),
             broker: str = BROKER, broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
             federation: str = FEDERATION, timeout: float = TIMEOUT, json_out: bool = JSON) -> None:
    """One dead letter: reason, origin queue, headers and what its envelope claims."""
    d = _run(broker, broker_password_file, federation, timeout, "show", message_id)
    doc = d.to_json()
    if json_out:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
    typer.echo(_line(d), err=True)
    for k, v in sorted(doc["headers"].items()):
        typer.echo(f"    header {k}: {v}", err=True)


def _chosen(ids: list[str], all_: bool, verb: str) -> Optional[list[str]]:
    if bool(ids) == all_:
        fail(_PROG, f"{verb}: give MESSAGE_ID(s) or --all (not both)")
    return None if all_ else ids


@app.command("requeue")
def requeue_cmd(message_ids: list[str] = typer.Argument(None, help="Message ids to send back."),
                all_: bool = typer.Option(False, "--all", help="Every dead letter of the federation."),
                broker: str = BROKER, broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
                federation: str = FEDERATION, timeout: float = TIMEOUT, json_out: bool = JSON) -> None:
    """Send dead letters back to the queue they were rejected from (after fixing the cause)."""
    done = _run(broker, broker_password_file, federation, timeout, "requeue", _chosen(message_ids or [], all_, "requeue"))
    if json_out:
        sys.stdout.write(json.dumps([d.message_id for d in done]) + "\n")
    typer.echo(f"requeued {len(done)} dead letter(s)" + "".join(f"\n    {d.message_id} -> {d.queue}" for d in done), err=True)


@app.command("purge")
def purge_cmd(message_ids: list[str] = typer.Argument(None, help="Message ids to delete."),
              all_: bool = typer.Option(False, "--all", help="Every dead letter of the federation."),
              broker: str = BROKER, broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
              federation: str = FEDERATION, timeout: float = TIMEOUT, json_out: bool = JSON) -> None:
    """Delete dead letters for good."""
    done = _run(broker, broker_password_file, federation, timeout, "purge", _chosen(message_ids or [], all_, "purge"))
    if json_out:
        sys.stdout.write(json.dumps([d.message_id for d in done]) + "\n")
    typer.echo(f"purged {len(done)} dead letter(s)", err=True)
