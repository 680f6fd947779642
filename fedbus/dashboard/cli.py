"""``fedbus coordinator serve``: the dashboard over one coordinator state directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register_serve(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        state: Path = typer.Option(..., "--state", help="Coordinator state directory (the one `coordinator run` writes)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond localhost needs --token, --tls-cert and --tls-key."),
        port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
        token: Optional[Path] = typer.Option(None, "--token", "--token-file",
                                             help="File holding the access token (one line, 16+ characters)."),
        allow_actions: bool = typer.Option(False, "--allow-actions",
                                           help="Allow stopping runs, signing approvals and starting runs."),
        key: Optional[Path] = typer.Option(None, "--key", help="Coordinator private key that signs approvals [STATE/coordinator.key]."),
        broker: Optional[str] = typer.Option(None, "--broker", help="Broker URL: dead letters, where started runs go, "
                                             "and site heartbeats between runs (the sites page's online/offline)."),
        federation: Optional[str] = typer.Option(None, "--federation", help="Federation whose dead letters to show [latest run's]."),
        tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Server certificate (PEM) to serve HTTPS with; required beyond localhost."),
        tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Private key of --tls-cert (PEM)."),
        users: Optional[Path] = typer.Option(None, "--users", help="Users file (`coordinator users add`): people sign in "
                                                                   "by name and password; their role decides what they may do."),
        mlflow: Optional[str] = typer.Option(None, "--mlflow", help="MLflow tracking URI (file:///DIR, http(s)://HOST, "
                                             "sqlite:///FILE; `--mlflow` alone: ./mlruns): \"Mark valid\" also registers "
                                             "the version in MLflow's model registry, and started runs are logged there. "
                                             "Needs fedbus[mlflow]."),
    ) -> None:
        """Serve the live dashboard (sites, budgets, runs, compare, dead letters) over STATE."""
        from fedbus.cli_common import mlflow_uri
        from fedbus.dashboard.security import TokenFileError
        from fedbus.dashboard.server import ServeError, ServeOptions, serve_forever

        if not state.is_dir():
            typer.echo(f"fedbus coordinator serve: --state {state} is not a directory", err=True)
            raise typer.Exit(2)
        tracking = mlflow_uri(mlflow, None, prog="fedbus coordinator serve")
        opts = ServeOptions(state=state, host=host, port=port, token_file=token, allow_actions=allow_actions,
                            key=key, broker=broker, federation=federation, tls_cert=tls_cert, tls_key=tls_key,
                            users_file=users, mlflow=tracking, liveness=broker is not None)
        try:
            serve_forever(opts, announce=lambda url: typer.echo(
                f"fedbus dashboard: {url}  ({'sign in with the token in ' + str(token) + '; ' if token else ''}"
                f"{'named users from ' + str(users) + '; ' if users else ''}"
                f"{'MLflow at ' + tracking + '; ' if tracking else ''}"
                f"{'site heartbeats watched; ' if broker else ''}"
                f"{'actions enabled' if allow_actions else 'read-only'}; Ctrl-C stops)", err=True))
        except (ServeError, TokenFileError) as e:
            typer.echo(f"fedbus coordinator serve: {e}", err=True)
            raise typer.Exit(2) from None
