"""Asynchronous aggregation: FedAsync (merge on arrival) and FedBuff (buffer K, then step).

Both weight an update by its staleness τ = (global version when it arrives) − (the
version it was trained from), and reject updates with τ > ``max_staleness`` (the run
loop records them as "stale"). Memory is O(model): FedBuff keeps one running sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like, register
from coordinator.aggregators.staleness import Staleness
from protocol.messages import Tensors


def _max_staleness(parameters: dict[str, Any]) -> int | None:
    v = parameters.get("max_staleness")
    if v is None:
        return None
    if int(v) < 0:
        raise ValueError(f"federated.parameters.max_staleness must be >= 0, got {v}")
    return int(v)


@register("FedAsync")
class FedAsync(Aggregator):
    """w ← (1 − a)·w + a·w_site with a = alpha · s(τ) (Xie et al., "Asynchronous Federated Optimization")."""

    name = "FedAsync"
    synchronous = False

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self.alpha = float(parameters.get("alpha", 0.6))
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"federated.parameters.alpha must be in (0, 1], got {self.alpha}")
        self.staleness = Staleness.from_parameters(parameters)
        self.max_staleness = _max_staleness(parameters)

    def mixing_weight(self, tau: int) -> float:
        return self.alpha * self.staleness(tau)

    def merge(
        self, contribution: Contribution, *, version: int, global_weights: Tensors, base_weights: Tensors
    ) -> Tensors:
        a = self.mixing_weight(version - contribution.base_round)
        merged = [
            (1.0 - a) * g.astype(np.float64) + a * np.asarray(w, dtype=np.float64)
            for (_, g), (_, w) in zip(global_weights, contribution.weights, strict=True)
        ]
        return like(global_weights, merged)


@register("FedBuff")
class FedBuff(Aggregator):
    """Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation".

    Each update contributes its delta Δ_i = w_site − w_base (the model it trained
    from), weighted by s(τ_i). After ``buffer_size`` (K, DiagnoseNET's "weighting")
    updates: w ← w + server_lr · (1/K) Σ s(τ_i) Δ_i.
    """

    name = "FedBuff"
    synchronous = False

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self.buffer_size = int(parameters.get("buffer_size", parameters.get("weighting", 2)))
        if self.buffer_size < 1:
            raise ValueError(f"federated.parameters.buffer_size must be >= 1, got {self.buffer_size}")
        self.server_lr = float(parameters.get("server_lr", 1.0))
        self.staleness = Staleness.from_parameters(parameters)
        self.max_staleness = _max_staleness(parameters)
        self._acc = [np.zeros(a.shape, dtype=np.float64) for _, a in initial]
        self._count = 0

    def pending(self) -> int:
        return self._count

    def replies_per_step(self) -> int:
        return self.buffer_size

    def merge(
        self, contribution: Contribution, *, version: int, global_weights: Tensors, base_weights: Tensors
    ) -> Tensors | None:
        s = self.staleness(version - contribution.base_round)
        for acc, (_, w), (_, b) in zip(self._acc, contribution.weights, base_weights, strict=True):
            acc += s * (np.asarray(w, dtype=np.float64) - b)
        self._count += 1
        if self._count < self.buffer_size:
            return None
        step = [
            g.astype(np.float64) + self.server_lr * acc / self._count
            for (_, g), acc in zip(global_weights, self._acc, strict=True)
        ]
        for acc in self._acc:
            acc.fill(0.0)
        self._count = 0
        return like(global_weights, step)
