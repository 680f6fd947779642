"""Local training with differential privacy (Opacus DP-SGD) and evaluation.

The trainer receives a ready model and prepared tensors, trains for the experiment's
local epochs, and hands back the weights plus the accountant history it ended with;
it never touches the network or the ledger file, so the daemon decides when privacy
spending becomes durable. Training checks a stop ``Event`` between batches so a
shutting-down daemon can abandon a task quickly (the task is then redelivered).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog
import torch
from torch.utils.data import DataLoader, TensorDataset

from site_worker.data import PreparedData
from site_worker.ledger import History, epsilon_of
from site_worker.metrics import evaluate, make_loss, prefixed, prepare_target

log = structlog.get_logger(__name__)


class TrainingAborted(Exception):
    """Training stopped on request before finishing; nothing was released."""


@dataclass(frozen=True)
class DPSpec:
    noise_multiplier: float | None
    max_grad_norm: float
    target_epsilon: float | None
    delta: float
    accountant: str = "rdp"


@dataclass(frozen=True)
class TrainSpec:
    """Everything the training loop needs, resolved from the experiment and per-task overrides."""

    loss: str
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    epochs: int
    batch_size: int
    seed: int
    dp: DPSpec | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_experiment(cls, experiment: Any, *, seed: int, overrides: dict[str, Any] | None = None) -> "TrainSpec":
        o = dict(overrides or {})
        tr = experiment.training
        opt = tr.optimizer
        dp_cfg = opt.differential_privacy
        dp = None
        if dp_cfg is not None and getattr(dp_cfg, "enabled", True):
            dp = DPSpec(
                noise_multiplier=None if dp_cfg.noise_multiplier is None else float(dp_cfg.noise_multiplier),
                max_grad_norm=float(dp_cfg.max_grad_norm),
                target_epsilon=None if dp_cfg.target_epsilon is None else float(dp_cfg.target_epsilon),
                delta=float(dp_cfg.delta),
                accountant=str(getattr(dp_cfg, "accountant", "rdp") or "rdp"),
            )
        return cls(
            loss=str(tr.loss_function),
            optimizer=str(opt.type),
            lr=float(o.get("lr", o.get("learning_rate", opt.learning_rate))),
            weight_decay=float(o.get("weight_decay", getattr(opt, "weight_decay", 0.0) or 0.0)),
            momentum=float(getattr(opt, "momentum", 0.0) or 0.0),
            epochs=int(o.get("epochs", tr.epochs)),
            batch_size=int(o.get("batch_size", tr.batch_size)),
            seed=int(seed),
            dp=dp,
        )


@dataclass(frozen=True)
class DPPlan:
    """What a DP task will spend: fixed before training so the budget can be checked first."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def plan_dp(spec: TrainSpec, n_train: int) -> DPPlan:
    """Sample rate and steps as Opacus derives them (1 / len(loader)), noise from σ or target ε."""
    assert spec.dp is not None
    per_epoch = batches_per_epoch(n_train, spec.batch_size)
    sample_rate = 1.0 / per_epoch
    noise = spec.dp.noise_multiplier
    if spec.dp.target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        noise = get_noise_multiplier(target_epsilon=spec.dp.target_epsilon, target_delta=spec.dp.delta,
                                     sample_rate=sample_rate, epochs=spec.epochs, accountant=spec.dp.accountant)
    assert noise is not None
    return DPPlan(noise_multiplier=float(noise), sample_rate=sample_rate, steps=per_epoch * spec.epochs,
                  max_grad_norm=spec.dp.max_grad_norm, delta=spec.dp.delta, accountant=spec.dp.accountant)


@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: dict[str, float]
    history: History  # accountant history after training (empty when DP is off)
    epsilon: float | None  # cumulative ε at delta; None when DP is off
    delta: float | None
    num_examples: int


def make_optimizer(spec: TrainSpec, params: Any) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum)
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum)
    raise ValueError(f"training.optimizer.type {spec.optimizer!r} is not adam, sgd or rmsprop")


def train(model: torch.nn.Module, data: PreparedData, spec: TrainSpec, *, history: History | None = None,
          plan: DPPlan | None = None, stop: threading.Event | None = None,
          on_batch: Callable[[int, int], None] | None = None,
          hooks: list[Callable[[torch.optim.Optimizer], None]] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` (DP-SGD when ``spec.dp``) and measure before/after.

    ``history`` is the dataset's accountant history so far; the returned history
    includes this task's steps. ``hooks`` get the plain optimizer before Opacus wraps it
    (e.g. FedProx's proximal term, ``site_worker.proximal``). Raises ``TrainingAborted``
    when ``stop`` is set.
    """
    stop = stop or threading.Event()
    torch.manual_seed(spec.seed)  # dropout and the like; the loaders use their own generators
    before = evaluate(model, data.x_val, data.y_val, loss_name=spec.loss, task=data.task)
    loader_gen = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=spec.batch_size,
                        shuffle=True, generator=loader_gen)
    optimizer = make_optimizer(spec, model.parameters())
    for hook in hooks or ():
        hook(optimizer)
    loss_fn = make_loss(spec.loss)
    engine = None
    train_model: torch.nn.Module = model
    if spec.dp is not None:
        from opacus import PrivacyEngine

        plan = plan or plan_dp(spec, len(data.x_train))
        noise_gen = torch.Generator().manual_seed(spec.seed + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode=False; we seed on purpose
            engine = PrivacyEngine(accountant=plan.accountant)
            engine.accountant.history = [tuple(h) for h in (history or [])]
            train_model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                noise_generator=noise_gen, poisson_sampling=True)
    train_model.train()
    total_batches = len(loader) * spec.epochs
    log.info("training_started", epochs=spec.epochs, batches=total_batches, n_train=len(data.x_train),
             dp=spec.dp is not None, noise_multiplier=plan.noise_multiplier if plan else None)
    samples = 0
    step = 0
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Opacus' hooks fire on the first layer although inputs need no grad: harmless, noisy.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _epoch in range(spec.epochs):
                for xb, yb in loader:
                    if stop.is_set():
                        raise TrainingAborted(f"stopped after {step} of {total_batches} batches")
                    optimizer.zero_grad(set_to_none=True)
                    if len(xb) == 0 and engine is None:
                        continue
                    out = train_model(xb)
                    loss = loss_fn(out, prepare_target(yb, out, spec.loss))
                    loss.backward()
                    optimizer.step()
                    samples += len(xb)
                    step += 1
                    if on_batch is not None:
                        on_batch(step, total_batches)
    finally:
        if engine is not None and hasattr(train_model, "_close"):
            train_model._close()  # remove Opacus hooks from the plain module
    train_s = time.perf_counter() - t0
    model.eval()
    after = evaluate(model, data.x_val, data.y_val, loss_name=spec.loss, task=data.task)
    metrics = {**prefixed("before", before), **prefixed("after", after)}
    metrics.update(train_s=train_s, samples_per_s=samples / train_s if train_s > 0 else 0.0,
                   steps=float(step), n_val=float(len(data.x_val)), n_train=float(len(data.x_train)))
    new_history: History = []
    epsilon = delta = None
    if engine is not None and plan is not None:
        new_history = [(float(a), float(b), int(c)) for a, b, c in engine.accountant.history]
        delta = plan.delta
        epsilon = epsilon_of(new_history, delta=delta, accountant=plan.accountant)
        metrics.update(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    log.info("training_finished", steps=step, train_s=round(train_s, 3), epsilon=epsilon)
    return TrainResult(model=model, metrics=metrics, history=new_history, epsilon=epsilon, delta=delta,
                       num_examples=len(data.x_train))
