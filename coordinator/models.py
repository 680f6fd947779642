"""Publish each model version once, fanned out by the broker (docs/design.md "Models").

A task names its model by ``ModelRef`` (protocol/model_blob.py); this module puts the
model's chunks on the bus before the tasks that name it. Each chunk is published once,
to the tasks exchange, routed to the first site's queue with the other sites in the
``BCC`` header: RabbitMQ (sender-selected distribution) and the in-memory bus copy it
into every listed site queue, so the coordinator's egress per version is one model
whatever the number of sites. A site already sent a version in this run is not sent it
again (it holds the version in its cache), unless it declined a task with
``model_unavailable``: then the next task re-sends it.

Models under ``inline_below`` bytes travel inside the task as before: for a few thousand
parameters the extra messages would cost more than the copies they save.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import structlog

from protocol.messages import Tensors
from protocol.model_blob import MODEL_CHUNK_HEADER, ModelRef, iter_chunks, model_ref
from protocol.transport.base import DEFAULT_CHUNK_SIZE, Bus
from protocol.transport.topology import TASKS

log = structlog.get_logger("fedbus.coordinator.models")

INLINE_BELOW = 1 * 2**20  # bytes: smaller models ride inside their tasks
BCC_GROUP = 256  # sites per published copy (the BCC header must fit one AMQP frame)
_KEEP_VERSIONS = 4  # versions whose recipients are remembered (hashes only: no weights are kept)


class ModelPublisher:
    """Hashes and publishes model versions; counts what it sent (egress, publishes)."""

    def __init__(self, bus: Bus, *, chunk_size: int | None = None, inline_below: int = INLINE_BELOW) -> None:
        self.bus = bus
        bus_chunk: int = getattr(bus, "chunk_size", DEFAULT_CHUNK_SIZE)
        self.chunk_size = int(chunk_size or bus_chunk)
        self.inline_below = inline_below
        # id(weights) -> (weights kept alive so the id stays theirs, their ref): the newest version only.
        self._refs: OrderedDict[int, tuple[Tensors, ModelRef]] = OrderedDict()
        self._sent: OrderedDict[str, set[str]] = OrderedDict()  # sha256 -> sites sent it
        self.publishes = 0  # versions put on the bus (one per send() that had sites to reach)
        self.bytes_published = 0  # chunk bytes this coordinator sent to the broker

    def ref(self, weights: Tensors) -> ModelRef | None:
        """The version's reference, or None when it is small enough to travel inline."""
        key = id(weights)
        hit = self._refs.get(key)
        if hit is not None and hit[0] is weights:
            self._refs.move_to_end(key)
            return hit[1] if hit[1].size >= self.inline_below else None
        ref = model_ref(weights, chunk_size=self.chunk_size)
        self._refs[key] = (weights, ref)
        while len(self._refs) > 1:  # the newest version only: an older one would be a model copy kept alive
            self._refs.popitem(last=False)
        return ref if ref.size >= self.inline_below else None

    def send(self, weights: Tensors, ref: ModelRef, sites: Iterable[str]) -> None:
        """Publish ``ref``'s chunks once, to the sites that were not sent this version yet.

        Returns once the broker confirmed every chunk: a task naming ``ref`` published after
        this never overtakes its model in a site's queue.
        """
        sent = self._sent.setdefault(ref.sha256, set())
        self._sent.move_to_end(ref.sha256)
        while len(self._sent) > _KEEP_VERSIONS:
            self._sent.popitem(last=False)
        todo = sorted(set(sites) - sent)
        if not todo:
            return
        groups = [todo[i:i + BCC_GROUP] for i in range(0, len(todo), BCC_GROUP)]
        for index, chunk in enumerate(iter_chunks(weights, chunk_size=self.chunk_size)):
            digest = ref.chunks[index]  # weights are never modified in place once published
            for group in groups:
                headers: dict[str, object] = {MODEL_CHUNK_HEADER: digest}
                if len(group) > 1:
                    headers["BCC"] = list(group[1:])
                self.bus.publish(TASKS, group[0], chunk, message_id=digest[:32], headers=headers)
                self.bytes_published += len(chunk)
        self.publishes += 1
        sent.update(todo)
        log.info("model published", sha256=ref.short, bytes=ref.size, chunks=len(ref.chunks), sites=len(todo))

    def forget(self, site: str) -> None:
        """``site`` lost its copies (it declined ``model_unavailable``): send it its next model again."""
        for sites in self._sent.values():
            sites.discard(site)


__all__ = ["ModelPublisher", "INLINE_BELOW"]
