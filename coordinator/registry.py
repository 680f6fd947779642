"""Which sites exist (enrolled keys) and what they offer (their ``SiteHello`` catalogue)."""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

import structlog

from coordinator.state import StateStore
from protocol.messages import SiteHello

log = structlog.get_logger(__name__)


def hello_to_dict(hello: SiteHello) -> dict[str, Any]:
    d = asdict(hello)
    d["datasets"] = [dict(x, columns=list(x["columns"])) for x in d["datasets"]]
    return d


class SiteRegistry:
    """Enrolled sites and the hellos heard during this process; wakes waiters on each hello."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._heard: set[str] = set()
        self._cond = threading.Condition()

    def enrolled(self) -> list[str]:
        return [s["site_id"] for s in self.store.sites()]

    def record_hello(self, site_id: str, hello: SiteHello) -> None:
        self.store.record_hello(site_id, hello_to_dict(hello))
        with self._cond:
            self._heard.add(site_id)
            self._cond.notify_all()
        log.info("site hello", site_id=site_id, datasets=[d.name for d in hello.datasets])

    def available(self, restrict: list[str] | None = None) -> list[str]:
        """Enrolled sites that said hello (now or in an earlier session), or ``restrict`` as given."""
        if restrict is not None:
            return sorted(restrict)
        return sorted(s["site_id"] for s in self.store.sites() if s["hello"] is not None or s["site_id"] in self._heard)

    def wait_available(self, minimum: int, *, timeout_s: float, restrict: list[str] | None = None) -> list[str]:
        """Block until at least ``minimum`` sites are available or ``timeout_s`` passed; returns them."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.available(restrict)) >= minimum, timeout=timeout_s)
        return self.available(restrict)

    def wait_hello(self, site_id: str, timeout_s: float) -> bool:
        """Block until ``site_id`` has a SiteHello on record (its update may overtake its hello)."""
        def known() -> bool:
            s = self.store.site(site_id)
            return bool(s and s["hello"] is not None)

        with self._cond:
            return self._cond.wait_for(known, timeout=timeout_s)

    def catalogue(self) -> list[dict[str, Any]]:
        """One row per (site, dataset) offered; sites without a hello appear with no dataset."""
        rows = []
        for s in self.store.sites():
            hello = s["hello"] or {}
            datasets = hello.get("datasets") or [None]
            for d in datasets:
                rows.append(
                    {
                        "site_id": s["site_id"],
                        "kid": s["kid"],
                        "software_version": hello.get("software_version"),
                        "hello_at": s["hello_at"],
                        "dataset": d["name"] if d else None,
                        "rows": d["rows"] if d else None,
                        "columns": len(d["columns"]) if d else None,
                        "target": d["target"] if d else None,
                    }
                )
        return rows
