"""Personal models at a site: a private head during the rounds (Arivazhagan et al. 2019), and a fine-tune of
the global model on the site's own training rows after them.

* A private head (``TaskConfig.personal_layers``, set by the run's aggregator on every task): the site
  keeps its own last layers between rounds under ``state_dir/personal/`` (file named by a
  hash of run id and dataset, never by a wire string) and puts them into every model the
  coordinator sends before training or evaluating.
* Fine-tune (``training.personalization``): after the last round the site trains the global
  model (with its private head when it has one) for a few epochs, the last layer only or the
  whole model, with the same DP settings; with ``total_epsilon`` those steps are part of the
  run's plan (``protocol.privacy_plan``), so the run's total still holds. ``proximal_mu``
  pulls the weights towards the global model while fine-tuning (Ditto's regulariser).
* Selection (``select: "validation"``; the default ``"last"`` keeps the last epoch): a fine-tune on 50-150 rows can overfit or
  undo what the federation learnt (measured: it lowered Hungary's accuracy below its
  local-only model in every seed). The site keeps a checkpoint of the model before
  fine-tuning and after every epoch, and keeps the one with the lowest loss on its own
  validation split, rows the fine-tune never trains on. Checkpoints of one DP-SGD run cost no
  extra privacy; which one is kept stays at the site (docs/threat-model.md). Without
  validation rows the last epoch is kept.

The site keeps both models and reports both on its own test split.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protocol.dp_plan import DPPlan
from protocol.durable import write_atomic
from protocol.messages import TaskConfig
from protocol.personal import personal_names
from protocol.train_spec import personalization_spec
from site_worker.data import PreparedData
from site_worker.ledger import PrivacyLedger
from site_worker.metrics import evaluate
from site_worker.proximal import add_proximal_term
from site_worker.trainer import TrainResult, train

if TYPE_CHECKING:
    from protocol.config import Experiment
    from site_worker.config import SiteConfig


def personal_layers(config: TaskConfig) -> int:
    """How many final layers stay at the site (the task's ``personal_layers``; 0: none)."""
    return int(config.personal_layers)


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


def _last_layer_only(model: torch.nn.Module, *, bias_only: bool = False) -> None:
    """Freeze all but the last layer (``bias_only``: all but its bias, the site's own base rate)."""
    names = personal_names([n for n, _ in model.named_parameters()], 1)
    if bias_only:
        names = [n for n in names if n.endswith("bias")]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def fine_tune(model: torch.nn.Module, data: PreparedData, experiment: Experiment, *, seed: int,
              plan: DPPlan | None = None, rng: Any = None) -> TrainResult:
    """Train ``model`` in place for ``training.personalization.epochs`` on ``data``'s training rows,
    then keep the checkpoint ``select`` asks for (see the module docstring).

    ``plan`` is the DP plan to spend (the site's, under its run budget); None without DP.
    ``result.kept_epoch`` says which checkpoint was kept (0: the model as received); it is
    site-local, not a metric to release."""
    p = experiment.training.personalization
    assert p is not None, "fine_tune runs only for an experiment with training.personalization"
    spec = personalization_spec(experiment, seed)
    if p.mode in ("last_layer", "bias"):
        _last_layer_only(model, bias_only=p.mode == "bias")
    checkpoints = [_snapshot(model)]
    per_epoch = [0]

    def on_batch(step: int, total: int) -> None:
        per_epoch[0] = per_epoch[0] or max(1, total // max(1, spec.epochs))
        if step % per_epoch[0] == 0:
            checkpoints.append(_snapshot(model))

    hooks = [lambda opt: add_proximal_term(opt, model, float(p.proximal_mu))] if p.proximal_mu > 0 else None
    try:
        result = train(model, data, spec, plan=plan, rng=rng, measure=False, on_batch=on_batch, hooks=hooks)
    finally:
        for q in model.parameters():
            q.requires_grad_(True)
    kept = select_checkpoint(model, checkpoints, data, loss_name=spec.loss) if p.select == "validation" else None
    if kept is None:
        kept = len(checkpoints) - 1
    model.load_state_dict(checkpoints[kept])
    model.eval()
    result.kept_epoch = kept
    return result


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def select_checkpoint(model: torch.nn.Module, checkpoints: list[dict[str, torch.Tensor]], data: PreparedData, *,
                      loss_name: str) -> int | None:
    """Index of the checkpoint with the lowest loss on ``data``'s validation split (the earliest
    on a tie: the less fine-tuned model); None when the site holds no validation rows."""
    if len(data.x_val) == 0:
        return None
    losses = []
    for state in checkpoints:
        model.load_state_dict(state)
        losses.append(evaluate(model, data.x_val, data.y_val, loss_name=loss_name, task=data.task)["loss"])
    return min(range(len(losses)), key=lambda i: (losses[i], i))


def release_id(run_id: str) -> str:
    """The ledger id of a run's fine-tune release (one per run and dataset)."""
    return f"personalize:{hashlib.sha256(run_id.encode()).hexdigest()[:16]}"


def personalize_at_site(experiment: Experiment, model: torch.nn.Module, data: PreparedData, *, config: SiteConfig, dataset: str,
                        run_id: str, seed: int, inputs: Any = None) -> TrainResult:
    """What a site runs after the last round: fine-tune under its policy, charged to its ledger
    with the run id (so the run budget sees it), inside ``total_epsilon`` when the run has one."""
    from protocol import privacy_plan
    from protocol.dp_plan import site_plan
    from site_worker import run_budget
    from site_worker.dp import noise_source

    policy = config.policy
    spec = personalization_spec(experiment, seed)
    if spec.dp is None:
        return fine_tune(model, data, experiment, seed=seed)
    ledger = PrivacyLedger(config.state_dir)
    n_train = len(data.x_train)
    noise = None
    if privacy_plan.applies(experiment):
        steps = privacy_plan.personalization_steps(experiment, privacy_plan.steps_per_epoch(n_train, spec.batch_size))
        noise = run_budget.noise_for_task(experiment, ledger, run_id=run_id, dataset=dataset,
                                          round=int(experiment.training.rounds) + 1, n_train=n_train,
                                          delta=policy.site_delta(data.rows), accountant=policy.accountant,
                                          policy=policy, remaining_steps=steps)
    plan = site_plan(policy, spec, n_train=n_train, rows=data.rows, noise_multiplier=noise)
    release = release_id(run_id)
    ledger.reserve(dataset, release_id=release, kind="train", entries=plan.entries(), delta=plan.delta,
                   accountant=policy.accountant, max_epsilon=policy.max_epsilon, run_id=run_id)
    try:
        result = fine_tune(model, data, experiment, seed=seed, plan=plan,
                           rng=noise_source(policy, task_seed=seed, purpose="personalize",
                                            inputs=None if inputs is None else lambda: inputs() + repr(plan).encode()))
    except BaseException:
        ledger.cancel(dataset, release)
        raise
    ledger.commit(dataset, release)
    return result


__all__ = ["HeadStore", "fine_tune", "personal_layers", "personalize_at_site", "select_checkpoint"]
