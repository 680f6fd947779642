"""An existing Flower NumPyClient trained and evaluated through fedbus tasks on RabbitMQ."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.messages import EvalResult, PersonalizeTask, Update
from protocol.transport import open_bus
from site_worker.config import load_site_config
from site_worker.daemon import SiteWorker
from site_worker.flower_adapter import FlowerAdapter, FlowerClientError

from tests.site_worker import flower_client
from tests.site_worker.support import TestCoordinator, experiment_dict, initial_weights, make_keys, site_toml, uid


def tiny_experiment() -> dict:
    exp = experiment_dict(**{"training.optimizer.differential_privacy": {"enabled": False}})
    exp["architecture"]["layers"] = [
        {"type": "input", "params": {"features": 12}},
        {"type": "Linear", "params": {"in_features": 12, "out_features": 8}},
        {"type": "ReLU", "params": {}},
        {"type": "Linear", "params": {"in_features": 8, "out_features": 1}},
        {"type": "output", "params": {"features": 1}},
    ]
    return exp


@pytest.mark.broker
def test_flower_numpy_client_trains_through_a_fedbus_task(tmp_path, amqp_url):
    site_id, fed = uid("flwr"), uid("fed")
    keys = make_keys(tmp_path, site_id)
    (tmp_path / "unused.csv").write_text("a,y\n1,0\n")
    cfg = load_site_config(site_toml(
        tmp_path, site_id=site_id, federation=fed, broker_url=amqp_url, keys=keys,
        datasets={"tiny": {"path": str(tmp_path / "unused.csv"), "target": "y"}},
        policy={"allow_no_dp": True, "allow_unprotected_flower_client": True, "metrics": "exact"},
        extra={"flower_client": "tests.site_worker.flower_client:make_client"}))
    bus = open_bus(amqp_url)
    coord = TestCoordinator(bus, keys.coordinator, federation=fed, site_id=site_id, site_pub=keys.site_pub)
    worker = SiteWorker(cfg)
    flower_client.CALLS.clear()
    try:
        worker.start()
        exp = tiny_experiment()
        sent = initial_weights(exp, seed=4)
        task = coord.train(exp, dataset="tiny", round=3, weights=sent, config={"epochs": 7})
        u = coord.reply().payload
        assert isinstance(u, Update) and u.task_id == task.message_id
        assert [n for n, _ in u.weights] == ["1.weight", "1.bias", "3.weight", "3.bias"]
        assert u.num_examples == 96 and u.epsilon is None and u.base_round == 2
        assert "train_loss" in u.metrics and "note" not in u.metrics
        assert flower_client.CALLS[0][0] == "fit"
        assert flower_client.CALLS[0][1]["epochs"] == 7 and flower_client.CALLS[0][1]["server_round"] == 3
        # The same client run directly with the same inputs produces exactly these weights.
        direct, n, _ = flower_client.make_client().fit([a.copy() for _, a in sent], {"epochs": 7})
        for (_, got), want in zip(u.weights, direct):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(u.weights[0][1], sent[0][1])

        ev = coord.evaluate(exp, dataset="tiny", weights=u.weights)
        r = coord.reply().payload
        assert isinstance(r, EvalResult) and r.task_id == ev.message_id
        assert r.num_examples == 96 and 0.0 <= r.metrics["accuracy"] <= 1.0 and "loss" in r.metrics


        # the final-model task: a Flower client is not fine-tuned under the ledger; the site answers
        # with the global model's test metrics, as an EvalTask(split="test") would
        import time

        fin = coord.task_envelope(PersonalizeTask(experiment=exp, weights=u.weights, dataset="tiny", base_round=3,
                                                  seed=5, deadline=time.time() + 600), round=3)
        coord.publish(fin)
        f = coord.reply().payload
        assert isinstance(f, EvalResult) and f.task_id == fin.message_id
        assert f.metrics["accuracy"] == r.metrics["accuracy"] and not any(k.startswith("personalized_") for k in f.metrics)
    finally:
        worker.stop(grace_s=2)
        coord.close()
        bus.close()


def test_adapter_rejects_wrong_shapes():
    class Bad(flower_client.TinyClient):
        def fit(self, parameters, config):
            return [np.zeros(3)] * 4, 1, {}

    exp = tiny_experiment()
    import time

    from protocol.messages import TrainTask

    task = TrainTask(experiment=exp, weights=initial_weights(exp), dataset="tiny", base_round=0, seed=0,
                     deadline=time.time() + 60)
    adapter = FlowerAdapter(Bad())
    assert adapter.shapes() == [(8, 12), (8,), (1, 8), (1,)]
    with pytest.raises(FlowerClientError, match="shape"):
        adapter.fit(task, task_id="t", server_round=1, epsilon=None, delta=None, keep_metrics=True)
