"""Updates waiting for the coordinator's run loop cost no resident memory (issue 23: three models).

On RabbitMQ a large update reaches the coordinator as a read-only map of the file its chunks
were spilled to. The transfer's hash is checked by reading the file (not through the map), and
the inbox opens a delivery (signature, hashes, zero-copy decode: every page of it read) only
when the run loop takes it, one at a time. So six updates that arrive together add nothing to
the process's resident set until the loop reads them; reading one adds one body, and releasing
it gives that back. Opening them as they arrive (on the bus's thread) held all six at once:
the coordinator's memory grew with the number of sites.

Resident memory is this process's ``VmRSS``: a page of a shared file mapping counts once this
process touches it, whatever the page cache holds.
"""

from __future__ import annotations

import gc
import time
from typing import Any, cast

import numpy as np
import pytest

from coordinator.inbox import Inbox
from coordinator.state import StateStore
from protocol.chunking import Reassembler, split_body
from protocol.codec import new_envelope, seal
from protocol.messages import Update
from protocol.signing import Signer, TrustStore
from protocol.transport.base import Delivery

pytestmark = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc (Linux)")

PARAMS = 2 * 2**20  # 8 MiB of float32 per update
UPDATES = 6
CHUNK = 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Spilled(Delivery):
    """What the AMQP consumer hands the inbox for a chunked update: a map of its spill file."""

    def __init__(self, body: memoryview, n: int) -> None:
        self.body, self.message_id, self.routing_key, self.queue = body, f"m{n}", "updates", "updates"
        self.headers, self.redelivered, self.user_id = {}, False, "site"

    def ack(self) -> None: ...
    def nack(self, reason: str) -> None: ...
    def requeue(self) -> None: ...

    def release_body(self) -> None:
        self.body = memoryview(b"")


def test_waiting_updates_cost_no_memory_and_the_loop_reads_one_at_a_time() -> None:
    signer = Signer.generate()
    trust = TrustStore()
    trust.add("site", signer.public_pem())
    weights = (("w", np.arange(PARAMS, dtype=np.float32)),)
    frame = seal(new_envelope(Update(task_id="t", weights=weights, num_examples=1, metrics={}, epsilon=None, delta=None,
                                     base_round=0), federation="f", run_id="r", round=1, sender="site",
                              recipient="coordinator"), signer)
    body = len(frame)
    pieces = [[(h, bytes(p)) for h, p in split_body(frame, chunk_size=CHUNK)] for _ in range(UPDATES)]
    del weights
    inbox = Inbox(cast(StateStore, None), federation="f", dataset="d")
    inbox.trust = trust
    reasm = Reassembler(max_bytes=2**31, max_transfer_bytes=2**31, max_user_transfers=UPDATES, spill=True)
    gc.collect()
    before = rss()
    for n, parts in enumerate(pieces):  # every update's chunks arrive before the loop takes any
        whole = None
        for h, p in parts:
            whole = reasm.add(h, p, user="site")
        assert whole is not None
        inbox.on_delivery(Spilled(whole, n))
        del whole
    queued = rss() - before
    assert queued < body // 2, f"{UPDATES} queued updates of {body >> 20} MiB added {queued / 2**20:.1f} MiB"

    held = 0
    for _ in range(UPDATES):
        inbound = inbox.next(time.time() + 5)
        assert inbound is not None and inbound.error is None, inbound
        got: Any = inbound.opened.envelope.payload.weights[0][1]
        assert got[-1] == PARAMS - 1 and got.size == PARAMS  # decoded from the map, read through
        held = max(held, rss() - before)
        inbound.delivery.release_body()
        del inbound, got
        gc.collect()
    assert held < body * 3 // 2, f"reading one of {UPDATES} updates held {held / 2**20:.1f} MiB (one is {body >> 20} MiB)"
    assert held > body // 2  # the measurement sees a body being read (else the bounds above prove nothing)
    assert rss() - before < body // 2, "a released update stays resident"
