"""``--resume`` of a server optimiser with state (FedAvgM's momentum, FedAdam's moments) gives
the model an uninterrupted run gives, to the last bit (issue 26, place 5).

Two runs of one experiment against the same deterministic fake sites: one uninterrupted,
one whose coordinator dies while committing round 3 (nothing of round 3 durable) and is
resumed. The resumed run must restore the optimiser state committed with round 2; starting
its moments from zero, or from a rounded copy, changes the final weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.state import StateStore
from tests.coordinator.conftest import experiment


class Crash(BaseException):
    """The coordinator process dying mid-commit (not an error the run loop handles)."""


@pytest.mark.parametrize("name, parameters", [
    ("FedAvgM", {"server_momentum": 0.9, "server_learning_rate": 0.7}),
    ("FedAdam", {"server_learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}),
])
def test_resume_of_a_stateful_server_optimiser_is_bit_identical_to_an_uninterrupted_run(federation, name, parameters):
    federation.add_site(0.1, 10)
    federation.add_site(-0.3, 30)
    federation.start_sites()
    exp = experiment(rounds=3, name=name, parameters=parameters)

    whole = federation.coordinator(exp, run_id=f"{name}-whole").run()
    assert whole.ok, whole.reason

    first = federation.coordinator(exp, run_id=f"{name}-cut")
    commit = first.store.commit_round

    def die_on_round_3(row, updates):
        if row.round == 3:
            raise Crash()
        return commit(row, updates)

    first.store.commit_round = die_on_round_3
    with pytest.raises(Crash):
        first.run()
    store = StateStore(federation.state_dir)
    assert [r["round"] for r in store.rounds(f"{name}-cut")] == [1, 2]
    assert store.last_round(f"{name}-cut")["agg_state_path"]  # the optimiser state went with round 2

    resumed = federation.coordinator(exp, run_id=f"{name}-cut", resume=True).run()
    assert resumed.ok, resumed.reason
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    assert [n for n, _ in resumed.weights] == [n for n, _ in whole.weights]
    for (n, a), (_, b) in zip(resumed.weights, whole.weights):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), n  # to the last bit
    # and the state mattered: the run moved by more than three plain FedAvg steps would
    init = StateStore(federation.state_dir).run(f"{name}-whole")["initial_checkpoint"]
    from coordinator.checkpoints import load_tensors

    w0 = load_tensors(federation.state_dir / init)
    assert not np.allclose(whole.weights[0][1], w0[0][1] + 3 * (10 * 0.1 - 30 * 0.3) / 40, atol=1e-6)
