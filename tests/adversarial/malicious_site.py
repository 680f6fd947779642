"""A malicious-site harness: real keys, enrolled, signing real frames, against a real Coordinator.

``Federation`` builds a federation on the in-memory bus or on RabbitMQ: the coordinator
is ``coordinator.run.Coordinator``; sites are ``FakeSite`` (tests/coordinator/fakesites.py):
they consume their real task queue, verify the coordinator's signature, and answer with
``Update`` frames sealed by their own enrolled Ed25519 key. A malicious site gets an
``attack(site, task_env, honest_env, honest_frame)`` hook that returns the frames it
publishes instead: crafted envelopes and payloads, sealed with its real key (so they pass
the signature check and the coordinator's own checks are what refuses them), or raw
chunks published straight to the updates exchange.

Each site has its own bus connection; on the memory bus each carries its own
broker-verified ``user_id`` (the site id), as a per-site broker user does on RabbitMQ.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.state import StateStore
from protocol.codec import new_envelope
from protocol.messages import Update
from protocol.signing import Signer
from protocol.transport import open_bus
from protocol.transport.base import Topology
from protocol.transport.topology import DEAD, REASON_HEADER
from tests.coordinator.conftest import experiment  # noqa: F401  (re-exported for the tests)
from tests.coordinator.fakesites import FakeSite, seal_raw  # noqa: F401  (seal_raw re-exported)

ROWS = 100  # what every FakeSite's SiteHello announces for dataset "toy"


@dataclass
class Federation:
    bus_url: str
    state_dir: Path
    bus_opts: dict[str, Any] = field(default_factory=dict)  # the coordinator's bus (reassembly bounds ...)
    federation: str = field(default_factory=lambda: f"fed-{uuid.uuid4().hex[:8]}")
    signer: Signer = field(default_factory=Signer.generate)
    sites: list[FakeSite] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bus = open_bus(self.bus_url, **self.bus_opts)

    @property
    def memory(self) -> bool:
        return self.bus_url.startswith("memory")

    def add_site(self, offset: float, num_examples: int, *, attack=None, chunk_size: int | None = None,
                 enroll: bool = True, site_id: str | None = None, bus_url: str | None = None, **kw) -> FakeSite:
        """A FakeSite on its own connection (``bus_url``: e.g. its own provisioned broker user)."""
        sid = site_id or f"site-{len(self.sites) + 1}-{uuid.uuid4().hex[:6]}"
        opts: dict[str, Any] = {}
        if self.memory:
            opts["user"] = sid  # broker-verified sender, as with per-site broker users
        if chunk_size:
            opts["chunk_size"] = chunk_size
        site = FakeSite(sid, open_bus(bus_url or self.bus_url, **opts), self.federation, self.signer.public_pem(),
                        offset=offset, num_examples=num_examples, tamper=attack, **kw)
        if enroll:
            store = StateStore(self.state_dir)
            store.enroll(sid, site.signer.public_pem())
            store.close()
        self.sites.append(site)
        return site

    def start_sites(self) -> None:
        self.bus.declare(Topology(sites=[s.site_id for s in self.sites], federations=[self.federation]))
        for s in self.sites:
            s.start(hello=True)

    def coordinator(self, exp: dict, **kw):
        from coordinator.run import Coordinator

        kw.setdefault("sites", [s.site_id for s in self.sites])
        kw.setdefault("progress", False)
        return Coordinator(exp, bus=self.bus, state_dir=self.state_dir, signer=self.signer,
                           federation=self.federation, **kw)

    def close(self) -> None:
        for s in self.sites:
            s.stop()
            s.bus.close()
        self.bus.close()

    def dead_letters(self) -> list[tuple[str, str]]:
        """(message id, reason header) of every dead letter from this federation's updates queue."""
        if self.memory:
            from protocol.transport.memory import get_broker
            from urllib.parse import urlsplit

            return [(d.message_id, d.reason or "") for d in get_broker(urlsplit(self.bus_url).netloc).dead_letters()
                    if d.routing_key == self.federation]
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.bus_url))
        try:
            ch = conn.channel()
            out = []
            while True:  # read without acking: closing the channel gives them back
                method, props, _ = ch.basic_get(DEAD, auto_ack=False)
                if method is None:
                    break
                if method.routing_key == self.federation:
                    out.append((props.message_id or "", str((props.headers or {}).get(REASON_HEADER, ""))))
            return out
        finally:
            conn.close()


def mean_offset(result_weights, initial) -> np.ndarray:
    """How far the final model moved from the initial one, per tensor element (flattened)."""
    return np.concatenate([(np.asarray(w, np.float64) - np.asarray(r, np.float64)).ravel()
                           for (_, w), (_, r) in zip(result_weights, initial)])


def initial_weights(exp: dict):
    from protocol.config import load_experiment
    from protocol.model import build_model, to_tensors

    e = load_experiment(exp)
    return to_tensors(build_model(e.architecture.layers, seed=int(e.training.seed)))


# ---------------------------------------------------------------------------- attacks
def with_payload(site: FakeSite, task_env, honest_env, **changes) -> tuple[bytes, str]:
    """The honest Update with ``changes``, in a fresh envelope sealed by the site's real key."""
    payload = dataclasses.replace(honest_env.payload, **changes)
    env = new_envelope(payload, federation=site.federation, run_id=task_env.run_id, round=task_env.round,
                       sender=site.site_id, recipient="coordinator")
    return seal_raw(env, site.signer), env.message_id


def with_message_id(site: FakeSite, task_env, honest_env, message_id: str) -> tuple[bytes, str]:
    env = dataclasses.replace(honest_env, message_id=message_id)
    return seal_raw(env, site.signer), uuid.uuid4().hex


def claim_examples(n: int):
    """Attack: the honest update, claiming ``n`` training examples."""
    def attack(site, task_env, honest_env, frame):
        return [with_payload(site, task_env, honest_env, num_examples=n)]
    return attack


def is_update(env) -> bool:
    return isinstance(env.payload, Update)
