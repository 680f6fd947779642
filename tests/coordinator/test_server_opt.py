"""Server momentum, FedAdam, FedProx and FedPer aggregators against hand-computed steps."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import get_aggregator
from protocol.messages import TaskConfig
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
    assert prox.task_config(1) == TaskConfig(proximal_mu=0.05)
    assert _round(prox, 1, 0.0, [(1.0, 1), (3.0, 1)]) == pytest.approx(2.0)  # FedAvg on the server
    with pytest.raises(ValueError, match="proximal_mu"):
        get_aggregator("FedProx", parameters={}, initial=_t(0.0))
    per = get_aggregator("FedPer", parameters={"personal_layers": 2}, initial=_t(0.0))
    assert per.task_config(3) == TaskConfig(personal_layers=2)
    assert get_aggregator("FedAvg", parameters={}, initial=_t(0.0)).task_config(1) == TaskConfig()
    flower_prox = get_aggregator("flower:FedProx", parameters={"proximal_mu": 0.3}, initial=_t(0.0))
    assert flower_prox.task_config(1) == TaskConfig(proximal_mu=0.3)


def test_task_config_bounds_are_refused_when_the_aggregator_is_built():
    """The edges of TaskConfig's bounds, through the aggregators that set them."""
    assert get_aggregator("FedProx", parameters={"proximal_mu": 1e4}, initial=_t(0.0)).task_config(1).proximal_mu == 1e4
    with pytest.raises(ValueError, match="proximal_mu"):
        get_aggregator("FedProx", parameters={"proximal_mu": 1.0001e4}, initial=_t(0.0))
    with pytest.raises(ValueError, match="proximal_mu"):
        get_aggregator("flower:FedProx", parameters={"proximal_mu": float("inf")}, initial=_t(0.0))
    assert get_aggregator("FedPer", parameters={"personal_layers": 256}, initial=_t(0.0)).task_config(1).personal_layers == 256
    with pytest.raises(ValueError, match="personal_layers"):
        get_aggregator("FedPer", parameters={"personal_layers": 257}, initial=_t(0.0))


def test_configure_fit_samples_the_round_and_central_dp_fixes_qn_secretly():
    """The loop's only question to a synchronous aggregator: the sites, the config, the replies."""
    from coordinator.aggregators import build_aggregator
    from coordinator.sampling import sample_sites

    sites = [f"s{i}" for i in range(10)]
    plain = get_aggregator("FedProx", parameters={"proximal_mu": 0.1}, initial=_t(0.0), seed=3)
    plan = plain.configure_fit(2, sites, 4)
    assert plan.sites == sample_sites(sites, 4, seed=3, round=2) and plan.expected == 4
    assert plan.config == TaskConfig(proximal_mu=0.1)
    dp = build_aggregator("FedProx", parameters={"proximal_mu": 0.1}, initial=_t(0.0), seed=3,
                          central_dp={"clip_norm": 1.0, "noise_multiplier": 1.0, "secret": b"k" * 32})
    dp.start_run("run-a", 3)
    plans = [dp.configure_fit(r, sites, 4) for r in range(1, 9)]
    assert dp.expected_clients == 4 and all(p.config == TaskConfig(proximal_mu=0.1) for p in plans)
    # the public seed does not predict central DP's sample (its own secret does)
    assert any(p.sites != sample_sites(sites, 4, seed=3, round=r) for r, p in enumerate(plans, 1))
    dp.configure_fit(8, sites[:2], 1, attempt=1)  # a retry's extra site leaves qN as it was
    assert dp.expected_clients == 4
    fedbuff = get_aggregator("FedBuff", parameters={"buffer_size": 3}, initial=_t(0.0), seed=3)
    assert fedbuff.configure_fit(0, sites, 5).expected == 3
    assert get_aggregator("FedAsync", parameters={}, initial=_t(0.0)).configure_fit(0, sites, 5).expected == 1
