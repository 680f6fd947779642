"""The one ``fedbus`` console script: sub-commands call into the packages.

Each verb group lives in its own module (``fedbus/cli_*.py``) so the groups stay
small and independent. Exit codes: 0 success, 1 a run that failed, 2 bad usage or
bad input (docs/design.md "Command line").
"""

from __future__ import annotations

import typer

from fedbus.cli_common import OneLineErrors
from fedbus import cli_broker, cli_certs, cli_config, cli_coordinator, cli_keys, cli_provision, cli_simulate, cli_site

app = typer.Typer(
    name="fedbus",
    cls=OneLineErrors,
    help="Federated learning for hospitals over a message bus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("fedbus")
        except PackageNotFoundError:  # running from a source tree that is not installed
            v = "unknown (not installed)"
        typer.echo(f"fedbus {v}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Federated learning for hospitals over a message bus."""
app.add_typer(cli_keys.app, name="keys")
app.add_typer(cli_config.app, name="config")
app.add_typer(cli_broker.app, name="broker")
app.add_typer(cli_certs.app, name="certs")
app.add_typer(cli_coordinator.app, name="coordinator")
app.add_typer(cli_site.app, name="site")
cli_simulate.register(app)
cli_provision.register(app)


OPTIONAL_VALUE = {"--mlflow": "default"}  # options whose value may be left out: `--mlflow [URI]`


def optional_values(argv: list[str]) -> list[str]:
    """``--mlflow`` with no value (last, or before another option) reads ``--mlflow default``."""
    out: list[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        if a in OPTIONAL_VALUE and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUE[a])
    return out


def main() -> None:
    import sys

    from protocol.transport.base import BusError, exit_code

    sys.argv[1:] = optional_values(sys.argv[1:])
    try:
        app()
    except BusError as e:  # broker unreachable / refused: one line, exit 1 or 2 (systemd stops on 2)
        typer.echo(f"fedbus: {e}", err=True)
        raise SystemExit(exit_code(e)) from None


if __name__ == "__main__":
    main()
