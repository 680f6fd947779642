"""Server momentum, FedAdam, FedProx and FedPer aggregators against hand-computed steps."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import get_aggregator
from coordinator.aggregators.base import Contribution


def _t(v: float) -> tuple:
    return (("w", np.array([v], dtype=np.float32)),)


def _round(agg, rnd: int, global_w: float, updates: list[tuple[float, int]]) -> float:
    agg.begin_round(rnd, _t(global_w))
    for i, (w, n) in enumerate(updates):
        agg.add(Contribution(site=f"s{i}", weights=_t(w), num_examples=n))
    return float(agg.finish_round()[0][1][0])


def test_fedavgm_momentum_by_hand():
    agg = get_aggregator("FedAvgM", parameters={"server_momentum": 0.9, "server_learning_rate": 1.0}, initial=_t(0.0))
    # round 1: mean of 1 (n=1) and 3 (n=3) = 2.5, Δ = 2.5, m = 2.5, x = 2.5
    x1 = _round(agg, 1, 0.0, [(1.0, 1), (3.0, 3)])
    assert x1 == pytest.approx(2.5)
    # round 2: the sites return x unchanged: Δ = 0, m = 0.9·2.5 = 2.25, x = 2.5 + 2.25
    assert _round(agg, 2, x1, [(x1, 1)]) == pytest.approx(4.75)
    restored = get_aggregator("FedAvgM", parameters={"server_momentum": 0.9}, initial=_t(0.0))
    restored.load_state(agg.state())
    assert float(restored.state()["m.0"][0]) == pytest.approx(2.25)


def test_fedadam_step_by_hand():
    agg = get_aggregator("FedAdam", parameters={"server_learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.99,
                                                "tau": 0.001}, initial=_t(0.0))
    # Δ = 1: m = 0.1, v = 0.01, x = 0.1 · 0.1 / (0.1 + 0.001)
    assert _round(agg, 1, 0.0, [(1.0, 5)]) == pytest.approx(0.1 * 0.1 / 0.101, rel=1e-6)


def test_fedprox_and_fedper_ask_the_sites():
    prox = get_aggregator("FedProx", parameters={"proximal_mu": 0.05}, initial=_t(0.0))
    assert prox.task_config(1) == {"proximal_mu": 0.05}
    assert _round(prox, 1, 0.0, [(1.0, 1), (3.0, 1)]) == pytest.approx(2.0)  # FedAvg on the server
    with pytest.raises(ValueError, match="proximal_mu"):
        get_aggregator("FedProx", parameters={}, initial=_t(0.0))
    per = get_aggregator("FedPer", parameters={"personal_layers": 2}, initial=_t(0.0))
    assert per.task_config(3) == {"personal_layers": 2}
    assert get_aggregator("FedAvg", parameters={}, initial=_t(0.0)).task_config(1) == {}
    flower_prox = get_aggregator("flower:FedProx", parameters={"proximal_mu": 0.3}, initial=_t(0.0))
    assert flower_prox.task_config(1) == {"proximal_mu": 0.3}
