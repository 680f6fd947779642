"""Chunk bodies the AMQP consumer's worker has not spilled yet are bounded in memory: past
``QUEUED_CHUNK_BYTES`` the I/O thread writes a chunk to a temporary file (many sites uploading a
large model at once, issue 23). With the bound at 0 every chunk takes that path: frames still
arrive whole and in order, and a corrupt transfer is still dead-lettered chunk by chunk with its
bytes."""

from __future__ import annotations

import hashlib
import os

import pytest

from protocol.transport import consumer
from protocol.transport.layout import CHUNK_HEADERS
from protocol.transport.topology import REASON_HEADER, TASKS, site_queue
from tests.transport.conftest import Collector, Net, ack, new_id
from tests.transport.test_conformance import read_dead_letter


@pytest.fixture
def every_chunk_in_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "QUEUED_CHUNK_BYTES", 0)


def test_chunks_waiting_in_files_make_the_same_frames(net: Net, every_chunk_in_a_file: None) -> None:
    bus = net.open(chunk_size=256 * 1024)
    bigs = [os.urandom(3 * 256 * 1024 + 17 * i) for i in range(3)]
    ids = [new_id() for _ in bigs]
    for mid, big in zip(ids, bigs):
        bus.publish(TASKS, net.site, big, message_id=mid)
    col = Collector(ack)
    c = bus.consume(site_queue(net.site), col, prefetch=4)
    assert col.wait_count(3, timeout=30)
    c.cancel()
    assert col.ids() == ids
    assert [hashlib.sha256(bytes(b)).digest() for b in col.bodies] == [hashlib.sha256(b).digest() for b in bigs]


def test_a_corrupt_transfer_from_files_is_dead_lettered_with_its_bytes(net: Net, every_chunk_in_a_file: None) -> None:
    mid, tid = new_id(), new_id()
    header = {CHUNK_HEADERS["transfer_id"]: tid, CHUNK_HEADERS["count"]: 2,
              CHUNK_HEADERS["sha256"]: hashlib.sha256(b"hello world").hexdigest(), CHUNK_HEADERS["total_size"]: 11}
    net.bus.publish(TASKS, net.site, b"hello ", message_id=mid, headers={**header, CHUNK_HEADERS["index"]: 0})
    net.bus.publish(TASKS, net.site, b"wXrld", message_id=mid, headers={**header, CHUNK_HEADERS["index"]: 1})
    ok = new_id()
    net.bus.publish(TASKS, net.site, b"fine", message_id=ok)
    col = Collector(ack)
    c = net.bus.consume(site_queue(net.site), col)
    assert col.wait_count(1)
    c.cancel()
    assert col.ids() == [ok]
    dead = read_dead_letter(net, mid)
    assert "sha256 mismatch" in dead.headers[REASON_HEADER]
    assert bytes(dead.body) in (b"hello ", b"wXrld")
