"""``fedbus simulate EXPERIMENT.json --cohort-only``: the cohort table of a simulated federation.

The production site workers answer the production coordinator's ``StatsTask`` (in this
process on the in-memory bus, or one OS process per site on RabbitMQ); nothing is trained.
Each simulated site's policy is the default ``stats = "dp"``, so the table is what a hospital
with the default policy would release, charged to each site's ledger.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from protocol.config import Experiment


def run_cohort(exp: Experiment, ws: Any, *, memory: bool, url: str, federation: str, bins: int,
               timeout_s: float = 120.0) -> dict[str, Any]:
    """The cohort document (``coordinator.cohort``), kept in the workspace's coordinator state."""
    from coordinator.cohort import CohortCollector
    from protocol.signing import Signer
    from protocol.transport import open_bus
    from simulator.faults import FaultLog, parse_faults
    from simulator.federation import MemoryFederation, ProcessFederation
    from simulator.run import SimulationFailed, _delete_run_queues

    plan = parse_faults(None, seed=0)
    fed: Any = (MemoryFederation(ws, url=url, federation=federation, plan=plan, fault_log=FaultLog()) if memory
                else ProcessFederation(ws, url=url, federation=federation, plan=plan))
    bus = open_bus(url)
    t0 = time.perf_counter()
    try:
        fed.declare(bus)
        fed.start()
        if not memory:
            try:
                fed.wait_ready()
            except RuntimeError as e:
                raise SimulationFailed(str(e)) from None
        collector = CohortCollector(exp, bus=bus, state_dir=ws.coordinator_state,
                                    signer=Signer.from_file(ws.coordinator_key), federation=federation,
                                    sites=sorted(ws.sites), bins=bins, timeout_s=timeout_s)
        doc = collector.collect()
    finally:
        fed.stop()
        if not memory:
            _delete_run_queues(bus, sites=sorted(ws.sites), federation=federation)
        try:
            bus.close()
        except Exception:  # noqa: BLE001
            pass
        if memory:
            from protocol.transport.memory import drop_broker

            drop_broker(urlsplit(url).netloc)
    doc["wall_s"] = time.perf_counter() - t0
    return doc
