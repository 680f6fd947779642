"""flower:<Strategy> gives exactly what the Flower strategy gives on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregators import Contribution, get_aggregator


def _weights(rng, scale=1.0):
    return (("w", (rng.normal(size=(3, 4)) * scale).astype(np.float32)), ("b", rng.normal(size=(4,)).astype(np.float32)))


def hand_built_fit_results(contributions):
    """``[(ClientProxy, FitRes)]`` built here from Flower's own types, not by the adapter's ``fit_results``."""
    import flwr.common as fc
    from flwr.server.client_proxy import ClientProxy

    class Proxy(ClientProxy):
        get_properties = get_parameters = fit = evaluate = reconnect = None

    return [(Proxy(c.site), fc.FitRes(status=fc.Status(code=fc.Code.OK, message=""),
                                      parameters=fc.ndarrays_to_parameters([a for _, a in c.weights]),
                                      num_examples=c.num_examples, metrics={}))
            for c in sorted(contributions, key=lambda c: c.site)]


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    initial = _weights(rng)
    sites = [Contribution(f"site-{i}", _weights(rng, 1 + i), num_examples=10 * (i + 1), metrics={"after_loss": 0.1 * i})
             for i in range(5)]
    return initial, sites


@pytest.mark.parametrize(
    "name, params",
    [
        ("FedAdam", {"eta": 0.1, "tau": 1e-3}),
        ("FedMedian", {}),
        ("Krum", {"num_malicious_clients": 1, "num_clients_to_keep": 0}),
    ],
)
def test_adapter_equals_direct_flower_call(inputs, name, params):
    import flwr.common as fc
    import flwr.server.strategy as fs

    initial, sites = inputs
    agg = get_aggregator(f"flower:{name}", parameters={"fraction_fit": 1.0, "min_fit_clients": 2, **params}, initial=initial)
    kwargs = dict(params)
    if name == "FedAdam":
        kwargs["initial_parameters"] = fc.ndarrays_to_parameters([a for _, a in initial])
    direct = getattr(fs, name)(**kwargs)
    current = initial
    for rnd in (1, 2):  # two rounds: FedAdam's moments carry over
        agg.begin_round(rnd, current)
        for c in reversed(sites):  # arrival order must not matter
            agg.add(c)
        ours = agg.finish_round()
        params_direct, _ = direct.aggregate_fit(rnd, hand_built_fit_results(sites), [])
        theirs = fc.parameters_to_ndarrays(params_direct)
        assert [n for n, _ in ours] == ["w", "b"]
        for (_, a), b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b.astype(np.float32), rtol=1e-6, atol=1e-7)
        current = ours
    # the result really is what the strategy computes (not e.g. a plain mean)
    mean = sum(c.weights[0][1] * c.num_examples for c in sites) / sum(c.num_examples for c in sites)
    assert not np.allclose(dict(ours)["w"], mean)


def test_flower_fedavg_through_the_adapter_is_the_hand_computed_weighted_mean(inputs):
    initial, sites = inputs
    agg = get_aggregator("flower:FedAvg", parameters={}, initial=initial)
    agg.begin_round(1, initial)
    for c in sites:
        agg.add(c)
    ours = dict(agg.finish_round())
    n = [c.num_examples for c in sites]  # 10, 20, 30, 40, 50: the weighting shows
    for name in ("w", "b"):
        want = sum(k * dict(c.weights)[name].astype(np.float64) for k, c in zip(n, sites)) / sum(n)
        np.testing.assert_allclose(ours[name], want, rtol=1e-5, atol=1e-6)
        plain = sum(dict(c.weights)[name].astype(np.float64) for c in sites) / len(sites)
        assert not np.allclose(ours[name], plain, rtol=1e-3)


def test_adapter_state_round_trips_fedadam_moments(inputs):
    initial, sites = inputs
    a = get_aggregator("flower:FedAdam", parameters={"eta": 0.1}, initial=initial)
    a.begin_round(1, initial)
    for c in sites:
        a.add(c)
    w1 = a.finish_round()
    state = a.state()
    assert {k.split(".")[0] for k in state} == {"current_weights", "m_t", "v_t"}
    b = get_aggregator("flower:FedAdam", parameters={"eta": 0.1}, initial=initial)
    b.load_state(state)
    for agg in (a, b):
        agg.begin_round(2, w1)
        for c in sites:
            agg.add(c)
    for (_, x), (_, y) in zip(a.finish_round(), b.finish_round()):
        np.testing.assert_array_equal(x, y)


def test_unknown_strategy_and_bad_kwargs_are_clear(inputs):
    initial, _ = inputs
    with pytest.raises(ValueError, match="flower:FedNope is not a Flower strategy"):
        get_aggregator("flower:FedNope", parameters={}, initial=initial)
    with pytest.raises(ValueError, match="does not take bogus"):
        get_aggregator("flower:FedMedian", parameters={"bogus": 1}, initial=initial)
