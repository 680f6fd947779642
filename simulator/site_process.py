"""A site worker process with injected faults: ``fedbus site run`` plus a ``FaultyBus``.

Used by the multi-process simulator only for sites named in ``--faults``; every other
site runs the plain ``fedbus site run --config``. The daemon code is the production
one; only its bus is wrapped, and "crash" means SIGKILL of this very process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulator.site_process")
    ap.add_argument("--config", required=True)
    ap.add_argument("--faults", required=True, help="FaultPlan as JSON")
    ap.add_argument("--coordinator-pub", required=True)
    args = ap.parse_args(argv)

    from protocol.logs import configure_logging
    from protocol.signing import Signer, TrustStore
    from protocol.transport import open_bus
    from simulator.faults import FaultPlan, FaultyBus
    from site_worker.config import load_site_config
    from site_worker.daemon import COORDINATOR, SiteWorker

    cfg = load_site_config(args.config)
    configure_logging(mode="daemon", level=cfg.log_level)
    plan = FaultPlan.from_json(json.loads(args.faults))
    trust = TrustStore()
    trust.add(COORDINATOR, Path(args.coordinator_pub).read_bytes())
    stop = threading.Event()
    inner = open_bus(cfg.broker_url, heartbeat=cfg.heartbeat_s)
    bus = FaultyBus(inner, site_id=cfg.site_id, plan=plan, signer=Signer.from_file(cfg.key_path), trust=trust,
                    stop=stop, on_crash=lambda: os.kill(os.getpid(), signal.SIGKILL))
    worker = SiteWorker(cfg, bus=bus)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.start()
    while not stop.wait(3600):
        pass
    worker.stop(grace_s=cfg.grace_s)
    inner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
