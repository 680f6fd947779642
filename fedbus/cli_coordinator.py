"""``fedbus coordinator``: enroll sites, run experiments, read results back, audit.

Human output (tables, progress) goes to stderr; ``--json`` prints one JSON document on
stdout. Exit codes: 0 success, 1 a run (or audit) that failed, 2 bad usage or input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedbus.cli_common import MLFLOW, log_to_mlflow, mlflow_uri
from protocol.dp_figures import shown

app = typer.Typer(help="The coordinator: sites, runs, results, audit.", no_args_is_help=True)
runs_app = typer.Typer(help="Read back stored runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
from fedbus import cli_dead_letters  # noqa: E402  (a sub-group of its own)

app.add_typer(cli_dead_letters.app, name="dead-letters")
from fedbus import cli_coordinator_run  # noqa: E402  (run, runs list|stop, logs)

cli_coordinator_run.register(app, runs_app)
from fedbus import cli_cohort  # noqa: E402  (cohort: the sites' Table 1 before training)

cli_cohort.register(app)
from fedbus import cli_users  # noqa: E402  (users add|remove|passwd)

app.add_typer(cli_users.app, name="users")
from fedbus import cli_models  # noqa: E402  (models register|list|show|export)

app.add_typer(cli_models.app, name="models")

_err = Console(stderr=True)
STATE = typer.Option(..., "--state", help="Coordinator state directory (SQLite database, checkpoints).")
JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")


@app.callback()
def _group() -> None:
    """The coordinator: enroll sites, run experiments, read results back, audit."""


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"fedbus coordinator: {message}", err=True)
    raise typer.Exit(code)


def _store(state: Path, *, must_exist: bool = True):
    from coordinator.state import StateError, StateStore

    if must_exist and not (state / "coordinator.db").exists():
        _fail(f"{state} holds no coordinator state (no coordinator.db): check --state, or enroll a site first")
    try:
        return StateStore(state)
    except StateError as e:
        _fail(str(e))


def _emit(doc: Any, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))  # a site's hello or reply text is printed as written, never as terminal markup


@app.command()
def enroll(
    site_id: str = typer.Argument(..., help="The site's id (as in its site config)."),
    pubkey: Path = typer.Argument(..., help="The site's public key file (SITE.pub from `fedbus keys generate`)."),
    state: Path = STATE,
    json_out: bool = JSON,
) -> None:
    """Trust SITE_ID's public key: its updates verify from now on."""
    from coordinator.state import StateError

    try:
        pem = pubkey.read_bytes()
    except OSError as e:
        _fail(f"cannot read public key {pubkey}: {e.strerror}")
    store = _store(state, must_exist=False)
    try:
        kid = store.enroll(site_id, pem)
    except StateError as e:
        _fail(f"{e} (file {pubkey})")
    _emit({"site_id": site_id, "kid": kid}, json_out)
    typer.echo(f"enrolled {site_id} with key id {kid}", err=True)


@app.command()
def sites(state: Path = STATE, json_out: bool = JSON) -> None:
    """Enrolled sites and the datasets their SiteHello offered."""
    from coordinator.registry import SiteRegistry

    rows = SiteRegistry(_store(state)).catalogue()
    _emit(rows, json_out)
    table = Table(title="sites")
    for col in ("site", "key id", "software", "dataset", "rows", "columns", "target"):
        table.add_column(col)
    for r in rows:
        table.add_row(_fmt(r["site_id"]), _fmt(r["kid"]), _fmt(r["software_version"]), _fmt(r["dataset"]), _fmt(r["rows"]),
                      _fmt(r["columns"]), _fmt(r["target"]))
    _err.print(table)


def _print_run(doc: dict[str, Any]) -> None:
    table = Table(title=f"run {doc['run_id']} ({doc.get('aggregator')}) - {doc.get('status')}")
    for col in ("round", "replies", "val loss", "val accuracy", "val auc", "wall s"):
        table.add_column(col, justify="right")
    for r in doc.get("rounds", []):
        table.add_row(str(r["round"]), _fmt(r["replies"]), _fmt(r["loss"]), _fmt(r["accuracy"]), _fmt(r["auc"]),
                      _fmt(r["wall_s"]))
    _err.print(table)
    final = doc.get("final") or {}
    if final:
        _err.print("final (test: each site's fixed test split; 95 % intervals in brackets): "
                   + ", ".join(f"{k} {shown(final, k, percent=k == 'accuracy')}" for k in ("loss", "accuracy", "auc", "f1")))
        if final.get("majority_class_accuracy") is not None:
            _err.print(f"  majority class of each site: accuracy {_fmt(final['majority_class_accuracy'])}")
        if final.get("personalized"):
            p = final["personalized"]
            _err.print(f"personalised ({p.get('method')}), each site on its own test split: "
                       + ", ".join(f"{k} {shown(p, k, percent=k == 'accuracy')}" for k in ("accuracy", "auc", "f1"))
                       + f", mean_accuracy {_fmt(p.get('mean_accuracy'))}")
        for s, m in (final.get("per_site") or {}).items():
            line = (f"  {s}: " + ", ".join(f"{k} {shown(m, k, percent=k == 'accuracy')}"
                                           for k in ("accuracy", "auc", "f1", "sensitivity", "specificity"))
                    + f", majority-class accuracy {_fmt(m.get('majority_class_accuracy'))}, n_test {m.get('n_test')}")
            pm = m.get("personalized") or {}
            if pm:
                line += f"; personalised accuracy {shown(pm, 'accuracy', percent=True)}, auc {shown(pm, 'auc')}"
            _err.print(line)
            from coordinator.final import one_class_warnings

            for w in one_class_warnings({"per_site": {s: m}}):
                _err.print(f"  [yellow]warning[/] {escape(w)}", markup=True, highlight=False)
    if doc.get("epsilon"):
        priv = doc.get("privacy") or {}
        delta, planned = priv.get("delta"), priv.get("planned_epsilon") or {}
        _err.print("epsilon" + (f" (delta {delta}, {priv.get('accountant')} accountant)" if delta is not None else "")
                   + ": " + ", ".join(f"{s} {_fmt(e)}" + (f" (planned {_fmt(planned[s])})" if planned.get(s) is not None
                                                          else "") for s, e in doc["epsilon"].items()))
    if doc.get("best_round"):
        b = doc["best_round"]
        _err.print(f"best round by validation loss: {b['round']} (validation loss {_fmt(b['validation_loss'])})")
    for d in doc.get("declined", []):
        _err.print(f"[yellow]declined[/] {_fmt(d['site'])} round {_fmt(d.get('round'))}: {_fmt(d['reason'])}")
    for r in doc.get("rejected", []):
        _err.print(f"[red]rejected[/] {_fmt(r['site'])} {_fmt(r['message_id'])}: {_fmt(r['reason'])}")


def _run_or_fail(fn, *args):
    from coordinator.state import StateError

    try:
        return fn(*args)
    except StateError as e:
        _fail(str(e))


@runs_app.command("show")
def runs_show(run_id: str = typer.Argument(...), state: Path = STATE, json_out: bool = JSON) -> None:
    """Per-round metrics (aggregated and per site), final metrics, ε per site."""
    from coordinator.results import show_run

    doc = _run_or_fail(show_run, _store(state), run_id)
    _emit(doc, json_out)
    _print_run(doc)
    for r in doc.get("rounds", []):
        for s, m in (r.get("per_site") or {}).items():
            _err.print(f"  round {r['round']} {s}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(m.items())))


@runs_app.command("compare")
def runs_compare(a: str = typer.Argument(...), b: str = typer.Argument(...), state: Path = STATE,
                 json_out: bool = JSON) -> None:
    """Two runs side by side."""
    from coordinator.results import compare_runs

    doc = _run_or_fail(compare_runs, _store(state), a, b)
    _emit(doc, json_out)
    table = Table(title=f"{a} vs {b}")
    table.add_column("round", justify="right")
    for k in ("loss", "accuracy", "auc"):
        table.add_column(f"val {k} A", justify="right")
        table.add_column(f"val {k} B", justify="right")
    for r in doc["rounds"]:
        table.add_row(str(r["round"]), *[_fmt(r[f"{k}_{t}"]) for k in ("loss", "accuracy", "auc") for t in ("a", "b")])
    table.add_row("final (test)", *[_fmt(doc["final"][k][i]) for k in ("loss", "accuracy", "auc") for i in (0, 1)])
    if any(v is not None for v in doc["final"].get("personalized_accuracy", [])):
        table.add_row("personalised (test)", "-", "-",
                      *[_fmt(doc["final"][k][i]) for k in ("personalized_accuracy", "personalized_auc") for i in (0, 1)])
    _err.print(table)


@runs_app.command("export")
def runs_export(run_id: str = typer.Argument(...),
                out: Optional[Path] = typer.Option(None, "--out", help="Directory to write (needed unless --mlflow)."),
                state: Path = STATE, json_out: bool = JSON, mlflow: Optional[str] = MLFLOW) -> None:
    """Final model (safetensors + spec), experiment JSON as run, metrics CSV, loss/accuracy PNG plots;
    with --mlflow, the run logged to MLflow (parameters, metrics per round, final metrics, ε, artifacts)."""
    from coordinator.results import export_run

    if out is None and mlflow is None:
        _fail("runs export needs --out DIR, --mlflow [URI] or both")
    tracking = mlflow_uri(mlflow, out, prog="fedbus coordinator runs export")
    store = _store(state)
    if out is not None:
        files = _run_or_fail(export_run, store, run_id, out)
        _emit(files, json_out)
        for k, v in files.items():
            typer.echo(f"{k}: {v}", err=True)
    if tracking is not None:
        _run_or_fail(store.run, run_id)
        log_to_mlflow(state, run_id, tracking, prog="fedbus coordinator runs export")


@app.command()
def audit(run_id: str = typer.Argument(...), state: Path = STATE, json_out: bool = JSON) -> None:
    """Re-verify every stored signature and checkpoint hash of RUN; exit 1 on any mismatch."""
    from coordinator.audit import audit_run

    report = _run_or_fail(audit_run, _store(state), run_id)
    _emit(report.to_json(), json_out)
    if report.ok:
        typer.echo(f"audit {run_id}: OK ({report.signatures} signatures, {report.checkpoints} checkpoints, "
                   f"{report.approvals} approvals, {report.registry} registry entries verified)", err=True)
        return
    for p in report.problems:
        typer.echo(f"audit {run_id}: {p}", err=True)
    typer.echo(f"audit {run_id}: FAILED ({len(report.problems)} problem(s))", err=True)
    raise typer.Exit(1)


from fedbus.dashboard.cli import register_serve  # noqa: E402 - `coordinator serve` lives with the dashboard

register_serve(app)
