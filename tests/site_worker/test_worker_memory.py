"""SiteWorker end to end on the in-memory bus (same semantics as RabbitMQ, no broker needed)."""

from __future__ import annotations

import threading

import pytest

from protocol.messages import Declined, EvalResult, SiteHello, Update
from protocol.signing import Signer
from protocol.transport import open_bus
from protocol.transport.memory import get_broker
from protocol.transport.topology import control_queue, site_queue
from site_worker.config import load_site_config
from site_worker.daemon import SiteWorker
from opacus.accountants import RDPAccountant

from tests.site_worker.support import (
    TestCoordinator,
    experiment_dict,
    heart_failure_csv,
    initial_weights,
    make_keys,
    site_toml,
    uid,
)

FAST = {"training.epochs": 1}
# The site's DP metrics noise multiplier. Below deploy/site.toml's 5 on purpose: at 5 (σ·Δ ≈ 8.7 per
# count) every noisy score-bin count of one class clips to 0 about 1.5 times in 10,000 releases on this
# ~50-row validation split, and the site then rightly leaves AUC out as undefined; at 1 that is ~1e-7.
METRICS_NOISE = 1.0


def opacus_epsilon(history, *, delta: float) -> float:
    """ε of a (noise, sample rate, steps) history, stepped through Opacus' RDPAccountant (not the site's ledger code)."""
    acc = RDPAccountant()
    for noise, sample_rate, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=noise, sample_rate=sample_rate)
    return acc.get_epsilon(delta=delta)


def site_data(worker, exp_dict, dataset="heart_failure"):
    """The rows this site trains/validates/tests on for the experiment (its own secret split)."""
    from protocol.config import load_experiment
    from site_worker.data import prepare

    exp = load_experiment(exp_dict)
    return prepare(worker.config.datasets[dataset], exp.dataset, key=worker.handler.split_key, input_shape=(12,))


@pytest.fixture
def env(tmp_path):
    name = uid("mem")
    url = f"memory://{name}"
    site_id, fed = uid("site"), uid("fed")
    keys = make_keys(tmp_path, site_id)
    csv = heart_failure_csv(tmp_path / "hf.csv")
    csv_missing = heart_failure_csv(tmp_path / "hf_missing.csv", drop="ejection_fraction")
    cfg = load_site_config(site_toml(
        tmp_path, site_id=site_id, federation=fed, broker_url=url, keys=keys,
        datasets={"heart_failure": {"path": str(csv), "target": "DEATH_EVENT"},
                  "hf_missing": {"path": str(csv_missing), "target": "DEATH_EVENT"}},
        policy={"max_parameters": 5000, "max_epsilon": 50.0, "min_noise_multiplier": 0.5,
                "allowed_layers": ["Linear", "ReLU"], "allowed_aggregators": ["FedAvg"],
                "metrics_noise_multiplier": METRICS_NOISE}))
    coord_bus = open_bus(url)
    coord = TestCoordinator(coord_bus, keys.coordinator, federation=fed, site_id=site_id, site_pub=keys.site_pub)
    worker = SiteWorker(cfg, bus=open_bus(url))
    yield coord, worker, cfg, name
    worker.stop(grace_s=2)
    coord.close()
    coord_bus.close()


def test_hello_then_train_reply_is_signed_update_with_epsilon(env):
    coord, worker, cfg, broker_name = env
    from protocol.transport.base import Topology

    coord.bus.declare(Topology(federations=[cfg.federation]))
    worker.start()
    exp = experiment_dict(**FAST)
    task = coord.train(exp, dataset="heart_failure")
    reply = coord.reply()
    u = reply.payload
    assert isinstance(u, Update), u
    assert reply.sender == cfg.site_id and reply.recipient == "coordinator"
    assert (reply.run_id, reply.round, u.task_id) == (task.run_id, task.round, task.message_id)
    assert reply.message_id != task.message_id
    data = site_data(worker, exp)
    n_train = len(data.x_train)
    assert u.num_examples == n_train and n_train + len(data.x_val) + len(data.x_test) == 299
    assert [n for n, _ in u.weights] == [n for n, _ in initial_weights(exp)]
    for k in ("after_loss", "after_auc", "after_accuracy", "after_f1", "train_s", "samples_per_s"):
        assert k in u.metrics
    assert not any(k.startswith("before_") for k in u.metrics)  # metrics = "dp": one release, after training
    assert abs(u.metrics["n_val"] - len(data.x_val)) < 6 * METRICS_NOISE * 3**0.5 * 2  # 4 noisy counts, σ·Δ = σ·√3 each
    per_epoch = -(-n_train // 32)
    hist = [(1.0, 1 / per_epoch, per_epoch), (METRICS_NOISE, 1.0, 1)]  # one epoch of DP-SGD + the metrics release
    assert u.epsilon == pytest.approx(opacus_epsilon(hist, delta=1e-5), rel=1e-9) and u.delta == 1e-5 and not u.reproducible
    assert worker.guard.seen(task.message_id)
    # The hello went to the control queue, signed, metadata only.
    import queue as _queue

    from protocol.codec import open_frame

    hellos: "_queue.Queue" = _queue.Queue()

    def on_hello(d):
        hellos.put(open_frame(d.body, coord.trust).envelope)
        d.ack()

    c = coord.bus.consume(control_queue(cfg.federation), on_hello)
    hello = hellos.get(timeout=10)
    c.cancel()
    assert isinstance(hello.payload, SiteHello) and hello.sender == cfg.site_id
    info = {i.name: i for i in hello.payload.datasets}["heart_failure"]
    assert info.rows == 299 and info.target == "DEATH_EVENT" and info.feature_types["platelets"] == "numeric"
    assert "DEATH_EVENT" in info.columns and hello.payload.policy["max_epsilon"] == 50.0


def test_refusals_keep_serving(env):
    coord, worker, cfg, broker_name = env
    worker.start()
    exp = experiment_dict(**FAST)
    # 1. signed by an unknown key -> dead-lettered with the reason; the coordinator gets one signed
    #    Declined(untrusted_task) naming the key ids (site_worker/untrusted.py), never a training reply
    env1 = coord.task_envelope(_train_task(exp))
    stranger = Signer.generate()
    coord.publish(env1, signer=stranger)
    r = coord.reply().payload
    assert isinstance(r, Declined) and r.reason == "untrusted_task" and r.task_id == env1.message_id
    assert stranger.kid in r.detail and "unknown signer" in r.detail
    # 2. forbidden layer (Dropout not allowed by this site)
    layers = exp["architecture"]["layers"]
    bad = experiment_dict(**FAST)
    bad["architecture"]["layers"] = layers[:2] + [{"type": "Dropout", "params": {"p": 0.1}}] + layers[2:]
    coord.train(bad, dataset="heart_failure")
    r = coord.reply().payload
    assert isinstance(r, Declined) and r.reason == "policy" and "Dropout" in r.detail
    # 3. over the parameter limit
    big = experiment_dict(**FAST)
    big["architecture"]["layers"][1]["params"]["out_features"] = 512
    big["architecture"]["layers"][3]["params"]["in_features"] = 512
    coord.train(big, dataset="heart_failure")
    r = coord.reply().payload
    assert isinstance(r, Declined) and r.reason == "policy" and "parameters" in r.detail
    # 4. missing column
    coord.train(exp, dataset="hf_missing")
    r = coord.reply().payload
    assert isinstance(r, Declined) and r.reason == "data" and "ejection_fraction" in r.detail
    # 5. a valid task is still served, then its replay is dead-lettered
    good = coord.train(exp, dataset="heart_failure")
    assert isinstance(coord.reply().payload, Update)
    frame = _frame_of(coord, good)
    coord.publish_frame(frame, good.message_id)
    # positive signal: the worker handles its queue in order, so the next reply being the
    # marker's proves the replay got none
    marker = coord.evaluate(exp, dataset="heart_failure")
    after = coord.reply()
    assert isinstance(after.payload, EvalResult) and after.payload.task_id == marker.message_id, after
    dead = {d.message_id: d.reason for d in get_broker(broker_name).dead_letters()}
    assert dead[env1.message_id].startswith("unknown_signer")
    assert dead[good.message_id].startswith("replayed")
    assert worker.stats["rejected"] == 2 and worker.stats["declined"] == 3 and worker.stats["trained"] == 1


def _train_task(exp):
    import time

    from protocol.messages import TrainTask

    return TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=0, seed=1,
                     deadline=time.time() + 600)


def _frame_of(coord, env):
    from protocol.codec import seal

    return seal(env, coord.signer)


def test_budget_decline_has_figures(env):
    coord, worker, cfg, _ = env
    worker.start()
    exp = experiment_dict(**{"training.epochs": 30, "training.optimizer.differential_privacy.noise_multiplier": 0.5})
    coord.train(exp, dataset="heart_failure")
    r = coord.reply().payload
    assert isinstance(r, Declined) and r.reason == "budget"
    assert r.figures["max_epsilon"] == 50.0
    assert r.figures["epsilon_spent"] == 0.0
    per_epoch = -(-len(site_data(worker, exp).x_train) // 32)
    # the projection follows from the site's training rows: it stays in the site's log (issue 20, class 2)
    assert "epsilon_projected" not in r.figures and set(r.figures) <= {"max_epsilon", "epsilon_spent", "delta"}
    assert opacus_epsilon([(0.5, 1 / per_epoch, 30 * per_epoch), (METRICS_NOISE, 1.0, 1)], delta=1e-5) > 50.0
    assert worker.ledger.history("heart_failure") == []


def test_eval_task_and_run_control(env):
    coord, worker, cfg, _ = env
    worker.start()
    exp = experiment_dict(**FAST)
    task = coord.evaluate(exp, dataset="heart_failure")
    r = coord.reply().payload
    assert isinstance(r, EvalResult) and r.task_id == task.message_id
    n_val = len(site_data(worker, exp).x_val)
    assert abs(r.num_examples - n_val) < 6 * METRICS_NOISE * 3**0.5 * 2 and {"loss", "accuracy", "auc", "f1", "n"} <= set(r.metrics)
    assert worker.ledger.history("heart_failure") == [(METRICS_NOISE, 1.0, 1)]  # the evaluation is charged
    ctl = coord.control("stop")
    coord.train(exp, dataset="heart_failure")  # served after the control message
    assert isinstance(coord.reply().payload, Update)
    assert worker.guard.seen(ctl.message_id) and worker.stats["controls"] == 1


def test_stop_mid_training_leaves_task_for_redelivery(env):
    coord, worker, cfg, broker_name = env
    started = threading.Event()
    from site_worker import trainer

    orig = trainer.log

    class Spy:
        def __getattr__(self, name):
            return getattr(orig, name)

        def info(self, event, **kw):
            if event == "training_started":
                started.set()
            return orig.info(event, **kw)

    trainer.log = Spy()
    try:
        worker.start()
        exp = experiment_dict(**{"training.epochs": 50, "training.batch_size": 8,
                                 "training.optimizer.differential_privacy.noise_multiplier": 5.0})
        task = coord.train(exp, dataset="heart_failure")
        assert started.wait(30)
        stats = worker.stop(grace_s=0.2)
    finally:
        trainer.log = orig
    assert stats["abandoned"] == 1 and stats["trained"] == 0
    assert get_broker(broker_name).queue_depth(site_queue(cfg.site_id)) == 1  # back in the queue
    assert not worker.guard.seen(task.message_id)
    assert worker.ledger.history("heart_failure") == []  # nothing released, nothing spent
