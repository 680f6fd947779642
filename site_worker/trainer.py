"""Local training with differential privacy (Opacus DP-SGD) and evaluation.

The trainer receives a ready model and prepared tensors, trains for the experiment's
local epochs, and hands back the weights plus the accountant history it ended with;
it never touches the network or the ledger file, so the daemon decides when privacy
spending becomes durable. Under DP the noise and the Poisson batches come from the site's
secret stream (``secure_rng``), never from the task's seed. Training checks a stop ``Event`` between batches so a
shutting-down daemon can abandon a task quickly (the task is then redelivered).
"""

from __future__ import annotations

import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import structlog
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from protocol.accounting import History, epsilon_of
from protocol.dp_plan import DPPlan, batches_per_epoch, plan_dp
from protocol.train_spec import TrainSpec
from site_worker.data import PreparedData
from site_worker.metrics import evaluate, make_loss, prefixed, prepare_target
from site_worker.secure_rng import SecureRandom, poisson_batches

log = structlog.get_logger(__name__)


class TrainingAborted(Exception):
    """Training stopped on request before finishing; nothing was released."""


@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: dict[str, float]
    history: History  # accountant history after training (empty when DP is off)
    epsilon: float | None  # cumulative ε at delta; None when DP is off
    delta: float | None
    num_examples: int
    reproducible: bool = False  # DP noise came from the site's dp_seed, not from os.urandom
    kept_epoch: int | None = None  # personalisation: the checkpoint kept (site-local, never released)


def make_optimizer(spec: TrainSpec, params: Any) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum)
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum)
    raise ValueError(f"training.optimizer.type {spec.optimizer!r} is not adam, sgd or rmsprop")


class _SecureNoise:
    """Opacus' ``add_noise`` with the site's secret stream instead of a seedable ``torch.Generator``."""

    params: list[Any]  # Opacus sets summed_grad on each
    noise_multiplier: float
    max_grad_norm: float

    def __init__(self, *args: Any, rng: SecureRandom, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.rng = rng

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.rng.gaussian_like(p.summed_grad, self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecureDPOptimizer(_SecureNoise, DPOptimizer):
    """Opacus' DPOptimizer (clipping, accounting hooks, scaling unchanged), secret noise."""


class SecureGhostDPOptimizer(_SecureNoise, DPOptimizerFastGradientClipping):
    """Opacus' optimizer for ghost clipping (the gradient arrives clipped and summed from the
    second backward pass; accounting hooks and scaling unchanged), secret noise."""


def ghost_clippable(model: torch.nn.Module) -> bool:
    """Whether Opacus' ghost clipping handles every layer with weights (a norm sampler or a
    per-sample gradient sampler): the torch side of ``protocol.layers.FAST_CLIPPING``."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost

    known = set(Ghost.GRAD_SAMPLERS) | set(Ghost.NORM_SAMPLERS)
    return all(type(m) in known for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


def _per_sample_loss(loss_fn: torch.nn.Module, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's loss (the mean over its outputs), so the batch mean equals ``loss_fn``'s."""
    reduction = str(loss_fn.reduction)
    loss_fn.reduction = "none"  # type: ignore[assignment]
    try:
        per = loss_fn(out, target)
    finally:
        loss_fn.reduction = reduction  # type: ignore[assignment]
    return per if per.dim() == 1 else per.flatten(1).mean(dim=1)


def _ghost_backward(module: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
                    out: torch.Tensor, target: torch.Tensor) -> None:
    """Ghost clipping's two backward passes: per-sample gradient norms, then the loss weighted
    by each row's clipping factor (Opacus' ``DPTensorFastGradientClipping.backward``)."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    per = _per_sample_loss(loss_fn, out, target) if len(out) else out.flatten(1).sum(dim=1) * 0.0  # empty batch
    DPTensorFastGradientClipping(module, optimizer, per, "mean").backward()  # type: ignore[arg-type]


def _plain_batches(n: int, spec: TrainSpec) -> Callable[[], Iterator[torch.Tensor]]:
    """Shuffled mini-batches without DP, reproducible from the task seed (no privacy claim)."""
    gen = torch.Generator().manual_seed(spec.seed)

    def epoch() -> Iterator[torch.Tensor]:
        perm = torch.randperm(n, generator=gen)
        yield from perm.split(spec.batch_size)

    return epoch


def train(model: torch.nn.Module, data: PreparedData, spec: TrainSpec, *, history: History | None = None,
          plan: DPPlan | None = None, stop: threading.Event | None = None,
          on_batch: Callable[[int, int], None] | None = None, rng: SecureRandom | None = None,
          measure: bool = True, hooks: list[Callable[[torch.optim.Optimizer], None]] | None = None,
          clipping: str | None = None) -> TrainResult:
    """Train ``model`` in place on ``data.x_train`` (DP-SGD when ``spec.dp``).

    ``plan`` is the site's DP plan (``dp.site_plan``); without one the spec's own request
    is planned (offline baselines). Noise and Poisson sampling come from ``rng``, a fresh
    secret stream unless the caller passes one (the handler does, for reproducible runs).
    ``history`` is the dataset's accountant history so far; the returned history includes
    this task's steps. With ``measure``, exact before/after validation metrics land in
    ``metrics`` (local use only: released metrics are the handler's, see ``release``).
    ``hooks`` get the plain optimizer before DP wraps it (the proximal term,
    ``site_worker.proximal``). Raises ``TrainingAborted`` when ``stop`` is set.
    ``clipping`` is DP-SGD's: ``"ghost"`` (Opacus' memory-efficient clipping, the default where
    every layer allows it, ``ghost_clippable``) or ``"per_sample"``; the same clipped sum, noise
    and accounting either way.
    """
    stop = stop or threading.Event()
    n = len(data.x_train)
    dp = spec.dp is not None
    if dp:
        plan = plan or plan_dp(spec, n)
        rng = rng or SecureRandom.secret()
    # Dropout and the like: the task seed only where nothing private depends on it.
    torch.manual_seed(spec.seed if not dp or rng.reproducible else secrets.randbits(63))  # type: ignore[union-attr]
    before = evaluate(model, data.x_val, data.y_val, loss_name=spec.loss, task=data.task) if measure else {}
    optimizer = make_optimizer(spec, model.parameters())
    for hook in hooks or ():
        hook(optimizer)
    loss_fn = make_loss(spec.loss)
    accountant = None
    train_model: torch.nn.Module = model
    if dp:
        assert plan is not None and rng is not None
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant

        accountant = create_accountant(mechanism=plan.accountant)
        accountant.history = [tuple(h) for h in (history or [])]
        clipping = clipping or ("ghost" if ghost_clippable(model) else "per_sample")
        dp_kwargs = dict(noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                         expected_batch_size=max(1, int(n * plan.sample_rate)), loss_reduction="mean", rng=rng)
        if clipping == "ghost":
            from opacus.grad_sample import GradSampleModuleFastGradientClipping

            train_model = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                               max_grad_norm=plan.max_grad_norm,
                                                               use_ghost_clipping=True)
            optimizer = SecureGhostDPOptimizer(optimizer, **dp_kwargs)  # type: ignore[arg-type]
        else:
            train_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            train_model.forbid_grad_accumulation()
            optimizer = SecureDPOptimizer(optimizer, **dp_kwargs)  # type: ignore[arg-type]
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        per_epoch = plan.steps // max(1, spec.epochs)
        sample_rate = plan.sample_rate

        def epoch_batches() -> Iterator[torch.Tensor]:
            yield from poisson_batches(n, sample_rate, per_epoch, rng)  # type: ignore[arg-type]
    else:
        epoch_batches = _plain_batches(n, spec)
        per_epoch = batches_per_epoch(n, spec.batch_size)
    train_model.train()
    total_batches = per_epoch * spec.epochs
    log.info("training_started", epochs=spec.epochs, batches=total_batches, n_train=n, dp=dp,
             noise_multiplier=plan.noise_multiplier if plan else None,
             reproducible=bool(rng is not None and rng.reproducible))
    samples = 0
    step = 0
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Opacus' hooks fire on the first layer although inputs need no grad: harmless, noisy.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _epoch in range(spec.epochs):
                for idx in epoch_batches():
                    if stop.is_set():
                        raise TrainingAborted(f"stopped after {step} of {total_batches} batches")
                    xb, yb = data.x_train[idx], data.y_train[idx]
                    optimizer.zero_grad(set_to_none=True)
                    if len(idx) == 0 and not dp:
                        continue
                    out = train_model(xb)
                    if clipping == "ghost":
                        _ghost_backward(train_model, optimizer, loss_fn, out, prepare_target(yb, out, spec.loss))
                    else:
                        loss = loss_fn(out, prepare_target(yb, out, spec.loss)) if len(idx) else out.sum() * 0.0
                        loss.backward()
                    optimizer.step()
                    samples += len(idx)
                    step += 1
                    if on_batch is not None:
                        on_batch(step, total_batches)
    finally:
        if dp and hasattr(train_model, "_close"):
            train_model._close()  # remove Opacus hooks from the plain module
    train_s = time.perf_counter() - t0
    model.eval()
    metrics: dict[str, float] = {}
    if measure:
        after = evaluate(model, data.x_val, data.y_val, loss_name=spec.loss, task=data.task)
        metrics = {**prefixed("before", before), **prefixed("after", after), "n_val": float(len(data.x_val))}
    metrics.update(train_s=train_s, samples_per_s=samples / train_s if train_s > 0 else 0.0,
                   steps=float(step), n_train=float(n))
    new_history: History = []
    epsilon = delta = None
    if accountant is not None and plan is not None:
        new_history = [(float(a), float(b), int(c)) for a, b, c in accountant.history]
        delta = plan.delta
        epsilon = epsilon_of(new_history, delta=delta, accountant=plan.accountant)
        metrics.update(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    log.info("training_finished", steps=step, train_s=round(train_s, 3), epsilon=epsilon)
    return TrainResult(model=model, metrics=metrics, history=new_history, epsilon=epsilon, delta=delta,
                       num_examples=n, reproducible=bool(rng is not None and rng.reproducible))


__all__ = ["TrainResult", "TrainingAborted", "make_optimizer", "train"]
