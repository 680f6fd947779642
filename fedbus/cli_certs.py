"""``fedbus certs``: the federation CA and the TLS certificates of broker, sites and coordinator.

    fedbus certs ca --federation F --out DIR            # DIR/ca.pem, DIR/ca.key (0600)
    fedbus certs issue NAME --out DIR [--server-name H]  # DIR/NAME.pem, DIR/NAME.key (0600)
    fedbus certs show FILE.pem

A client certificate's CN is the party's broker user (EXTERNAL login): issue one per
site id and one for the coordinator's broker user. Exit 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Federation CA and TLS certificates (mutual TLS with the broker).", no_args_is_help=True)


@app.command("ca")
def ca(
    federation: str = typer.Option(..., "--federation", help="Federation name (in the CA's subject)."),
    out: Path = typer.Option(..., "--out", help="Directory for ca.pem and ca.key."),
    days: float = typer.Option(3650, "--days", min=1, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (invalidates what it signed)."),
) -> None:
    """Create the federation CA."""
    from protocol.transport.certificates import CertificateError, make_ca

    try:
        issued = make_ca(out, federation=federation, days=days, force=force)
    except CertificateError as e:
        typer.echo(f"fedbus certs ca: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"CA: {issued.cert} (give it to the broker and every party), key {issued.key} (0600; keep it offline)", err=True)


@app.command("issue")
def issue(
    name: str = typer.Argument(..., help="Site id, coordinator user, or a name for the broker's certificate."),
    out: Path = typer.Option(..., "--out", help="Directory holding ca.pem/ca.key; NAME.pem/NAME.key are written here."),
    server_name: Optional[list[str]] = typer.Option(None, "--server-name", help="Broker DNS name or IP (repeat): makes a server certificate."),
    days: float = typer.Option(825, "--days", min=1, help="Validity in days."),
    to: Optional[Path] = typer.Option(None, "--to", help="Write NAME.pem/NAME.key to this directory instead (a kit)."),
) -> None:
    """Sign a client (or, with --server-name, a broker) certificate with the CA in --out."""
    from protocol.transport.certificates import CertificateError, issue as issue_cert

    try:
        issued = issue_cert(out, name, server_names=server_name or None, days=days, out=to)
    except CertificateError as e:
        typer.echo(f"fedbus certs issue: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{'server' if server_name else 'client'} certificate {issued.cert}, key {issued.key} (0600)", err=True)


@app.command("show")
def show(cert: Path = typer.Argument(..., help="A PEM certificate.")) -> None:
    """Subject CN, issuer, validity and names of a certificate, as JSON."""
    from protocol.transport.certificates import describe

    try:
        typer.echo(json.dumps(describe(cert), indent=2))
    except (OSError, ValueError) as e:
        typer.echo(f"fedbus certs show: cannot read {cert}: {e}", err=True)
        raise typer.Exit(2) from None
