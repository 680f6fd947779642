"""The coordinator relays each masked update's sealed shares beside its round loop (``_Relay``):
every relay is published before any unmask request, and a failed relay surfaces in the loop."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from coordinator.rounds import secure
from coordinator.rounds.tasks import TaskBook
from protocol.transport.base import BusError
from protocol.messages import SecAggShare, SecAggUnmask
from simulator.run import simulate

HEART_FAILURE = Path(__file__).resolve().parents[2] / "examples" / "heart_failure.json"


def test_wait_returns_only_once_the_relay_published_and_raises_what_it_raised():
    relay = secure._Relay()
    release, published = threading.Event(), []

    def slow() -> None:
        assert release.wait(30)
        published.append("shares")

    relay.start(slow)
    waiter = threading.Thread(target=relay.wait)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and published == []  # still waiting on the relay
    release.set()
    waiter.join(30)
    assert not waiter.is_alive() and published == ["shares"]

    def broken() -> None:
        raise BusError("broker gone")

    relay.start(broken)
    with pytest.raises(BusError, match="broker gone"):
        relay.wait()
    relay.wait()  # raised once, then clear
    relay.start(broken)
    with pytest.raises(BusError):
        relay.start(lambda: None)  # the next start raises the previous relay's failure


def test_in_a_run_every_share_is_published_before_the_unmask_request_even_when_relays_are_slow(monkeypatch):
    """Each relay is held back until the loop waits for it (the next update's, or the unmask request):
    the request still goes out after every share, and each round unmasks with every site's answer."""
    events: list[str] = []
    send, publish, wait = TaskBook.send, TaskBook.publish, secure._Relay.wait
    lock, gate = threading.Lock(), threading.Event()

    def late_send(self: TaskBook, frames: list[tuple[str, bytes, str]]) -> None:
        assert gate.wait(30)  # a relay publishes only once the loop waits for it: as late as it can be
        send(self, frames)
        with lock:
            events.extend("share" for _ in frames)

    def gated_wait(self: secure._Relay) -> None:
        if self._thread is not None:
            gate.set()
        try:
            wait(self)
        finally:
            gate.clear()

    def logged_publish(self: TaskBook, payload: Any, **kw: Any) -> str:
        if isinstance(payload, SecAggUnmask):
            with lock:
                events.append("unmask")
        assert not isinstance(payload, SecAggShare) or self._batch is not None  # shares only through batch(later=)
        return publish(self, payload, **kw)

    monkeypatch.setattr(secure._Relay, "wait", gated_wait)
    monkeypatch.setattr(TaskBook, "send", late_send)
    monkeypatch.setattr(TaskBook, "publish", logged_publish)
    exp = json.loads(HEART_FAILURE.read_text())
    exp["training"]["optimizer"].pop("differential_privacy")
    exp["federated"]["parameters"].update(min_fit_clients=3, min_available_clients=3, fraction_eval=0.0)
    exp["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": 2}
    doc = simulate(exp, sites=3, rounds=2, progress=False)
    assert doc["status"] == "completed" and [r["replies"] for r in doc["rounds"]] == [3, 3]
    # per round: 3 updates x 2 shares, then the request to each of the 3 sites; never a request
    # with a share still to come
    order = "".join("s" if e == "share" else "U" for e in events)
    assert order.startswith("ssssssUUUssssssUUU"), order
