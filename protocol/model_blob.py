"""A round's model as content-addressed chunks: published once, fetched by hash (issue 23).

The coordinator encodes the global model once per version (the codec's tensor array,
``protocol.codec.tensor_parts``), cuts it into chunks of at most ``chunk_size`` bytes and
names each chunk by its sha256. A signed task carries only the model's ``ModelRef``
(sha256 of the whole blob, its size and the ordered chunk hashes), never the weights, so
the frame a site verifies stays small and the weights are authenticated through the
signature over their hash. The chunks travel as plain messages fanned out by the broker
(``MODEL_CHUNK_HEADER``; see docs/design.md "Models: publish once, fetch by hash").

Encoding streams: ``iter_chunks`` holds one chunk at a time, so publishing a model costs
one chunk of memory beside the global model, not another copy of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from protocol.codec import tensor_parts
from protocol.messages import Tensors

__all__ = ["ModelRef", "iter_chunks", "model_ref", "MODEL_CHUNK_HEADER", "SHA256_HEX"]

MODEL_CHUNK_HEADER = "x-fedbus-model-chunk"  # on a chunk message: the sha256 (hex) its bytes must have
SHA256_HEX = r"[0-9a-f]{64}"


@dataclass(frozen=True)
class ModelRef:
    """What a task says about its model: enough to fetch it by hash and verify it before use."""

    sha256: str  # of the whole blob (the codec's tensor array)
    size: int  # bytes of the whole blob
    chunks: tuple[str, ...]  # sha256 of each chunk, in order; every chunk but the last is chunk_size bytes

    @property
    def short(self) -> str:
        return self.sha256[:12]


def iter_chunks(tensors: Tensors, *, chunk_size: int) -> Iterator[bytes | memoryview]:
    """The model blob of ``tensors`` in chunks of ``chunk_size`` bytes (the last holds the rest).

    A chunk that lies inside one array's data is a view of it (no copy: hashing a 400 MB model
    copied it twice, chunk by chunk); one that straddles parts is gathered in one chunk-sized
    buffer. Views are valid while ``tensors`` is unchanged (published weights never change).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    buf = bytearray(chunk_size)
    fill = 0
    for part in tensor_parts(tensors):
        view = memoryview(part).cast("B")
        pos = 0
        while pos < len(view):
            if fill == 0 and len(view) - pos >= chunk_size:
                yield view[pos:pos + chunk_size]
                pos += chunk_size
                continue
            n = min(chunk_size - fill, len(view) - pos)
            buf[fill:fill + n] = view[pos:pos + n]
            fill += n
            pos += n
            if fill == chunk_size:
                yield bytes(buf)
                fill = 0
    if fill:
        yield bytes(buf[:fill])


def model_ref(tensors: Tensors, *, chunk_size: int) -> ModelRef:
    """Hash ``tensors``' blob: the whole and each chunk, in one pass over the chunks (views, no copy).

    The chunk hashes are computed in a second thread beside the whole's (hashlib releases the GIL),
    so a 400 MB model costs about one sha256 pass of wall time, not two.
    """
    import queue
    import threading

    whole = hashlib.sha256()
    chunks: list[str] = []
    todo: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=2)  # two chunks ahead at most

    def hash_chunks() -> None:
        while (c := todo.get()) is not None:
            chunks.append(hashlib.sha256(c).hexdigest())

    worker = threading.Thread(target=hash_chunks, name="fedbus-chunk-sha256", daemon=True)
    worker.start()
    size = 0
    try:
        for chunk in iter_chunks(tensors, chunk_size=chunk_size):
            todo.put(chunk)
            whole.update(chunk)
            size += len(chunk)
    finally:
        todo.put(None)
        worker.join()
    return ModelRef(sha256=whole.hexdigest(), size=size, chunks=tuple(chunks))
