"""``fedbus coordinator cohort EXPERIMENT.json``: the sites' Table 1 before any training.

Over a live federation: one signed ``StatsTask`` per enrolled site (or per ``--site``), each
site answering as its ``stats`` policy says (DP by default, charged to its own ledger). Prints
the table (per site and pooled, every figure with its 95 % interval) on stderr, ``--json`` the
cohort document on stdout, and keeps it in ``STATE/cohorts/`` for the dashboard's Cohort page.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cohort import rows_of
from fedbus.cli_common import BROKER_PASSWORD_FILE, fail
from fedbus.cli_federation import BROKER, CONFIG, FEDERATION, KEY, STATE

_PROG = "fedbus coordinator cohort"


def print_cohort(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(stderr=True, width=240)
    released = [s for s, v in doc["sites"].items() if v["status"] == "released"]
    t = Table(title=f"cohort {doc['cohort_id']}: {doc['dataset']} (95 % intervals cover the DP noise)")
    t.add_column("")
    for s in released:
        t.add_column(s, overflow="fold")
    if doc.get("pooled"):
        t.add_column("pooled", overflow="fold")
    for label, cells in rows_of(doc):
        t.add_row(label, *cells)
    console.print(t)
    for s, v in doc["sites"].items():
        if v["status"] == "released":
            eps = "exact (not DP: a leak its policy allows)" if v["mode"] == "exact" else \
                f"ε {v['epsilon']:.3g} spent in all at δ {v['delta']:g} ({v['accountant']}), noise SD {v['noise_sd']:.3g}"
            console.print(f"{s}: {eps}")
        else:
            console.print(f"{s}: {v['status']}: {v.get('reason', '')} {v.get('detail', '')}".rstrip())


def register(app: typer.Typer) -> None:
    @app.command("cohort")
    def cohort(
        experiment: Path = typer.Argument(..., help="Experiment JSON (its dataset block: features, categorical, bounds)."),
        config: Optional[Path] = CONFIG,
        broker: Optional[str] = BROKER,
        broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
        state: Optional[Path] = STATE,
        key: Optional[Path] = KEY,
        federation: Optional[str] = FEDERATION,
        site: Optional[list[str]] = typer.Option(None, "--site", help="Ask exactly these enrolled sites (repeat)."),
        bins: int = typer.Option(20, "--bins", min=2, max=200, help="Histogram bins over each column's public bounds."),
        timeout: float = typer.Option(120.0, "--timeout", min=1.0, help="Seconds to wait for the sites' answers."),
        json_out: bool = typer.Option(False, "--json", help="Print the cohort document on stdout."),
    ) -> None:
        """Ask the sites for the cohort table of EXPERIMENT.json (DP per site policy), per site and pooled."""
        from fedbus import cli_federation
        from protocol.cohort import CohortError, spec_from_experiment
        from protocol.config import ConfigError, load_experiment
        from protocol.logs import configure_logging
        from protocol.transport import BusError, BusPermissionError

        configure_logging("cli", level="warning")

        def on_error(message: str, code: int = 2) -> NoReturn:
            fail(_PROG, message, code)

        fed = cli_federation.resolve(config=config, broker=broker, password_file=broker_password_file, state=state,
                                     key=key, federation=federation, prog=_PROG, on_error=on_error)
        try:
            exp = load_experiment(experiment)
            spec_from_experiment(exp, bins=bins)
        except (ConfigError, CohortError) as e:
            fail(_PROG, f"{experiment}: {e}")
        signer, _key = cli_federation.signer(fed, on_error=on_error)
        from coordinator.cohort import CohortCollector, CohortFailed

        lock, bus = cli_federation.lock_and_open(fed, what=f"cohort of {experiment}", on_error=on_error)
        try:
            doc = CohortCollector(exp, bus=bus, state_dir=fed.state, signer=signer, federation=fed.federation,
                                  sites=site or None, bins=bins, timeout_s=timeout).collect()
        except CohortFailed as e:
            fail(_PROG, str(e))
        except BusError as e:
            fail(_PROG, str(e), 2 if isinstance(e, BusPermissionError) else 1)
        finally:
            bus.close()
            lock.release()
        print_cohort(doc)
        if json_out:
            sys.stdout.write(json.dumps(doc) + "\n")
        if not doc.get("pooled"):
            typer.echo("no site released its cohort table", err=True)
            raise typer.Exit(1)
