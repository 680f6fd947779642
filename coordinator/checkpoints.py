"""Global-model checkpoints: one safetensors file per committed round, hashed for the audit.

Files are written to a temporary name, fsync'ed and renamed, so a crash never leaves a
half-written checkpoint under its final name; the database row that records the
file's sha256 is committed only after the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from protocol import durable
from protocol.messages import Tensors

_ORDER_KEY = "fedbus.order"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` durably under ``path``; returns its sha256."""
    durable.write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def save_tensors(path: Path, tensors: Tensors | dict[str, np.ndarray], *, metadata: dict[str, str] | None = None) -> str:
    """Save ``tensors`` (order kept in the metadata) durably; returns the file's sha256."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps([n for n, _ in items])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        out = _Hashing(f)  # the file's sha256 from the bytes as written: the file is not read back
        _write_safetensors(out, items, meta)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    durable.fsync_dir(path.parent)
    return out.sha256.hexdigest()


class _Hashing:
    """A write-only file that hashes what it writes (every byte goes through ``write``)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        return self.f.write(data)


_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
           "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL"}


def _write_safetensors(f: BinaryIO, items: list[tuple[str, np.ndarray]], meta: dict[str, str]) -> None:
    """The safetensors format, streamed: the header, then each array's bytes straight from the
    array (``safetensors.numpy.save_file`` builds the whole file in memory first: one more model
    copy in the coordinator at every commit). Read back by ``read_safetensors`` (and by safetensors' own ``load_file``)."""
    header: dict[str, object] = {"__metadata__": meta}
    arrays, at = [], 0
    for name, a in items:
        a = np.asarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt.name not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which a checkpoint cannot hold")
        a = np.ascontiguousarray(a, dtype=dt)  # a view when it already is (the global model's arrays are)
        header[name] = {"dtype": _DTYPES[dt.name], "shape": list(a.shape), "data_offsets": [at, at + a.nbytes]}
        arrays.append(a)
        at += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in arrays:
        if a.nbytes:
            f.write(a.reshape(-1).view(np.uint8).data)


def load_tensors(path: Path, *, sha256: str | None = None) -> Tensors:
    """Load a checkpoint in its saved order; with ``sha256``, refuse a file that changed."""
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise ValueError(f"checkpoint {path} has sha256 {actual}, the state database recorded {sha256}")
    arrays, meta = read_safetensors(path)
    order = json.loads(meta[_ORDER_KEY]) if _ORDER_KEY in meta else sorted(arrays)
    return tuple((n, arrays[n]) for n in order)


_NUMPY = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own bound on the JSON header


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors file read tensor by tensor into its own array: one model in memory.

    ``safetensors.numpy.load_file`` reads the whole file into one bytes object and copies each
    tensor out of it: two models at once, 762 MB at 100 M parameters (issue 23). Here each array is
    allocated at its size and filled by ``readinto`` (no mapping: the file's pages are the page
    cache's, not this process's). A header that does not describe the file raises ``ValueError``.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"checkpoint {path}: header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"checkpoint {path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        base, data = 8 + n, size - 8 - n
        arrays: dict[str, np.ndarray] = {}
        for name, spec in sorted(header.items(), key=lambda kv: _offsets(path, kv[0], kv[1], data)[0]):
            start, stop = _offsets(path, name, spec, data)
            dtype = _NUMPY.get(spec.get("dtype"))
            shape = spec.get("shape")
            if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"checkpoint {path}: tensor {name!r} has dtype {spec.get('dtype')!r}, shape {shape!r}")
            a = np.empty(shape, dtype=np.dtype(dtype).newbyteorder("<"))
            if a.nbytes != stop - start:
                raise ValueError(f"checkpoint {path}: tensor {name!r} holds {stop - start} bytes, its shape {shape} "
                                 f"of {dtype} needs {a.nbytes}")
            f.seek(base + start)
            if a.nbytes and f.readinto(a.reshape(-1).view(np.uint8).data) != a.nbytes:
                raise ValueError(f"checkpoint {path}: tensor {name!r} is cut short")
            arrays[name] = a
    return arrays, {str(k): str(v) for k, v in dict(meta).items()}


def _offsets(path: Path, name: str, spec: object, data: int) -> tuple[int, int]:
    off = spec.get("data_offsets") if isinstance(spec, dict) else None
    if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(x, int) for x in off)
            or not 0 <= off[0] <= off[1] <= data):
        raise ValueError(f"checkpoint {path}: tensor {name!r} has data_offsets {off!r} outside the {data} data bytes")
    return off[0], off[1]
