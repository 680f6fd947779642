"""A small federation for coordinator tests: memory bus, enrolled fake sites, tiny model."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.state import StateStore
from protocol.signing import Signer
from protocol.transport import open_bus
from tests.coordinator.fakesites import FakeSite


def experiment(*, rounds: int = 2, name: str = "FedAvg", parameters: dict | None = None, **federated) -> dict:
    params = {"min_fit_clients": 2, "min_available_clients": 2, "fraction_eval": 0.0}
    params.update(parameters or {})
    return {
        "basic_info": {"name": "toy"},
        "architecture": {"layers": [
            {"type": "input", "params": {"features": 3}},
            {"type": "Linear", "params": {"in_features": 3, "out_features": 2}},
            {"type": "ReLU"},
            {"type": "Linear", "params": {"in_features": 2, "out_features": 1}},
            {"type": "output", "params": {"features": 1}},
        ]},
        "training": {"loss_function": "bce_with_logits", "epochs": 1, "batch_size": 8, "rounds": rounds, "seed": 3},
        "dataset": {"name": "toy", "target": "y"},
        "federated": {"name": name, "parameters": params, "round_timeout_s": 10, **federated},
    }


@dataclass
class Federation:
    bus_url: str
    bus: object
    state_dir: Path
    federation: str
    signer: Signer
    sites: list[FakeSite] = field(default_factory=list)

    def add_site(self, offset: float, num_examples: int, *, enroll: bool = True, start: bool = True, **kw) -> FakeSite:
        sid = f"site-{len(self.sites) + 1}-{uuid.uuid4().hex[:6]}"
        site = FakeSite(sid, open_bus(self.bus_url), self.federation, self.signer.public_pem(), offset=offset,
                        num_examples=num_examples, **kw)
        if enroll:
            store = StateStore(self.state_dir)
            store.enroll(sid, site.signer.public_pem())
            store.close()
        self.sites.append(site)
        return site

    def start_sites(self) -> None:
        from protocol.transport.base import Topology

        # what `fedbus broker provision` does in production: queues exist before sites connect
        self.bus.declare(Topology(sites=[s.site_id for s in self.sites], federations=[self.federation]))
        for s in self.sites:
            s.start(hello=True)

    def coordinator(self, exp: dict, **kw):
        from coordinator.run import Coordinator

        kw.setdefault("sites", [s.site_id for s in self.sites])
        kw.setdefault("progress", False)
        return Coordinator(exp, bus=self.bus, state_dir=self.state_dir, signer=self.signer,
                           federation=self.federation, **kw)


@pytest.fixture
def amqp_federation(tmp_path, amqp_url):
    fed = Federation(bus_url=amqp_url, bus=open_bus(amqp_url), state_dir=tmp_path / "amqp-state",
                     federation=f"fed-{uuid.uuid4().hex[:8]}", signer=Signer.generate())
    yield fed
    for s in fed.sites:
        s.stop()
        s.bus.close()
    fed.bus.close()


@pytest.fixture
def federation(tmp_path):
    url = f"memory://coord-{uuid.uuid4().hex[:8]}"
    fed = Federation(bus_url=url, bus=open_bus(url), state_dir=tmp_path / "state",
                     federation=f"fed-{uuid.uuid4().hex[:8]}", signer=Signer.generate())
    yield fed
    for s in fed.sites:
        s.stop()
    fed.bus.close()
