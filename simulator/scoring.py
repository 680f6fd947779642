"""After the run: the final global model's weights, scored on the rows the simulator held back
from every site, and saved beside the report (``simulator/run.py`` calls these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulator.errors import SimulationFailed

if TYPE_CHECKING:
    from protocol.config import Experiment


def final_weights(result: Any, state_dir: Path, doc: dict[str, Any]) -> Any:
    weights = getattr(result, "final_weights", None) or getattr(result, "weights", None)
    if weights is not None:
        return weights
    from coordinator.state import StateStore

    store = StateStore(state_dir)
    try:
        last = store.last_round(doc["run_id"])
    finally:
        store.close()
    if not last or not last.get("checkpoint"):
        raise SimulationFailed(f"run {doc.get('run_id')} has no committed checkpoint to evaluate")
    from coordinator.checkpoints import load_tensors

    path = Path(last["checkpoint"])
    if not path.is_absolute():
        path = state_dir / path
    return load_tensors(path, sha256=last.get("checkpoint_sha256"))


def model_with(exp: Experiment, weights: Any) -> Any:
    from protocol.model import build_model, load_tensors

    model = build_model(exp.architecture.layers, seed=int(exp.training.seed))
    load_tensors(model, tuple(weights))
    return model


def input_shape(exp: Experiment) -> tuple[int, ...] | None:
    from protocol.model import summarize

    shape = summarize(exp.architecture.layers).input_shape
    return tuple(shape) if shape else None


def test_splits(exp: Experiment, ws: Any) -> list[Any]:
    """Every site's held-out test split, encoded with that site's training statistics."""
    from simulator.evaluation import holdout, source_for

    ds = exp.dataset
    target = ds.target or "label"
    return [
        holdout(source_for(f.train, target, ds.name), source_for(f.test, target, ds.name), ds,
                input_shape=input_shape(exp), site=s)
        for s, f in sorted(ws.sites.items())
    ]


def scorer(exp: Experiment, ws: Any) -> Any:
    """``scorer(weights) -> metrics`` on every site's held-out test split (encoded once)."""
    from simulator.evaluation import score

    splits = test_splits(exp, ws)
    return lambda weights: score(model_with(exp, weights), splits, loss_name=exp.training.loss_function,
                                 task=exp.dataset.task or "binary")


def holdout_personalized(doc: dict[str, Any], exp: Experiment, ws: Any) -> None:
    """The personalised model each site kept (``state_dir/final/``) on that site's held-out rows,
    beside the local-only baseline scored on the same rows (the sites' own figures are in "final")."""
    from simulator.evaluation import score, union_of_own
    from site_worker.config import load_site_config
    from site_worker.final_model import FinalStore

    if not (doc.get("final") or {}).get("personalized"):
        return
    models = {}
    for site, files in sorted(ws.sites.items()):
        store = FinalStore(load_site_config(files.config).state_dir)
        if store.reply(doc["run_id"], exp.dataset.name) is None:
            continue
        arrays = store.load(doc["run_id"], exp.dataset.name, "personalized")
        models[site] = model_with(exp, list(arrays.items()))
    if not models:
        return
    splits = [s for s in test_splits(exp, ws) if s.site in models]
    loss, task = exp.training.loss_function, exp.dataset.task or "binary"
    for sp in splits:
        m = score(models[sp.site], [sp], loss_name=loss, task=task)["per_site"][sp.site]
        doc["holdout"]["per_site"].setdefault(sp.site, {})["personalized"] = m
    doc["holdout"]["personalized"] = {"method": doc["final"]["personalized"].get("method"),
                                      **union_of_own(models, splits, loss_name=loss, task=task)}


def save_model(out: Path, exp: Experiment, weights: Any) -> None:
    """The final global model: safetensors weights plus the declarative layer list that builds it."""
    from coordinator.checkpoints import save_tensors

    save_tensors(out / "model.safetensors", tuple(weights), metadata={"experiment": exp.name})
    (out / "model_spec.json").write_text(json.dumps(exp.raw.get("architecture", {}), indent=2) + "\n", encoding="utf-8")
