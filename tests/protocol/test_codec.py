"""Wire codec: round trips, zero-copy decode, and every way a frame is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import wire_strategies
from protocol.codec import (
    DTYPES,
    decode_envelope,
    decode_frame,
    encode_envelope,
    encode_frame,
    new_envelope,
    open_frame,
    seal,
)
from protocol.errors import (
    BadSignature,
    LimitExceeded,
    MalformedFrame,
    OutOfBounds,
    ProtocolError,
    UnknownMessageType,
    UnknownSigner,
    UnsupportedSchemaVersion,
)
from protocol.limits import Limits
from protocol.messages import (
    MESSAGE_TYPES,
    DatasetInfo,
    Declined,
    RunControl,
    SiteHello,
    TaskConfig,
    TrainTask,
    Update,
)
from protocol.signing import Signer, TrustStore

SITE = "site-1"
SIGNER = Signer.generate()
OTHER = Signer.generate()
TRUST = TrustStore()
TRUST.add(SITE, SIGNER.public_pem())
TRUST.add("site-2", OTHER.public_pem())

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def envelope(payload, **kw):
    args = dict(federation="fed", run_id="run-1", round=3, sender=SITE, recipient="coordinator")
    args.update(kw)
    return new_envelope(payload, **args)


def small_update(**kw) -> Update:
    fields = dict(
        task_id="task-1",
        weights=(("fc.weight", np.arange(6, dtype=np.float32).reshape(2, 3)), ("fc.bias", np.ones(2, np.float32))),
        num_examples=10,
        metrics={"after_loss": 0.5},
        epsilon=1.5,
        delta=1e-5,
        base_round=2,
    )
    fields.update(kw)
    return Update(**fields)


def signed_body(body: bytes, signer: Signer = SIGNER) -> bytes:
    """A frame around hand-made body bytes, properly signed (tests the body checks, not the signature)."""
    return encode_frame(signer.kid, body, signer.sign(body))


def body_dict(payload=None, **overrides) -> dict:
    """The envelope of a valid small Update as a plain dict, to corrupt field by field."""
    env = envelope(payload if payload is not None else small_update())
    tree = msgpack.unpackb(encode_envelope(env))
    tree.update(overrides)
    return tree


def open_dict(tree: dict, **kw):
    return open_frame(signed_body(msgpack.packb(tree)), TRUST, **kw)


# ---------------------------------------------------------------- strategies

WIRE_DTYPES = [np.dtype(d) for d in ("<f2", "<f4", "<f8", "i1", "<i2", "<i4", "<i8", "u1", "?")]
# Big-endian inputs must arrive little-endian with the same values.
INPUT_DTYPES = WIRE_DTYPES + [np.dtype(d) for d in (">f4", ">f8", ">i4", ">i8")]

arrays = st.sampled_from(INPUT_DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)
tensors = st.lists(st.tuples(st.text(max_size=20), arrays), max_size=5).map(tuple)
names = st.text(max_size=30)
finite = st.floats(allow_nan=False)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | finite | st.text(max_size=10) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_dict = st.dictionaries(st.text(max_size=8), json_like, max_size=5)
task_config = st.builds(  # TaskConfig: every field inside its bounds
    TaskConfig, proximal_mu=st.floats(0.0, 1e4), personal_layers=st.integers(0, 256),
    epochs=st.none() | st.integers(1, 100_000), learning_rate=st.none() | st.floats(1e-12, 1e3),
    batch_size=st.none() | st.integers(1, 10_000_000), weight_decay=st.none() | st.floats(0.0, 1e3))
metrics = st.dictionaries(st.text(max_size=12), finite, max_size=6)
dataset_info = st.builds(
    DatasetInfo,
    name=names,
    rows=st.integers(0, 10**9),
    columns=st.lists(names, max_size=5).map(tuple),
    feature_types=st.dictionaries(names, st.sampled_from(["numeric", "categorical", "signal"]), max_size=4),
    target=names,
)
# One strategy per message type, derived from the registry and protocol/bounds.py (every field
# inside its bound); ``payloads`` draws from all of them.
PAYLOAD_STRATEGIES = {cls: wire_strategies.payload(cls, weights=tensors) for cls in MESSAGE_TYPES.values()}
payloads = st.one_of(*PAYLOAD_STRATEGIES.values())


def assert_same_array(sent: np.ndarray, got: np.ndarray, frame: bytes) -> None:
    assert got.shape == sent.shape
    assert got.dtype == sent.dtype.newbyteorder("<") or got.dtype == sent.dtype
    assert got.dtype.byteorder in ("<", "=", "|") and got.dtype.isnative
    # Bitwise equal (NaN-safe), after bringing the sent array to little-endian.
    assert got.tobytes() == np.asarray(sent, dtype=got.dtype).tobytes()
    if got.nbytes:
        # Zero copy: the decoded array is a view into the received frame bytes.
        assert not got.flags.owndata
        assert np.shares_memory(got, np.frombuffer(frame, dtype=np.uint8))
        # ... at an aligned offset, so numpy and torch take their fast paths.
        assert (got.ctypes.data - np.frombuffer(frame, dtype=np.uint8).ctypes.data) % 8 == 0


def assert_same_payload(sent, got, frame: bytes) -> None:
    assert type(got) is type(sent)
    for name in ("weights", "masked", "shares", "sealed", "share", "union_masked", "union_shares"):  # every Tensors field
        if hasattr(sent, name):
            assert [n for n, _ in getattr(got, name)] == [n for n, _ in getattr(sent, name)]
            for (_, a), (_, b) in zip(getattr(sent, name), getattr(got, name)):
                assert_same_array(a, b, frame)
            sent, got = dataclasses.replace(sent, **{name: ()}), dataclasses.replace(got, **{name: ()})
    assert got == sent


# ---------------------------------------------------------------- round trips


@FAST
@given(payload=payloads, round_=st.integers(0, 2**31 - 1), sent_at=st.floats(0, 4e9))
def test_every_message_type_round_trips(payload, round_, sent_at):
    env = envelope(payload, round=round_, sent_at=sent_at)
    frame = seal(env, SIGNER)
    opened = open_frame(frame, TRUST)
    got = opened.envelope
    assert dataclasses.replace(got, payload=None) == dataclasses.replace(env, payload=None)
    assert_same_payload(payload, got.payload, frame)
    assert opened.signer == SITE and opened.kid == SIGNER.kid


@FAST
@given(data=st.data())
def test_strategies_cover_every_message_type(data):
    # what the strategies really draw, not a hand-typed list: one strategy per wire type, each
    # drawing its own type, so a type added to MESSAGE_TYPES without a strategy fails here
    assert {cls.__name__ for cls in PAYLOAD_STRATEGIES} == set(MESSAGE_TYPES)
    for cls, strategy in PAYLOAD_STRATEGIES.items():
        assert type(data.draw(strategy)) is cls


@FAST
@given(arr=arrays)
def test_arrays_round_trip_zero_copy_for_every_dtype_and_shape(arr):
    frame = seal(envelope(small_update(weights=(("w", arr),))), SIGNER)
    (name, got), = open_frame(frame, TRUST).envelope.payload.weights
    assert name == "w"
    assert_same_array(arr, got, frame)


def test_decoded_arrays_are_views_of_the_frame_even_from_memoryview():
    weights = (("w", np.linspace(0, 1, 1000, dtype=np.float32)),)
    frame = bytearray(seal(envelope(small_update(weights=weights)), SIGNER))
    (_, got), = open_frame(memoryview(frame), TRUST).envelope.payload.weights
    assert np.array_equal(got, weights[0][1])
    assert np.shares_memory(got, np.frombuffer(frame, np.uint8))


def test_alignment_padding_is_plain_msgpack():
    """The padding is non-minimal str headers: any msgpack decoder reads the same values."""
    env = envelope(small_update(task_id="odd-length-id-x"))
    frame = seal(env, SIGNER)
    outer = msgpack.unpackb(frame)
    assert sorted(outer) == ["body", "kid", "sig", "v"] and outer["v"] == 1 and outer["kid"] == SIGNER.kid
    inner = msgpack.unpackb(outer["body"])
    assert inner["payload"]["task_id"] == "odd-length-id-x"
    assert [w["name"] for w in inner["payload"]["weights"]] == ["fc.weight", "fc.bias"]
    assert np.frombuffer(inner["payload"]["weights"][0]["data"], "<f4").tolist() == list(range(6))


def test_non_contiguous_and_fortran_arrays_are_sent_in_c_order():
    arr = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2].T  # neither C nor F contiguous
    frame = seal(envelope(small_update(weights=(("w", arr),))), SIGNER)
    (_, got), = open_frame(frame, TRUST).envelope.payload.weights
    assert np.array_equal(got, arr) and got.flags.c_contiguous


def test_numpy_scalars_in_metrics_are_encoded_as_plain_numbers():
    upd = small_update(metrics={"loss": np.float32(0.25), "steps": np.int64(7)})
    got = open_frame(seal(envelope(upd), SIGNER), TRUST).envelope.payload.metrics
    assert got == {"loss": 0.25, "steps": 7}


def test_opened_carries_what_audit_needs():
    frame = seal(envelope(small_update()), SIGNER)
    opened = open_frame(frame, TRUST)
    assert opened.frame_sha256 == hashlib.sha256(frame).hexdigest()
    _, kid, body, sig = decode_frame(frame)
    assert bytes(opened.body) == bytes(body)
    assert opened.body_sha256 == hashlib.sha256(body).hexdigest()
    assert opened.signature == sig
    # Re-verification later, from the stored body and signature alone:
    assert TRUST.verify(opened.kid, bytes(opened.body), opened.signature) == SITE


def test_a_large_body_is_hashed_beside_its_signature_check_and_named_right():
    """From ``HASH_BESIDE_FROM`` the body's sha256 is computed in a thread while the signature is
    checked: the name is the body's hash all the same, and a frame whose signature does not verify
    is refused (the hash is never used, nothing is decoded), the thread joined."""
    import threading

    from protocol.codec import HASH_BESIDE_FROM

    big = np.arange(HASH_BESIDE_FROM // 4 + 1000, dtype=np.float32)
    frame = seal(envelope(small_update(weights=(("w", big),))), SIGNER)
    _, _, body, _ = decode_frame(frame)
    assert len(body) >= HASH_BESIDE_FROM
    opened = open_frame(frame, TRUST)
    assert opened.body_sha256 == hashlib.sha256(body).hexdigest()
    assert opened.frame_sha256 == hashlib.sha256(frame).hexdigest()
    forged = bytearray(frame)
    forged[len(frame) // 2] ^= 0x01  # inside the weights: the signature no longer verifies
    with pytest.raises(BadSignature):
        open_frame(bytes(forged), TRUST)
    assert not any(t.name == "fedbus-body-sha256" for t in threading.enumerate())


def test_decode_envelope_alone_round_trips():
    env = envelope(RunControl(action="abort", reason="operator"))
    assert decode_envelope(encode_envelope(env)) == env


# ---------------------------------------------------------------- tampering and signers


def test_every_single_byte_flip_is_rejected():
    """Exhaustive over a small frame with tensors: no flipped byte is ever accepted or crashes."""
    frame = seal(envelope(small_update()), SIGNER)
    for pos in range(len(frame)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(frame)
            bad[pos] ^= mask
            with pytest.raises(ProtocolError):
                open_frame(bytes(bad), TRUST)


@FAST
@given(data=st.data(), payload=payloads)
def test_a_flipped_byte_anywhere_is_rejected(data, payload):
    frame = seal(envelope(payload), SIGNER)
    pos = data.draw(st.integers(0, len(frame) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    bad = bytearray(frame)
    bad[pos] ^= mask
    with pytest.raises(ProtocolError):
        open_frame(bytes(bad), TRUST)


def test_flipped_body_byte_is_a_bad_signature():
    frame = bytearray(seal(envelope(small_update()), SIGNER))
    _, _, body, _ = decode_frame(bytes(frame))
    start = bytes(frame).index(bytes(body))
    frame[start + len(body) // 2] ^= 0x10
    with pytest.raises(BadSignature, match="does not verify"):
        open_frame(bytes(frame), TRUST)


def test_frame_signed_by_unknown_key_is_rejected():
    stranger = Signer.generate()
    with pytest.raises(UnknownSigner, match="not in the trust store"):
        open_frame(seal(envelope(small_update()), stranger), TRUST)


def test_signature_checked_before_the_body_is_decoded():
    # Garbage body signed with a wrong key: the signature fails first, body never parsed.
    junk = b"\xc1" * 50
    with pytest.raises(BadSignature):
        open_frame(encode_frame(SIGNER.kid, junk, OTHER.sign(junk)), TRUST)
    # The same garbage signed correctly reaches the decoder and is malformed.
    with pytest.raises(MalformedFrame):
        open_frame(signed_body(junk), TRUST)


def test_a_site_cannot_send_as_another_site():
    env = envelope(small_update(), sender=SITE)
    with pytest.raises(BadSignature, match="claims sender 'site-1'"):
        open_frame(seal(env, OTHER), TRUST)  # OTHER is enrolled, but as site-2


def test_wrong_signature_length_is_a_bad_signature():
    body = encode_envelope(envelope(small_update()))
    with pytest.raises(BadSignature, match="64 bytes"):
        open_frame(encode_frame(SIGNER.kid, body, SIGNER.sign(body)[:63]), TRUST)


# ---------------------------------------------------------------- malformed frames


def test_every_truncation_is_malformed():
    frame = seal(envelope(small_update()), SIGNER)
    for n in range(len(frame)):
        with pytest.raises(MalformedFrame):
            open_frame(frame[:n], TRUST)


@FAST
@given(junk=st.binary(max_size=300))
def test_garbage_bytes_never_escape_as_other_exceptions(junk):
    with pytest.raises(ProtocolError):
        open_frame(junk, TRUST)
    with pytest.raises(ProtocolError):
        decode_envelope(junk)


@pytest.mark.parametrize(
    "raw, error, message",
    [
        (b"", MalformedFrame, "truncated"),
        (b"hello", MalformedFrame, "frame"),
        (b"\xc1", MalformedFrame, "invalid msgpack byte 0xc1"),
        (msgpack.packb([1, 2]), MalformedFrame, "expected a map"),
        (msgpack.packb({"v": 1, "kid": "k", "body": b"", "sig": b"", "x": 1}), MalformedFrame, "unexpected field"),
        (msgpack.packb({"v": 1, "kid": "k", "body": b""}), MalformedFrame, "frame.sig: missing"),
        (msgpack.packb({"v": "1", "kid": "k", "body": b"", "sig": b""}), MalformedFrame, "frame.v: expected int"),
        (msgpack.packb({"v": 2, "kid": "k", "body": b"", "sig": b""}), UnsupportedSchemaVersion, "frame.v=2"),
        (msgpack.packb({"v": 0, "kid": "k", "body": b"", "sig": b""}), MalformedFrame, "frame.v=0"),
        (msgpack.packb({"v": 1, "kid": 5, "body": b"", "sig": b""}), MalformedFrame, "frame.kid: expected str"),
        (msgpack.packb({"v": 1, "kid": "k", "body": "text", "sig": b""}), MalformedFrame, "frame.body: expected bin"),
        (msgpack.packb({"v": 1, "kid": "k", "body": b"", "sig": b""}) + b"\x00", MalformedFrame, "trailing"),
        (msgpack.packb({1: 1}), MalformedFrame, "map key"),
        (b"\x82\xa1v\x01\xa1v\x01", MalformedFrame, "duplicate map key 'v'"),
        (msgpack.packb(msgpack.ExtType(5, b"abcd")), MalformedFrame, "ext type"),
        (b"\xa2\xff\xfe", MalformedFrame, "not UTF-8"),
    ],
)
def test_malformed_frames_get_specific_errors(raw, error, message):
    with pytest.raises(error, match=message):
        open_frame(raw, TRUST)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda t: t["payload"].update(num_examples="ten"), MalformedFrame, "payload.num_examples: expected int, got str"),
        (lambda t: t["payload"].update(num_examples=True), MalformedFrame, "payload.num_examples: expected int, got bool"),
        (lambda t: t.update(round="3"), MalformedFrame, "envelope.round: expected int, got str"),
        (lambda t: t.update(sent_at=None), MalformedFrame, "envelope.sent_at: expected float, got nil"),
        (lambda t: t.update(sent_at=math.nan), MalformedFrame, "envelope.sent_at: expected a finite"),
        (lambda t: t.update(message_id="a b"), MalformedFrame, "envelope.message_id"),
        (lambda t: t.pop("federation"), MalformedFrame, "envelope.federation: missing"),
        (lambda t: t.update(extra=1), MalformedFrame, "unknown field"),
        (lambda t: t.update(payload=[1]), MalformedFrame, "payload: expected map, got array"),
        (lambda t: t["payload"].pop("task_id"), MalformedFrame, "payload.task_id: missing"),
        (lambda t: t["payload"].update(bogus=1), MalformedFrame, "unknown field"),
        (lambda t: t["payload"].update(epsilon="x"), MalformedFrame, "payload.epsilon: expected float"),
        (lambda t: t["payload"].update(metrics={"a": "b"}), MalformedFrame, "payload.metrics.a: expected float"),
        (lambda t: t["payload"].update(metrics=[]), MalformedFrame, "payload.metrics: expected map"),
        (lambda t: t["payload"].update(weights={}), MalformedFrame, "payload.weights: expected array"),
        (lambda t: t["payload"]["weights"][0].update(dtype="complex64"), MalformedFrame, r"payload.weights\[0\].dtype"),
        (lambda t: t["payload"]["weights"][0].update(shape=[2, -3]), MalformedFrame, "negative dimension"),
        (lambda t: t["payload"]["weights"][0].update(shape=[2, "3"]), MalformedFrame, r"shape\[1\]: expected int"),
        (lambda t: t["payload"]["weights"][0].update(shape=[3, 3]), MalformedFrame, "data holds 24 bytes"),
        (lambda t: t["payload"]["weights"][0].update(data="x"), MalformedFrame, r"weights\[0\].data: expected bin"),
        (lambda t: t["payload"]["weights"][0].pop("name"), MalformedFrame, "expected fields name, dtype"),
        (lambda t: t["payload"]["weights"][0].update(dtype="bool"), MalformedFrame, "data holds"),
        (lambda t: t.update(type="Gossip"), UnknownMessageType, "'Gossip' is not one of"),
        (lambda t: t.update(type=7), MalformedFrame, "envelope.type: expected str"),
        (lambda t: t.update(schema_version=2), UnsupportedSchemaVersion, "schema_version=2"),
        (lambda t: t.update(schema_version=0), MalformedFrame, "versions start at 1"),
        (lambda t: t.update(schema_version=1.0), MalformedFrame, "schema_version: expected int"),
    ],
)
def test_wrong_fields_in_a_signed_body_name_the_field(mutate, error, message):
    tree = body_dict()
    mutate(tree)
    with pytest.raises(error, match=message):
        open_dict(tree)


def test_future_schema_version_is_refused_before_its_unknown_type():
    tree = body_dict(schema_version=9, type="FancyNewMessage")
    with pytest.raises(UnsupportedSchemaVersion, match="upgrade"):
        open_dict(tree)


def test_bool_tensor_with_non_boolean_bytes_is_malformed():
    tree = body_dict()
    tree["payload"]["weights"] = [{"name": "mask", "dtype": "bool", "shape": [3], "data": b"\x00\x01\x02"}]
    with pytest.raises(MalformedFrame, match="bool data"):
        open_dict(tree)


def test_declined_reason_outside_the_literal_is_malformed():
    tree = body_dict(Declined(task_id="t", reason="budget", detail="eps"))
    tree["payload"]["reason"] = "bored"
    with pytest.raises(MalformedFrame, match="payload.reason: expected one of"):
        open_dict(tree)


def test_dataset_info_fields_are_checked_with_their_path():
    hello = SiteHello(site_id="s", software_version="1",
                      datasets=(DatasetInfo("hf", 10, ("a",), {"a": "numeric"}, "a"),))
    tree = body_dict(hello)
    tree["payload"]["datasets"][0]["rows"] = -1.5
    with pytest.raises(MalformedFrame, match=r"payload.datasets\[0\].rows: expected int, got float"):
        open_dict(tree)


# ---------------------------------------------------------------- limits and bombs


def test_frame_over_max_frame_bytes_is_refused_before_parsing():
    frame = seal(envelope(small_update(weights=(("w", np.zeros(10_000, np.float32)),))), SIGNER)
    with pytest.raises(LimitExceeded, match="max_frame_bytes"):
        open_frame(frame, TRUST, limits=Limits(max_frame_bytes=len(frame) - 1))
    with pytest.raises(LimitExceeded, match="max_frame_bytes"):
        seal(envelope(small_update(weights=(("w", np.zeros(10_000, np.float32)),))), SIGNER,
             limits=Limits(max_frame_bytes=1000))


@pytest.mark.parametrize(
    "weights, limits, message",
    [
        (tuple((f"w{i}", np.zeros(1, np.float32)) for i in range(5)), Limits(max_arrays=4), "max_arrays"),
        ((("w", np.zeros(101, np.float32)),), Limits(max_array_elements=100), "max_array_elements"),
        ((("a", np.zeros(60, np.float32)), ("b", np.zeros(60, np.float32))), Limits(max_total_elements=100),
         "max_total_elements"),
        ((("w", np.zeros((1,) * 5, np.float32)),), Limits(max_dims=4), "max_dims"),
    ],
)
def test_tensor_limits(weights, limits, message):
    frame = seal(envelope(small_update(weights=weights)), SIGNER)
    with pytest.raises(LimitExceeded, match=message):
        open_frame(frame, TRUST, limits=limits)


def test_container_and_string_limits():
    frame = seal(envelope(small_update(metrics={f"m{i}": 1.0 for i in range(20)})), SIGNER)
    with pytest.raises(LimitExceeded, match="max_container_items"):
        open_frame(frame, TRUST, limits=Limits(max_container_items=16))
    frame = seal(envelope(Declined(task_id="t", reason="error", detail="x" * 5000)), SIGNER)
    with pytest.raises(LimitExceeded, match="max_str_bytes"):
        open_frame(frame, TRUST, limits=Limits(max_str_bytes=4096))


def test_shape_claiming_more_elements_than_the_data_is_refused_without_allocating():
    tree = body_dict()
    tree["payload"]["weights"] = [{"name": "w", "dtype": "float64", "shape": [2**20, 2**20], "data": b""}]
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded, match="max_array_elements"):
            open_dict(tree)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20


BOMBS = {
    "array32 of 2**31 items": b"\xdd\x80\x00\x00\x00",
    "map32 of 2**31 entries": b"\xdf\x80\x00\x00\x00",
    "bin32 of 2**31 bytes": b"\xc6\x80\x00\x00\x00",
    "str32 of 2**31 bytes": b"\xdb\x80\x00\x00\x00",
    "array32 of 2**32-1 items": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64,
    "deep nesting": b"\x91" * 100_000 + b"\xc0",
    "65535 nils claimed, 3 given": b"\xdc\xff\xff\xc0\xc0\xc0",
}


@pytest.mark.parametrize("bomb", list(BOMBS.values()), ids=list(BOMBS))
def test_msgpack_bombs_are_refused_without_large_allocations(bomb):
    """As a whole frame (before any signature check) and as a signed body, and inside a payload."""
    payload_bomb = msgpack.packb(body_dict()).replace(
        msgpack.packb("metrics") + msgpack.packb({"after_loss": 0.5}), msgpack.packb("metrics") + bomb
    )
    assert bomb in payload_bomb
    tracemalloc.start()
    try:
        for raw in (bomb, signed_body(bomb), signed_body(payload_bomb)):
            with pytest.raises((LimitExceeded, MalformedFrame)):
                open_frame(raw, TRUST)
        with pytest.raises((LimitExceeded, MalformedFrame)):
            decode_envelope(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak} bytes"


def test_many_tiny_objects_hit_max_objects():
    tree = body_dict()
    tree["payload"]["metrics"] = {}
    tree["payload"]["task_id"] = "t"
    tree["payload"]["weights"] = []
    # 100 arrays of 100 nils each = 10,000 objects, each container within its own limit;
    # the reader refuses the body before the field itself is looked at.
    tree["payload"]["metrics"] = {f"m{i}": [None] * 100 for i in range(100)}
    with pytest.raises(LimitExceeded, match="max_objects"):
        open_dict(tree, limits=Limits(max_objects=5000))


def test_ext_types_are_refused_in_a_signed_body():
    tree = body_dict()
    tree["payload"]["metrics"] = {"t": msgpack.Timestamp(1, 0)}
    with pytest.raises(MalformedFrame, match="ext type"):
        open_frame(signed_body(msgpack.packb(tree, datetime=False)), TRUST)


# ---------------------------------------------------------------- sender-side errors


def test_sender_errors_name_the_field():
    with pytest.raises(TypeError, match=r"payload.weights\[0\] \(w\): dtype complex64"):
        seal(envelope(small_update(weights=(("w", np.zeros(2, np.complex64)),))), SIGNER)
    with pytest.raises(TypeError, match=r"payload.weights\[0\] \(w\): expected numpy.ndarray"):
        seal(envelope(small_update(weights=(("w", [1.0, 2.0]),))), SIGNER)
    task = TrainTask(experiment={"a": {1: "int key"}}, weights=(), dataset="d", base_round=0, seed=1, deadline=0.0)
    with pytest.raises(TypeError, match="payload.experiment.a: map keys must be str"):
        seal(envelope(task), SIGNER)
    with pytest.raises(TypeError, match="payload.num_examples: expected int, got str"):
        seal(envelope(small_update(num_examples="10")), SIGNER)
    with pytest.raises(TypeError, match="envelope.round: expected int, got float"):
        seal(envelope(small_update(), round=1.0), SIGNER)
    env = dataclasses.replace(envelope(small_update()), type="EvalResult")
    with pytest.raises(TypeError, match="does not match payload Update"):
        seal(env, SIGNER)


def test_wire_dtype_whitelist_is_little_endian():
    assert set(DTYPES) == {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32",
                            "bool"}
    assert all(dt.str[0] in "<|" for dt in DTYPES.values())


def test_every_error_has_a_distinct_reason():
    from protocol import errors

    classes = [getattr(errors, n) for n in errors.__all__]
    reasons = [c.reason for c in classes]
    assert len(set(reasons)) == len(reasons)
    assert all(r.replace("_", "").isalpha() and r == r.lower() for r in reasons)
    assert MalformedFrame("x").header() == "malformed: x"


def _task_config_edges() -> list[tuple[str, float, float]]:
    """Both ends of every TaskConfig field, from TaskConfig.BOUNDS: (field, just inside, just outside)."""
    out = []
    for name, (kind, lo, hi) in TaskConfig.BOUNDS.items():
        if kind is int:
            out += [(name, int(lo), int(lo) - 1), (name, int(hi), int(hi) + 1)]
        else:
            out += [(name, lo, lo - max(abs(lo) * 1e-6, 1e-15)), (name, hi, hi * (1 + 1e-6))]
    return out


@pytest.mark.parametrize("field, inside, outside", _task_config_edges())
def test_task_config_out_of_bounds_on_the_wire_is_malformed(field, inside, outside):
    """A TaskConfig field just inside its bound decodes; just outside is refused as a malformed frame."""
    import msgpack

    task = TrainTask(experiment={}, weights=(), dataset="d", base_round=0, seed=1, deadline=0.0)
    body = encode_envelope(new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator",
                                        recipient=SITE))
    tree = msgpack.unpackb(body, raw=False)
    for value, ok in ((inside, True), (outside, False)):
        tree["payload"]["config"] = {field: value}
        raw = msgpack.packb(tree, use_bin_type=True)
        if ok:
            assert getattr(decode_envelope(raw).payload.config, field) == value
        else:
            with pytest.raises((MalformedFrame, OutOfBounds), match=field):  # bounds.py states TaskConfig.BOUNDS
                decode_envelope(raw)
    tree["payload"]["config"] = {"proximal_mu": 0.1, "name": "FedProx"}  # no untyped side channel
    with pytest.raises(MalformedFrame, match="unknown field"):
        decode_envelope(msgpack.packb(tree, use_bin_type=True))


def test_seal_builds_a_large_frame_once() -> None:
    """A site's update frame is built in one buffer and signed in place (issue 23): sealing 16 MiB
    of weights peaks at about one frame, not a body and then a frame around a copy of it."""
    import gc

    signer = Signer.generate()
    weights = (("w", np.ones(4 * 2**20, dtype=np.float32)),)
    env = new_envelope(Update(task_id="t", weights=weights, num_examples=1, metrics={}, epsilon=None, delta=None,
                              base_round=0), federation="f", run_id="r", round=1, sender="s", recipient="coordinator")
    gc.collect()
    tracemalloc.start()
    try:
        frame = seal(env, signer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    trust = TrustStore()
    trust.add("s", signer.public_pem())
    got = open_frame(frame, trust).envelope.payload.weights
    np.testing.assert_array_equal(got[0][1], weights[0][1])
    assert peak < 1.25 * len(frame), f"peak {peak / 2**20:.1f} MiB for a {len(frame) / 2**20:.1f} MiB frame"
