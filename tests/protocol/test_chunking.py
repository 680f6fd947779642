"""Chunking: split and reassemble, and every way a transfer can go wrong."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunking import Reassembler, split_body
from protocol.errors import ChunkError, ProtocolError


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_100_mb_round_trip_in_any_order() -> None:
    body = os.urandom(100 * 10**6)
    chunks = split_body(body, chunk_size=8 * 2**20)
    assert len(chunks) == 12
    assert all(h["count"] == 12 and h["total_size"] == len(body) for h, _ in chunks)
    assert chunks[0][0]["sha256"] == hashlib.sha256(body).hexdigest()
    random.Random(7).shuffle(chunks)
    r = Reassembler(max_bytes=200 * 10**6)
    out = [r.add(h, piece) for h, piece in chunks]
    assert all(o is None for o in out[:-1])
    assert out[-1] == body
    assert r.reserved_bytes == 0 and r.in_progress() == []


def test_slices_are_zero_copy() -> None:
    body = bytearray(b"abcdefghij")
    chunks = split_body(body, chunk_size=4)
    body[0] = ord("Z")
    assert bytes(chunks[0][1]) == b"Zbcd"  # a view, not a copy
    assert [bytes(p) for _, p in chunks] == [b"Zbcd", b"efgh", b"ij"]


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=3000), chunk_size=st.integers(1, 700), seed=st.integers(0, 2**16))
def test_round_trip_property(body: bytes, chunk_size: int, seed: int) -> None:
    chunks = split_body(body, chunk_size=chunk_size)
    assert len(chunks) == max(1, -(-len(body) // chunk_size))
    random.Random(seed).shuffle(chunks)
    r = Reassembler()
    results = [r.add(h, p) for h, p in chunks]
    assert results[-1] == body and all(x is None for x in results[:-1])


def _chunks(n: int = 4, size: int = 1000):
    body = os.urandom(n * size)
    return body, split_body(body, chunk_size=size)


def test_missing_chunk_is_detected_by_timeout() -> None:
    clock = FakeClock()
    body, chunks = _chunks()
    r = Reassembler(timeout_s=30, clock=clock)
    tid = chunks[0][0]["transfer_id"]
    for h, p in chunks[:2] + chunks[3:]:
        assert r.add(h, p) is None
    assert r.missing(tid) == [2]
    clock.t += 29
    assert r.expire() == []
    clock.t += 2
    assert r.expire() == [tid]
    assert r.reserved_bytes == 0 and r.in_progress() == []


def test_duplicate_chunk_is_detected() -> None:
    _, chunks = _chunks()
    r = Reassembler()
    r.add(*chunks[0])
    with pytest.raises(ChunkError, match="duplicate chunk 0") as e:
        r.add(*chunks[0])
    assert e.value.transfer_id == chunks[0][0]["transfer_id"]  # type: ignore[attr-defined]
    assert isinstance(e.value, ProtocolError) and r.in_progress() == []


def test_corrupted_chunk_is_detected() -> None:
    _, chunks = _chunks()
    h, p = chunks[1]
    bad = bytearray(p)
    bad[10] ^= 0x01
    r = Reassembler()
    for hh, pp in [chunks[0], (h, bytes(bad)), *chunks[2:-1]]:
        assert r.add(hh, pp) is None
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        r.add(*chunks[-1])
    assert r.reserved_bytes == 0


def test_single_chunk_corruption_detected() -> None:
    h, p = split_body(b"hello", chunk_size=100)[0]
    with pytest.raises(ChunkError, match="sha256"):
        Reassembler().add(h, b"hellO")


def test_inconsistent_headers_are_detected() -> None:
    _, chunks = _chunks()
    r = Reassembler()
    r.add(*chunks[0])
    h, p = chunks[1]
    with pytest.raises(ChunkError, match="disagrees"):
        r.add({**h, "count": 5}, p)


def test_more_bytes_than_declared_is_detected() -> None:
    _, chunks = _chunks()
    r = Reassembler()
    r.add(*chunks[0])
    h, p = chunks[1]
    with pytest.raises(ChunkError, match="more than the declared"):
        r.add(h, bytes(p) * 4)


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"index": 4}, "index 4 >= count 4"),
        ({"index": -1}, r"index: must be in \[0, "),
        ({"count": 0}, r"count: must be in \[1, "),
        ({"sha256": "zz"}, "sha256: length must be"),
        ({"transfer_id": ""}, "transfer_id"),
        ({"total_size": "big"}, "total_size"),
    ],
)
def test_malformed_headers_rejected(patch: dict, match: str) -> None:
    _, chunks = _chunks()
    h, p = chunks[0]
    with pytest.raises(ChunkError, match=match):
        Reassembler().add({**h, **patch}, p)


def test_missing_header_field_rejected() -> None:
    h, p = _chunks()[1][0]
    del h["sha256"]
    with pytest.raises(ChunkError, match="misses sha256"):
        Reassembler().add(h, p)


def test_memory_bound_refuses_before_allocating() -> None:
    r = Reassembler(max_bytes=5000, max_user_bytes=5000)
    _, a = _chunks(4, 1000)  # 4000 bytes reserved
    r.add(*a[0])
    assert r.reserved_bytes == 4000
    _, b = _chunks(2, 1000)  # would need 2000 more
    with pytest.raises(ChunkError, match="max_bytes"):
        r.add(*b[0])
    # A header claiming a huge size is refused on its first chunk, nothing stored.
    h, p = b[0]
    with pytest.raises(ChunkError, match="declares"):
        Reassembler(max_bytes=10**6).add({**h, "transfer_id": "x", "total_size": 2**40}, p)


def test_max_transfers_bound() -> None:
    r = Reassembler(max_transfers=2)
    for _ in range(2):
        r.add(*_chunks(2, 10)[1][0])
    with pytest.raises(ChunkError, match="max_transfers=2"):
        r.add(*_chunks(2, 10)[1][0])


def test_interleaved_transfers() -> None:
    b1, c1 = _chunks(3, 100)
    b2, c2 = _chunks(2, 100)
    r = Reassembler()
    got = [r.add(*c) for c in (c1[0], c2[0], c1[1], c2[1], c1[2])]
    assert got == [None, None, None, b2, b1]


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        split_body(b"x", chunk_size=0)


def test_one_sender_cannot_reserve_the_whole_budget() -> None:
    """A 10-byte first chunk declaring a huge transfer: capped at the frame limit, then at its sender's quota."""
    from protocol.errors import ChunkCapacity

    r = Reassembler(max_bytes=10_000, max_transfer_bytes=8_000)
    h, p = _chunks(2, 10)[1][0]
    with pytest.raises(ChunkError, match="frame limit") as e:
        r.add({**h, "transfer_id": "big", "total_size": 9_000}, b"x" * 4_500, user="mallory")
    assert not isinstance(e.value, ChunkCapacity)  # can never succeed: dead-letter, not requeue
    assert r.add({**h, "transfer_id": "jam", "total_size": 5_000}, b"x" * 2_500, user="mallory") is None  # its quota
    assert r.user_reserved_bytes("mallory") == 5_000
    with pytest.raises(ChunkCapacity, match="max_user_bytes=5000"):
        r.add({**h, "transfer_id": "jam2", "total_size": 100}, b"x" * 50, user="mallory")
    # an honest sender still has room; mallory reusing its transfer id opens mallory's own transfer (refused)
    body, honest = _chunks(2, 1000)
    assert r.add(*honest[0], user="site-1") is None
    with pytest.raises(ChunkCapacity):
        r.add(*honest[1], user="mallory")
    assert r.add(*honest[1], user="site-1") == body
    r.discard("jam", user="mallory")
    assert r.reserved_bytes == 0 and r.user_reserved_bytes("mallory") == 0


def test_unauthenticated_chunks_share_one_quota() -> None:
    from protocol.errors import ChunkCapacity

    r = Reassembler(max_bytes=10_000)
    h, p = _chunks(2, 10)[1][0]
    r.add({**h, "transfer_id": "anon", "total_size": 5_000}, b"x" * 2_500)
    with pytest.raises(ChunkCapacity, match="unauthenticated senders"):
        r.add({**h, "transfer_id": "anon2", "total_size": 10}, b"x" * 5, user=None)
    assert r.add({**h, "transfer_id": "named", "total_size": 5_000}, b"x" * 2_500, user="site-1") is None


def test_a_transfer_is_reassembled_in_one_buffer_not_two() -> None:
    """Each chunk is copied into the transfer's one buffer as it comes (issue 23, "stream
    everywhere"): a 16 MiB body in 1 MiB chunks that arrive as fresh bytes (as from the socket)
    peaks at one body plus a chunk or two, never the chunks and their join (two bodies)."""
    import gc
    import tracemalloc

    total, size = 16 * 2**20, 2**20
    body = bytes(range(256)) * (total // 256)
    headers = [h for h, _ in split_body(body, chunk_size=size)]
    r = Reassembler(max_bytes=2**30, max_transfer_bytes=2**30)
    gc.collect()
    tracemalloc.start()
    try:
        whole = None
        for h in reversed(headers):  # in any order
            i = h["index"]
            chunk = bytes(body[i * size:(i + 1) * size])  # a fresh object per chunk, dropped after add
            whole = r.add(h, chunk)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole is not None and bytes(whole) == body
    assert peak < total + 3 * size, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.0f} MiB body"


def test_a_spilling_reassembler_holds_no_transfer_in_memory_until_it_is_read() -> None:
    """With ``spill`` (the AMQP consumer's), partial transfers wait in temporary files: ten 4 MiB
    transfers interleaved chunk by chunk cost about one chunk of this process's memory, not ten
    bodies; each whole body is a read-only map of its file, verified, equal to what was sent."""
    import gc
    import tracemalloc

    total, size, n = 4 * 2**20, 2**20, 10
    bodies = [os.urandom(total) for _ in range(n)]
    splits = [split_body(b, chunk_size=size) for b in bodies]
    r = Reassembler(max_bytes=2**30, max_transfer_bytes=2**30, max_user_transfers=n, spill=True)
    gc.collect()
    tracemalloc.start()
    wholes = []
    try:
        for i in range(total // size):
            for parts in splits:
                h, piece = parts[i]
                out = r.add(h, bytes(piece))  # a fresh chunk object, as from the socket
                if out is not None:
                    wholes.append(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [bytes(w) for w in wholes] == bodies
    assert peak < 3 * size, f"peak {peak / 2**20:.1f} MiB for {n} transfers of {total / 2**20:.0f} MiB"
    spilled = Reassembler(max_bytes=2**30, max_transfer_bytes=2**30, spill=True)
    h0, p0 = split_body(bodies[0], chunk_size=size)[0]
    spilled.add(h0, bytes(p0))
    assert bytes(spilled.last_view.read()) == bytes(p0)  # what a dead letter of that chunk would carry


@pytest.mark.parametrize("spill", [False, True])
def test_the_running_hash_is_checked_before_a_body_is_handed_on_in_any_chunk_order(spill: bool) -> None:
    """Chunks are hashed as they come, in index order (one that comes early is hashed, read back,
    once those before it are in): whatever the order, the body is handed on only when that hash is
    the declared sha256, and ``last_sha256`` names it; a chunk corrupted while it waited early fails
    the transfer at its last chunk."""
    import hashlib
    import random

    body = os.urandom(7 * 1000 + 123)
    chunks = split_body(body, chunk_size=1000)
    order = list(range(len(chunks)))
    random.Random(7).shuffle(order)
    assert order[0] != 0
    r = Reassembler(spill=spill)
    outs = [r.add(*chunks[i]) for i in order]
    assert all(o is None for o in outs[:-1]) and bytes(outs[-1]) == body
    assert r.last_sha256 == hashlib.sha256(body).hexdigest() == chunks[0][0]["sha256"]

    r = Reassembler(spill=spill)
    early = order[0]  # arrives first, so it is hashed only later, read back from its buffer or file
    h, p = chunks[early]
    bad = bytearray(p)
    bad[5] ^= 0x01
    for i in order[:-1]:
        assert r.add(*((h, bytes(bad)) if i == early else chunks[i])) is None
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        r.add(*chunks[order[-1]])
    assert r.reserved_bytes == 0 and r.last_sha256 is None
