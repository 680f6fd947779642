"""``fedbus simulate EXPERIMENT.json --cohort-only``: the cohort table of a simulated federation.

The production site workers answer the production coordinator's ``StatsTask`` (in this
process on the in-memory bus, or one OS process per site on RabbitMQ); nothing is trained.
Each simulated site's policy is the default ``stats = "dp"``, so the table is what a hospital
with the default policy would release, charged to each site's ledger.
"""

from __future__ import annotations

import time
from typing import Any

from protocol.config import Experiment


def run_cohort(exp: Experiment, ws: Any, *, memory: bool, url: str, federation: str, bins: int,
               timeout_s: float = 120.0) -> dict[str, Any]:
    """The cohort document (``coordinator.cohort``), kept in the workspace's coordinator state."""
    from coordinator.cohort import CohortCollector
    from protocol.signing import Signer
    from simulator.faults import FaultLog, parse_faults
    from simulator.federation import running

    t0 = time.perf_counter()
    with running(ws, memory=memory, url=url, federation=federation, plan=parse_faults(None, seed=0),
                 fault_log=FaultLog()) as live:
        collector = CohortCollector(exp, bus=live.bus, state_dir=ws.coordinator_state,
                                    signer=Signer.from_file(ws.coordinator_key), federation=federation,
                                    sites=sorted(ws.sites), bins=bins, timeout_s=timeout_s)
        doc = collector.collect()
    doc["wall_s"] = time.perf_counter() - t0
    return doc
