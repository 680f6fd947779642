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
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedbus.cli_common import BROKER_PASSWORD_FILE, broker_url, fail

_PROG = "fedbus coordinator cohort"


def _fmt(fig: dict[str, Any] | None, *, pct: bool = False, digits: int = 1) -> str:
    if not fig or fig.get("value") is None:
        return "-"
    k = 100.0 if pct else 1.0
    lo, hi = fig["ci"]
    unit = " %" if pct else ""
    return f"{fig['value'] * k:.{digits}f}{unit} ({lo * k:.{digits}f}–{hi * k:.{digits}f})"


def rows_of(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, one cell per site then pooled) for every figure of the cohort table."""
    sites = [s for s, v in doc["sites"].items() if v["status"] == "released"]
    tables = [doc["sites"][s]["table"] for s in sites] + ([doc["pooled"]["table"]] if doc.get("pooled") else [])
    out: list[tuple[str, list[str]]] = [("n (announced rows)", [f"{t['n']:.0f}" for t in tables])]
    for i, col in enumerate(doc["columns"]):
        cols = [t["columns"][i] for t in tables]
        name = col["name"]
        if col["kind"] == "outcome" and col.get("task") == "binary":
            out.append((f"{name}: prevalence", [_fmt(c.get("prevalence"), pct=True) for c in cols]))
        elif col["kind"] == "categorical" or (col["kind"] == "outcome" and col.get("task") == "multiclass"):
            key, label = ("categories", "category") if col["kind"] == "categorical" else ("classes", "class")
            for j, cat in enumerate(cols[0][key] if cols else []):
                out.append((f"{name} = {cat[label]}", [_fmt(c[key][j]["share"], pct=True) for c in cols]))
        elif col.get("bounds"):
            out.append((f"{name}: mean (SD)", [f"{_fmt(c.get('mean'))}  SD {_fmt(c.get('sd'))}" for c in cols]))
            out.append((f"{name}: median [IQR]", [
                f"{_fmt(c.get('median'))} [{_fmt(c.get('q1'))}, {_fmt(c.get('q3'))}]" for c in cols]))
        out.append((f"{name}: missing", [_fmt(c.get("missing_share"), pct=True) for c in cols]))
    return out


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
        config: Optional[Path] = typer.Option(None, "--config", help="A kit's coordinator.toml."),
        broker: Optional[str] = typer.Option(None, "--broker", help="amqp://user[:pass]@host:5672/vhost"),
        broker_password_file: Optional[Path] = BROKER_PASSWORD_FILE,
        state: Optional[Path] = typer.Option(None, "--state", help="Coordinator state directory."),
        key: Optional[Path] = typer.Option(None, "--key", help="Coordinator private key."),
        federation: Optional[str] = typer.Option(None, "--federation", help="Federation name."),
        site: Optional[list[str]] = typer.Option(None, "--site", help="Ask exactly these enrolled sites (repeat)."),
        bins: int = typer.Option(20, "--bins", min=2, max=200, help="Histogram bins over each column's public bounds."),
        timeout: float = typer.Option(120.0, "--timeout", min=1.0, help="Seconds to wait for the sites' answers."),
        json_out: bool = typer.Option(False, "--json", help="Print the cohort document on stdout."),
    ) -> None:
        """Ask the sites for the cohort table of EXPERIMENT.json (DP per site policy), per site and pooled."""
        from fedbus.coordinator_lock import FederationLock, FederationLocked
        from fedbus.kits import ProjectError, load_coordinator_config
        from protocol.cohort import CohortError, spec_from_experiment
        from protocol.config import ConfigError, load_experiment
        from protocol.logs import configure_logging
        from protocol.signing import Signer
        from protocol.transport import BusError, BusPermissionError, open_bus

        configure_logging("cli", level="warning")
        tls = None
        if config is not None:
            try:
                cfg = load_coordinator_config(config)
            except ProjectError as e:
                fail(_PROG, f"--config {config}: {e}")
            broker = broker or cfg.broker_url
            state, key, federation, tls = state or cfg.state_dir, key or cfg.key_path, federation or cfg.federation, cfg.tls
        if broker is None or state is None or federation is None:
            fail(_PROG, "--broker, --state and --federation are required (or --config coordinator.toml from a kit)")
        broker = broker_url(broker, broker_password_file, prog=_PROG)
        try:
            exp = load_experiment(experiment)
            spec_from_experiment(exp, bins=bins)
        except (ConfigError, CohortError) as e:
            fail(_PROG, f"{experiment}: {e}")
        key = key or state / "coordinator.key"
        try:
            signer = Signer.from_file(key)
        except (OSError, ValueError) as e:
            fail(_PROG, f"--key: cannot load coordinator key {key}: {e}")
        from coordinator.cohort import CohortCollector, CohortFailed

        state.mkdir(parents=True, exist_ok=True)
        lock = FederationLock(state, federation)
        try:
            lock.acquire(state=str(state.resolve()), experiment=f"cohort of {experiment}")
        except FederationLocked as e:
            fail(_PROG, str(e))
        try:
            bus = open_bus(broker, tls=tls) if tls else open_bus(broker)
        except (BusError, ValueError, OSError) as e:
            lock.release()
            fail(_PROG, f"cannot open broker: {e}", 2 if isinstance(e, (BusPermissionError, ValueError)) else 1)
        try:
            doc = CohortCollector(exp, bus=bus, state_dir=state, signer=signer, federation=federation,
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
