"""RabbitMQ bus: the :class:`Bus` that composes a connector, a publisher and consumers
(``connector.py``, ``publisher.py`` and ``consumer.py`` are the only modules importing pika).

Sites sit behind hospital firewalls and connect outbound; connections, processes and
the broker itself come and go. The parts, one module each:

* ``connector.py``: opening connections (failover between a cluster's nodes, fail-fast
  on a broker never reached, refusals classified and named).
* ``publisher.py``: one confirm-mode channel per bus; publish returns after its own
  confirm, ``mandatory`` and ``user_id`` set; unconfirmed publishes are republished
  with the same ``message_id`` after a failover (consumers dedupe by message id).
* ``consumer.py``: one connection and I/O thread per consumer, handlers on a worker
  thread, acks via ``add_callback_threadsafe``; whole-message prefetch for chunked
  frames; reconnect, and resubscribe after a broker cancel.
* ``delivery.py``: the whole frame a handler gets, settled once; ``nack(reason)``
  dead-letters it to ``fedbus.dlx`` with confirm *before* acking the original.

**Refusals** (AMQP 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, bad
credentials) stop with :class:`BusPermissionError` naming the object and the user;
they are never retried.
"""

from __future__ import annotations

from typing import Any

from protocol.transport.base import (
    DEFAULT_CHUNK_SIZE,
    Bus,
    BusError,
    Consumer,
    Handler,
    Topology,
)
from protocol.transport.connector import DEFAULT_CONNECT_TIMEOUT_S, Connector, node_parameters
from protocol.transport.consumer import AmqpConsumer
from protocol.transport.delivery import AmqpDelivery
from protocol.transport.endpoints import parse_endpoints
from protocol.transport.layout import EXCHANGES, USER_HEADER, plan
from protocol.chunking import MAX_CHUNKS, MAX_USER_CHUNKS
from protocol.transport.publisher import Publisher

__all__ = ["AmqpBus", "AmqpConsumer", "AmqpDelivery", "Publisher", "USER_HEADER"]


class AmqpBus(Bus):
    """A :class:`Bus` on RabbitMQ; see the module docstring for the guarantees.

    ``url`` may list several nodes of a cluster (comma-separated): connections fail over
    between them, and queues are declared as quorum queues.
    """

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        quorum: bool = False,
        tls: dict[str, str] | None = None,
        heartbeat: int = 30,
        blocked_connection_timeout: float = 60.0,
        publish_timeout_s: float = 120.0,
        reconnect_max_s: float = 10.0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        resubscribe_timeout_s: float = 10.0,
        connection_name: str | None = None,
        max_reassembly_bytes: int | None = None,
        reassembly_timeout_s: float = 300.0,
        max_reassembly_chunks: int = MAX_CHUNKS,
        max_user_chunks: int = MAX_USER_CHUNKS,
        user: str | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.url = url
        self.endpoints = parse_endpoints(url, tls=tls)
        self.user = self.endpoints.user
        self.connect_timeout_s = connect_timeout_s
        plist = [
            node_parameters(n, heartbeat=heartbeat, blocked_connection_timeout=blocked_connection_timeout,
                    connection_name=connection_name, connect_timeout_s=connect_timeout_s)
            for n in self.endpoints.nodes
        ]
        self.params = plist[0]
        self.connector = Connector(self.endpoints, plist, connect_timeout_s=connect_timeout_s)
        if user is not None and user != self.user:
            raise ValueError(f"user={user!r} differs from the URL's user {self.user!r}")
        self.chunk_size = chunk_size
        self.quorum = quorum or self.endpoints.quorum
        self.publish_timeout_s = publish_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.resubscribe_timeout_s = resubscribe_timeout_s  # after a broker cancel: wait this long for the queue
        # An operator's max_reassembly_bytes is a bound they chose: spill_budget keeps it. Unset: 1 GiB,
        # which the coordinator raises to its round's size (spill_budget).
        self._budget_chosen = max_reassembly_bytes is not None
        self.reassembly = {"max_bytes": 1 * 2**30 if max_reassembly_bytes is None else max_reassembly_bytes,
                           "timeout_s": reassembly_timeout_s,
                           "max_chunks": max_reassembly_chunks, "max_user_chunks": max_user_chunks}
        self.publisher = Publisher(self)
        self._consumers: list[AmqpConsumer] = []
        self._closed = False

    def spill_budget(self, max_bytes: int) -> int:
        """Let consumers opened from now on reassemble up to ``max_bytes`` of partial transfers at
        once (never less than the bus was opened with, and not at all when the bus was opened with
        an explicit ``max_reassembly_bytes``: the operator's bound stands); returns the budget in force.

        An AMQP consumer's partial transfers wait in unlinked temporary files, not in its memory
        (``Reassembler(spill=True)``), so this is a bound on disk; each broker user keeps its own
        quota (half the budget, at most one frame: ``max_user_bytes``) and 8 transfers.
        """
        if not self._budget_chosen:
            self.reassembly["max_bytes"] = max(int(self.reassembly["max_bytes"]), int(max_bytes))
        return int(self.reassembly["max_bytes"])

    # -- Bus ------------------------------------------------------------------------------
    def declare(self, topology: Topology) -> None:
        self._check_open()
        quorum = bool(topology.quorum or self.quorum)
        topo = Topology(topology.sites, topology.federations, quorum, topology.extra)

        def work(ch: Any) -> None:
            for name, kind in EXCHANGES.items():
                self._what = f"declaring exchange {name!r}"
                ch.exchange_declare(name, exchange_type=kind, durable=True)
            for qp in plan(topo):
                self._what = f"declaring queue {qp.name!r}"
                ch.queue_declare(qp.name, durable=True, arguments=qp.arguments)
                self._what = f"binding queue {qp.name!r} to {qp.exchange!r}"
                ch.queue_bind(qp.name, qp.exchange, routing_key=qp.routing_key)

        self._what = "declaring the topology"
        self.publisher.run_on_channel(work, what=lambda: self._what)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        self._check_open()
        self.publisher.publish(exchange, routing_key, body, message_id=message_id, headers=headers)

    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Consumer:
        self._check_open()
        if not 1 <= prefetch <= 1000:
            raise ValueError(f"prefetch must be in 1..1000, got {prefetch}")
        c = AmqpConsumer(self, queue, handler, prefetch)
        self._consumers.append(c)
        c.start()
        return c

    def close(self) -> None:
        self._closed = True
        for c in list(self._consumers):
            c.cancel()
        self.publisher.close()

    @property
    def reconnects(self) -> int:
        """How often the publishing connection was re-established after a loss."""
        return self.publisher.reconnects

    def delete_queue(self, name: str) -> None:
        """Delete a queue (tests and de-provisioning)."""
        self.publisher.run_on_channel(lambda ch: ch.queue_delete(name), what=lambda: f"deleting queue {name!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("bus is closed")

    def __enter__(self) -> "AmqpBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
