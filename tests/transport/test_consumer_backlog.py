"""The AMQP consumer holds at most a few chunks its worker has not spilled (issue 23: coordinator memory).

A chunked transfer opens the prefetch window for every one of its chunks, and the coordinator
consumes its updates with a window of 1,000 whole messages: without a bound the broker pushes every
chunk of every transfer in flight at once, and what the worker has not spilled yet waits in the
process as pika's 8 MiB bodies (1.1 GB at 100 M parameters x 3 sites). The consumer gives the broker
credit instead: at most ``BACKLOG_CHUNKS`` chunk sizes past what the worker finished with. A worker
slowed down here (every chunk takes 20 ms to spill) shows the bound at its edge: the backlog reaches
more than one chunk (the broker still runs ahead of the worker) and never more than the credit.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from protocol.transport import consumer as consumer_mod
from protocol.transport import open_bus
from protocol.transport.backlog import BACKLOG_CHUNKS
from protocol.transport.topology import site_queue
from tests.transport.conftest import Collector, Net, ack

CHUNK = 256 * 1024
FRAME = 16 * CHUNK  # 16 chunks per transfer


@pytest.fixture(params=["amqp"])
def bus_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.getfixturevalue("amqp_url")


class SlowReassembler(consumer_mod.Reassembler):
    """Spills like the real one, 20 ms per chunk: the worker falls behind the broker."""

    def add(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return super().add(*args, **kwargs)


class SlowerReassembler(consumer_mod.Reassembler):
    """50 ms per chunk: the admitted transfer takes longer than the first capacity backoff (0.25 s)."""

    def add(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return super().add(*args, **kwargs)


def test_a_slow_worker_holds_at_most_the_credit_of_chunks(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_mod, "Reassembler", SlowReassembler)
    sender = net.open(chunk_size=CHUNK)
    receiver = open_bus(net.url, chunk_size=CHUNK)
    frames = [os.urandom(FRAME) for _ in range(2)]
    got = Collector(ack)
    c: Any = receiver.consume(site_queue(net.site), got, prefetch=1000)  # the coordinator's updates window
    try:
        for i, f in enumerate(frames):
            sender.publish("", site_queue(net.site), f, message_id=f"t{i}")
        assert got.wait_count(2, timeout=60), f"got {len(got.deliveries)} of 2 transfers"
        assert sorted(hashlib.sha256(b).digest() for b in got.bodies) == sorted(
            hashlib.sha256(f).digest() for f in frames)
        assert c.backlog_peak <= BACKLOG_CHUNKS * CHUNK, (
            f"the worker was {c.backlog_peak / CHUNK:.1f} chunks behind; the credit is {BACKLOG_CHUNKS}")
        assert c.backlog_peak > CHUNK  # the broker runs ahead of the worker: not one chunk at a time
    finally:
        c.cancel()
        receiver.close()


def _uploads_at_once(net: Net, n: int, timeout: float) -> Any:
    """``n`` sites upload one FRAME each at once to a receiver with room for one transfer; every frame
    arrives intact and the window never held more than its credit. Returns the consumer (its counts)."""
    senders = [net.open(chunk_size=CHUNK) for _ in range(n)]  # sites uploading at once: chunks interleave
    receiver = open_bus(net.url, chunk_size=CHUNK, max_reassembly_bytes=2 * (FRAME + CHUNK))  # one transfer per user
    frames = [os.urandom(FRAME) for _ in range(n)]
    got = Collector(ack)
    c: Any = receiver.consume(site_queue(net.site), got, prefetch=1000)
    try:
        threads = [threading.Thread(target=b.publish, args=("", site_queue(net.site), f), kwargs={"message_id": f"t{i}"})
                   for i, (b, f) in enumerate(zip(senders, frames))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got.wait_count(n, timeout=timeout), f"got {len(got.deliveries)} of {n} transfers"
        assert sorted(hashlib.sha256(b).digest() for b in got.bodies) == sorted(
            hashlib.sha256(f).digest() for f in frames)
        assert c.backlog_peak <= BACKLOG_CHUNKS * CHUNK
        return c
    finally:
        c.cancel()
        receiver.close()


def test_a_transfer_refused_for_capacity_waits_once_without_stalling_the_worker(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reassembly budget admits one transfer: the second is refused at its first chunk, its chunks
    already in the window are set aside (tags only, no bytes, no further refusal), and the whole
    transfer is requeued once there is room for it, so it is refused exactly once. Requeued before
    (every 50 ms, refusing and sleeping on each chunk), it went back to the head of the queue ahead
    of the admitted transfer's chunks, again and again: at 100 M x 3 the admitted one timed out."""
    monkeypatch.setattr(consumer_mod, "Reassembler", SlowerReassembler)
    c = _uploads_at_once(net, 2, timeout=60)
    assert c.capacity_refusals == 1, f"{c.capacity_refusals} refusals of one waiting transfer of 16 chunks"


def test_waiting_transfers_are_requeued_only_as_many_as_fit_together(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three uploads at once, room for one: two wait. When the first is done each of them fits alone,
    but not both: only one is requeued, and the other only once that one is done, so each waiting
    transfer is refused exactly once (2 refusals; requeued together, the one that lost was refused
    again and every chunk of it received a third time: 3 or more)."""
    monkeypatch.setattr(consumer_mod, "Reassembler", SlowerReassembler)
    c = _uploads_at_once(net, 3, timeout=90)
    assert c.capacity_refusals == 2, f"{c.capacity_refusals} refusals of two waiting transfers"
