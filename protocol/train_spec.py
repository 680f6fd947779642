"""What one task trains with (``TrainSpec``), resolved from the experiment and the task's overrides.

The site's trainer runs it and every privacy planner derives the task's DP-SGD steps from it
(``protocol.privacy_plan``), so both read the same epochs, batch size and DP request. Overrides
(a task's ``TaskConfig``, the fine-tune's epochs and rate) go through the one
``protocol.config.apply_overrides``. Pure data: no torch here (the trainer's
``site_worker.trainer.make_optimizer`` builds the optimizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.config import Experiment, apply_overrides


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
    def from_experiment(cls, experiment: Experiment, *, seed: int,
                        overrides: Mapping[str, Any] | None = None) -> TrainSpec:
        """``overrides``: names of ``protocol.config.OVERRIDES`` (``epochs``, ``learning_rate``,
        ``batch_size``, ``weight_decay``; ``TaskConfig.overrides()``), None keeping the experiment's."""
        tr = experiment.training
        opt = tr.optimizer
        doc = apply_overrides({"training": {"epochs": tr.epochs, "batch_size": tr.batch_size, "optimizer": {
            "learning_rate": opt.learning_rate, "weight_decay": getattr(opt, "weight_decay", 0.0) or 0.0}}},
            overrides or {})["training"]
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
            lr=float(doc["optimizer"]["learning_rate"]),
            weight_decay=float(doc["optimizer"]["weight_decay"]),
            momentum=float(getattr(opt, "momentum", 0.0) or 0.0),
            epochs=int(doc["epochs"]),
            batch_size=int(doc["batch_size"]),
            seed=int(seed),
            dp=dp,
        )


def personalization_spec(experiment: Experiment, seed: int) -> TrainSpec:
    """The fine-tune's training spec (its epochs and learning rate): the site's and every planner's."""
    p = experiment.training.personalization
    assert p is not None
    return TrainSpec.from_experiment(experiment, seed=seed, overrides={
        "epochs": int(p.epochs), "learning_rate": None if p.learning_rate is None else float(p.learning_rate)})


__all__ = ["DPSpec", "TrainSpec", "personalization_spec"]
