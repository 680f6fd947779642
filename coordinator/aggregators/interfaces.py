"""What the round loop needs from an aggregator: two small interfaces, one per loop.

In the manner of Flower's ``configure_fit``, an aggregator answers for each round (sync)
or for the start of a run (async) a ``FitPlan``: which sites train, the ``TaskConfig``
each task carries, and how many replies the loop waits for. The loop never asks an
aggregator what class it is: central DP's secret sampling and its fixed denominator qN
live in ``CentralDP.configure_fit``, FedBuff's buffer in ``FedBuff.replies_per_step``.
``coordinator.aggregators.base.Aggregator`` implements both; a third-party aggregator
may subclass it or implement the one interface its ``synchronous`` flag names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coordinator.aggregators.base import Contribution
from protocol.messages import TaskConfig, Tensors


@dataclass(frozen=True)
class FitPlan:
    """One round's (or an async run's first) training tasks: who, with what, how many replies."""

    sites: list[str]  # sorted site ids to send a TrainTask to
    config: TaskConfig  # what every task carries for the sites' trainers
    expected: int  # replies the loop waits for (sync: one per site; async: per global step)


class _Common(Protocol):
    @property
    def name(self) -> str: ...

    def start_run(self, run_id: str, seed: int) -> None:
        """The run's id and seed, once known (before the first ``configure_fit``)."""

    def task_config(self, server_round: int) -> TaskConfig:
        """The config of a task of ``server_round`` (evaluation and final tasks carry it too)."""

    def state(self) -> dict[str, np.ndarray]:
        """Server-side state checkpointed with each round's model."""

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what ``state`` returned (``--resume``)."""


class SyncAggregator(_Common, Protocol):
    """A round: ``configure_fit`` → ``begin_round`` → ``add`` per update → ``finish_round``."""

    def configure_fit(self, server_round: int, available: Sequence[str], count: int, *,
                      attempt: int = 0) -> FitPlan:
        """Choose ``count`` of ``available`` for the round (``attempt`` > 0: a retry's extra sites)."""

    def begin_round(self, server_round: int, global_weights: Tensors) -> None: ...

    def add(self, contribution: Contribution) -> None: ...

    def finish_round(self) -> Tensors: ...


class AsyncAggregator(_Common, Protocol):
    """Merge on arrival; ``merge`` returns new weights when a global step happened."""

    max_staleness: int | None

    def configure_fit(self, server_round: int, available: Sequence[str], count: int, *,
                      attempt: int = 0) -> FitPlan:
        """The sites kept busy from version ``server_round`` on; ``expected``: replies per global step."""

    def merge(self, contribution: Contribution, *, version: int, global_weights: Tensors,
              base_weights: Tensors) -> Tensors | None: ...


__all__ = ["AsyncAggregator", "FitPlan", "SyncAggregator"]
