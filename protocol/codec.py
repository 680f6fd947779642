"""Frames and envelopes on the wire (docs/design.md "Wire protocol").

A frame is the msgpack map ``{v: 2, kid, body, sig}``; ``body`` is the msgpack of
the envelope map ``{type, schema_version, message_id, federation, run_id, round,
sender, recipient, sent_at, payload}`` and ``sig`` is Ed25519 over a fixed prefix and
the SHA-256 of exactly those body bytes (``signed_digest``). The payload is a map of the message dataclass's fields; weights
(``Tensors``) are an array of ``{name, dtype, shape, data}`` with ``data`` the raw
little-endian buffer.

Receiving is ``open_frame``: size check, frame decode under ``Limits``, signature
verified over the body *before* the envelope is decoded, then the envelope
decoded and type-checked field by field, arrays made with ``np.frombuffer`` over
the received bytes (zero copy, read-only when the input is ``bytes``). Whatever
is wrong with the bytes surfaces as a ``ProtocolError`` subclass naming the field.

Over 500 lines on purpose: the frame, the signature check before any payload byte, and
the bounded zero-copy decoder of every field are one trust boundary, reviewed as one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import time
import types
import typing
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

import msgpack
import numpy as np

from protocol import bounds
from protocol.errors import (
    BadSignature,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    UnknownMessageType,
    UnsupportedSchemaVersion,
)
from protocol.limits import DEFAULT_LIMITS, Limits
from protocol.messages import MESSAGE_TYPES, SCHEMA_VERSION, DatasetInfo, Envelope, TaskConfig, Tensors
from protocol.msgpack_view import as_byte_view, read_msgpack
from protocol.signing import Signer, TrustStore

FRAME_VERSION = 2
# What a v2 frame's signature covers: this prefix, then sha256(body). Version 1 signed the body
# itself: Ed25519 hashes its message twice with SHA-512, so signing a 100 MB update took 0.27 s and
# verifying it 0.135 s, against 0.064 s for one SHA-256 pass (SHA-NI), whose digest the receiver
# needs anyway (``Opened.body_sha256``). Collision resistance of SHA-256 is what binds the body.
_SIGNED_PREFIX = b"fedbus frame v2: ed25519 over sha256(body)\0"
# Tensor data starts at a multiple of ALIGN bytes into the body, and the body at a multiple
# of ALIGN into the frame, so arrays decoded from a frame in an aligned buffer (any bytes
# object) are aligned too. The padding is free: non-minimal (still valid) msgpack str
# headers on a few map keys.
ALIGN = 8

# Wire dtype name -> little-endian numpy dtype. bfloat16 has no numpy dtype: send float32.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
        "int8": "i1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "uint8": "u1",
        "uint32": "<u4",  # secure aggregation's field vectors (p = 2**31 - 1): half an int64's bytes
        "bool": "?",
    }.items()
}
_WIRE_NAME = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}

_ENVELOPE_FIELDS = [f.name for f in dataclasses.fields(Envelope)]
_FRAME_FIELDS = ("v", "kid", "body", "sig")


@dataclass(frozen=True)
class Opened:
    """A frame that passed every check of ``open_frame``, with what audit needs."""

    envelope: Envelope
    kid: str
    signer: str  # identity from the trust store
    body_sha256: str  # hex, of the exact body bytes
    frame_sha256: str  # hex, of the whole frame bytes
    signature: bytes
    body: bytes | memoryview  # the signed body bytes (for audit re-verification)


# --------------------------------------------------------------------------------------
# envelopes


def new_envelope(
    payload: Any,
    *,
    federation: str,
    run_id: str,
    round: int,
    sender: str,
    recipient: str,
    message_id: str | None = None,
    sent_at: float | None = None,
) -> Envelope:
    """Wrap ``payload`` with a fresh message id and the current time."""
    if type(payload) not in MESSAGE_TYPES.values():
        raise TypeError(f"payload must be one of {sorted(MESSAGE_TYPES)}, got {type(payload).__name__}")
    return Envelope(
        type=payload.TYPE,
        schema_version=SCHEMA_VERSION,
        message_id=message_id if message_id is not None else uuid.uuid4().hex,
        federation=federation,
        run_id=run_id,
        round=round,
        sender=sender,
        recipient=recipient,
        sent_at=time.time() if sent_at is None else sent_at,
        payload=payload,
    )


def encode_envelope(env: Envelope) -> bytes:
    """The body bytes of ``env`` (what gets signed)."""
    return b"".join(_envelope_parts(env))


def decode_envelope(body: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode and type-check body bytes; arrays share memory with ``body``."""
    try:
        tree = read_msgpack(body, limits=limits, what="body")
        return _decode_envelope_tree(tree, limits)
    except ProtocolError:
        raise
    except Exception as e:  # a bug here must still read as a rejection, not a crash
        raise MalformedFrame(f"body: cannot decode ({type(e).__name__}: {e})") from e


def tensor_parts(tensors: Tensors) -> list[bytes | memoryview]:
    """``tensors`` as the msgpack array the codec sends, in parts (array data as views, no copy):
    the body of a published model (``protocol/model_blob.py``), streamed chunk by chunk."""
    return _tensor_parts(tensors, "model", offset=0)


def decode_tensors(data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Tensors:
    """The arrays of ``tensor_parts``' bytes, bounded by ``limits``, as views of ``data``."""
    try:
        tree = read_msgpack(as_byte_view(data), limits=limits, what="model")
        return _decode_tensors(tree, "model", limits, [0])
    except ProtocolError:
        raise
    except Exception as e:  # a bug here must still read as a rejection, not a crash
        raise MalformedFrame(f"model: cannot decode ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------
# frames


def _frame_head(kid: str, body_len: int) -> bytes:
    """The frame map's bytes before a body of ``body_len`` bytes, which then starts at a multiple
    of ``ALIGN`` bytes into the frame."""
    kid_packed = msgpack.packb(kid)
    # Unpadded: fixmap, "v", 1, "kid", kid, "body", bin32 header.
    pad = -(1 + 2 + 1 + 4 + len(kid_packed) + 5 + 5) % ALIGN
    key_v, key_kid, key_body = _padded_keys(("v", "kid", "body"), pad)
    return b"".join((b"\x84", key_v, msgpack.packb(FRAME_VERSION), key_kid, kid_packed, key_body,
                     b"\xc6" + body_len.to_bytes(4, "big")))  # always bin32: the offset must not depend on the size


def encode_frame(kid: str, body: bytes | memoryview, sig: bytes) -> bytes:
    """The frame map around ``body``, which starts at a multiple of ``ALIGN`` bytes into the frame."""
    return b"".join((_frame_head(kid, len(body)), body, b"\xa3sig", msgpack.packb(bytes(sig))))


def decode_frame(
    data: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[int, str, memoryview, bytes]:
    """``(v, kid, body, sig)`` of a frame; ``body`` is a view into ``data``."""
    view = as_byte_view(data)
    if len(view) > limits.max_frame_bytes:
        raise LimitExceeded(
            f"frame of {len(view)} bytes is over Limits.max_frame_bytes={limits.max_frame_bytes}"
        )
    # The frame is tiny apart from its body: tighten container bounds before parsing.
    frame_limits = dataclasses.replace(
        limits, max_container_items=8, max_objects=32, max_depth=1, max_str_bytes=256
    )
    try:
        tree = read_msgpack(view, limits=frame_limits, what="frame")
    except LimitExceeded as e:
        raise LimitExceeded(f"{e} (bounds of the frame map {{v, kid, body, sig}} itself)") from None
    except ProtocolError:
        raise
    except Exception as e:
        raise MalformedFrame(f"frame: cannot decode ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict):
        raise MalformedFrame(f"frame: expected a map {{v, kid, body, sig}}, got {_tname(tree)}")
    extra = sorted(set(tree) - set(_FRAME_FIELDS))
    if extra:
        raise MalformedFrame(f"frame: unexpected field(s) {extra}")
    for name in _FRAME_FIELDS:
        if name not in tree:
            raise MalformedFrame(f"frame.{name}: missing")
    v = tree["v"]
    if type(v) is not int:
        raise MalformedFrame(f"frame.v: expected int, got {_tname(v)}")
    if v != FRAME_VERSION:
        if v > FRAME_VERSION:
            raise UnsupportedSchemaVersion(
                f"frame.v={v}: this fedbus speaks frame version {FRAME_VERSION}; upgrade the receiver"
            )
        if v == 1:
            raise UnsupportedSchemaVersion(
                "frame.v=1: the sender is an older fedbus (version 1 signed the body itself, version 2 its "
                "sha256); upgrade the sender"
            )
        raise MalformedFrame(f"frame.v={v}: frame versions start at 1")
    kid = _str(tree["kid"], "frame.kid")
    body = tree["body"]
    if not isinstance(body, memoryview):
        raise MalformedFrame(f"frame.body: expected bin, got {_tname(body)}")
    sig = tree["sig"]
    if not isinstance(sig, memoryview):
        raise MalformedFrame(f"frame.sig: expected bin, got {_tname(sig)}")
    return v, kid, body, bytes(sig)


def signed_digest(body: bytes | memoryview) -> bytes:
    """The bytes a frame's Ed25519 signature covers: a fixed prefix and sha256(body)."""
    return _SIGNED_PREFIX + hashlib.sha256(body).digest()


def seal(envelope: Envelope, signer: Signer, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode ``envelope``, sign the body, wrap it in a frame; returns the frame bytes.

    The body is decoded once before signing (cheap: no copies, no crypto), so a field
    of the wrong type fails here with a ``TypeError`` naming it, not at the receiver.
    """
    # One buffer for the whole frame: the body's parts (array data read through views) are
    # written straight into it and signed in place, so a large update is built once, not as a
    # body and then a frame around a copy of it (issue 23, "stream everywhere").
    parts = _envelope_parts(envelope)
    n = sum(len(p) for p in parts)
    if n > limits.max_frame_bytes:
        raise LimitExceeded(
            f"body of {n} bytes is over Limits.max_frame_bytes={limits.max_frame_bytes}: "
            "receivers would refuse it; shrink the model or raise the limit on both sides"
        )
    head = _frame_head(signer.kid, n)
    sig_at = len(head) + n
    frame = bytearray(sig_at + 4 + 2 + 64)  # then "sig": bin8 of an Ed25519 signature's 64 bytes
    view = memoryview(frame)
    view[:len(head)] = head
    pos = len(head)
    for p in parts:
        view[pos:pos + len(p)] = p
        pos += len(p)
    body = view[len(head):sig_at]
    try:
        decode_envelope(body, limits=limits)
    except LimitExceeded:
        raise
    except ProtocolError as e:
        raise TypeError(f"cannot send this {envelope.type}: {e}") from None
    tail = b"\xa3sig" + msgpack.packb(bytes(signer.sign(signed_digest(body))))
    if len(tail) != len(frame) - sig_at:
        raise ValueError(f"signature of unexpected length from key {signer.kid}")
    view[sig_at:] = tail
    del body, view
    if len(frame) > limits.max_frame_bytes:
        raise LimitExceeded(
            f"frame of {len(frame)} bytes is over Limits.max_frame_bytes={limits.max_frame_bytes}: "
            "receivers would refuse it; shrink the model or raise the limit on both sides"
        )
    return frame


def open_frame(
    data: bytes | memoryview, trust: TrustStore, *, limits: Limits = DEFAULT_LIMITS,
    frame_sha256: str | None = None,
) -> Opened:
    """Check and decode a frame from the wire; raises a ``ProtocolError`` subclass.

    Does not check replay, recipient, run or round: that is ``ReplayGuard.check``.
    ``frame_sha256``: the sha256 of ``data`` where the caller's bus already verified it (a
    reassembled transfer, ``Delivery.frame_sha256``): a 400 MB frame is not hashed a second time.
    """
    view = as_byte_view(data)
    _, kid, body, sig = decode_frame(view, limits=limits)
    digest = hashlib.sha256(body).digest()
    identity = trust.verify(kid, _SIGNED_PREFIX + digest, sig)  # before a single payload byte is decoded
    try:
        envelope = decode_envelope(body, limits=limits)
    except ProtocolError as e:
        e.signer = identity  # type: ignore[attr-defined]  # signed but malformed: say who sent it
        raise
    if envelope.sender != identity:
        raise BadSignature(
            f"frame signed by key {kid} of {identity!r} claims sender {envelope.sender!r}: "
            "a party may only send as itself"
        )
    return Opened(
        envelope=envelope,
        kid=kid,
        signer=identity,
        body_sha256=digest.hex(),
        frame_sha256=frame_sha256 or hashlib.sha256(view).hexdigest(),
        signature=sig,
        body=body,
    )


# --------------------------------------------------------------------------------------
# encoding


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError(f"bin of {n} bytes cannot be encoded in msgpack (max 4 GiB)")


def _padded_key(key: str, extra: int) -> bytes:
    """``key`` as a msgpack str whose header is ``extra`` (0, 1, 2 or 4) bytes longer than minimal."""
    raw = key.encode()
    n = len(raw)
    header = {0: bytes([0xA0 | n]), 1: b"\xd9" + n.to_bytes(1, "big"), 2: b"\xda" + n.to_bytes(2, "big"),
              4: b"\xdb" + n.to_bytes(4, "big")}[extra]
    return header + raw


def _padded_keys(keys: tuple[str, str, str], pad: int) -> tuple[bytes, bytes, bytes]:
    """Three short keys whose headers add up to ``pad`` (0-7) extra bytes."""
    return (_padded_key(keys[0], pad & 1), _padded_key(keys[1], pad & 2), _padded_key(keys[2], pad & 4))


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.generic) and not isinstance(obj, (np.void, np.object_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        raise TypeError("numpy arrays travel only in Tensors fields (weights)")
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _pack(value: Any, path: str) -> bytes:
    _check_plain(value, path, 0)
    try:
        return msgpack.packb(value, default=_pack_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{path}: {e}") from None


def _check_plain(value: Any, path: str, depth: int) -> None:
    """Sender-side check that a free-form value will decode on the other side."""
    if depth > 24:
        raise TypeError(f"{path}: nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: map keys must be str, got {type(k).__name__} {k!r}")
            _check_plain(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{path}[{i}]", depth + 1)


def _tensor_parts(tensors: Any, path: str, offset: int) -> list[bytes | memoryview]:
    """Parts of the tensors array, which starts ``offset`` bytes into the body."""
    if not isinstance(tensors, (tuple, list)):
        raise TypeError(f"{path}: expected a tuple of (name, ndarray) pairs, got {type(tensors).__name__}")
    parts: list[bytes | memoryview] = [_array_header(len(tensors))]
    offset += len(parts[0])
    for i, item in enumerate(tensors):
        where = f"{path}[{i}]"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{where}: expected a (name, ndarray) pair")
        name, arr = item
        if not isinstance(name, str):
            raise TypeError(f"{where}: name must be str, got {type(name).__name__}")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{where} ({name}): expected numpy.ndarray, got {type(arr).__name__}")
        wire = _WIRE_NAME.get((arr.dtype.kind, arr.dtype.itemsize))
        if wire is None:
            raise TypeError(
                f"{where} ({name}): dtype {arr.dtype} is not on the wire whitelist {sorted(DTYPES)}"
            )
        little = np.asarray(arr, dtype=DTYPES[wire], order="C")  # no copy when already '<' and C-order
        data = little.reshape(-1).view(np.uint8).data
        name_p, wire_p = msgpack.packb(name), msgpack.packb(wire)
        shape_p = msgpack.packb([int(d) for d in little.shape])
        bin_header = _bin_header(data.nbytes)
        # Unpadded: fixmap, "name", name, "dtype", dtype, "shape", shape, "data", bin header.
        unpadded = 1 + 5 + len(name_p) + 6 + len(wire_p) + 6 + len(shape_p) + 5 + len(bin_header)
        pad = -(offset + unpadded) % ALIGN
        key_name, key_dtype, key_shape = _padded_keys(("name", "dtype", "shape"), pad)
        head = b"".join((b"\x84", key_name, name_p, key_dtype, wire_p, key_shape, shape_p, b"\xa4data", bin_header))
        parts += [head, data]
        offset += len(head) + data.nbytes
    return parts


def _dataset_info_map(info: Any, path: str) -> dict[str, Any]:
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"{path}: expected DatasetInfo, got {type(info).__name__}")
    return {f.name: getattr(info, f.name) for f in dataclasses.fields(DatasetInfo)}


def _envelope_parts(env: Envelope) -> list[bytes | memoryview]:
    if not isinstance(env, Envelope):
        raise TypeError(f"expected Envelope, got {type(env).__name__}")
    payload = env.payload
    cls = MESSAGE_TYPES.get(env.type)
    if cls is None or type(payload) is not cls:
        raise TypeError(
            f"envelope.type={env.type!r} does not match payload {type(payload).__name__}; "
            "build envelopes with new_envelope()"
        )
    parts: list[bytes | memoryview] = [_map_header(len(_ENVELOPE_FIELDS))]
    for name in _ENVELOPE_FIELDS:
        parts.append(msgpack.packb(name))
        if name == "payload":
            break
        parts.append(_pack(getattr(env, name), f"envelope.{name}"))
    fields = _SCHEMAS[cls]
    parts.append(_map_header(len(fields)))
    for fname, kind, _dec, _has_default in fields:
        value = getattr(payload, fname)
        path = f"payload.{fname}"
        parts.append(msgpack.packb(fname))
        if kind == "tensors":
            parts += _tensor_parts(value, path, offset=sum(len(p) for p in parts))
        elif kind == "record":  # a nested typed record (TaskConfig): its fields as a map
            if not dataclasses.is_dataclass(value) or isinstance(value, type):
                raise TypeError(f"{path}: expected a {_RECORDS} record, got {type(value).__name__}")
            parts.append(_pack({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path))
        elif kind == "datasets":
            parts.append(_pack([_dataset_info_map(d, f"{path}[{i}]") for i, d in enumerate(value)], path))
        else:
            parts.append(_pack(value, path))
    return parts


# --------------------------------------------------------------------------------------
# decoding and type checks


def _tname(value: Any) -> str:
    if isinstance(value, memoryview):
        return "bin"
    if value is None:
        return "nil"
    return {dict: "map", list: "array"}.get(type(value), type(value).__name__)


def _str(value: Any, path: str) -> str:
    if type(value) is not str:
        raise MalformedFrame(f"{path}: expected str, got {_tname(value)}")
    return value


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A message id names nothing but a message: exactly a uuid4 hex, so it can never be a path.
_MESSAGE_ID = re.compile(r"[0-9a-f]{32}")


def _int(value: Any, path: str) -> int:
    if type(value) is not int:
        raise MalformedFrame(f"{path}: expected int, got {_tname(value)}")
    # msgpack carries up to uint64; every int fedbus stores must fit a signed 64-bit column.
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise MalformedFrame(f"{path}: {value} is outside the signed 64-bit range")
    return value


def _float(value: Any, path: str) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise MalformedFrame(f"{path}: expected float, got {_tname(value)}")


def _plain(value: Any, path: str) -> Any:
    """A free-form value (experiment, config, policy): copy bin out of the frame."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {k: _plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _map(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedFrame(f"{path}: expected map, got {_tname(value)}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedFrame(f"{path}: expected array, got {_tname(value)}")
    return value


def _decode_tensors(value: Any, path: str, limits: Limits, budget: list[int]) -> Tensors:
    items = _list(value, path)
    if len(items) > limits.max_arrays:
        raise LimitExceeded(f"{path}: {len(items)} arrays is over Limits.max_arrays={limits.max_arrays}")
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        m = _map(item, where)
        if set(m) != {"name", "dtype", "shape", "data"}:
            raise MalformedFrame(f"{where}: expected fields name, dtype, shape, data; got {sorted(m)}")
        name = _str(m["name"], f"{where}.name")
        wire = _str(m["dtype"], f"{where}.dtype")
        dtype = DTYPES.get(wire)
        if dtype is None:
            raise MalformedFrame(f"{where}.dtype: {wire[:40]!r} is not one of {sorted(DTYPES)}")
        shape = _list(m["shape"], f"{where}.shape")
        if len(shape) > limits.max_dims:
            raise LimitExceeded(f"{where}.shape: {len(shape)} dimensions is over Limits.max_dims={limits.max_dims}")
        count = 1
        for d, dim in enumerate(shape):
            dim = _int(dim, f"{where}.shape[{d}]")
            if dim < 0:
                raise MalformedFrame(f"{where}.shape[{d}]: negative dimension {dim}")
            count *= dim
            if count > limits.max_array_elements:
                raise LimitExceeded(
                    f"{where} ({name}): shape {shape} has over "
                    f"Limits.max_array_elements={limits.max_array_elements} elements"
                )
        budget[0] += count
        if budget[0] > limits.max_total_elements:
            raise LimitExceeded(
                f"{where} ({name}): arrays hold over Limits.max_total_elements={limits.max_total_elements} elements"
            )
        data = m["data"]
        if not isinstance(data, memoryview):
            raise MalformedFrame(f"{where}.data: expected bin, got {_tname(data)}")
        if len(data) != count * dtype.itemsize:
            raise MalformedFrame(
                f"{where} ({name}): data holds {len(data)} bytes, shape {shape} of {wire} needs "
                f"{count * dtype.itemsize}"
            )
        if wire == "bool" and count and np.frombuffer(data, dtype=np.uint8).max() > 1:
            raise MalformedFrame(f"{where} ({name}): bool data holds bytes other than 0 and 1")
        arr = np.frombuffer(data, dtype=dtype, count=count).reshape([int(x) for x in shape])
        out.append((name, arr))
    return tuple(out)


# Field kinds from the message dataclasses' type hints; computed once.
_RECORDS = (TaskConfig,)  # typed records nested in a payload field
_Decoder = Callable[[Any, str, Limits, list[int]], Any]


def _kind_of(hint: Any) -> tuple[str, _Decoder]:
    if hint == Tensors:
        return "tensors", _decode_tensors
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is str:
        return "str", lambda v, p, lim, b: _str(v, p)
    if hint is int:
        return "int", lambda v, p, lim, b: _int(v, p)
    if hint is float:
        return "float", lambda v, p, lim, b: _float(v, p)
    if hint is bytes:
        def dec_bytes(v: Any, p: str, lim: Limits, b: list[int]) -> bytes:
            if not isinstance(v, (bytes, memoryview)):
                raise MalformedFrame(f"{p}: expected bin, got {_tname(v)}")
            return bytes(v)
        return "bytes", dec_bytes
    if hint is bool:
        def dec_bool(v: Any, p: str, lim: Limits, b: list[int]) -> bool:
            if type(v) is not bool:
                raise MalformedFrame(f"{p}: expected bool, got {_tname(v)}")
            return v
        return "bool", dec_bool
    if origin is Literal:
        allowed = args

        def dec_literal(v: Any, p: str, lim: Limits, b: list[int]) -> Any:
            if v not in allowed or type(v) is not type(allowed[0]):
                raise MalformedFrame(f"{p}: expected one of {list(allowed)}, got {str(v)[:40]!r}")
            return v

        return "literal", dec_literal
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        _, dec = _kind_of(inner[0] if len(inner) == 1 else typing.Union[tuple(inner)])
        return "optional", lambda v, p, lim, b: None if v is None else dec(v, p, lim, b)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] is DatasetInfo:
            return "datasets", lambda v, p, lim, b: tuple(
                _decode_dataclass(DatasetInfo, item, f"{p}[{i}]", lim, b) for i, item in enumerate(_list(v, p))
            )
        _, dec = _kind_of(args[0])
        return "tuple", lambda v, p, lim, b: tuple(dec(x, f"{p}[{i}]", lim, b) for i, x in enumerate(_list(v, p)))
    if origin is dict:
        key_hint, value_hint = args
        if value_hint is Any:
            return "map", lambda v, p, lim, b: _plain(_map(v, p), p)
        _, dec = _kind_of(value_hint)
        return "map", lambda v, p, lim, b: {k: dec(x, f"{p}.{k}", lim, b) for k, x in _map(v, p).items()}
    if hint is Any:
        return "any", lambda v, p, lim, b: _plain(v, p)
    if hint in _RECORDS:  # its own bounds (__post_init__) refuse a value outside them
        def dec_record(v: Any, p: str, lim: Limits, b: list[int]) -> Any:
            try:
                return _decode_dataclass(hint, v, p, lim, b)
            except ValueError as e:
                raise MalformedFrame(f"{p}: {e}") from None
        return "record", dec_record
    raise TypeError(f"protocol/codec.py does not know how to decode {hint!r}")


def _schema(cls: type) -> list[tuple[str, str, _Decoder, bool]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, dec = _kind_of(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        out.append((f.name, kind, dec, has_default))
    return out


_SCHEMAS = {cls: _schema(cls) for cls in (*MESSAGE_TYPES.values(), DatasetInfo, *_RECORDS)}


def _decode_dataclass(cls: type, value: Any, path: str, limits: Limits, budget: list[int]) -> Any:
    m = _map(value, path)
    schema = _SCHEMAS[cls]
    names = {name for name, *_ in schema}
    extra = [k for k in m if k not in names]
    if extra:
        raise MalformedFrame(f"{path}: unknown field(s) {sorted(extra)[:8]} for {cls.__name__}")
    kwargs = {}
    for name, _kind, dec, has_default in schema:
        if name not in m:
            if has_default:
                continue
            raise MalformedFrame(f"{path}.{name}: missing ({cls.__name__} needs it)")
        kwargs[name] = dec(m[name], f"{path}.{name}", limits, budget)
        bounds.check(cls.__name__, name, kwargs[name], f"{path}.{name}")  # the value, before any handler
    return cls(**kwargs)


def _decode_envelope_tree(tree: Any, limits: Limits) -> Envelope:
    env = _map(tree, "envelope")
    if "schema_version" not in env:
        raise MalformedFrame("envelope.schema_version: missing")
    version = _int(env["schema_version"], "envelope.schema_version")
    if version > SCHEMA_VERSION:
        raise UnsupportedSchemaVersion(
            f"envelope.schema_version={version}: this fedbus speaks schema {SCHEMA_VERSION}; "
            "upgrade fedbus on the receiving side"
        )
    if version < 1:
        raise MalformedFrame(f"envelope.schema_version={version}: versions start at 1")
    extra = [k for k in env if k not in _ENVELOPE_FIELDS]
    if extra:
        raise MalformedFrame(f"envelope: unknown field(s) {sorted(extra)[:8]}")
    for name in _ENVELOPE_FIELDS:
        if name not in env:
            raise MalformedFrame(f"envelope.{name}: missing")
    mtype = _str(env["type"], "envelope.type")
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise UnknownMessageType(
            f"envelope.type={mtype[:60]!r} is not one of {sorted(MESSAGE_TYPES)}; "
            "is the sender running a newer fedbus?"
        )
    message_id = _str(env["message_id"], "envelope.message_id")
    if not _MESSAGE_ID.fullmatch(message_id):
        raise MalformedFrame(
            f"envelope.message_id: expected 32 lowercase hex digits (uuid4().hex), got {message_id[:40]!r}"
        )
    sent_at = _float(env["sent_at"], "envelope.sent_at")
    if not math.isfinite(sent_at):
        raise MalformedFrame(f"envelope.sent_at: expected a finite unix time, got {sent_at}")
    budget = [0]
    payload = _decode_dataclass(cls, env["payload"], "payload", limits, budget)
    envelope = Envelope(
        type=mtype,
        schema_version=version,
        message_id=message_id,
        federation=_str(env["federation"], "envelope.federation"),
        run_id=_str(env["run_id"], "envelope.run_id"),
        round=_int(env["round"], "envelope.round"),
        sender=_str(env["sender"], "envelope.sender"),
        recipient=_str(env["recipient"], "envelope.recipient"),
        sent_at=sent_at,
        payload=payload,
    )
    for f in _ENVELOPE_FIELDS:
        bounds.check("Envelope", f, getattr(envelope, f), f"envelope.{f}")
    return envelope


__all__ = [
    "DTYPES",
    "FRAME_VERSION",
    "signed_digest",
    "Opened",
    "new_envelope",
    "encode_envelope",
    "decode_envelope",
    "encode_frame",
    "decode_frame",
    "seal",
    "open_frame",
]
