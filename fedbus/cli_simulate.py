"""``fedbus simulate EXPERIMENT.json``: a whole federation on one machine.

Runs the production coordinator and site workers (in-memory bus by default, one OS
process per site with ``--broker amqp://...``), prints the results table on stderr and,
with ``--json``, the docs/design.md result document on stdout. Exit 0 success, 1 a run that
failed, 2 bad usage or bad input, 3 a run that completed with gaps (a sampled site declined
or missed a round: ``status`` "completed_with_gaps", the ``gaps`` list names them).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

COMPLETED_WITH_GAPS = "completed_with_gaps"  # coordinator.rounds.result's status (imported lazily: CLI start-up)


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        experiment: Annotated[Path, typer.Argument(help="Experiment JSON (e.g. examples/heart_failure.json)")],
        sites: Annotated[Optional[int], typer.Option("--sites", min=1, help="Number of sites (iid/dirichlet; default 3)")] = None,
        partition: Annotated[str, typer.Option("--partition", help="iid | dirichlet:ALPHA | quantity:N,N,... | natural:COLUMN")] = "iid",
        dataset: Annotated[Optional[str], typer.Option("--dataset", help="heart_failure | heart_disease | ecg_synthetic | a CSV/Parquet path (default: the experiment's dataset.name)")] = None,
        target: Annotated[Optional[str], typer.Option("--target", help="Target column of a CSV/Parquet dataset")] = None,
        broker: Annotated[str, typer.Option("--broker", help="memory (one process) or amqp://... (one process per site)")] = "memory",
        rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Override training.rounds")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Write the report, model and coordinator state here")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the result document on stdout")] = False,
        baselines: Annotated[bool, typer.Option("--baselines", help="Also train pooled and local-only baselines")] = False,
        faults: Annotated[Optional[str], typer.Option("--faults", help="e.g. 'dropout:0.2,straggler:site-2:exp:3,crash:site-3@2,byzantine:site-1:flip'")] = None,
        seed: Annotated[Optional[int], typer.Option("--seed", help="Override training.seed (the run's seed)")] = None,
        round_timeout: Annotated[Optional[float], typer.Option("--round-timeout", help="Seconds per round before closing it with the replies in")] = None,
        log_level: Annotated[str, typer.Option("--log-level", help="debug | info | warning | error")] = "warning",
        reproducible_dp: Annotated[bool, typer.Option("--reproducible-dp", help="Research runs: sites draw DP noise from a seed (reported in every update) instead of the OS; never for real data")] = False,
        site_budget: Annotated[Optional[float], typer.Option("--site-budget", min=0.0, help="Every simulated site's max_epsilon (lifetime, per dataset), as a hospital's policy sets it; default: no limit (ε spent is still announced)")] = None,
        serve: Annotated[bool, typer.Option("--serve", help="Open the dashboard (localhost, actions on) over --out's coordinator state, live; serves on after the run until Ctrl-C")] = False,
        mlflow: Annotated[Optional[str], typer.Option("--mlflow", help="Also log the run to MLflow at this tracking URI; `--mlflow` alone: OUT/mlruns, else ./mlruns (fedbus[mlflow])")] = None,
        cohort_only: Annotated[bool, typer.Option("--cohort-only", help="Train nothing: ask the simulated sites for the cohort table (DP, each site's default policy), per site and pooled")] = False,
        bins: Annotated[int, typer.Option("--bins", min=2, max=200, help="Histogram bins of the cohort table (--cohort-only)")] = 20,
        serve_port: Annotated[int, typer.Option("--serve-port", min=0, max=65535, help="Dashboard port with --serve (0: any free port)")] = 8765,
    ) -> None:
        """Run a whole federation on one machine through the production coordinator and site workers."""
        from rich.console import Console
        from rich.markup import escape

        from protocol.logs import configure_logging

        configure_logging(mode="cli", level=log_level)
        if not broker.startswith("memory"):
            from protocol.transport.connector import reach
            from protocol.transport.endpoints import EndpointError

            try:
                reach(broker)  # before torch's imports: an absent broker fails in 10 s, whatever the load
            except EndpointError as e:
                Console(stderr=True).print(f"[red]fedbus simulate:[/red] --broker: {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(2) from None
        from simulator.run import SimulationFailed, SimulationInputError, simulate as run_simulation
        from simulator.table import print_results

        # Opacus' hooks on a model whose inputs need no gradient: harmless, and noise in a results table.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
        err = Console(stderr=True)
        if cohort_only:
            _cohort_only(experiment, sites=sites, partition=partition, dataset=dataset, broker=broker, out=out,
                         target=target, seed=seed, bins=bins, json_out=json_out, err=err)
            return
        from fedbus.cli_common import log_to_mlflow, mlflow_uri

        tracking = mlflow_uri(mlflow, out, prog="fedbus simulate")
        keep = out
        if tracking is not None and out is None:  # the run's state must outlive the simulation to be logged
            import tempfile

            out = Path(tempfile.mkdtemp(prefix="fedbus-sim-mlflow-"))
        dashboard = _start_dashboard(out, serve_port, broker, err, tracking) if serve else None
        try:
            doc = run_simulation(
                experiment, sites=sites, partition=partition, dataset=dataset, broker=broker, rounds=rounds,
                out=out, baselines=baselines, faults=faults, target=target, seed=seed,
                round_timeout_s=round_timeout, progress=True, reproducible_dp=reproducible_dp, site_budget=site_budget,
            )
        except SimulationInputError as e:
            err.print(f"[red]fedbus simulate:[/red] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except SimulationFailed as e:
            if json_out:  # a failed run still prints its document
                failed = dict(e.document or {"reason": str(e)})
                failed["status"] = "failed"
                typer.echo(json.dumps(failed, default=str))
            err.print(f"[red]fedbus simulate: run failed:[/red] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(1) from None
        print_results(doc, console=err)
        if tracking is not None:
            assert out is not None
            log_to_mlflow(out / "coordinator", doc["run_id"], tracking, prog="fedbus simulate")
            if keep is None:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                out = None
        if out is not None:
            err.print(f"report: {out / 'report.html'}  ·  coordinator state: {out / 'coordinator'}")
        if json_out:
            typer.echo(json.dumps(doc, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
        if dashboard is not None:
            err.print(f"dashboard still serving at {dashboard.url} (Ctrl-C stops)")
            try:
                dashboard.thread.join()
            except KeyboardInterrupt:
                dashboard.stop()
        if doc.get("status") == COMPLETED_WITH_GAPS:
            from coordinator.rounds.result import EXIT_WITH_GAPS, describe_gaps

            err.print(f"[yellow]run completed with gaps:[/yellow] {escape(describe_gaps(doc.get('gaps') or []))}",
                      soft_wrap=True)
            raise typer.Exit(EXIT_WITH_GAPS)


def _cohort_only(experiment: Path, *, sites: Optional[int], partition: str, dataset: Optional[str], broker: str,
                 out: Optional[Path], target: Optional[str], seed: Optional[int], bins: int, json_out: bool,
                 err) -> None:
    """``--cohort-only``: the cohort table of the simulated sites, nothing trained."""
    from rich.markup import escape

    from fedbus.cli_cohort import print_cohort
    from simulator.run import SimulationFailed, SimulationInputError, simulate as run_simulation

    try:
        doc = run_simulation(experiment, sites=sites, partition=partition, dataset=dataset, broker=broker, out=out,
                             target=target, seed=seed, progress=False, cohort_only=True, bins=bins)
    except SimulationInputError as e:
        err.print(f"[red]fedbus simulate:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except SimulationFailed as e:
        err.print(f"[red]fedbus simulate: cohort failed:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1) from None
    print_cohort(doc)
    if out is not None:
        err.print(f"cohort kept in {out / 'coordinator' / 'cohorts'}")
    if json_out:
        typer.echo(json.dumps(doc))
    if not doc.get("pooled"):
        raise typer.Exit(1)


def _start_dashboard(out: Optional[Path], port: int, broker: str, err, mlflow: Optional[str] = None) -> object:
    """``--serve``: the dashboard on a thread over ``OUT/coordinator``, read-only, localhost."""
    from rich.markup import escape

    from fedbus.dashboard.server import BackgroundServer, ServeError, ServeOptions

    if out is None:
        err.print("[red]fedbus simulate:[/red] --serve needs --out DIR (the dashboard reads DIR/coordinator)")
        raise typer.Exit(2)
    (out / "coordinator").mkdir(parents=True, exist_ok=True)
    try:
        server = BackgroundServer(ServeOptions(state=out / "coordinator", port=port, allow_actions=True,
                                               broker=None if broker.startswith("memory") else broker,
                                               simulate_out=out if broker.startswith("memory") else None,
                                               port_option="--serve-port", mlflow=mlflow)).start()
    except ServeError as e:
        err.print(f"[red]fedbus simulate:[/red] --serve: {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    err.print(f"dashboard: {server.url}", soft_wrap=True)
    return server
