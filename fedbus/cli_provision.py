"""``fedbus provision PROJECT.toml --out DIR``: one kit per party (see ``fedbus/kits.py``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("provision")
    def provision(
        project: Annotated[Path, typer.Argument(metavar="PROJECT.toml", help="[federation] name, broker; [[sites]] id; optional [tls].")],
        out: Annotated[Path, typer.Option("--out", help="Directory of the kits (one per party).")],
        rotate_key: Annotated[Optional[list[str]], typer.Option("--rotate-key", help="Renew this party's signing key (a site id or 'coordinator'; repeat).")] = None,
        rotate_password: Annotated[Optional[list[str]], typer.Option("--rotate-password", help="Renew this party's broker password (repeat).")] = None,
        revoke: Annotated[Optional[list[str]], typer.Option("--revoke", help="Revoke a site: distrust its key, delete its broker user and kit (repeat).")] = None,
        skip_broker: Annotated[bool, typer.Option("--skip-broker", help="Write the kits only; create no broker users.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print what was done as one JSON document.")] = False,
        management_url: Annotated[Optional[str], typer.Option("--management-url", help="RabbitMQ management API [federation.management_url, else https://HOST:15671 for amqps://]; plain http:// only to this machine.")] = None,
    ) -> None:
        """Write the coordinator's and every site's kit and create their broker users; idempotent."""
        from fedbus.kits import ProjectError, load_project, provision_kits
        from protocol.transport.base import BusError, BusPermissionError
        from protocol.transport.provision import ProvisionError

        def fail(msg: str, code: int = 2) -> None:
            typer.echo(f"fedbus provision: {msg}", err=True)
            raise typer.Exit(code)

        try:
            proj = load_project(project)
            if management_url:
                proj = dataclasses.replace(proj, management_url=management_url)
            rep = provision_kits(proj, out, rotate_keys=set(rotate_key or ()), rotate_passwords=set(rotate_password or ()),
                                 revoke=set(revoke or ()), broker=not skip_broker)
        except (ProjectError, ProvisionError, BusPermissionError, ValueError) as e:  # ValueError: CertificateError
            fail(f"{project}: {e}" if isinstance(e, ProjectError) else str(e))
        except BusError as e:
            fail(str(e), 1)
        if json_out:
            typer.echo(json.dumps(rep.to_json()))
        for line in rep.created:
            typer.echo(f"created  {line}", err=True)
        for line in rep.kept:
            typer.echo(f"kept     {line}", err=True)
        for line in rep.revoked:
            typer.echo(f"revoked  {line}", err=True)
        typer.echo(f"broker users: {rep.broker or 'skipped (--skip-broker)'}", err=True)
        typer.echo(f"kits in {out}: give {out}/<site>/ to each hospital (see its README); "
                   f"the coordinator runs from {out}/coordinator/", err=True)
