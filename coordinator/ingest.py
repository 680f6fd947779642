"""The first stage of update ingest: verify and decode a delivery on the bus's worker thread.

The bus calls the consumer handler on a worker thread (never pika's I/O thread), so
doing the expensive part there — Ed25519 over the whole body and the zero-copy decode —
pipelines it with the run loop, which only validates and aggregates. The handler never
raises: a frame that does not open travels on as an ``Inbound`` with its error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.transport.base import Delivery


@dataclass
class Inbound:
    """A delivery with the result of ``open_frame``: exactly one of ``opened`` and ``error`` is set."""

    delivery: Delivery
    opened: Any = None
    error: Exception | None = None


def open_delivery(delivery: Delivery, trust: Any) -> Inbound:
    from protocol.codec import open_frame
    from protocol.errors import ProtocolError

    try:
        return Inbound(delivery, opened=open_frame(delivery.body, trust))
    except ProtocolError as e:
        return Inbound(delivery, error=e)
    except Exception as e:  # noqa: BLE001 - a bug must reject the frame, not kill the consumer thread
        from protocol.errors import MalformedFrame

        return Inbound(delivery, error=MalformedFrame(f"cannot open frame ({type(e).__name__}: {e})"))
