import typer


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def simulate() -> None:
        """Run a whole federation on one machine (not available yet)."""
        typer.echo("fedbus simulate: not available yet", err=True)
        raise typer.Exit(2)
