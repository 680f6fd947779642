"""The aggregator interface and the registry of aggregators by name.

Aggregation is pure arithmetic over ``Tensors`` (ordered ``(name, ndarray)`` pairs):
no bus, no database. The run loop (``coordinator/run.py``) feeds accepted updates in,
one at a time, and takes the new global model out. Two kinds exist:

* synchronous (``synchronous = True``): ``begin_round`` → ``add`` per update →
  ``finish_round`` returns the next global model;
* asynchronous (``synchronous = False``): ``merge`` per update returns a new global
  model whenever a global step happened (FedAsync: every update, FedBuff: every K).

A third party adds one with an entry point in the ``fedbus.aggregators`` group whose
value is the aggregator class; the experiment names it by the entry point's name.
"""

from __future__ import annotations

import abc
import importlib.metadata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from coordinator.sampling import sample_sites
from protocol.messages import TaskConfig, Tensors

if TYPE_CHECKING:
    from coordinator.aggregators.interfaces import FitPlan

ENTRY_POINT_GROUP = "fedbus.aggregators"

# Keys of ``federated.parameters`` that fedbus itself reads (sampling, deadlines,
# wrappers); aggregators and Flower strategies never see them as keyword arguments.
FEDBUS_KEYS = frozenset(
    {
        "fraction_fit",
        "fraction_eval",
        "min_fit_clients",
        "min_eval_clients",
        "min_available_clients",
        "round_timeout_s",
        "max_round_retries",
        "central_dp",
        "early_stopping",
        "norm_bound",
    }
)


@dataclass(frozen=True)
class Contribution:
    """One accepted update as an aggregator sees it."""

    site: str
    weights: Tensors
    num_examples: int
    base_round: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class AggregatorModeError(TypeError):
    """A synchronous call on an asynchronous aggregator, or the other way round."""


class Aggregator(abc.ABC):  # noqa: B024 - an ABC for isinstance and registration; every method has a default
    """Base of every aggregator; subclasses set ``name`` and ``synchronous``."""

    name: ClassVar[str] = ""
    synchronous: ClassVar[bool] = True

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        self.parameters = {k: v for k, v in parameters.items() if k not in FEDBUS_KEYS}
        self.seed = seed

    # -- synchronous aggregators -------------------------------------------------
    def begin_round(self, server_round: int, global_weights: Tensors) -> None:
        """Start collecting the updates of ``server_round`` (trained from ``global_weights``)."""
        raise AggregatorModeError(f"{self.name} is asynchronous: call merge()")

    def add(self, contribution: Contribution) -> None:
        """Fold one accepted update into the round."""
        raise AggregatorModeError(f"{self.name} is asynchronous: call merge()")

    def finish_round(self) -> Tensors:
        """The next global model from everything added since ``begin_round``."""
        raise AggregatorModeError(f"{self.name} is asynchronous: call merge()")

    # -- asynchronous aggregators ------------------------------------------------
    max_staleness: int | None = None

    def merge(
        self, contribution: Contribution, *, version: int, global_weights: Tensors, base_weights: Tensors
    ) -> Tensors | None:
        """Merge one update that arrived at global ``version``; new weights when a step happened."""
        raise AggregatorModeError(f"{self.name} is synchronous: call begin_round/add/finish_round")

    def pending(self) -> int:
        """Updates merged into the aggregator but not yet into a global step (FedBuff's buffer)."""
        return 0

    def replies_per_step(self) -> int:
        """Async: accepted updates per global step (FedBuff's K; 1 for FedAsync)."""
        return 1

    # -- what sites are asked to do (coordinator/aggregators/interfaces.py) ------------
    def start_run(self, run_id: str, seed: int) -> None:
        """The run's id and seed, once known; the seed drives the public choice of sites."""
        self.seed = seed

    def sampling_seed(self) -> int:
        """Seed of the choice of training sites: the run's (public) seed unless overridden."""
        return self.seed

    def configure_fit(self, server_round: int, available: Sequence[str], count: int, *,
                      attempt: int = 0) -> "FitPlan":
        """Which sites train, with what config, and how many replies to wait for (Flower's configure_fit).

        Synchronous: ``count`` of ``available`` for round ``server_round`` (a retry's extra
        sites with ``attempt`` > 0); asynchronous: the sites kept busy from version
        ``server_round`` on, and ``expected`` is the replies per global step."""
        from coordinator.aggregators.interfaces import FitPlan

        if self.synchronous:
            sites = sample_sites(list(available), count, seed=self.sampling_seed(), round=server_round, attempt=attempt)
            return FitPlan(sites=sites, config=self.task_config(server_round), expected=len(sites))
        sites = sample_sites(list(available), count, seed=self.sampling_seed(), round=server_round, purpose="async")
        return FitPlan(sites=sites, config=self.task_config(server_round), expected=self.replies_per_step())

    def task_config(self, server_round: int) -> TaskConfig:
        """What the sites' trainers need for a task of ``server_round`` (``TrainTask.config``),
        e.g. FedProx's ``proximal_mu``; sites read its fields, never this class's name."""
        return TaskConfig()

    # -- resume ------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Server-side optimiser state to checkpoint with the model (e.g. FedAdam's moments)."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what ``state`` returned (on ``--resume``)."""
        if arrays:
            raise ValueError(f"{self.name} keeps no state but a checkpoint carries {sorted(arrays)}")


AggregatorFactory = Callable[..., Aggregator]
_REGISTRY: dict[str, AggregatorFactory] = {}


def register(name: str, factory: AggregatorFactory | None = None):
    """Register an aggregator class (or factory) under ``name``; usable as a decorator."""

    def _do(f: AggregatorFactory) -> AggregatorFactory:
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"aggregator {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = f
        return f

    return _do(factory) if factory is not None else _do


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names an experiment may use: built-ins, entry points, and ``flower:<Strategy>``."""
    return sorted(set(_REGISTRY) | set(_entry_points())) + ["flower:<StrategyName>"]


def unknown_name(name: str) -> str | None:
    """Why ``federated.name`` names no aggregator (None when it does): checked where an
    experiment is validated, so a misspelling fails there and not at run time."""
    if name.startswith("flower:") and len(name) > len("flower:"):
        return None
    if name in _REGISTRY or name in _entry_points():
        return None
    import difflib

    close = difflib.get_close_matches(name, sorted(set(_REGISTRY) | set(_entry_points())), n=1)
    return (f"unknown aggregator {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; available: {', '.join(available())}")


def get_aggregator(name: str, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> Aggregator:
    """Instantiate the aggregator ``name`` (built-in, ``flower:<Strategy>``, or entry point)."""
    if name.startswith("flower:"):
        from coordinator.aggregators.flower import FlowerAdapter

        return FlowerAdapter(strategy=name.split(":", 1)[1], parameters=parameters, initial=initial, seed=seed)
    factory = _REGISTRY.get(name)
    if factory is None:
        ep = _entry_points().get(name)
        if ep is None:
            raise ValueError(
                f"federated.name: unknown aggregator {name!r}; available: {', '.join(available())} "
                f"(a third-party aggregator registers an entry point in group {ENTRY_POINT_GROUP!r})"
            )
        factory = ep.load()
    agg = factory(parameters=parameters, initial=initial, seed=seed)
    if not isinstance(agg, Aggregator):
        raise TypeError(f"aggregator {name!r} must subclass coordinator.aggregators.base.Aggregator, got {type(agg)!r}")
    return agg


def like(reference: Tensors, arrays: list[np.ndarray]) -> Tensors:
    """Name ``arrays`` after ``reference`` and cast each to the reference's dtype."""
    return tuple((n, np.asarray(a).astype(r.dtype, copy=False)) for (n, r), a in zip(reference, arrays, strict=True))
