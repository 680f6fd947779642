"""What federation is compared against: pooled centralized training, and each site alone.

Both baselines use the production site-worker code (``site_worker.data.prepare`` and
``site_worker.trainer.train``) with the experiment's model, optimizer, loss, batch
size and DP settings, for the same total number of epochs as the federated run
(``rounds x local epochs``), and are scored on the same held-out test splits.
The pooled baseline is what a single hospital holding everyone's data could do;
"local" is what each hospital can do alone. Federation is worth it when it beats
local and comes close to pooled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import numpy as np

from protocol.model import build_model
from simulator.evaluation import TestSplit, holdout, score, source_for, union_of_own
from site_worker.config import DatasetSource
from site_worker.data import prepare
from protocol.train_spec import TrainSpec
from site_worker.trainer import train

if TYPE_CHECKING:
    from protocol.config import Experiment


def _train(experiment: Experiment, source: DatasetSource, *, epochs: int, seed: int) -> Any:
    layers = experiment.architecture.layers
    model = build_model(layers, seed=seed)
    input_shape = _input_shape(experiment)
    data = prepare(source, experiment.dataset, seed=seed, input_shape=input_shape)
    spec = TrainSpec.from_experiment(experiment, seed=seed, overrides={"epochs": epochs})
    return train(model, data, spec, plan=_budget_plan(experiment, spec, len(data.x_train))).model


def _budget_plan(experiment: Experiment, spec: TrainSpec, n_train: int) -> Any:
    """With ``total_epsilon``: the same total spent on the baseline's own steps (else None:
    the trainer's plan from the experiment's noise)."""
    from protocol import privacy_plan as run_budget
    from protocol.dp_plan import DPPlan

    if spec.dp is None or not run_budget.applies(experiment):
        return None
    per_epoch = run_budget.steps_per_epoch(n_train, spec.batch_size)
    steps = per_epoch * spec.epochs
    sigma = run_budget.solve_noise(total_epsilon=float(experiment.training.dp.total_epsilon), delta=spec.dp.delta,
                                   accountant=spec.dp.accountant, sample_rate=1.0 / per_epoch, steps=steps)
    return DPPlan(noise_multiplier=sigma, sample_rate=1.0 / per_epoch, steps=steps, max_grad_norm=spec.dp.max_grad_norm,
                  delta=spec.dp.delta, accountant=spec.dp.accountant)


def _input_shape(experiment: Experiment) -> tuple[int, ...] | None:
    from protocol.model import summarize

    shape = summarize(experiment.architecture.layers).input_shape
    return tuple(shape) if shape else None


def run_baselines(
    experiment: Experiment,
    *,
    train_files: dict[str, Path],
    test_files: dict[str, Path],
    rounds: int,
    seed: int,
    work_dir: Path,
) -> dict[str, Any]:
    """``{"pooled": {...}, "local": {site: {...}, "_union": {...}}}`` on the sites' test splits."""
    ds = experiment.dataset
    target = ds.target or "label"
    epochs = rounds * int(experiment.training.epochs)
    loss_name = experiment.training.loss_function
    task = ds.task or "binary"
    input_shape = _input_shape(experiment)
    sources = {s: source_for(p, target, ds.name) for s, p in train_files.items()}
    tests = {s: source_for(p, target, ds.name) for s, p in test_files.items()}

    pooled_path = _pool(train_files, work_dir / "baselines" / "pooled_train")
    pooled_src = source_for(pooled_path, target, ds.name)
    pooled_model = _train(experiment, pooled_src, epochs=epochs, seed=seed)
    pooled_splits = [holdout(pooled_src, tests[s], ds, input_shape=input_shape, site=s) for s in sorted(tests)]
    pooled = score(pooled_model, pooled_splits, loss_name=loss_name, task=task)

    local: dict[str, Any] = {}
    own_splits: list[TestSplit] = []
    for site in sorted(sources):
        model = _train(experiment, sources[site], epochs=epochs, seed=seed)
        own = holdout(sources[site], tests[site], ds, input_shape=input_shape, site=site)
        own_splits.append(own)
        mine = score(model, [own], loss_name=loss_name, task=task)
        # The same site model on every site's test rows, each encoded with *this* site's statistics,
        # as that hospital would apply its model to another hospital's patients.
        everywhere = [holdout(sources[site], tests[s], ds, input_shape=input_shape, site=s) for s in sorted(tests)]
        allm = score(model, everywhere, loss_name=loss_name, task=task)
        local[site] = {
            **{k: v for k, v in mine.items() if k != "per_site"},
            "accuracy_all": allm.get("accuracy"),
            "auc_all": allm.get("auc"),
            "_model": model,
        }
    # Each hospital's own model on its own patients, pooled over hospitals.
    union = union_of_own({s: m["_model"] for s, m in local.items()}, own_splits, loss_name=loss_name, task=task)
    for site in local:
        local[site].pop("_model")
    local["_union"] = union
    return {"pooled": {k: v for k, v in pooled.items() if k != "per_site"}, "pooled_per_site": pooled["per_site"],
            "local": local, "epochs": epochs, "split": "test"}


def _pool(files: dict[str, Path], stem: Path) -> Path:
    """All sites' training files in one (what a central data warehouse would hold)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [files[s] for s in sorted(files)]
    if paths[0].name.endswith("_X.npy"):
        xs = [np.load(p, allow_pickle=False) for p in paths]
        ys = [np.load(p.with_name(p.name[: -len("_X.npy")] + "_y.npy"), allow_pickle=False) for p in paths]
        x_path = stem.parent / f"{stem.name}_X.npy"
        np.save(x_path, np.concatenate(xs), allow_pickle=False)
        np.save(stem.parent / f"{stem.name}_y.npy", np.concatenate(ys), allow_pickle=False)
        return x_path
    frame = pd.concat([pd.read_csv(p, low_memory=False) for p in paths], ignore_index=True)
    out = stem.with_suffix(".csv")
    frame.to_csv(out, index=False)
    return out
