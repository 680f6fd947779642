"""A registry entry into MLflow's model registry (the optional ``fedbus[mlflow]`` extra).

The version is logged as an MLflow run in the experiment ``fedbus-registry`` (the
checkpoint as the ``model`` artifact, the signed entry as ``registry-entry.json``, the
final metrics, ε per site as metrics) and registered as a version of the model of the same
name, tagged with fedbus's version, checkpoint sha256 and approver. MLflow's version
numbers are its own; the ``fedbus.version`` tag links the two.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

EXPERIMENT = "fedbus-registry"


def to_mlflow(uri: str, record: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """Log and register ``record``'s model at ``uri`` (e.g. ``file:///srv/mlruns``); returns where it went."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(EXPERIMENT)
    tags = {"fedbus.name": record["name"], "fedbus.version": str(record["version"]), "fedbus.run_id": record["run_id"],
            "fedbus.checkpoint_sha256": record["checkpoint_sha256"], "fedbus.experiment_sha256": record["experiment_sha256"],
            "fedbus.approved_by": record["approved_by"], "fedbus.approved_at": record["approved_at_utc"]}
    run = client.create_run(exp_id, run_name=f"{record['name']}-v{record['version']}", tags=tags)
    rid = run.info.run_id
    for k, fig in (record["metrics"].get("overall") or {}).items():
        if fig:
            client.log_metric(rid, f"test_{k}", fig["value"])
    for site, eps in (record["privacy"].get("epsilon") or {}).items():
        if eps is not None:
            client.log_metric(rid, f"epsilon_{site}", eps)
    client.log_artifact(rid, str(checkpoint), "model")
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "registry-entry.json"
        doc.write_text(json.dumps(record, indent=2))
        client.log_artifact(rid, str(doc))
    client.set_terminated(rid)
    try:
        client.create_registered_model(record["name"], description="registered by fedbus (coordinator/model_registry.py)")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    mv = client.create_model_version(record["name"], source=f"{run.info.artifact_uri}/model", run_id=rid, tags=tags,
                                     description=f"fedbus {record['name']} v{record['version']} from run {record['run_id']}")
    return {"uri": uri, "mlflow_run_id": rid, "model": record["name"], "mlflow_version": str(mv.version)}
