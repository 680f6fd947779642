"""Does serving the dashboard slow a running federation? Round time with vs without it.

Runs the heart-failure example through ``simulate()`` (in-memory bus, production
coordinator and site workers) alternately without and with the dashboard: the server
on a thread of the same process (as ``simulate --serve`` runs it, the worst case for the
GIL) and a separate client process that polls like the run page does (the rounds
endpoint every ``--poll-s`` seconds, the full run document after every new round, and
the sites page every 10 s). Prints the median round wall time of each, their ratio
and whether it is within the 5 % target.

    python bench/dashboard_overhead.py [--repeats 3] [--rounds 10] [--poll-s 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 1.05


def poller(base: str, poll_s: float) -> None:
    """What the run page does while a run is live (a child process, like a browser)."""
    import httpx

    with httpx.Client(base_url=base, timeout=30) as c:
        run_id, last, sites_at = None, 0, 0.0
        while True:
            if run_id is None:
                runs = c.get("/api/runs?status=running").json()["runs"]
                run_id = runs[0]["run_id"] if runs else None
            else:
                doc = c.get(f"/api/runs/{run_id}/rounds?after={last}").json()
                if doc["rounds"]:
                    last = doc["rounds"][-1]["round"]
                    c.get(f"/api/runs/{run_id}")
            if time.monotonic() - sites_at > 10:
                c.get("/api/sites")
                sites_at = time.monotonic()
            time.sleep(poll_s)


def _thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) the OS has charged to one thread of this process."""
    import psutil

    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return 0.0


def one_run(rounds: int, served: bool, poll_s: float, cpu: list[tuple[float, float]]) -> list[float]:
    from fedbus.dashboard.server import BackgroundServer, ServeOptions
    from simulator.run import simulate

    with tempfile.TemporaryDirectory(prefix="fedbus-dash-bench-") as tmp:
        out = Path(tmp) / "out"
        server = child = None
        if served:
            (out / "coordinator").mkdir(parents=True)
            server = BackgroundServer(ServeOptions(state=out / "coordinator", port=0, poll_s=poll_s)).start()
            child = subprocess.Popen([sys.executable, __file__, "--poller", server.base, "--poll-s", str(poll_s)])
        t0 = time.monotonic()
        try:
            doc = simulate(ROOT / "examples" / "heart_failure.json", sites=3, rounds=rounds, out=out, progress=False)
            if server is not None:  # the server thread's own CPU: a load-independent bound on its cost
                cpu.append((_thread_cpu_s(server.thread.native_id), time.monotonic() - t0))
        finally:
            if child is not None:
                child.terminate()
                child.wait(10)
            if server is not None:
                server.stop()
    return [r["wall_s"] for r in doc["rounds"][1:]]  # round 1 warms up caches and threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--poller", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.poller:
        poller(a.poller, a.poll_s)
        return
    import warnings

    from fedbus.logs import configure_logging

    configure_logging(mode="cli", level="warning")
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {"without": [], "with": []}
    cpu: list[tuple[float, float]] = []
    for i in range(a.repeats):
        for mode in (("without", "with") if i % 2 == 0 else ("with", "without")):  # ABBA: drift hits both
            t = one_run(a.rounds, mode == "with", a.poll_s, cpu)
            times[mode].extend(t)
            print(f"repeat {i + 1} {mode:>7} dashboard: median round {statistics.median(t) * 1000:7.1f} ms "
                  f"over {len(t)} rounds", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["with"] / med["without"]
    busy = sum(c for c, _ in cpu) / max(1e-9, sum(w for _, w in cpu))
    doc = {"rounds_per_run": a.rounds, "repeats": a.repeats, "poll_s": a.poll_s,
           "median_round_s": med, "ratio": ratio, "target": TARGET, "within_target": ratio <= TARGET,
           "dashboard_thread_cpu_share": busy, "load_average": list(os.getloadavg())}
    print(f"median round time without dashboard: {med['without'] * 1000:.1f} ms")
    print(f"median round time with dashboard + poller: {med['with'] * 1000:.1f} ms")
    print(f"ratio with/without: {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    print(f"dashboard thread CPU: {sum(c for c, _ in cpu):.2f} s over {sum(w for _, w in cpu):.1f} s of served runs "
          f"= {100 * busy:.2f} % of one core (load average now {os.getloadavg()[0]:.1f}: on a busy machine the "
          f"round-time ratio is noise, this share is not)")
    if a.json:
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
