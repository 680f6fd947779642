"""``fedbus broker``: declare the topology and create least-privilege broker users."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from protocol.transport.base import BusError
from protocol.transport.provision import ProvisionError, provision, user_url

app = typer.Typer(help="RabbitMQ topology and users.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """RabbitMQ topology and per-site users."""


@app.command("provision")
def provision_cmd(
    broker: str = typer.Option(..., "--broker", help="Admin URL, e.g. amqp://admin:secret@host:5672/%2F"),
    site: list[str] = typer.Option([], "--site", help="Site id (repeatable); its broker user is named after it."),
    coordinator: Optional[str] = typer.Option(None, "--coordinator", help="Coordinator broker user name."),
    federation: Optional[str] = typer.Option(None, "--federation", help="Federation whose coordinator queues to declare."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the credentials as JSON to FILE (mode 0600) instead of printing them."),
    quorum: bool = typer.Option(False, "--quorum", help="Declare quorum queues (clustered brokers)."),
    method: str = typer.Option("auto", "--method", help="auto | management | rabbitmqctl"),
    management_url: Optional[str] = typer.Option(
        None, "--management-url",
        help="RabbitMQ management API [https://HOST:15671 for amqps://, http://HOST:15672 for amqp://]; "
             "plain http:// only to this machine."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="Federation CA (PEM) that the broker's and the management "
                                                       "API's certificates must chain to [the URL's ca_certs]."),
) -> None:
    """Declare exchanges/queues and create one user per site (and the coordinator).

    Passwords are generated and shown once; re-running rotates them.
    """
    if method not in ("auto", "management", "rabbitmqctl"):
        typer.echo(f"fedbus broker provision: --method must be auto, management or rabbitmqctl, not {method!r}", err=True)
        raise typer.Exit(2)
    try:
        creds = provision(broker, sites=site, coordinator=coordinator, federation=federation, quorum=quorum,
                          method=method, management_url=management_url, ca=str(ca) if ca else None)  # type: ignore[arg-type]
    except ProvisionError as e:
        typer.echo(f"fedbus broker provision: {e}", err=True)
        raise typer.Exit(2) from None
    except BusError as e:
        from protocol.transport.base import exit_code

        typer.echo(f"fedbus broker provision: {e}", err=True)
        raise typer.Exit(exit_code(e)) from None
    doc = {
        "method": creds.method,
        "vhost": creds.vhost,
        "users": {
            u: {"role": creds.roles[u], "password": pw, "url": user_url(broker, u, pw)}
            for u, pw in creds.passwords.items()
        },
    }
    typer.echo(f"topology declared; users created with {creds.method} on vhost {creds.vhost!r}: "
               f"{', '.join(creds.passwords)}", err=True)
    if out is not None:
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2)
        except OSError as e:
            typer.echo(f"fedbus broker provision: cannot write {out}: {e.strerror}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"credentials written to {out} (mode 0600); they are not shown again", err=True)
    else:
        typer.echo(json.dumps(doc, indent=2))
        typer.echo("store these passwords now: they are not shown again (re-running rotates them)", err=True)
