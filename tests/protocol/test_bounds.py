"""protocol/bounds.py at its edges: for every bounded wire field, the value just inside passes the
codec and the value just outside is refused (``out_of_bounds``), derived from ``bounds.FIELDS``
so a field added later is tested too; and the chunk header's count/size/cap checks."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import pytest

from protocol import bounds as B
from protocol.chunking import Reassembler, split_body, window_chunks
from protocol.codec import decode_envelope, encode_envelope, encode_frame, new_envelope, open_frame, signed_digest
from protocol.errors import ChunkCapacity, ChunkError, MalformedFrame, OutOfBounds, ProtocolError
from protocol.messages import MESSAGE_TYPES, DatasetInfo, SiteHello
from protocol.signing import Signer, TrustStore

SIGNER = Signer.generate()
TRUST = TrustStore()
TRUST.add("site-a", SIGNER.public_pem())
ITEMS_THROUGH_CODEC = 4096  # longer arrays/maps are tested on the bound alone (same code, less time)


def inside(bound: B.Bound) -> Any:
    """One canonical value inside ``bound``."""
    if isinstance(bound, B.Record):
        return bound.cls()
    if isinstance(bound, B.Int):
        return max(bound.lo, min(bound.hi, 0))
    if isinstance(bound, B.Num):
        return (bound.lo + bound.hi) / 2 if bound.open_lo or bound.open_hi else bound.lo
    if isinstance(bound, B.Text):
        if bound.choices:
            return bound.choices[0]
        if bound.pattern:
            return "0" * bound.min_len
        return "a" * bound.min_len
    if isinstance(bound, B.Flag):
        return False
    if isinstance(bound, B.Bin):
        return b"\0" * bound.min_len
    if isinstance(bound, B.Opt):
        return None
    if isinstance(bound, (B.Items,)):
        return []
    if isinstance(bound, (B.Table, B.Tree)):
        return {}
    raise AssertionError(bound)


def edges(bound: B.Bound) -> tuple[list[Any], list[Any]]:
    """(values just inside, values just outside) ``bound``."""
    if isinstance(bound, B.Int):
        ins, outs = [bound.lo, bound.hi], []
        if bound.lo > -(2**63):
            outs.append(bound.lo - 1)
        if bound.hi < 2**63 - 1:
            outs.append(bound.hi + 1)
        return ins, outs + [1.5]  # and a value of the wrong type
    if isinstance(bound, B.Num):
        lo_in = math.nextafter(bound.lo, math.inf) if bound.open_lo else bound.lo
        hi_in = math.nextafter(bound.hi, -math.inf) if bound.open_hi else bound.hi
        lo_out = bound.lo if bound.open_lo else math.nextafter(bound.lo, -math.inf)
        hi_out = bound.hi if bound.open_hi else math.nextafter(bound.hi, math.inf)
        return [lo_in, hi_in], [lo_out, hi_out, math.nan, math.inf, -math.inf]
    if isinstance(bound, B.Text):
        if bound.choices:
            return list(bound.choices), [bound.choices[0] + "x", "x" * (bound.max_len + 1)]
        fill = "0" if bound.pattern else "a"
        outs = ["x" * (bound.max_len + 1)]
        if bound.min_len:
            outs.append(fill * (bound.min_len - 1))
        if bound.pattern:
            outs.append("g" * bound.max_len)
        return [fill * bound.max_len, fill * max(bound.min_len, 1 if bound.pattern else 0)], outs
    if isinstance(bound, B.Flag):
        return [True, False], [1, "true"]
    if isinstance(bound, B.Bin):
        outs_b: list[Any] = [b"x" * (bound.max_len + 1), "x" * bound.min_len]
        if bound.min_len:
            outs_b.append(b"x" * (bound.min_len - 1))
        return [b"x" * bound.max_len, b"x" * bound.min_len], outs_b
    if isinstance(bound, B.Opt):
        ins, outs = edges(bound.inner)
        return [None, *ins], outs
    if isinstance(bound, B.Items):
        item = _any_inside(bound.item)
        ins_i, outs_i = edges(bound.item) if not isinstance(bound.item, B.Unchecked) else ([], [])
        return ([[item] * bound.max_items] + [[v] for v in ins_i[:1]],
                [[item] * (bound.max_items + 1)] + [[v] for v in outs_i[:1]])
    if isinstance(bound, B.Table):
        ins, outs = [], []
        other = bound.other
        fill = _any_inside(other) if other is not None else None
        if other is not None:
            ins.append({f"k{i}": fill for i in range(bound.max_items)})
            outs.append({f"k{i}": fill for i in range(bound.max_items + 1)})
            ins.append({"k" * bound.key_len: fill})
            outs.append({"k" * (bound.key_len + 1): fill})
        else:
            outs.append({"no_such_key": 1})
        for k, b in bound.named.items():
            i, o = edges(b)
            ins += [{k: v} for v in i]
            outs += [{k: v} for v in o]
        return ins, outs
    if isinstance(bound, B.Tree):
        deep_ok: Any = 1
        for _ in range(bound.max_depth - 1):
            deep_ok = [deep_ok]
        return [{"d": deep_ok}, {"s": "x" * bound.max_str}], [{"d": [deep_ok]}, {"s": "x" * (bound.max_str + 1)},
                                                               {"f": math.nan}, {"f": math.inf}]
    return [], []


def _any_inside(bound: B.Bound) -> Any:
    if isinstance(bound, B.Opt):
        return _any_inside(bound.inner)
    if isinstance(bound, B.Unchecked):
        return sample(DatasetInfo)  # the one array of records: SiteHello.datasets
    if isinstance(bound, B.Text) and bound.pattern is None and not bound.choices:
        return "a"
    return inside(bound)


def sample(cls: type) -> Any:
    """A ``cls`` with every field at a canonical inside value (weights empty, one dataset)."""
    kw = {}
    for f in dataclasses.fields(cls):
        b = B.FIELDS[cls.__name__][f.name]
        if isinstance(b, B.Unchecked):
            kw[f.name] = (sample(DatasetInfo),) if f.name == "datasets" else ()
        else:
            v = inside(b)
            kw[f.name] = tuple(v) if isinstance(b, B.Items) else v
    return cls(**kw)


def _body(cls_name: str, field: str, value: Any) -> bytes:
    if cls_name == "DatasetInfo":
        payload = dataclasses.replace(sample(SiteHello), datasets=(dataclasses.replace(sample(DatasetInfo), **{field: value}),))
    elif cls_name == "Envelope":
        payload = sample(SiteHello)
    else:
        payload = dataclasses.replace(sample(MESSAGE_TYPES[cls_name]), **{field: value})
    env = new_envelope(payload, federation="fed", run_id="run", round=1, sender="site-a", recipient="coordinator",
                       sent_at=1.7e9)
    if cls_name == "Envelope":
        env = dataclasses.replace(env, **{field: value})
    return encode_envelope(env)


# TaskConfig cannot be built outside its bounds (its __post_init__ refuses): its edges are
# tested on raw frames in tests/protocol/test_codec.py, from the same TaskConfig.BOUNDS.
CASES = [(t, f) for t, fields in B.FIELDS.items() if t != "TaskConfig" for f, b in fields.items()
         if not isinstance(b, (B.Unchecked, B.Record)) and (t, f) not in {("Envelope", "message_id"), ("Envelope", "type"),
                                                               ("Envelope", "schema_version")}]


def _small(v: Any) -> bool:
    return not isinstance(v, (list, dict)) or len(v) <= ITEMS_THROUGH_CODEC


@pytest.mark.parametrize("type_name, field", CASES, ids=[f"{t}.{f}" for t, f in CASES])
def test_each_field_at_its_edge(type_name: str, field: str) -> None:
    bound = B.FIELDS[type_name][field]
    ins, outs = edges(bound)
    assert ins and outs, f"{type_name}.{field}: no edge to test"
    for v in ins:
        bound.check(v, "x")  # just inside: the bound alone
        if _small(v):  # ... and through the codec, end to end
            got = decode_envelope(_body(type_name, field, v))
            assert got is not None
    for v in outs:
        with pytest.raises(OutOfBounds):
            bound.check(v, "x")
        if _small(v):
            with pytest.raises((OutOfBounds, MalformedFrame)) as e:
                decode_envelope(_body(type_name, field, v))
            assert e.value.reason in ("out_of_bounds", "malformed")


def test_every_registered_message_type_and_field_has_a_bound() -> None:
    for cls in (*MESSAGE_TYPES.values(), DatasetInfo):
        assert set(B.FIELDS[cls.__name__]) == {f.name for f in dataclasses.fields(cls)}


def test_the_minus_inf_policy_is_out_of_bounds_with_its_path() -> None:
    payload = dataclasses.replace(sample(SiteHello), policy={"max_sample_rate": -math.inf})
    env = new_envelope(payload, federation="f", run_id="", round=0, sender="site-a", recipient="coordinator")
    body = encode_envelope(env)
    with pytest.raises(OutOfBounds, match=r"payload\.policy\.max_sample_rate: must be a finite number"):
        open_frame(encode_frame(SIGNER.kid, body, SIGNER.sign(signed_digest(body))), TRUST)


# ------------------------------------------------------------------------------ chunks
def _transfer(total: int, chunk: int) -> list[tuple[dict, memoryview]]:
    return split_body(os.urandom(total), chunk_size=chunk)


def test_count_must_match_total_size() -> None:
    h, _ = _transfer(10, 5)[0]
    r = Reassembler()
    with pytest.raises(ChunkError, match="cannot carry total_size=0"):
        r.add({**h, "total_size": 0, "count": 65_535, "index": 0}, b"")
    with pytest.raises(ChunkError, match="cannot carry total_size=10"):
        r.add({**h, "count": 11}, b"x")
    assert window_chunks({**h, "total_size": 0, "count": 65_535}) == 1  # opens no prefetch room
    assert window_chunks({**h, "count": 10}) == 10  # 10 chunks of 1 byte: the edge, fine


def test_zero_length_chunks_are_refused_and_an_empty_body_still_travels() -> None:
    (h, p), = split_body(b"", chunk_size=8)
    assert Reassembler().add(h, p) == b""  # the one honest empty chunk
    h, _ = _transfer(10, 5)[0]
    with pytest.raises(ChunkError, match="is empty"):
        Reassembler().add(h, b"")


@pytest.mark.parametrize("sizes, ok", [
    ((5, 5), True), ((4, 4, 2), True), ((6, 4), True),  # what split_body sends (last chunk 1..c)
    ((9, 1), True), ((4, 6), False), ((3, 3, 4), False), ((5, 3, 2), False), ((2, 9), False)])
def test_every_chunk_but_the_last_has_one_size(sizes: tuple[int, ...], ok: bool) -> None:
    body = os.urandom(sum(sizes))
    h, _ = split_body(body, chunk_size=max(sizes))[0]
    h = {**h, "count": len(sizes)}
    pieces, at = [], 0
    for s in sizes:
        pieces.append(body[at:at + s])
        at += s
    for order in (range(len(sizes)), reversed(range(len(sizes)))):  # the last may arrive first
        r = Reassembler()
        try:
            out = [r.add({**h, "index": i}, pieces[i]) for i in order]
        except ChunkError as e:
            assert not ok, e
            assert r.in_progress() == []
            continue
        assert ok and out[-1] == body


def test_user_chunk_cap_at_its_edge_with_the_global_cap_relaxed() -> None:
    cap = 8
    r = Reassembler(max_chunks=10**6, max_user_chunks=cap)
    # An honest transfer of exactly the cap passes.
    body = os.urandom(cap)
    chunks = split_body(body, chunk_size=1)
    assert len(chunks) == cap
    assert [r.add(h, p, user="site-1") for h, p in chunks][-1] == body
    # One chunk more can never be held: dead-lettered, not requeued.
    h, p = split_body(os.urandom(cap + 1), chunk_size=1)[0]
    with pytest.raises(ChunkError, match=f"max_user_chunks={cap}") as e:
        r.add(h, p, user="site-1")
    assert not isinstance(e.value, ChunkCapacity)
    # Two transfers in progress: up to the cap together; one chunk over waits (requeue), others unaffected.
    a = split_body(os.urandom(4), chunk_size=1)
    b = split_body(os.urandom(4), chunk_size=1)
    c = split_body(os.urandom(2), chunk_size=1)
    assert r.add(*a[0], user="mallory") is None and r.add(*b[0], user="mallory") is None
    with pytest.raises(ChunkCapacity, match="max_user_chunks=8"):
        r.add(*c[0], user="mallory")
    assert r.add(*c[0], user="site-2") is None  # another user still has all of its own cap


def test_global_chunk_cap_requeues() -> None:
    r = Reassembler(max_chunks=6, max_user_chunks=4)
    assert r.add(*split_body(os.urandom(4), chunk_size=1)[0], user="a") is None
    with pytest.raises(ChunkCapacity, match="max_chunks=6"):
        r.add(*split_body(os.urandom(3), chunk_size=1)[0], user="b")
    assert r.add(*split_body(os.urandom(2), chunk_size=1)[0], user="b") is None


def test_header_fields_are_bounded_from_bounds_py() -> None:
    h, p = _transfer(10, 5)[0]
    for field, value in (("total_size", 2**40 + 1), ("index", -1), ("count", 10**6 + 1), ("transfer_id", "t" * 129)):
        with pytest.raises(ChunkError) as e:
            Reassembler().add({**h, field: value}, p)
        assert isinstance(e.value, ProtocolError) and field in str(e.value)
