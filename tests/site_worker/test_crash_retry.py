"""A task that crashes the site is retried a bounded number of times, with backoff, and each
reserved privacy step is released or charged, never lost (issue 20, class 8).

The crash is played by a training step that raises a ``BaseException`` (as a native crash or
an OOM kill would, nothing in the handler catches it); each "restart" is a new SiteWorker on
the same state directory, which gets the unacked task redelivered. Before, every restart
re-reserved the task's steps and nothing bounded the loop: the budget drained with nothing
released.
"""

from __future__ import annotations

import threading

import pytest

from protocol.messages import Declined
from protocol.transport import open_bus
from site_worker import attempts as attempts_mod
from site_worker import daemon as daemon_mod
from site_worker.attempts import MAX_ATTEMPTS, TaskAttempts, backoff_s
from site_worker.config import load_site_config
from site_worker.daemon import SiteWorker
from site_worker.ledger import PrivacyLedger

from tests.site_worker.support import TestCoordinator, experiment_dict, heart_failure_csv, make_keys, site_toml, uid


class Crash(BaseException):
    """What a native crash looks like to the handler: nothing catches it."""


def _wait(cond, timeout: float = 30.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        done.wait(0.05)
    raise AssertionError("condition not met in time")


def test_backoff_grows_and_is_bounded():
    assert backoff_s(1) == 0.0
    waits = [backoff_s(n) for n in range(2, 12)]
    assert waits == sorted(waits) and waits[0] == attempts_mod.BACKOFF_S and max(waits) == attempts_mod.MAX_BACKOFF_S


def test_a_crash_loop_ends_declined_and_its_reservation_released(tmp_path, monkeypatch):
    url, site_id, fed = f"memory://{uid('mem')}", uid("site"), uid("fed")
    keys = make_keys(tmp_path, site_id)
    csv = heart_failure_csv(tmp_path / "hf.csv")
    cfg = load_site_config(site_toml(tmp_path, site_id=site_id, federation=fed, broker_url=url, keys=keys,
                                     datasets={"heart_failure": {"path": str(csv), "target": "DEATH_EVENT"}},
                                     policy={"max_epsilon": 50.0}))
    waits: list[float] = []
    monkeypatch.setattr(daemon_mod, "backoff_s", lambda n: waits.append(backoff_s(n)) or 0.0)  # no real wait

    def crash(*_a, **_k):
        raise Crash("the site died while training")

    monkeypatch.setattr("site_worker.handlers.train", crash)
    coord_bus = open_bus(url)
    coord = TestCoordinator(coord_bus, keys.coordinator, federation=fed, site_id=site_id, site_pub=keys.site_pub)
    ledger = PrivacyLedger(cfg.state_dir)
    journal = TaskAttempts(cfg.state_dir)
    try:
        task = None
        for start in range(1, MAX_ATTEMPTS + 1):
            worker = SiteWorker(cfg, bus=open_bus(url))
            worker.start()
            if task is None:
                task = coord.train(experiment_dict(**{"training.epochs": 1}), dataset="heart_failure")
            _wait(lambda task=task, start=start: journal.started(task.message_id) == start
                  and [r["state"] for r in ledger.releases("heart_failure")] == ["reserved"])
            worker.stop(grace_s=2)  # the "restart": the unacked task comes back redelivered
            # one reservation, whatever the number of starts: a dead attempt's reservation is replaced
            assert len(ledger.releases("heart_failure")) == 1
        assert coord.no_reply(0.2)  # every start crashed: nothing answered yet
        worker = SiteWorker(cfg, bus=open_bus(url))
        worker.start()
        reply = coord.reply().payload
        worker.stop(grace_s=2)
        assert isinstance(reply, Declined) and reply.reason == "error" and "crash_loop" in reply.detail
        assert reply.task_id == task.message_id and f"{MAX_ATTEMPTS} times" in reply.detail
        assert ledger.releases("heart_failure") == []  # released: no attempt committed, none published
        assert journal.started(task.message_id) == 0
        assert waits == [backoff_s(n) for n in range(1, MAX_ATTEMPTS + 1)] and waits[1] > 0  # a backoff before each retry
    finally:
        coord.close()
        coord_bus.close()


def test_a_committed_release_stays_charged_when_its_task_comes_back(tmp_path):
    """The other half: a release that committed may have published its reply, so a
    redelivery of the same task is charged again, never replaced."""
    ledger = PrivacyLedger(tmp_path)
    entry = [(1.0, 0.5, 4)]
    ledger.reserve("d", release_id="t", kind="train", entries=entry, delta=1e-5, accountant="rdp", max_epsilon=None)
    ledger.reserve("d", release_id="t", kind="train", entries=entry, delta=1e-5, accountant="rdp", max_epsilon=None)
    assert [r["state"] for r in ledger.releases("d")] == ["reserved"]  # the dead attempt's reservation replaced
    ledger.commit("d", "t")
    ledger.reserve("d", release_id="t", kind="train", entries=entry, delta=1e-5, accountant="rdp", max_epsilon=None)
    assert [r["state"] for r in ledger.releases("d")] == ["spent", "reserved"]


@pytest.mark.parametrize("failure", [ValueError("bug"), RuntimeError("bug")])
def test_a_task_that_fails_in_the_handler_releases_its_reservation(tmp_path, monkeypatch, failure):
    import time

    from protocol.codec import new_envelope
    from protocol.messages import TrainTask
    from site_worker.config import DatasetSource, SiteConfig, SitePolicy
    from site_worker.handlers import TaskHandler
    from tests.site_worker.support import initial_weights

    csv = heart_failure_csv(tmp_path / "hf.csv")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=SitePolicy(max_epsilon=1e6))
    handler = TaskHandler(cfg)

    def boom(*_a, **_k):
        raise failure

    monkeypatch.setattr("site_worker.handlers.train", boom)
    exp = experiment_dict(**{"training.epochs": 1})
    reply = handler.handle(new_envelope(TrainTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure",
                                                  base_round=0, seed=1, deadline=time.time() + 60),
                                        federation="f", run_id="r", round=1, sender="coordinator", recipient="s"))
    assert isinstance(reply, Declined) and reply.reason == "error"
    assert handler.ledger.releases("heart_failure") == []
