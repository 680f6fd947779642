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
from safetensors.numpy import load_file

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
        _write_safetensors(f, items, meta)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    durable.fsync_dir(path.parent)
    return sha256_file(path)


_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
           "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL"}


def _write_safetensors(f: BinaryIO, items: list[tuple[str, np.ndarray]], meta: dict[str, str]) -> None:
    """The safetensors format, streamed: the header, then each array's bytes straight from the
    array (``safetensors.numpy.save_file`` builds the whole file in memory first: one more model
    copy in the coordinator at every commit). Read back by safetensors' own ``load_file``."""
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
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    arrays = load_file(str(path))
    order = json.loads(meta[_ORDER_KEY]) if _ORDER_KEY in meta else sorted(arrays)
    return tuple((n, arrays[n]) for n in order)
