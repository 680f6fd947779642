"""Server-side optimisers over FedAvg's mean (Reddi et al., "Adaptive Federated
Optimization"), plus FedProx and FedPer, which are FedAvg on the server and ask the sites'
trainers for something (``task_config``).

The round's mean ``x̄`` is a streaming ``WeightedSum`` (memory O(model)); the
pseudo-gradient ``Δ = x̄ − x`` then drives a server step. Under site-side DP, server
momentum averages the noise of successive rounds (a temporal denoiser): ``FedAvgM`` keeps
``m ← β·m + Δ`` and steps ``x ← x + η·m``; ``FedAdam`` keeps Adam's two moments
(``x ← x + η·m/(√v + τ)``). Their moments are checkpointed (``state``) for ``--resume``.
"""

from __future__ import annotations

import abc

from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like, register
from coordinator.aggregators.fedavg import FedAvg, WeightedSum
from protocol.messages import TaskConfig, Tensors


def _number(parameters: dict[str, Any], key: str, default: float, *, lo: float, hi: float | None = None,
            name: str) -> float:
    value = parameters.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"federated.parameters.{key} for {name} must be a number {bound}, got {value!r}")
    return float(value)


class _ServerOpt(Aggregator):
    synchronous = True

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self._sum = WeightedSum(initial, accumulator="float64")
        self._x = [np.asarray(a, dtype=np.float64).copy() for _, a in initial]
        self._reference = initial
        self.server_lr = _number(parameters, "server_learning_rate", 1.0, lo=1e-12, name=self.name)

    def begin_round(self, server_round: int, global_weights: Tensors) -> None:
        self._sum.reset()
        self._reference = global_weights
        self._x = [np.asarray(a, dtype=np.float64).copy() for _, a in global_weights]

    def add(self, contribution: Contribution) -> None:
        if contribution.num_examples <= 0:
            raise ValueError(f"update from {contribution.site} has num_examples={contribution.num_examples}; must be > 0")
        self._sum.add(contribution.weights, float(contribution.num_examples))

    def finish_round(self) -> Tensors:
        mean = [np.asarray(a, dtype=np.float64) for _, a in self._sum.mean()]
        delta = [m - x for m, x in zip(mean, self._x, strict=True)]
        step = self._step(delta)
        return like(self._reference, [x + s for x, s in zip(self._x, step, strict=True)])

    @abc.abstractmethod
    def _step(self, delta: list[np.ndarray]) -> list[np.ndarray]:
        """The server optimiser's step from the round's mean delta (FedAvgM, FedAdam)."""

    _MOMENTS: tuple[str, ...] = ()

    def state(self) -> dict[str, np.ndarray]:
        return {f"{k}.{i}": a for k in self._MOMENTS for i, a in enumerate(getattr(self, f"_{k}") or [])}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for k in self._MOMENTS:
            keys = sorted((n for n in arrays if n.startswith(k + ".")), key=lambda n: int(n.rsplit(".", 1)[1]))
            if keys:
                setattr(self, f"_{k}", [np.array(arrays[n], dtype=np.float64) for n in keys])
        unknown = [n for n in arrays if n.split(".", 1)[0] not in self._MOMENTS]
        if unknown:
            raise ValueError(f"{self.name} checkpoint carries unknown state {sorted(unknown)}")


@register("FedAvgM")
class FedAvgM(_ServerOpt):
    """Server momentum (Hsu et al. 2019): ``m ← β·m + Δ``, ``x ← x + η·m``."""

    name = "FedAvgM"
    _MOMENTS = ("m",)

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self.beta = _number(parameters, "server_momentum", 0.9, lo=0.0, hi=0.999, name=self.name)
        self._m: list[np.ndarray] | None = None

    def _step(self, delta: list[np.ndarray]) -> list[np.ndarray]:
        self._m = delta if self._m is None else [self.beta * m + d for m, d in zip(self._m, delta, strict=True)]
        return [self.server_lr * m for m in self._m]


@register("FedAdam")
class FedAdam(_ServerOpt):
    """Adaptive server step: ``m ← β1·m + (1−β1)·Δ``, ``v ← β2·v + (1−β2)·Δ²``, ``x ← x + η·m/(√v + τ)``."""

    name = "FedAdam"
    _MOMENTS = ("m", "v")

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        parameters = {"server_learning_rate": 0.1, **parameters}
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self.beta_1 = _number(parameters, "beta_1", 0.9, lo=0.0, hi=0.999, name=self.name)
        self.beta_2 = _number(parameters, "beta_2", 0.99, lo=0.0, hi=0.9999, name=self.name)
        self.tau = _number(parameters, "tau", 1e-3, lo=1e-12, name=self.name)
        self._m: list[np.ndarray] | None = None
        self._v: list[np.ndarray] | None = None

    def _step(self, delta: list[np.ndarray]) -> list[np.ndarray]:
        if self._m is None or self._v is None:
            self._m = [np.zeros_like(d) for d in delta]
            self._v = [np.zeros_like(d) for d in delta]
        self._m = [self.beta_1 * m + (1 - self.beta_1) * d for m, d in zip(self._m, delta, strict=True)]
        self._v = [self.beta_2 * v + (1 - self.beta_2) * d * d for v, d in zip(self._v, delta, strict=True)]
        return [self.server_lr * m / (np.sqrt(v) + self.tau) for m, v in zip(self._m, self._v, strict=True)]


@register("FedProx")
class FedProx(FedAvg):
    """FedAvg on the server; every site adds ``proximal_mu/2·||w − w_global||²`` (Li et al. 2020)."""

    name = "FedProx"

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        if "proximal_mu" not in parameters:
            raise ValueError("federated.parameters.proximal_mu is required for FedProx (e.g. 0.01)")
        self.mu = _number(parameters, "proximal_mu", 0.0, lo=0.0, hi=TaskConfig.BOUNDS["proximal_mu"][2], name=self.name)

    def task_config(self, server_round: int) -> TaskConfig:
        return TaskConfig(proximal_mu=self.mu)


@register("FedPer")
class FedPer(FedAvg):
    """Personalised FL with a private head (Arivazhagan et al. 2019): each site keeps its own
    last ``personal_layers`` layers between rounds and trains the shared body with them; the
    server averages every layer (the averaged head only serves sites without their own)."""

    name = "FedPer"

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        value = parameters.get("personal_layers", 1)
        most = TaskConfig.BOUNDS["personal_layers"][2]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ValueError(f"federated.parameters.personal_layers for FedPer must be an integer in [1, {most:g}], "
                             f"got {value!r}")
        self.personal_layers = value

    def task_config(self, server_round: int) -> TaskConfig:
        return TaskConfig(personal_layers=self.personal_layers)
