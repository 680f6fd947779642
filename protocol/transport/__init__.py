"""Pick a bus by URL: ``memory://[name]`` or ``amqp://`` / ``amqps://``.

``open_bus`` is the one way to get a :class:`~protocol.transport.base.Bus`; pika is
imported only when an AMQP URL is opened.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from protocol.transport.base import (
    Bus,
    BusError,
    BusPermissionError,
    Consumer,
    Delivery,
    PublishError,
    PublishRefused,
    Topology,
)

__all__ = [
    "open_bus",
    "Bus",
    "BusError",
    "BusPermissionError",
    "Consumer",
    "Delivery",
    "PublishError",
    "PublishRefused",
    "Topology",
]

_MEMORY_OPTS = {"chunk_size", "user", "max_reassembly_bytes", "reassembly_timeout_s", "max_reassembly_chunks",
                "max_user_chunks"}


def open_bus(url: str, **opts: Any) -> Bus:
    """Open a bus for ``url``.

    memory options: chunk_size, user, max_reassembly_bytes, reassembly_timeout_s,
    max_reassembly_chunks, max_user_chunks
    (AMQP-only options such as tls/heartbeat/quorum are accepted and ignored so one
    configuration works on both). AMQP options: see ``AmqpBus``.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from protocol.transport.memory import MemoryBus

        unknown = set(opts) - _MEMORY_OPTS - _AMQP_ONLY_OPTS
        if unknown:
            raise TypeError(f"open_bus({url!r}): unknown option(s) {sorted(unknown)}")
        return MemoryBus(url, **{k: v for k, v in opts.items() if k in _MEMORY_OPTS})
    if scheme in ("amqp", "amqps"):
        from protocol.transport.amqp import AmqpBus

        return AmqpBus(url, **opts)
    raise ValueError(
        f"unsupported broker URL {url!r}: use memory://[name], amqp://user:pass@host:5672/vhost "
        "or amqps://..."
    )


_AMQP_ONLY_OPTS = {
    "quorum",
    "tls",
    "heartbeat",
    "blocked_connection_timeout",
    "publish_timeout_s",
    "reconnect_max_s",
    "connect_timeout_s",
    "resubscribe_timeout_s",
    "connection_name",
}
