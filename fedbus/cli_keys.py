"""``fedbus keys``: Ed25519 key pairs for sites and coordinators."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from protocol.signing import Signer, generate_keypair

app = typer.Typer(help="Ed25519 signing keys.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Ed25519 signing keys (one pair per site and per coordinator)."""


@app.command()
def generate(
    name: str = typer.Argument(..., help="Key name: files NAME.key and NAME.pub (letters, digits, . _ -)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the key pair into (created if missing)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing NAME.key (the old key is lost)."),
    json_out: bool = typer.Option(False, "--json", help="Print {key, pub, kid} as JSON on stdout."),
) -> None:
    """Write DIR/NAME.key (PKCS8 PEM, mode 0600) and DIR/NAME.pub; prints the key id."""
    try:
        key_path, pub_path = generate_keypair(name, out, force=force)
    except (ValueError, FileExistsError) as e:
        typer.echo(f"fedbus keys generate: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"fedbus keys generate: cannot write to {out}: {e.strerror}", err=True)
        raise typer.Exit(2) from None
    kid = Signer.from_file(key_path).kid
    if json_out:
        typer.echo(json.dumps({"key": str(key_path), "pub": str(pub_path), "kid": kid}))
    typer.echo(
        f"wrote {key_path} (private, mode 0600: keep it on this machine) and {pub_path} "
        f"(give it to the other side to enroll); key id {kid}",
        err=True,
    )
