"""The dead-letters page's data: ``protocol.transport.dead_letters`` over the dashboard's broker.

Listing browses ``fedbus.dead`` without removing anything (see that module). Every way
it can fail (no broker configured, broker unreachable, module missing) becomes a
document with ``available: false`` and a reason the page shows as it is.
"""

from __future__ import annotations

import time
from typing import Any


def _redact(url: str) -> str:
    from protocol.broker_url import redact

    return redact(url)


def _tcp_problem(url: str, timeout_s: float = 3.0) -> str | None:
    """Why an AMQP broker's port does not answer (the bus itself connects lazily), or None."""
    import socket
    from urllib.parse import urlsplit

    p = urlsplit(url)
    if p.scheme not in ("amqp", "amqps"):
        return None
    host, port = p.hostname or "127.0.0.1", p.port or (5671 if p.scheme == "amqps" else 5672)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or e})"
    return None


def dead_letters_doc(broker: str | None, federation: str | None, *, timeout_s: float = 30.0) -> dict[str, Any]:
    base: dict[str, Any] = {"broker": _redact(broker) if broker else None, "federation": federation,
                            "checked_at": time.time(), "letters": []}
    if not broker:
        return {**base, "available": False,
                "reason": "no broker configured: start the dashboard with --broker URL to see fedbus.dead"}
    from protocol.transport import open_bus

    problem = _tcp_problem(broker)
    if problem:
        return {**base, "available": False, "reason": f"broker unreachable: {problem}"}
    try:
        bus = open_bus(broker)
    except Exception as e:  # noqa: BLE001 - any connect failure is "unreachable", said with its cause
        return {**base, "available": False, "reason": f"broker unreachable: {type(e).__name__}: {e}"}
    try:
        try:
            from protocol.transport.dead_letters import DeadLetters
        except ImportError:
            return {**base, "available": False,
                    "reason": "this fedbus has no dead-letter reader (protocol.transport.dead_letters)"}
        dl = DeadLetters(bus, federation, timeout_s=timeout_s)
        letters = [d.to_json() for d in dl.list()]
        return {**base, "available": True, "reason": None, "letters": letters,
                "truncated": bool(getattr(dl, "truncated", False))}
    except Exception as e:  # noqa: BLE001 - the broker answered but refused: the page says why, the server goes on
        return {**base, "available": False, "reason": f"could not read fedbus.dead: {type(e).__name__}: {e}"}
    finally:
        try:
            bus.close()
        except Exception:  # noqa: BLE001
            pass
