"""Placeholder verb groups: exit 2 with "not available yet" until their issue lands."""

import typer


def not_available(group: str) -> typer.Typer:
    app = typer.Typer(help=f"{group} (not available yet)", no_args_is_help=False)

    @app.callback(invoke_without_command=True)
    def _stub(ctx: typer.Context) -> None:
        typer.echo(f"fedbus {group}: not available yet", err=True)
        raise typer.Exit(2)

    return app
