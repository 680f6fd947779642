"""Aggregators against hand-computed numbers (no bus, no database)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import (
    CentralDP,
    Contribution,
    EarlyStopping,
    build_aggregator,
    get_aggregator,
)
from coordinator.aggregators.staleness import Staleness


def T(**arrays):
    return tuple((k, np.asarray(v, dtype=np.float32)) for k, v in arrays.items())


INIT = T(w=[[0.0, 0.0], [0.0, 0.0]], b=[0.0])


def test_fedavg_three_sites_is_the_hand_computed_weighted_mean():
    agg = get_aggregator("FedAvg", parameters={"fraction_fit": 1.0}, initial=INIT)
    agg.begin_round(1, INIT)
    agg.add(Contribution("a", T(w=[[1, 2], [3, 4]], b=[1]), num_examples=10))
    agg.add(Contribution("b", T(w=[[5, 6], [7, 8]], b=[2]), num_examples=30))
    agg.add(Contribution("c", T(w=[[0, 0], [0, 0]], b=[10]), num_examples=60))
    out = dict(agg.finish_round())
    # w = (10*[1,2,3,4] + 30*[5,6,7,8] + 60*0) / 100 = [1.6, 2.0, 2.4, 2.8]; b = (10 + 60 + 600)/100 = 6.7
    np.testing.assert_allclose(out["w"], [[1.6, 2.0], [2.4, 2.8]], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [6.7], rtol=1e-6)
    assert out["w"].dtype == np.float32
    # a second round starts from an empty sum
    agg.begin_round(2, INIT)
    agg.add(Contribution("a", T(w=[[1, 1], [1, 1]], b=[3]), num_examples=5))
    np.testing.assert_allclose(dict(agg.finish_round())["b"], [3.0])


def test_fedavg_rejects_zero_examples_and_empty_rounds():
    agg = get_aggregator("FedAvg", parameters={}, initial=INIT)
    agg.begin_round(1, INIT)
    with pytest.raises(ValueError, match="num_examples=0"):
        agg.add(Contribution("a", INIT, num_examples=0))
    with pytest.raises(ValueError, match="no weight"):
        agg.finish_round()


def test_staleness_functions():
    assert Staleness("constant")(7) == 1.0
    p = Staleness("polynomial", a=0.5)
    assert p(0) == 1.0 and p(3) == pytest.approx(0.5)  # (1+3)^-0.5
    h = Staleness("hinge", a=10, b=4)
    assert h(4) == 1.0 and h(6) == pytest.approx(1 / 21)  # 1/(10*(6-4)+1)
    assert Staleness.from_parameters({"staleness": {"function": "hinge", "a": 2, "b": 1}})(3) == pytest.approx(1 / 5)
    assert Staleness.from_parameters({"staleness": "polynomial", "staleness_a": 1})(1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown function 'cubic'"):
        Staleness.from_parameters({"staleness": "cubic"})


def test_fedasync_hand_computed_merges_for_a_fixed_arrival_order():
    agg = get_aggregator(
        "FedAsync", parameters={"alpha": 0.5, "staleness": "polynomial", "staleness_a": 1.0, "max_staleness": 3},
        initial=T(x=[0.0]),
    )
    assert agg.max_staleness == 3 and not agg.synchronous
    g0 = T(x=[0.0])
    # v0 -> v1: fresh update (tau 0): a = 0.5 -> 0.5*0 + 0.5*4 = 2
    g1 = agg.merge(Contribution("a", T(x=[4.0]), 1, base_round=0), version=0, global_weights=g0, base_weights=g0)
    np.testing.assert_allclose(dict(g1)["x"], [2.0])
    # v1 -> v2: site b trained on v0 (tau 1): a = 0.5 * (1+1)^-1 = 0.25 -> 0.75*2 + 0.25*10 = 4
    g2 = agg.merge(Contribution("b", T(x=[10.0]), 1, base_round=0), version=1, global_weights=g1, base_weights=g0)
    np.testing.assert_allclose(dict(g2)["x"], [4.0])
    # v2 -> v3: tau 2 with a=0.5/3: 4*(1-1/6) + 16/6 = 6
    g3 = agg.merge(Contribution("c", T(x=[16.0]), 1, base_round=0), version=2, global_weights=g2, base_weights=g0)
    np.testing.assert_allclose(dict(g3)["x"], [6.0], rtol=1e-6)


def test_fedbuff_steps_after_k_updates_with_staleness_weighted_deltas():
    agg = get_aggregator(
        "FedBuff",
        parameters={"buffer_size": 2, "server_lr": 1.0, "staleness": "hinge", "staleness_a": 1, "staleness_b": 0},
        initial=T(x=[1.0]),
    )
    g0 = T(x=[1.0])
    assert agg.merge(Contribution("a", T(x=[3.0]), 1, base_round=0), version=0, global_weights=g0, base_weights=g0) is None
    assert agg.pending() == 1
    # second: delta 5-1 = 4 with tau 0 -> s 1; first delta 2 with s 1 -> mean 3 -> x = 4
    g1 = agg.merge(Contribution("b", T(x=[5.0]), 1, base_round=0), version=0, global_weights=g0, base_weights=g0)
    np.testing.assert_allclose(dict(g1)["x"], [4.0])
    assert agg.pending() == 0
    # next buffer at v1: a fresh delta from v1 (6-4 = +2, s=1) and a stale one from v0
    # (tau 1 -> hinge 1/(1*(1-0)+1) = 1/2, delta 7-1 = +6); step = (2 + 6/2)/2 = 2.5 -> x = 6.5
    assert agg.merge(Contribution("a", T(x=[6.0]), 1, base_round=1), version=1, global_weights=g1, base_weights=g1) is None
    g2 = agg.merge(Contribution("c", T(x=[7.0]), 1, base_round=0), version=1, global_weights=g1, base_weights=g0)
    np.testing.assert_allclose(dict(g2)["x"], [6.5], rtol=1e-6)


def test_central_dp_clips_deltas_sums_equal_weights_and_adds_secret_noise():
    g = T(x=[0.0, 0.0])
    plain = CentralDP(get_aggregator("FedAvg", parameters={}, initial=g), clip_norm=1.0, noise_multiplier=0.0,
                      secret=b"k" * 32)
    plain.begin_round(1, g)
    plain.add(Contribution("a", T(x=[3.0, 4.0]), 1000))  # norm 5 -> clipped to [0.6, 0.8]; n plays no part
    plain.add(Contribution("b", T(x=[0.1, 0.0]), 1))  # inside the ball: kept
    np.testing.assert_allclose(dict(plain.finish_round())["x"], [0.35, 0.4], rtol=1e-6)

    def noisy(secret, expected=None):
        agg = build_aggregator("FedAvg", parameters={}, initial=g, seed=7,
                               central_dp={"clip_norm": 1.0, "noise_multiplier": 2.0, "secret": secret})
        agg.expected_clients = expected
        agg.begin_round(3, g)
        agg.add(Contribution("a", T(x=[0.0, 0.0]), 1))
        agg.add(Contribution("b", T(x=[0.0, 0.0]), 1))
        assert agg.noise_std() == pytest.approx(2.0 / (expected or 2))
        return dict(agg.finish_round())["x"]

    a, b = noisy(b"s" * 32), noisy(b"s" * 32)
    np.testing.assert_array_equal(a, b)  # the secret's holder (a resumed run) adds the same noise
    assert not np.allclose(a, 0.0)
    assert not np.array_equal(a, noisy(b"t" * 32))  # same experiment seed, another secret: other noise
    # the fixed denominator: 4 expected clients, 2 replied -> same noise draw divided by 4, not 2
    np.testing.assert_allclose(noisy(b"s" * 32, expected=4), a / 2, rtol=1e-6)


def test_early_stopping_patience_and_min_delta():
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert not es.update(1.0)
    assert not es.update(0.95)  # not better by > 0.1
    assert es.update(0.93)  # second round without improvement
    es2 = EarlyStopping(patience=2, min_delta=0.1)
    assert [es2.update(x) for x in (1.0, 0.8, 0.6, 0.59)] == [False, False, False, False]


def test_unknown_aggregator_names_the_choices():
    with pytest.raises(ValueError, match="unknown aggregator 'FedNope'.*FedAvg"):
        get_aggregator("FedNope", parameters={}, initial=INIT)


def test_fedavg_float32_and_float64_accumulators_agree():
    rng = np.random.default_rng(1)
    init = (("w", np.zeros((64, 32), np.float32)), ("b", np.zeros(32, np.float32)))
    ups = [tuple((n, rng.normal(size=a.shape).astype(np.float32)) for n, a in init) for _ in range(20)]
    outs = []
    for acc in ("float32", "float64"):
        agg = get_aggregator("FedAvg", parameters={"accumulator": acc}, initial=init)
        agg.begin_round(1, init)
        for i, u in enumerate(ups):
            agg.add(Contribution(f"s{i}", u, num_examples=1 + i))
        outs.append(dict(agg.finish_round()))
    expected = sum((1 + i) * u[0][1].astype(np.float64) for i, u in enumerate(ups)) / sum(range(1, 21))
    np.testing.assert_allclose(outs[1]["w"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outs[0]["w"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="accumulator must be float32 or float64"):
        get_aggregator("FedAvg", parameters={"accumulator": "float16"}, initial=init)
