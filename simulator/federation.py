"""Starting and stopping the site workers of a simulated federation.

Two ways, both running the production ``SiteWorker`` unchanged:

* ``MemoryFederation`` - every site in this process, on a private in-memory broker
  (``memory://sim-<uuid>``); faults wrap each affected site's bus (``FaultyBus``).
* ``ProcessFederation`` - one OS process per site against a real broker: exactly
  ``fedbus site run --config SITE.toml``, or, for a site with injected faults,
  ``python -m simulator.site_process`` (the same daemon with a ``FaultyBus``).

The coordinator runs in the simulator's process in both cases (``run.simulate``). ``running``
starts and stops either kind around a simulated run or a cohort (one start and stop for both).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from protocol.transport import open_bus
from protocol.transport.base import Bus, BusError, Topology
from simulator.faults import FaultLog, FaultPlan, FaultyBus
from simulator.workspace import Workspace

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class MemoryFederation:
    """All site workers in this process, sharing one named in-memory broker."""

    def __init__(self, ws: Workspace, *, url: str, federation: str, plan: FaultPlan, fault_log: FaultLog) -> None:
        self.ws = ws
        self.url = url
        self.federation = federation
        self.plan = plan
        self.fault_log = fault_log
        self.workers: list[Any] = []
        self._buses: list[Bus] = []
        self._stop = threading.Event()

    def declare(self, bus: Bus) -> None:
        bus.declare(Topology(sites=sorted(self.ws.sites), federations=[self.federation]))

    def start(self) -> None:
        from protocol.signing import Signer, TrustStore
        from site_worker.config import load_site_config
        from site_worker.daemon import COORDINATOR, SiteWorker

        coordinator_pub = self.ws.coordinator_pub.read_bytes()
        for site in sorted(self.ws.sites):
            files = self.ws.sites[site]
            cfg = load_site_config(files.config)
            bus: Bus = open_bus(self.url)
            self._buses.append(bus)
            if self.plan.affects(site):
                trust = TrustStore()
                trust.add(COORDINATOR, coordinator_pub)
                bus = FaultyBus(bus, site_id=site, plan=self.plan, signer=Signer.from_file(files.key), trust=trust,
                                stop=self._stop, fault_log=self.fault_log)
            worker = SiteWorker(cfg, bus=bus)
            worker.start()
            self.workers.append(worker)

    def stop(self) -> None:
        self._stop.set()  # wakes stragglers sleeping on a delay
        for w in self.workers:
            try:
                w.stop(grace_s=2.0)
            except Exception as e:  # noqa: BLE001 - one stuck worker must not keep the others running
                log.warning("site_stop_failed", site_id=w.config.site_id, error=str(e))
        for b in self._buses:
            try:
                b.close()
            except BusError:
                pass


class ProcessFederation:
    """One ``fedbus site run`` OS process per site, against a real broker."""

    def __init__(self, ws: Workspace, *, url: str, federation: str, plan: FaultPlan) -> None:
        self.ws = ws
        self.url = url
        self.federation = federation
        self.plan = plan
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    def declare(self, bus: Bus) -> None:
        bus.declare(Topology(sites=sorted(self.ws.sites), federations=[self.federation]))

    def command(self, site: str) -> list[str]:
        cfg = str(self.ws.sites[site].config)
        if self.plan.affects(site):
            return [sys.executable, "-m", "simulator.site_process", "--config", cfg,
                    "--faults", json.dumps(self.plan.to_json()),
                    "--coordinator-pub", str(self.ws.coordinator_pub)]
        return [sys.executable, "-m", "fedbus.cli", "site", "run", "--config", cfg]

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("OMP_NUM_THREADS", "1")  # N trainers on a few cores: no oversubscription
        for site in sorted(self.ws.sites):
            logf = open(self.ws.sites[site].config.parent / "site.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(logf)
            self.procs[site] = subprocess.Popen(
                self.command(site), cwd=str(REPO_ROOT), env=env, stdout=logf, stderr=subprocess.STDOUT
            )
        log.info("site_processes_started", sites=len(self.procs))

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until every site process has announced itself (its log says ``site_started``).

        Site processes import torch and Opacus before they can take a task; starting the
        coordinator's round clock before that would count start-up as a missed deadline.
        """
        pending = set(self.procs)
        deadline = time.monotonic() + timeout_s
        tick = threading.Event()
        while pending:
            for site in sorted(pending):
                logf = self.ws.sites[site].config.parent / "site.log"
                if b'"site_started"' in logf.read_bytes():
                    pending.discard(site)
                elif self.procs[site].poll() is not None:
                    tail = logf.read_bytes()[-2000:].decode("utf-8", "replace")
                    raise RuntimeError(f"site process {site} exited with {self.procs[site].returncode}:\n{tail}")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"site processes not up after {timeout_s:.0f} s: {sorted(pending)}")
            if pending:
                tick.wait(0.2)

    def fault_events(self) -> list[dict[str, Any]]:
        """Faults the site processes injected, read back from their JSON log lines."""
        events: list[dict[str, Any]] = []
        for site in sorted(self.procs):
            logf = self.ws.sites[site].config.parent / "site.log"
            if not logf.exists():
                continue
            for line in logf.read_text(encoding="utf-8", errors="replace").splitlines():
                if '"fault_injected"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                events.append({k: rec[k] for k in ("kind", "site", "round", "delay_s", "mode", "factor") if k in rec})
        return events

    def alive(self) -> dict[str, bool]:
        return {s: p.poll() is None for s, p in self.procs.items()}

    def stop(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for site, p in self.procs.items():
            try:
                codes[site] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("site_process_killed", site_id=site)
                p.kill()
                codes[site] = p.wait()
        for f in self._logs:
            f.close()
        return codes


@dataclass
class Running:
    """A started federation (``running``): the coordinator's bus, the sites, and how long they took."""

    bus: Bus
    fed: MemoryFederation | ProcessFederation
    sites_start_s: float = 0.0
    sites_stop_s: float = 0.0


@contextmanager
def running(ws: Workspace, *, memory: bool, url: str, federation: str, plan: FaultPlan,
            fault_log: FaultLog) -> Iterator[Running]:
    """The simulated sites started and ready, with the coordinator's bus open; on the way out the sites
    stop, their fault events join ``fault_log``, the run's queues go (RabbitMQ) or the private broker
    (memory). The one start and stop for a simulated run (``run.simulate``) and a cohort (``cohort``)."""
    from simulator.errors import SimulationFailed

    fed: MemoryFederation | ProcessFederation = (
        MemoryFederation(ws, url=url, federation=federation, plan=plan, fault_log=fault_log) if memory
        else ProcessFederation(ws, url=url, federation=federation, plan=plan))
    bus = open_bus(url)
    out = Running(bus=bus, fed=fed)
    t0 = time.perf_counter()
    try:
        fed.declare(bus)
        fed.start()
        if isinstance(fed, ProcessFederation):
            try:
                fed.wait_ready()
            except RuntimeError as e:
                raise SimulationFailed(str(e)) from None
        out.sites_start_s = time.perf_counter() - t0
        yield out
    finally:
        t_stop = time.perf_counter()
        fed.stop()
        out.sites_stop_s = time.perf_counter() - t_stop
        if isinstance(fed, ProcessFederation):
            fault_log.events.extend(fed.fault_events())
            delete_run_queues(bus, sites=sorted(ws.sites), federation=federation)
        try:
            bus.close()
        except Exception:  # noqa: BLE001
            pass
        if memory:
            from protocol.transport.memory import drop_broker

            drop_broker(urlsplit(url).netloc)


def delete_run_queues(bus: Bus, *, sites: list[str], federation: str) -> None:
    """Leave the broker as we found it: the run's queues are simulation-only (use a dedicated vhost
    on a broker that real sites share, so simulated site ids never meet real ones)."""
    from protocol.transport.base import BrokerUnreachable
    from protocol.transport.topology import control_queue, liveness_queue, site_queue, updates_queue

    delete = getattr(bus, "delete_queue", None)
    if delete is None:
        return
    for name in [*(site_queue(s) for s in sites), updates_queue(federation), control_queue(federation),
                  liveness_queue(federation)]:
        try:
            delete(name)
        except BrokerUnreachable:
            return  # never connected: nothing to clean up, and the error is reported once
        except Exception as e:  # noqa: BLE001 - cleanup must not turn a finished run into a failure
            log.warning("queue_not_deleted", queue=name, error=str(e))
