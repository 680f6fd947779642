"""Aggregators by name: built-ins, ``flower:<Strategy>``, and ``fedbus.aggregators`` entry points."""

from __future__ import annotations

from typing import Any

from coordinator.aggregators import fedasync as _fedasync  # noqa: F401  (registers FedAsync, FedBuff)
from coordinator.aggregators import fedavg as _fedavg  # noqa: F401  (registers FedAvg)
from coordinator.aggregators import server_opt as _server_opt  # noqa: F401  (FedAvgM, FedAdam, FedProx, FedPer)
from coordinator.aggregators.base import (
    ENTRY_POINT_GROUP,
    Aggregator,
    Contribution,
    available,
    get_aggregator,
    register,
    unknown_name,
)
from coordinator.aggregators.central_dp import CentralDP
from coordinator.aggregators.early_stopping import EarlyStopping
from coordinator.aggregators.interfaces import AsyncAggregator, FitPlan, SyncAggregator

__all__ = [
    "ENTRY_POINT_GROUP",
    "Aggregator",
    "AsyncAggregator",
    "CentralDP",
    "Contribution",
    "EarlyStopping",
    "FitPlan",
    "SyncAggregator",
    "available",
    "build_aggregator",
    "get_aggregator",
    "register",
    "unknown_name",
]


def build_aggregator(
    name: str, *, parameters: dict[str, Any], initial, seed: int = 0, central_dp: dict[str, Any] | None = None
) -> Aggregator:
    """The aggregator an experiment names, wrapped in central DP when ``central_dp`` is set.

    ``central_dp`` holds ``clip_norm``, ``noise_multiplier`` and ``secret`` (the
    coordinator's secret from ``central_dp.load_or_create_secret``; never the seed).
    """
    agg = get_aggregator(name, parameters=parameters, initial=initial, seed=seed)
    if central_dp:
        agg = CentralDP(
            agg,
            clip_norm=float(central_dp["clip_norm"]),
            noise_multiplier=float(central_dp["noise_multiplier"]),
            secret=central_dp["secret"],
        )
    return agg
