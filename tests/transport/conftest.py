"""Fixtures for the bus tests: a declared topology with unique names, and a collector."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from protocol.transport import Bus, Delivery, Topology, open_bus
from protocol.transport.topology import control_queue, site_queue, updates_queue


@dataclass
class Net:
    """A bus with a freshly declared topology of one site and one federation."""

    url: str
    bus: Bus
    site: str
    fed: str
    opened: list[Bus] = field(default_factory=list)

    def open(self, **opts: Any) -> Bus:
        """Another connection to the same broker (closed at teardown)."""
        b = open_bus(self.url, **opts)
        self.opened.append(b)
        return b


class Collector:
    """A handler that records deliveries and lets a test wait for a condition on them."""

    def __init__(self, action: Callable[[Delivery], None] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.bodies: list[bytes] = []
        self._cond = threading.Condition()
        self._action = action

    def __call__(self, d: Delivery) -> None:
        body = bytes(d.body)
        if self._action is not None:
            self._action(d)
        with self._cond:
            self.deliveries.append(d)
            self.bodies.append(body)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[["Collector"], bool], timeout: float = 20.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self), timeout=timeout)

    def wait_count(self, n: int, timeout: float = 20.0) -> bool:
        return self.wait_for(lambda c: len(c.deliveries) >= n, timeout)

    def ids(self) -> list[str]:
        with self._cond:
            return [d.message_id for d in self.deliveries]


def ack(d: Delivery) -> None:
    d.ack()


@pytest.fixture
def net(bus_url: str) -> Iterator[Net]:
    bus = open_bus(bus_url)
    tag = uuid.uuid4().hex[:10]
    n = Net(bus_url, bus, f"site-{tag}", f"fed-{tag}")
    bus.declare(Topology(sites=[n.site], federations=[n.fed]))
    yield n
    for b in n.opened:
        b.close()
    if bus_url.startswith("amqp"):
        for q in (site_queue(n.site), updates_queue(n.fed), control_queue(n.fed)):
            bus.delete_queue(q)  # type: ignore[attr-defined]
    bus.close()


def new_id() -> str:
    return uuid.uuid4().hex
