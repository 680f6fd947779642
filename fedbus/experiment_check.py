"""One check of an experiment, for ``fedbus config validate`` and the dashboard's model designer.

The schema (``protocol.config``), the shape walk and parameter count (``protocol.model.summarize``,
on the meta device), the aggregator's name, and, given the rows each site announced, each
site's ε plan (``protocol.privacy_plan.plan_catalogue``, the one planner).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.config import ConfigError, Experiment, load_experiment

if TYPE_CHECKING:
    from protocol.model import ModelSummary


def check_experiment(source: str | Path | Mapping[str, Any]) -> tuple[Experiment, ModelSummary]:
    """The experiment and its model summary; ``ConfigError`` (with the JSON path) on the first problem."""
    from coordinator.aggregators import unknown_name
    from protocol.model import summarize  # torch: imported only by the verbs that need it

    experiment = load_experiment(source)
    summary = summarize(experiment.architecture.layers)
    why = unknown_name(str(experiment.federated.name))
    if why is not None:  # a misspelt aggregator fails here, not when the run starts
        raise ConfigError("federated.name", why)
    return experiment, summary


def report(experiment: Experiment, summary: ModelSummary) -> dict[str, Any]:
    wire = experiment.to_wire()
    return {
        "valid": True,
        "name": experiment.name,
        "parameters": summary.parameters,
        "input_shape": summary.input_shape,
        "output_shape": summary.output_shape,
        "layers": summary.layers,
        "training": wire["training"],
        "federated": wire["federated"],
        "dataset": {k: v for k, v in wire["dataset"].items() if k != "selected_datasets"},
        "not_used_by_fedbus": experiment.not_used,
    }


def error_doc(exc: ConfigError) -> dict[str, Any]:
    return {"valid": False, "error": {"path": exc.path, "message": exc.message,
                                      "errors": [{"path": p, "message": m} for p, m in exc.errors]}}


def privacy_plan(experiment: Experiment, rows_by_site: dict[str, int]) -> dict[str, Any] | None:
    """Each site's ε at the end of the run from its announced rows; None when DP is off."""
    from protocol import privacy_plan as planner

    if experiment.training.dp is None or not rows_by_site:
        return None
    return planner.plan_catalogue(experiment, rows_by_site)
