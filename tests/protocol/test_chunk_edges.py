"""Every reassembly cap at its edge, each with the others relaxed so none hides another
(issue 26, place 4): exactly at the cap a transfer is held, one more byte, transfer or
second is refused (``ChunkCapacity``: requeued, or ``ChunkError``: can never fit)."""

from __future__ import annotations

import os

import pytest

from protocol.chunking import Reassembler, split_body
from protocol.errors import ChunkCapacity, ChunkError

BIG = 10**9  # a relaxed cap


def _first(total: int, chunk_size: int = 1) -> tuple[dict, bytes]:
    """The first chunk of a fresh transfer declaring ``total`` bytes in ``chunk_size`` chunks."""
    return split_body(os.urandom(total), chunk_size=chunk_size)[0]


def relaxed(**caps) -> Reassembler:
    base = dict(max_bytes=BIG, max_transfers=10**6, max_transfer_bytes=BIG, max_user_bytes=BIG,
                max_user_transfers=10**6, max_chunks=10**6, max_user_chunks=10**6)
    return Reassembler(**{**base, **caps})


def test_frame_limit_alone_at_its_edge():
    r = relaxed(max_transfer_bytes=100)
    assert r.add(*_first(100, chunk_size=50)) is None
    with pytest.raises(ChunkError, match="max_transfer_bytes=100") as e:
        r.add(*_first(101, chunk_size=51))
    assert not isinstance(e.value, ChunkCapacity)  # can never fit: dead-lettered


def test_per_user_bytes_alone_at_its_edge():
    r = relaxed(max_user_bytes=100)
    assert r.add(*_first(60, chunk_size=30), user="mallory") is None
    assert r.add(*_first(40, chunk_size=20), user="mallory") is None  # exactly the quota
    with pytest.raises(ChunkCapacity, match="max_user_bytes=100"):
        r.add(*_first(2), user="mallory")  # (a one-chunk body is never held: the smallest held is 2)
    assert r.add(*_first(100, chunk_size=50), user="site-1") is None  # another user: its own quota


def test_global_bytes_alone_at_its_edge():
    r = relaxed(max_bytes=100)
    assert r.add(*_first(60, chunk_size=30), user="a") is None
    assert r.add(*_first(40, chunk_size=20), user="b") is None  # exactly the budget, two users
    with pytest.raises(ChunkCapacity, match="max_bytes=100"):
        r.add(*_first(2), user="c")


def test_per_user_transfers_alone_at_its_edge():
    r = relaxed(max_user_transfers=3)
    for _ in range(3):
        assert r.add(*_first(2), user="mallory") is None
    with pytest.raises(ChunkCapacity, match="max_user_transfers=3"):
        r.add(*_first(2), user="mallory")
    assert r.add(*_first(2), user="site-1") is None


def test_global_transfers_alone_at_its_edge():
    r = relaxed(max_transfers=3)
    for user in ("a", "b", "c"):
        assert r.add(*_first(2), user=user) is None
    with pytest.raises(ChunkCapacity, match="refused for now: max_transfers=3 already in progress"):
        r.add(*_first(2), user="d")


def test_global_chunks_alone_at_its_edge():
    r = relaxed(max_chunks=6)
    assert r.add(*_first(4), user="a") is None
    assert r.add(*_first(2), user="b") is None  # 6 chunks in progress: exactly the cap
    with pytest.raises(ChunkCapacity, match="max_chunks=6 are in progress"):
        r.add(*_first(2), user="c")
    with pytest.raises(ChunkError, match="could never be held"):  # more than the cap in one transfer
        relaxed(max_chunks=6).add(*_first(7), user="a")
    relaxed(max_chunks=6).add(*_first(6), user="a")  # exactly the cap in one transfer


def test_a_transfer_expires_after_its_timeout_not_at_it():
    now = [0.0]
    r = Reassembler(**{**dict(max_bytes=BIG, max_transfer_bytes=BIG), "timeout_s": 10.0, "clock": lambda: now[0]})
    head, data = _first(2)
    r.add(head, data, user="a")
    now[0] = 10.0
    assert r.expire() == [] and r.in_progress() == [head["transfer_id"]]
    now[0] = 10.001
    assert r.expire() == [head["transfer_id"]] and r.in_progress() == [] and r.reserved_bytes == 0



@pytest.mark.parametrize("cap, held, ahead, past, asked, other", [
    # the cap alone; in progress (total, chunk size); requeued ahead and one past the cap, as
    # (total, count) each; the transfer asked about (total, count); another user's ahead, for per-user caps
    ({"max_bytes": 100}, (30, 3), [(30, 3)], [(31, 3)], (40, 4), None),
    ({"max_user_bytes": 100}, (30, 3), [(30, 3)], [(31, 3)], (40, 4), (100, 10)),
    ({"max_transfers": 3}, (2, 1), [(2, 2)], [(2, 2), (2, 2)], (2, 2), None),
    ({"max_user_transfers": 3}, (2, 1), [(2, 2)], [(2, 2), (2, 2)], (2, 2), (2, 2)),
    ({"max_chunks": 10}, (3, 1), [(3, 3)], [(3, 4)], (4, 4), None),
    ({"max_user_chunks": 10}, (3, 1), [(3, 3)], [(3, 4)], (4, 4), (10, 10)),
])
def test_room_counts_the_transfers_requeued_ahead_at_the_edge(cap, held, ahead, past, asked, other):
    """``has_room(ahead=...)``: transfers requeued and not yet back count as admitted, by each cap alone.
    One in progress + those ahead + the one asked exactly fill the cap: room; one more byte, chunk or
    transfer ahead: none. Another user's transfer ahead does not use a per-user quota."""
    r = relaxed(**cap)
    assert r.add(*_first(*held), user="a") is None
    assert r.has_room(*asked, user="a", ahead=[("a", *t) for t in ahead])  # exactly at the cap
    assert not r.has_room(*asked, user="a", ahead=[("a", *t) for t in past])  # one past it
    assert r.has_room(*asked, user="a")  # nothing ahead: room to spare
    if other is not None:
        assert r.has_room(*asked, user="a", ahead=[("b", *other)])
