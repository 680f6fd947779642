"""Reading a consumer's socket in blocks larger than an AMQP frame (issue 23: large models, fast).

pika reads its socket 4 KiB at a time and appends each read to its pending frame buffer, an
immutable ``bytes``: every 128 KiB body frame is copied about 32 times while it accumulates (16 x
its size in memcpy), and in the coordinator, whose large blocks are mapped on their own
(``coordinator/memory.py``), each of those copies is an ``mmap``/``munmap`` with its page faults.
Profiled at 100 M parameters x 3 sites, that append was the coordinator's largest CPU cost
(41 s of its I/O thread over a 2-round run, more than every hash, signature and fold together).

Reading ``RECV_BYTES`` (two frames) per ``recv`` makes each frame land in one or two reads, so
it is copied a few times, not 32. It is set on one connection's transport only (the consumers'
connections, which receive models and updates), never on pika's class: other connections in the
process, such as the bench's bare-pika baseline, keep pika's default. ``_MAX_RECV_BYTES`` is a
private attribute of pika's transport (pika 1.3-1.4, pinned in ``requirements.lock``); where it
is absent the connection keeps pika's default and ``tune_receive`` says so by returning False.
"""

from __future__ import annotations

from typing import Any

RECV_BYTES = 256 * 1024  # two of RabbitMQ's default 128 KiB frames per read

__all__ = ["RECV_BYTES", "tune_receive"]


def tune_receive(conn: Any, recv_bytes: int = RECV_BYTES) -> bool:
    """Make ``conn`` (a ``pika.BlockingConnection``) read up to ``recv_bytes`` per ``recv``; False
    when its transport is not the one this knows (nothing is changed then)."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    if transport is None or not isinstance(getattr(type(transport), "_MAX_RECV_BYTES", None), int):
        return False
    transport._MAX_RECV_BYTES = int(recv_bytes)
    return True
