"""Central DP noise depends on the coordinator's secret: anyone holding everything else
(the run id, the round, the experiment) but another key predicts nothing."""

from __future__ import annotations

import numpy as np

from coordinator.aggregators import build_aggregator
from coordinator.aggregators.central_dp import CentralDP


def _draw(secret: bytes, context: str = "run-1", server_round: int = 1) -> np.ndarray:
    init = (("w", np.zeros(1000, dtype=np.float32)),)
    agg = CentralDP(build_aggregator("FedAvg", parameters={}, initial=init), clip_norm=1.0, noise_multiplier=1.0,
                    secret=secret, context=context)
    return agg.rng(server_round).normal(0.0, 1.0, size=1000)


def test_the_noise_is_a_function_of_the_secret_and_only_its_holder_rebuilds_it():
    key, other = bytes(range(32)), bytes(range(1, 33))
    np.testing.assert_array_equal(_draw(key), _draw(key))  # the holder (a resumed run) rebuilds it exactly
    guess = _draw(other)  # an attacker who knows the run id and round, not the key
    assert abs(np.corrcoef(_draw(key), guess)[0, 1]) < 0.2
    assert not np.allclose(_draw(key), _draw(key, server_round=2))  # fresh noise every round
