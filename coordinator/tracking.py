"""Runs where researchers already track them: one finished fedbus run as one MLflow run.

``log_run`` reads a run back from the coordinator's state (the same documents ``runs show``
and ``runs export`` read) and logs, through MLflow's own client (``MlflowClient``, the
optional extra ``fedbus[mlflow]``):

* the experiment as run, flattened (``training.optimizer.learning_rate``, ...), as parameters;
* per round, the aggregated validation metrics (``val_loss``, ``val_accuracy``, ...) and each
  site's (``val_accuracy.site-1``), and the per-round test scores where the run asked for them
  (``test_accuracy``), with ``step`` = the round;
* the final test metrics per site and overall (``test_accuracy.site-1``) with their 95 %
  intervals (``test_accuracy.site-1.ci_low`` / ``.ci_high``);
* ε per site (``epsilon.site-1``) with δ and the accountant as parameters (``privacy.delta``,
  ``privacy.accountant``);
* the model (the last checkpoint, safetensors) and the experiment JSON as artifacts.

``TrackingError`` carries a one-line reason (a bad URI, a store that cannot be written); the
CLI prints it and exits 2. The registry (issue 25, item 3) extends ``log_run``'s run.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from coordinator.state import StateStore

MAX_PARAM_VALUE = 6000  # MLflow's limit on one parameter value
_METRICS = ("loss", "accuracy", "auc", "f1", "sensitivity", "specificity", "mse", "mae")


class TrackingError(Exception):
    """MLflow could not be reached or written; ``str(e)`` is one line saying which URI and why."""


def default_uri(base: Path | None = None) -> str:
    """A local MLflow file store: ``BASE/mlruns`` (the run's out directory), else ``./mlruns``."""
    return (Path(base or ".") / "mlruns").resolve().as_uri()


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys for nested maps and lists (``architecture.layers.1.type``), values as text."""
    out: dict[str, str] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(doc, list) and doc and any(isinstance(v, (dict, list)) for v in doc):
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        text = json.dumps(doc) if isinstance(doc, list) else str(doc)
        out[prefix[:-1][:250]] = text[:MAX_PARAM_VALUE]
    return out


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("MLflow is not installed: pip install 'fedbus[mlflow]'") from None
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in ("file", "http", "https", "sqlite", "postgresql", "mysql", "databricks"):
        raise TrackingError(f"--mlflow {uri!r}: not an MLflow tracking URI (use file:///DIR, http(s)://HOST, "
                            "sqlite:///FILE or a database URI)")
    if scheme == "file":
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):])
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"--mlflow {uri!r}: cannot create the file store ({e.strerror})") from None
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\..*")  # the file store's notice
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for a bad URI: one line for each
        raise TrackingError(f"--mlflow {uri!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def check_uri(uri: str) -> None:
    """Raise ``TrackingError`` now (before a run starts) if ``uri`` is no MLflow store we can write."""
    _client(uri)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def metrics_of(doc: dict[str, Any], rounds: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(key, value, step) for every metric of the run: per round (validation, test) and final."""
    out: list[tuple[str, float, int]] = []
    for r in rounds:
        step, m = int(r["round"]), r.get("metrics") or {}
        for k, v in (m.get("aggregate") or {}).items():
            if k in _METRICS and _finite(v):
                out.append((f"val_{k}", float(v), step))
        for site, sm in (m.get("per_site") or {}).items():
            for k in _METRICS:
                v = sm.get(f"eval_{k}", sm.get(k))
                if _finite(v):
                    out.append((f"val_{k}.{site}", float(v), step))
        test = m.get("test")
        if isinstance(test, dict):
            for k, v in test.items():
                if k in _METRICS and _finite(v):
                    out.append((f"test_{k}", float(v), step))
    final = doc.get("final") or {}
    last = max([int(r["round"]) for r in rounds] or [0])

    def final_metrics(prefix: str, suffix: str, m: dict[str, Any]) -> None:
        for k in _METRICS:
            if _finite(m.get(k)):
                out.append((f"{prefix}{k}{suffix}", float(m[k]), last))
            ci = (m.get("ci") or {}).get(k)
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(x) for x in ci):
                out.append((f"{prefix}{k}{suffix}.ci_low", float(ci[0]), last))
                out.append((f"{prefix}{k}{suffix}.ci_high", float(ci[1]), last))

    final_metrics("final_test_", "", final)
    for site, m in (final.get("per_site") or {}).items():
        final_metrics("final_test_", f".{site}", m)
    for site, eps in (doc.get("epsilon") or {}).items():
        if _finite(eps):
            out.append((f"epsilon.{site}", float(eps), last))
    return out


def log_run(state_dir: Path, run_id: str, uri: str) -> dict[str, str]:
    """Log run ``run_id`` of the coordinator state ``state_dir`` to MLflow at ``uri``; returns
    ``{"uri", "experiment_id", "mlflow_run_id"}``. Raises ``TrackingError`` (one line)."""
    from mlflow.entities import Metric, Param, RunTag

    from coordinator.results import export_run, show_run

    store = StateStore(state_dir)
    doc = show_run(store, run_id)
    run = store.run(run_id)
    rounds = store.rounds(run_id)
    client = _client(uri)
    experiment = run["experiment"]
    name = f"fedbus/{(experiment.get('basic_info') or {}).get('name') or 'experiment'}"
    try:
        found = client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found is not None else client.create_experiment(name)
        mrun = client.create_run(exp_id, run_name=run_id, tags={
            "fedbus.run_id": run_id, "fedbus.federation": str(run["federation"]), "fedbus.status": str(run["status"]),
            "fedbus.aggregator": str(run["aggregator"])})
        rid = mrun.info.run_id
        params = flatten(experiment)
        privacy = doc.get("privacy") or {}
        params.update({"privacy.delta": str(privacy.get("delta")), "privacy.accountant": str(privacy.get("accountant")),
                       "fedbus.rounds_planned": str(run["rounds_planned"])})
        items = sorted(params.items())
        for i in range(0, len(items), 100):
            client.log_batch(rid, params=[Param(k, v) for k, v in items[i:i + 100]])
        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step) for k, v, step in metrics_of(doc, rounds)]
        for i in range(0, len(ms), 1000):
            client.log_batch(rid, metrics=ms[i:i + 1000])
        client.log_batch(rid, tags=[RunTag("fedbus.epsilon_reported_with", "delta and accountant in params privacy.*")])
        with tempfile.TemporaryDirectory() as tmp:
            files = export_run(store, run_id, Path(tmp) / "export")
            for key in ("model", "experiment", "model_spec"):
                if key in files:
                    client.log_artifact(rid, files[key])
            shutil.rmtree(Path(tmp) / "export", ignore_errors=True)
        status = "FINISHED" if str(run["status"]).startswith("completed") else "FAILED"
        client.set_terminated(rid, status=status)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - a store MLflow cannot write: one line, not a traceback
        raise TrackingError(f"--mlflow {uri!r}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
    return {"uri": uri, "experiment_id": str(exp_id), "mlflow_run_id": rid}
