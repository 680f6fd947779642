"""Run any Flower strategy's ``aggregate_fit`` as a fedbus aggregator (``flower:<StrategyName>``).

The strategy is ``flwr.server.strategy.<Name>(**parameters)`` with the fedbus keys
removed; strategies that need the initial model (FedAdam, FedYogi, FedAdagrad, FedAvgM
with momentum, ...) get ``initial_parameters`` from the run's initial weights. Each
round, the accepted updates become ``FitRes`` (sorted by site id, so the result does
not depend on arrival order) and the strategy's output becomes the next global model.
Flower's API takes the whole list at once, so this adapter holds every update of a
round in memory (O(sites × model)), unlike the streaming built-in FedAvg.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like
from protocol.messages import TaskConfig

_NEEDS_INITIAL = ("FedOpt", "FedAdam", "FedYogi", "FedAdagrad")


def _flwr():
    import flwr.common as common
    import flwr.server.strategy as strategies
    from flwr.server.client_proxy import ClientProxy

    return common, strategies, ClientProxy


def _stub_proxy_class():
    """A ``ClientProxy`` that only names a site: Flower's aggregate_fit never calls it."""
    _, _, ClientProxy = _flwr()

    class SiteProxy(ClientProxy):
        def _unused(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("fedbus SiteProxy only names a site; Flower tried to talk to it")

        get_properties = get_parameters = fit = evaluate = reconnect = _unused

    return SiteProxy


def fit_results(contributions: list[Contribution]) -> list[tuple[Any, Any]]:
    """``[(ClientProxy, FitRes)]`` for ``aggregate_fit``, sorted by site id."""
    common, _, _ = _flwr()
    proxy = _stub_proxy_class()
    out = []
    for c in sorted(contributions, key=lambda c: c.site):
        params = common.ndarrays_to_parameters([np.asarray(w) for _, w in c.weights])
        metrics = {k: float(v) for k, v in c.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        res = common.FitRes(
            status=common.Status(code=common.Code.OK, message="ok"),
            parameters=params,
            num_examples=int(c.num_examples),
            metrics=metrics,
        )
        out.append((proxy(c.site), res))
    return out


def make_strategy(name: str, parameters: dict[str, Any], initial) -> Any:
    """``flwr.server.strategy.<name>(**parameters)``, adding ``initial_parameters`` where needed."""
    common, strategies, _ = _flwr()
    cls = getattr(strategies, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, strategies.Strategy)):
        names = sorted(n for n in dir(strategies) if inspect.isclass(getattr(strategies, n)) and n[0].isupper())
        raise ValueError(f"federated.name: flower:{name} is not a Flower strategy; choose one of {', '.join(names)}")
    kwargs = dict(parameters)
    accepted = inspect.signature(cls.__init__).parameters
    if "initial_parameters" in accepted and "initial_parameters" not in kwargs:
        if name in _NEEDS_INITIAL or any(issubclass(cls, getattr(strategies, n)) for n in ("FedOpt", "FedAvgM")):
            kwargs["initial_parameters"] = common.ndarrays_to_parameters([np.asarray(a) for _, a in initial])
    unknown = [k for k in kwargs if k not in accepted and not any(p.kind == p.VAR_KEYWORD for p in accepted.values())]
    if unknown:
        raise ValueError(
            f"federated.parameters: flower:{name} does not take {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(k for k in accepted if k != 'self')}"
        )
    return cls(**kwargs)


class FlowerAdapter(Aggregator):
    """Synchronous aggregator that delegates to a Flower strategy's ``aggregate_fit``."""

    synchronous = True

    def __init__(self, *, strategy: str, parameters: dict[str, Any], initial, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self.name = f"flower:{strategy}"
        self.strategy = make_strategy(strategy, self.parameters, initial)
        self._reference = initial
        self._round = 0
        self._items: list[Contribution] = []
        self.task_config(0)  # a proximal_mu outside TaskConfig's bounds is refused now, not at round 1

    def task_config(self, server_round: int) -> TaskConfig:
        """Flower's FedProx asks its clients for the proximal term through the fit config."""
        mu = getattr(self.strategy, "proximal_mu", None)
        return TaskConfig(proximal_mu=float(mu)) if mu is not None else TaskConfig()

    def begin_round(self, server_round: int, global_weights) -> None:
        self._round = server_round
        self._reference = global_weights
        self._items = []

    def add(self, contribution: Contribution) -> None:
        self._items.append(contribution)

    def finish_round(self):
        common, _, _ = _flwr()
        params, _metrics = self.strategy.aggregate_fit(self._round, fit_results(self._items), [])
        if params is None:
            raise ValueError(f"{self.name}.aggregate_fit returned no parameters for round {self._round}")
        self._items = []
        return like(self._reference, common.parameters_to_ndarrays(params))

    # FedOpt family keeps server-side moments and its current weights between rounds.
    _STATE_LISTS = ("current_weights", "m_t", "v_t", "momentum_vector")

    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for attr in self._STATE_LISTS:
            value = getattr(self.strategy, attr, None)
            if value:
                for i, a in enumerate(value):
                    out[f"{attr}.{i}"] = np.asarray(a)
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for attr in self._STATE_LISTS:
            keys = sorted((k for k in arrays if k.startswith(attr + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
            if keys:
                setattr(self.strategy, attr, [np.array(arrays[k]) for k in keys])
