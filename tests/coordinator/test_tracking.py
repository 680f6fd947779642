"""MLflow tracking (issue 25): a run logged by `simulate --mlflow` and `coordinator runs export --mlflow`,
read back with MLflow's own client (``MlflowClient``) from a real MLflow file store.

Oracles: the coordinator's SQLite database (per-round validation losses, the last checkpoint's
sha256), the run's stored result (final test metrics with their intervals, ε, δ, accountant) and
the experiment JSON as run. Bad URIs: one line, exit 2, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "heart_failure.json"


def fedbus(*args: str, check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True, text=True, timeout=300,
                       env=env, cwd=cwd)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mlflow-sim") / "out"
    r = fedbus("simulate", str(EXAMPLE), "--sites", "2", "--rounds", "2", "--out", str(out), "--json", "--mlflow")
    return out, json.loads(r.stdout)


def read_back(uri: str, run_id: str):
    """The tracked run of ``run_id`` (a registered version's own MLflow run, in the registry's experiment, is not it)."""
    from coordinator.model_registry_mlflow import EXPERIMENT as REGISTRY

    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() if e.name != REGISTRY for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("fedbus.run_id") == run_id]
    assert len(runs) == 1, runs
    return client, runs[0]


def check_logged(client: MlflowClient, run, state: Path, doc: dict) -> None:
    rid = run.info.run_id
    experiment = json.loads((state / "coordinator.db").exists() and sqlite3.connect(state / "coordinator.db").execute(
        "SELECT experiment_json FROM runs WHERE run_id=?", (doc["run_id"],)).fetchone()[0])
    params = run.data.params
    assert params["training.batch_size"] == str(experiment["training"]["batch_size"])
    assert params["training.optimizer.learning_rate"] == str(experiment["training"]["optimizer"]["learning_rate"])
    assert params["privacy.delta"] == str(doc["privacy"]["delta"]) and params["privacy.accountant"] == "rdp"
    db = sqlite3.connect(state / "coordinator.db")
    rounds = db.execute("SELECT round, loss, checkpoint_sha256 FROM rounds WHERE run_id=? ORDER BY round",
                        (doc["run_id"],)).fetchall()
    history = client.get_metric_history(rid, "val_loss")
    assert [(m.step, m.value) for m in history] == [(r, pytest.approx(loss)) for r, loss, _ in rounds]
    metrics = run.data.metrics
    for site, m in doc["final"]["per_site"].items():
        if not isinstance(m.get("accuracy"), (int, float)):  # no final figure from this site: none logged
            assert f"final_test_accuracy.{site}" not in metrics, (site, m)
            continue
        assert metrics[f"final_test_accuracy.{site}"] == pytest.approx(m["accuracy"])
        lo, hi = m["ci"]["accuracy"]
        assert metrics[f"final_test_accuracy.{site}.ci_low"] == pytest.approx(lo)
        assert metrics[f"final_test_accuracy.{site}.ci_high"] == pytest.approx(hi)
        assert metrics[f"epsilon.{site}"] == pytest.approx(doc["epsilon"][site])
    assert {a.path for a in client.list_artifacts(rid)} >= {"model.safetensors", "experiment.json"}
    model = Path(client.download_artifacts(rid, "model.safetensors"))
    assert hashlib.sha256(model.read_bytes()).hexdigest() == rounds[-1][2]
    as_run = json.loads(Path(client.download_artifacts(rid, "experiment.json")).read_text())
    assert as_run["metadata"]["fedbus_run_id"] == doc["run_id"]
    assert run.info.status == "FINISHED"


def test_simulate_mlflow_default_logs_into_the_out_dirs_file_store(simulated):
    out, doc = simulated
    uri = (out / "mlruns").resolve().as_uri()
    client, run = read_back(uri, doc["run_id"])
    check_logged(client, run, out / "coordinator", doc)


def test_runs_export_logs_a_finished_run_to_a_named_store(simulated, tmp_path):
    out, doc = simulated
    uri = (tmp_path / "store").resolve().as_uri()
    fedbus("coordinator", "runs", "export", doc["run_id"], "--state", str(out / "coordinator"), "--mlflow", uri)
    client, run = read_back(uri, doc["run_id"])
    check_logged(client, run, out / "coordinator", doc)


def test_a_bad_mlflow_uri_is_one_line_and_exit_2(simulated, tmp_path):
    out, doc = simulated
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    export = ["coordinator", "runs", "export", doc["run_id"], "--state", str(out / "coordinator"), "--mlflow"]
    bad = "ftp://example.org/mlruns"
    for args in (["simulate", str(EXAMPLE), "--sites", "2", "--mlflow", bad], [*export, bad],
                 [*export, blocker.resolve().as_uri() + "/store"],  # a store that cannot be created
                 ["coordinator", "run", str(EXAMPLE), "--broker", "amqp://127.0.0.1:1/%2F", "--state",
                  str(tmp_path / "s"), "--federation", "f", "--mlflow", bad]):
        r = fedbus(*args, check=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "--mlflow" in lines[0], (args, r.stderr)
