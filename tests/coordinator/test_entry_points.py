"""A third-party aggregator, installed as a tiny package with a `fedbus.aggregators` entry point."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from coordinator.aggregators import available, get_aggregator
from coordinator.aggregators.base import Contribution
from tests.coordinator.conftest import experiment

PACKAGE = '''
"""Element-wise maximum of the site models: a deliberately odd rule nobody ships."""
import numpy as np
from coordinator.aggregators.base import Aggregator, like


class ElementwiseMax(Aggregator):
    name = "ElementwiseMax"
    synchronous = True

    def begin_round(self, server_round, global_weights):
        self._ref, self._max = global_weights, None

    def add(self, c):
        arrays = [np.asarray(w) for _, w in c.weights]
        self._max = arrays if self._max is None else [np.maximum(a, b) for a, b in zip(self._max, arrays)]

    def finish_round(self):
        return like(self._ref, self._max)
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "tinyagg").mkdir(parents=True)
    (site / "tinyagg" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    dist = site / "tinyagg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyagg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedbus.aggregators]\nElementwiseMax = tinyagg:ElementwiseMax\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    import sys

    sys.modules.pop("tinyagg", None)


def test_entry_point_aggregator_is_found_by_name(installed):
    assert "ElementwiseMax" in available()
    init = (("w", np.zeros(3, np.float32)),)
    agg = get_aggregator("ElementwiseMax", parameters={}, initial=init)
    agg.begin_round(1, init)
    agg.add(Contribution("a", (("w", np.array([1, 5, 0], np.float32)),), 1))
    agg.add(Contribution("b", (("w", np.array([3, 2, -1], np.float32)),), 1))
    np.testing.assert_array_equal(dict(agg.finish_round())["w"], [3, 5, 0])


def test_an_experiment_runs_with_the_entry_point_aggregator(installed, federation):
    federation.add_site(1.0, 10)
    federation.add_site(7.0, 10)
    federation.start_sites()
    result = federation.coordinator(experiment(rounds=1, name="ElementwiseMax")).run()
    assert result.ok and result.aggregator == "ElementwiseMax"
    from coordinator.checkpoints import load_tensors
    from coordinator.state import StateStore

    w0 = load_tensors(federation.state_dir / StateStore(federation.state_dir).run(result.run_id)["initial_checkpoint"])
    np.testing.assert_allclose(result.weights[0][1], w0[0][1] + 7.0, rtol=1e-6)  # the max, not the mean (4)
