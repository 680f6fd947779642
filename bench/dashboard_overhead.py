"""Does serving the dashboard slow a running federation? Round time with vs without it.

Runs the heart-failure example through ``simulate()`` (in-memory bus, production
coordinator and site workers) alternately without and with the dashboard: the server
on a thread of the same process (as ``simulate --serve`` runs it, the worst case for the
GIL) and a separate client process that polls like the run page does (the rounds
endpoint every ``--poll-s`` seconds, the full run document after every new round, and
the sites page every 10 s). Runs come in A/B pairs, the order alternating (A/B, B/A, ...),
so a shared machine's load drifts over both. Prints each mode's round time as mean ± sd
of the runs' median round times, the with/without ratio per pair (mean ± sd) and whether
it is within the 5 % target.

    python bench/dashboard_overhead.py [--repeats 4] [--rounds 10] [--poll-s 2] [--json]
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
        c.get("/api/runs")  # imports done and the server answering: a browser already open on the page
        print("ready", flush=True)
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
            child = subprocess.Popen([sys.executable, __file__, "--poller", server.base, "--poll-s", str(poll_s)],
                                     stdout=subprocess.PIPE, text=True)
            # The browser is open before the run starts: the poller's own start-up (Python, httpx)
            # is not charged to the federation's rounds. It says "ready" once it has been answered.
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the dashboard poller did not start")
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


def _ratio_ci(ratios: list[float]) -> tuple[float, float]:
    """95 % confidence interval of the pairs' geometric-mean ratio (Student t on the log ratios)."""
    import math

    logs = [math.log(x) for x in ratios]
    if len(logs) < 2:
        return ratios[0], ratios[0]
    from scipy.stats import t

    half = t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    m = statistics.fmean(logs)
    return math.exp(m - half), math.exp(m + half)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=4, help="A/B pairs")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--poller", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="one A/B pair of 2 rounds: checks the bench runs (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.repeats, a.rounds, a.poll_s = 1, 2, 0.25
    if a.poller:
        poller(a.poller, a.poll_s)
        return
    import warnings

    from protocol.logs import configure_logging

    configure_logging(mode="cli", level="warning")
    warnings.filterwarnings("ignore")
    runs: dict[str, list[float]] = {"without": [], "with": []}  # median round time of each run
    ratios: list[float] = []  # with/without within each A/B pair (the same minute of machine load)
    cpu: list[tuple[float, float]] = []
    for i in range(a.repeats):
        pair = {}
        for mode in (("without", "with") if i % 2 == 0 else ("with", "without")):  # A/B then B/A: drift hits both
            t = one_run(a.rounds, mode == "with", a.poll_s, cpu)
            pair[mode] = statistics.median(t)
            runs[mode].append(pair[mode])
            print(f"repeat {i + 1} {mode:>7} dashboard: median round {pair[mode] * 1000:7.1f} ms "
                  f"over {len(t)} rounds (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        ratios.append(pair["with"] / pair["without"])

    def spread(v: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v), "max": max(v), "n": len(v)}

    stats = {k: spread(v) for k, v in runs.items()}
    r = spread(ratios)
    mean_ratio = stats["with"]["mean"] / stats["without"]["mean"]
    lo, hi = _ratio_ci(ratios)
    verdict = "met" if hi <= TARGET else "NOT met" if lo > TARGET else "not resolved at this noise (CI spans the target)"
    busy = sum(c for c, _ in cpu) / max(1e-9, sum(w for _, w in cpu))
    doc = {"rounds_per_run": a.rounds, "repeats": a.repeats, "poll_s": a.poll_s,
           "run_median_round_s": runs, "round_s": stats, "pair_ratios": ratios, "pair_ratio": r,
           "ratio_of_means": mean_ratio, "pair_ratio_ci95": [lo, hi], "target": TARGET, "verdict": verdict,
           "dashboard_thread_cpu_share": busy, "load_average": list(os.getloadavg())}
    for k in ("without", "with"):
        st = stats[k]
        print(f"round time {k:>7} dashboard: {st['mean'] * 1000:.1f} ± {st['sd'] * 1000:.1f} ms "
              f"(mean ± sd of {st['n']} runs' medians; min {st['min'] * 1000:.1f}, max {st['max'] * 1000:.1f})")
    print(f"with/without per A/B pair: {r['mean']:.3f} ± {r['sd']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}); "
          f"geometric-mean 95 % CI [{lo:.3f}, {hi:.3f}]; ratio of means {mean_ratio:.3f}; target <= {TARGET}: {verdict}")
    print(f"dashboard thread CPU: {sum(c for c, _ in cpu):.2f} s over {sum(w for _, w in cpu):.1f} s of served runs "
          f"= {100 * busy:.2f} % of one core (load average now {os.getloadavg()[0]:.1f}: on a busy machine the "
          f"round-time ratio is noisy, this share is not)")
    if a.json:
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
