"""The dashboard's own liveness monitor (``coordinator serve --broker``): sites read "online" or
"offline" between runs too, not "not monitored" (coordinator/liveness_monitor.py).

Which federation: ``--federation``, else the latest run's in the state. None known yet (a new
state, no ``--federation``): no monitor, said once in the log; the page keeps saying "not
monitored". Nothing here can stop the dashboard: a broker that refuses or never answers only
means no ticks, which the page reads as "not monitored".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def federation_of(state: Path, federation: str | None) -> str | None:
    """``federation`` if given, else the latest run's in ``state``."""
    if federation:
        return federation
    from fedbus.dashboard.data import StateReader

    runs = StateReader(state).runs()
    return runs[0]["federation"] if runs else None


def start_monitor(state: Path, broker: str, federation: str | None, *, tick_s: float) -> Any:
    """A started ``LivenessMonitor`` (stop it with ``.stop()``), or None when it cannot be."""
    from coordinator.liveness_monitor import LivenessMonitor
    from coordinator.state import StateStore
    from protocol.transport import open_bus

    fed = federation_of(state, federation)
    if fed is None:
        log.warning("site liveness is not monitored between runs: this state has no run yet; "
                    "start the dashboard with --federation NAME", state=str(state))
        return None
    try:
        store = StateStore(state)
    except Exception as e:  # noqa: BLE001 - a read-only state: the page says "not monitored"
        log.warning("site liveness is not monitored: cannot write the state", state=str(state), error=str(e))
        return None
    try:
        bus = open_bus(broker, connection_name=f"fedbus-dashboard-liveness-{fed}")
    except Exception as e:  # noqa: BLE001 - a bad URL was already refused by the dead-letters page's reader
        store.close()
        log.warning("site liveness is not monitored: cannot open the broker", error=str(e))
        return None
    return _Owned(LivenessMonitor(bus, store, fed, tick_s=tick_s), bus, store).start()


class _Owned:
    """The monitor with the bus and store it was given: stopping it closes them too."""

    def __init__(self, monitor: Any, bus: Any, store: Any) -> None:
        self.monitor, self.bus, self.store = monitor, bus, store

    def start(self) -> "_Owned":
        self.monitor.start()
        return self

    def stop(self) -> None:
        try:
            self.monitor.stop()
        finally:
            self.bus.close()
            self.store.close()
