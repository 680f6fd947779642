"""``fedbus coordinator models register|list|show|export``: the signed model registry.

``register RUN --name NAME`` is the dashboard's "Mark valid" (fedbus/dashboard/actions.py):
a signed approval, then a signed registry entry; ``--mlflow URI`` also registers the version
in MLflow's model registry. ``export`` writes the checkpoint, the signed entry and the model
card (Markdown and HTML). Bad input: one line, exit 2.
"""

from __future__ import annotations

import getpass
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(help="The model registry: signed versions of models marked valid, and their model cards.",
                  no_args_is_help=True)
STATE = typer.Option(..., "--state", help="Coordinator state directory.")
JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"fedbus coordinator models: {message}", err=True)
    raise typer.Exit(code)


def _state(state: Path) -> Path:
    if not (state / "coordinator.db").exists():
        _fail(f"{state} holds no coordinator state (no coordinator.db): check --state")
    return state


def _emit(doc: Any, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")


@app.command("register")
def register(run_id: str = typer.Argument(...), name: Optional[str] = typer.Option(None, "--name", help="Model name [the experiment's]."),
             state: Path = STATE, key: Optional[Path] = typer.Option(None, "--key", help="Coordinator private key [STATE/coordinator.key]."),
             approved_by: Optional[str] = typer.Option(None, "--approved-by", help="Who approves [the login name]."),
             note: str = typer.Option("", "--note", help="Why it is valid (kept in the signed approval)."),
             mlflow: Optional[str] = typer.Option(None, "--mlflow", help="Also register in MLflow's model registry at this URI."),
             json_out: bool = JSON) -> None:
    """Mark RUN's final model valid: a signed approval and the next signed version of NAME."""
    from fedbus.dashboard.actions import ActionError, Actions

    if key is not None and not key.is_file():
        _fail(f"--key {key} does not exist")
    actions = Actions(_state(state), key=key, broker=None, federation=None)
    try:
        out = actions.approve(run_id, who=approved_by or getpass.getuser(), note=note, model_name=name, mlflow=mlflow)
    except ActionError as e:
        _fail(str(e))
    rec = out["registry"]
    _emit(out, json_out)
    typer.echo(f"registered {rec['name']} v{rec['version']}: run {rec['run_id']} round {rec['round']}, "
               f"checkpoint sha256 {rec['checkpoint_sha256'][:16]}…, approved by {rec['approved_by']}"
               + (f"; MLflow {out['mlflow']['model']} version {out['mlflow']['mlflow_version']}" if "mlflow" in out else ""),
               err=True)


@app.command("list")
def list_(state: Path = STATE, name: Optional[str] = typer.Option(None, "--name"), json_out: bool = JSON) -> None:
    """Every registered version: name, version, run, approver, when."""
    from coordinator.model_registry import RegistryError, check_name, entries

    try:
        found = [e["record"] for e in entries(_state(state), check_name(name) if name else None)]
    except RegistryError as e:
        _fail(str(e))
    _emit({"models": found}, json_out)
    for r in found:
        acc = (r["metrics"]["overall"].get("accuracy") or {}).get("value")
        typer.echo(f"{r['name']} v{r['version']}  run {r['run_id']}  approved by {r['approved_by']} at {r['approved_at_utc']}"
                   f"  test accuracy {acc if acc is None else f'{acc:.3f}'}", err=True)
    if not found:
        typer.echo("no registered models", err=True)


def _one(state: Path, name: str, version: Optional[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    from coordinator.model_card import card_inputs
    from coordinator.model_registry import RegistryError, entry
    from coordinator.state import StateStore

    try:
        signed = entry(_state(state), name, version)
    except RegistryError as e:
        _fail(str(e))
    store = StateStore(state)
    try:
        return signed, card_inputs(store, state, signed)
    finally:
        store.close()


@app.command("show")
def show(name: str = typer.Argument(...), version: Optional[int] = typer.Option(None, "--version", min=1),
         state: Path = STATE, json_out: bool = JSON) -> None:
    """One version (the latest by default) and whether its signature verifies; the model card as Markdown."""
    from coordinator.model_card import markdown

    signed, inputs = _one(state, name, version)
    _emit({**signed["record"], "verified": inputs["verified"]}, json_out)
    if not json_out:
        typer.echo(markdown(signed["record"], **inputs))
    if inputs["verified"] is False:
        typer.echo(f"{name}: the entry does NOT verify (run `fedbus coordinator audit {signed['record']['run_id']}`)", err=True)
        raise typer.Exit(1)


@app.command("export")
def export(name: str = typer.Argument(...), version: Optional[int] = typer.Option(None, "--version", min=1),
           out: Path = typer.Option(..., "--out", help="Directory to write."), state: Path = STATE, json_out: bool = JSON) -> None:
    """The checkpoint, the signed entry and the model card (Markdown, HTML) of one version."""
    from coordinator.checkpoints import sha256_file
    from coordinator.model_card import html_page, markdown

    signed, inputs = _one(state, name, version)
    rec = signed["record"]
    if inputs["verified"] is not True:
        _fail(f"{name} v{rec['version']} does not verify: run `fedbus coordinator audit {rec['run_id']}`", 1)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{rec['name']}-v{rec['version']}"
    files = {"model": out / f"{stem}.safetensors", "entry": out / f"{stem}.registry.json",
             "card_md": out / f"{stem}.model-card.md", "card_html": out / f"{stem}.model-card.html"}
    shutil.copyfile(state / rec["checkpoint"], files["model"])
    if sha256_file(files["model"]) != rec["checkpoint_sha256"]:
        _fail(f"the copied checkpoint does not have the registered sha256 {rec['checkpoint_sha256']}", 1)
    files["entry"].write_text(json.dumps(signed, indent=2))
    files["card_md"].write_text(markdown(rec, **inputs))
    files["card_html"].write_text(html_page(rec, **inputs))
    _emit({k: str(v) for k, v in files.items()}, json_out)
    for k, v in files.items():
        typer.echo(f"{k}: {v}", err=True)
