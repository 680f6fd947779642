"""The proximal term (Li et al. 2020) for the site trainer.

The proximal objective is ``F(w) + mu/2 · ||w - w_global||²`` locally, so every step adds
``mu · (w - w_global)`` to the gradient. The term depends only on the weights the
coordinator sent, never on a row, so it is added *after* Opacus has clipped and noised
the data gradient (a step pre-hook on the plain optimizer, which DP-SGD calls after
privatising): privacy accounting is unchanged and per-sample clipping does not shrink it.

``mu`` comes from the task (``TaskConfig.proximal_mu``, which the run's aggregator sets);
the site never looks at the aggregator's name.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from protocol.messages import TaskConfig


def proximal_mu(config: TaskConfig) -> float:
    """The task's ``proximal_mu`` (0 when the aggregator does not ask for one; bounded by TaskConfig)."""
    return float(config.proximal_mu)


def add_proximal_term(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mu: float) -> None:
    """Before every step of ``optimizer``: ``p.grad += mu · (p - p_at_start)`` for each trainable p.

    ``p_at_start`` is ``model``'s weights now (the global model of the round)."""
    anchors = {id(p): p.detach().clone() for p in model.parameters()}

    def pre_step(opt: torch.optim.Optimizer, *_: Any) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None and id(p) in anchors:
                        p.grad.add_(p - anchors[id(p)], alpha=mu)

    optimizer.register_step_pre_hook(pre_step)


def hooks_for(config: TaskConfig, model: torch.nn.Module) -> list[Callable[[torch.optim.Optimizer], None]]:
    """Trainer hooks for this task: the proximal term when ``mu > 0``, else none."""
    mu = proximal_mu(config)
    if mu <= 0:
        return []
    return [lambda opt: add_proximal_term(opt, model, mu)]


__all__ = ["add_proximal_term", "hooks_for", "proximal_mu"]
