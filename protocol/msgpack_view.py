"""A bounded, zero-copy msgpack reader for untrusted bytes.

Why not ``msgpack.unpackb``: it copies every ``bin`` into a new ``bytes`` object,
so weights could not be decoded zero-copy, and its limits are per container only.
This reader returns ``bin`` values as ``memoryview`` slices of the input, checks
every length against ``Limits`` and against the bytes that remain *before*
building anything, bounds nesting depth and the total number of objects, refuses
ext types, duplicate and non-str map keys, and raises only ``MalformedFrame`` or
``LimitExceeded``. It is pure Python, which is fine for fedbus bodies: they hold a
few hundred small objects around a few large ``bin`` buffers.
"""

from __future__ import annotations

import struct
from typing import Any

from protocol.errors import LimitExceeded, MalformedFrame
from protocol.limits import Limits

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


def as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view of ``data`` (no copy)."""
    try:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except TypeError as e:
        raise MalformedFrame(f"expected bytes, got {type(data).__name__} ({e})") from None
    return view


def read_msgpack(data: bytes | bytearray | memoryview, *, limits: Limits, what: str = "frame") -> Any:
    """Decode exactly one msgpack object spanning all of ``data``.

    ``bin`` values come back as ``memoryview`` slices of ``data`` (read-only when
    ``data`` is ``bytes``); arrays as ``list``; maps as ``dict`` with ``str`` keys.
    """
    reader = _Reader(as_byte_view(data), limits, what)
    value = reader.value(0)
    if reader.pos != reader.end:
        raise MalformedFrame(
            f"{what}: {reader.end - reader.pos} trailing bytes after the msgpack object "
            f"(it ends at byte {reader.pos} of {reader.end})"
        )
    return value


class _Reader:
    __slots__ = ("buf", "pos", "end", "limits", "objects", "what")

    def __init__(self, buf: memoryview, limits: Limits, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.limits = limits
        self.objects = 1
        self.what = what

    # -- helpers ---------------------------------------------------------------

    def _take(self, n: int, kind: str) -> int:
        """Reserve ``n`` bytes at the cursor; returns their start."""
        start = self.pos
        if n > self.end - start:
            raise MalformedFrame(
                f"{self.what} truncated: {kind} at byte {start} needs {n} bytes, "
                f"{self.end - start} remain"
            )
        self.pos = start + n
        return start

    def _uint(self, st: struct.Struct, kind: str) -> int:
        return st.unpack_from(self.buf, self._take(st.size, kind))[0]

    # -- values ----------------------------------------------------------------

    def value(self, depth: int) -> Any:
        b = self.buf[self._take(1, "a value")]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b == 0xC4:
            return self._bin(self._uint(_U8, "bin8 length"))
        if b == 0xC5:
            return self._bin(self._uint(_U16, "bin16 length"))
        if b == 0xC6:
            return self._bin(self._uint(_U32, "bin32 length"))
        if b == 0xCA:
            return _F32.unpack_from(self.buf, self._take(4, "float32"))[0]
        if b == 0xCB:
            return _F64.unpack_from(self.buf, self._take(8, "float64"))[0]
        if b == 0xCC:
            return self._uint(_U8, "uint8")
        if b == 0xCD:
            return self._uint(_U16, "uint16")
        if b == 0xCE:
            return self._uint(_U32, "uint32")
        if b == 0xCF:
            return self._uint(_U64, "uint64")
        if b == 0xD0:
            return self._uint(_I8, "int8")
        if b == 0xD1:
            return self._uint(_I16, "int16")
        if b == 0xD2:
            return self._uint(_I32, "int32")
        if b == 0xD3:
            return self._uint(_I64, "int64")
        if b == 0xD9:
            return self._str(self._uint(_U8, "str8 length"))
        if b == 0xDA:
            return self._str(self._uint(_U16, "str16 length"))
        if b == 0xDB:
            return self._str(self._uint(_U32, "str32 length"))
        if b == 0xDC:
            return self._array(self._uint(_U16, "array16 length"), depth)
        if b == 0xDD:
            return self._array(self._uint(_U32, "array32 length"), depth)
        if b == 0xDE:
            return self._map(self._uint(_U16, "map16 length"), depth)
        if b == 0xDF:
            return self._map(self._uint(_U32, "map32 length"), depth)
        if b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8:
            raise MalformedFrame(
                f"{self.what}: msgpack ext type (byte 0x{b:02x} at {self.pos - 1}) is not allowed"
            )
        raise MalformedFrame(f"{self.what}: invalid msgpack byte 0x{b:02x} at {self.pos - 1}")

    def _str(self, n: int) -> str:
        if n > self.limits.max_str_bytes:
            raise LimitExceeded(
                f"{self.what}: a str of {n} bytes at byte {self.pos} is over "
                f"Limits.max_str_bytes={self.limits.max_str_bytes}"
            )
        start = self._take(n, "str")
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise MalformedFrame(f"{self.what}: str at byte {start} is not UTF-8 ({e.reason})") from None

    def _bin(self, n: int) -> memoryview:
        if n > self.limits.max_frame_bytes:
            raise LimitExceeded(
                f"{self.what}: a bin of {n} bytes at byte {self.pos} is over "
                f"Limits.max_frame_bytes={self.limits.max_frame_bytes}"
            )
        start = self._take(n, "bin")
        return self.buf[start : start + n]

    def _container(self, n: int, depth: int, kind: str, min_item_bytes: int) -> None:
        """All checks on a container header, before any item is read."""
        limits = self.limits
        if n > limits.max_container_items:
            raise LimitExceeded(
                f"{self.what}: a {kind} of {n} items at byte {self.pos} is over "
                f"Limits.max_container_items={limits.max_container_items}"
            )
        if depth + 1 > limits.max_depth:
            raise LimitExceeded(
                f"{self.what}: containers nested deeper than Limits.max_depth={limits.max_depth}"
            )
        if n * min_item_bytes > self.end - self.pos:
            raise MalformedFrame(
                f"{self.what} truncated: a {kind} at byte {self.pos} claims {n} items, "
                f"only {self.end - self.pos} bytes remain"
            )
        self.objects += n * (2 if kind == "map" else 1)
        if self.objects > limits.max_objects:
            raise LimitExceeded(
                f"{self.what}: more than Limits.max_objects={limits.max_objects} msgpack objects"
            )

    def _array(self, n: int, depth: int) -> list[Any]:
        self._container(n, depth, "array", 1)
        return [self.value(depth + 1) for _ in range(n)]

    def _map(self, n: int, depth: int) -> dict[str, Any]:
        self._container(n, depth, "map", 2)
        out: dict[str, Any] = {}
        for _ in range(n):
            at = self.pos
            key = self.value(depth + 1)
            if type(key) is not str:
                raise MalformedFrame(
                    f"{self.what}: map key at byte {at} must be a str, got {type(key).__name__}"
                )
            if key in out:
                raise MalformedFrame(f"{self.what}: duplicate map key {key[:80]!r} at byte {at}")
            out[key] = self.value(depth + 1)
        return out


__all__ = ["read_msgpack", "as_byte_view"]
