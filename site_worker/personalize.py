"""Personal models at a site: FedPer's private head during the rounds, and a fine-tune of
the global model on the site's own training rows after them.

* FedPer (``federated.name: "FedPer"``, ``TrainTask.config["personal_layers"]``): the site
  keeps its own last layers between rounds under ``state_dir/personal/`` (file named by a
  hash of run id and dataset, never by a wire string) and puts them into every model the
  coordinator sends before training or evaluating.
* Fine-tune (``training.personalization``): after the last round the site trains the global
  model (with its FedPer head when it has one) for a few epochs, the last layer only or the
  whole model, with the same DP settings; with ``total_epsilon`` those steps are part of the
  run's plan (``site_worker.run_budget``), so the run's total still holds.

The site keeps both models and reports both on its own test split.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.durable import write_atomic
from protocol.personal import personal_names
from site_worker.data import PreparedData
from site_worker.ledger import PrivacyLedger
from site_worker.trainer import DPPlan, TrainResult, TrainSpec, plan_dp, train


def personal_layers(experiment: Any, task_config: dict[str, Any] | None = None) -> int:
    """How many final layers stay at the site (0 unless the aggregator is FedPer)."""
    value = (task_config or {}).get("personal_layers")
    if value is None and experiment.federated.name == "FedPer":
        value = experiment.federated.parameters.get("personal_layers", 1)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"personal_layers must be an integer >= 0, got {value!r}")
    return value


class HeadStore:
    """The site's personal layers per (run, dataset), as an ``.npz`` of plain arrays."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "personal"

    def _path(self, run_id: str, dataset: str) -> Path:
        return self.dir / (hashlib.sha256(f"{run_id}\0{dataset}".encode()).hexdigest()[:32] + ".npz")

    def load(self, run_id: str, dataset: str) -> dict[str, np.ndarray]:
        p = self._path(run_id, dataset)
        if not p.exists():
            return {}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, run_id: str, dataset: str, arrays: dict[str, np.ndarray]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(self._path(run_id, dataset), buf.getvalue())

    def apply(self, model: torch.nn.Module, run_id: str, dataset: str, layers: int) -> bool:
        """Overwrite ``model``'s personal layers with the stored ones; False when none stored yet."""
        stored = self.load(run_id, dataset)
        state = model.state_dict()
        names = personal_names(state.keys(), layers)
        if not stored or set(stored) != set(names):
            return False
        with torch.no_grad():
            for n in names:
                if tuple(stored[n].shape) != tuple(state[n].shape):
                    return False
            for n in names:
                state[n].copy_(torch.from_numpy(np.asarray(stored[n])))
        return True

    def keep(self, model: torch.nn.Module, run_id: str, dataset: str, layers: int) -> None:
        state = model.state_dict()
        self.save(run_id, dataset, {n: state[n].detach().cpu().numpy().copy()
                                    for n in personal_names(state.keys(), layers)})


def _last_layer_only(model: torch.nn.Module) -> None:
    names = personal_names([n for n, _ in model.named_parameters()], 1)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def fine_tune(model: torch.nn.Module, data: PreparedData, experiment: Any, *, seed: int,
              plan: DPPlan | None = None, history: Any = None) -> TrainResult:
    """Train ``model`` in place for ``training.personalization.epochs`` on ``data``.

    ``plan`` is the DP plan to spend (from the run budget); None derives it like a round."""
    p = experiment.training.personalization
    overrides: dict[str, Any] = {"epochs": int(p.epochs)}
    if p.learning_rate is not None:
        overrides["lr"] = float(p.learning_rate)
    spec = TrainSpec.from_experiment(experiment, seed=seed, overrides=overrides)
    if p.mode == "last_layer":
        _last_layer_only(model)
    if spec.dp is not None and plan is None:
        plan = plan_dp(spec, len(data.x_train))
    if plan is not None:
        plan = replace(plan, steps=int(p.epochs) * max(1, round(1 / plan.sample_rate)))
    try:
        return train(model, data, spec, history=history, plan=plan)
    finally:
        for q in model.parameters():
            q.requires_grad_(True)


def personalize_at_site(experiment: Any, model: torch.nn.Module, data: PreparedData, *, state_dir: Path,
                        dataset: str, run_id: str, seed: int, min_noise: float | None = None) -> TrainResult:
    """What a site runs after the last round: fine-tune and charge its ledgers (dataset and run)."""
    from site_worker import run_budget

    spec = TrainSpec.from_experiment(experiment, seed=seed)
    ledger = PrivacyLedger(state_dir)
    plan = None
    budgeted = spec.dp is not None and run_budget.applies(experiment)
    runs = run_budget.RunLedger(state_dir)
    if budgeted:
        per_epoch = run_budget.steps_per_epoch(len(data.x_train), spec.batch_size)
        steps = run_budget.personalization_steps(experiment, per_epoch)
        sigma, rp = run_budget.noise_for_task(experiment, runs, run_id=run_id, dataset=dataset,
                                              round=int(experiment.training.rounds) + 1, n_train=len(data.x_train),
                                              delta=spec.dp.delta, accountant=spec.dp.accountant,
                                              min_noise=min_noise, remaining_steps=steps)
        plan = DPPlan(noise_multiplier=sigma, sample_rate=rp.sample_rate, steps=steps,
                      max_grad_norm=spec.dp.max_grad_norm, delta=spec.dp.delta, accountant=spec.dp.accountant)
    history = ledger.history(dataset) if spec.dp is not None else None
    result = fine_tune(model, data, experiment, seed=seed, plan=plan, history=history)
    if spec.dp is not None:
        ledger.record(dataset, result.history, task_id=f"personalize:{run_id}")
        if budgeted and plan is not None:
            runs.record(run_id, dataset, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                        steps=plan.steps, task_id=f"personalize:{run_id}")
    return result


__all__ = ["HeadStore", "fine_tune", "personal_layers", "personalize_at_site"]
