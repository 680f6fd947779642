"""Soak: many rounds with site processes under random faults; does anything grow or get lost?

A real federation (``tests/chaos/harness.py``): ``fedbus coordinator run`` plus N
``fedbus site run`` processes on RabbitMQ, each in its own RabbitMQ vhost. While the run
goes, a seeded schedule injects a fault after some rounds: ``kill -9`` of a random site
(restarted at once, its task redelivered) or every connection of the vhost force-closed.
Every process's RSS is sampled with psutil. The report gives, per process, RSS after
warm-up and at the end (growth in MB and per 100 rounds), the messages dead-lettered (by
reason), the rounds that needed a retry, and checks that no (round, site) update was
accepted twice. Not part of CI: 200 rounds x 16 sites takes a long while.

    .venv/bin/python bench/soak.py --rounds 20 --sites 4
    .venv/bin/python bench/soak.py                       # 200 rounds, 16 sites
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.harness import Federation, experiment  # noqa: E402


class RssSampler:
    """RSS of the coordinator and every site process (restarts included), every ``interval_s``."""

    def __init__(self, fed: Federation, interval_s: float = 2.0) -> None:
        self.fed = fed
        self.interval_s = interval_s
        self.samples: list[tuple[float, str, int, float]] = []  # (t, role, pid, rss MB)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self.t0 = time.monotonic()

    def start(self) -> None:
        self._t.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            procs: list[tuple[str, Any]] = []
            if self.fed.coordinator is not None:
                procs.append(("coordinator", self.fed.coordinator))
            procs += [(s.site_id, s.proc) for s in self.fed.sites if s.proc is not None]
            now = time.monotonic() - self.t0
            for role, p in procs:
                if p.poll() is not None:
                    continue
                try:
                    rss = psutil.Process(p.pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.samples.append((now, role, p.pid, rss))

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def growth(samples: list[tuple[float, str, int, float]], round_times: list[float], warmup_rounds: int) -> list[dict]:
    """Per process (role, pid): RSS once it has lived through ``warmup_rounds`` round ends
    (imports, first task, caches) vs its last sample. Zombie samples (RSS ~0) are ignored."""
    by: dict[tuple[str, int], list[tuple[float, float]]] = collections.defaultdict(list)
    for t, role, pid, rss in samples:
        if rss >= 1.0:
            by[(role, pid)].append((t, rss))
    out = []
    for (role, pid), pts in sorted(by.items(), key=lambda kv: (kv[0][0] != "coordinator", kv[0][0], kv[1][0][0])):
        born, died = pts[0][0], pts[-1][0]
        lived = [rt for rt in round_times if born <= rt <= died]
        warm_t = lived[warmup_rounds - 1] if len(lived) >= warmup_rounds else None
        after = [p for p in pts if warm_t is not None and p[0] >= warm_t]
        row = {"process": role, "pid": pid, "rss_peak_mb": max(r for _, r in pts), "rounds_lived": len(lived),
               "rss_start_mb": None, "rss_end_mb": pts[-1][1], "growth_mb": None, "rounds": 0,
               "growth_mb_per_100_rounds": None}
        if len(after) >= 2:
            rounds_seen = sum(1 for rt in round_times if after[0][0] <= rt <= after[-1][0])
            grow = after[-1][1] - after[0][1]
            row.update(rss_start_mb=after[0][1], rss_end_mb=after[-1][1], growth_mb=grow, rounds=rounds_seen,
                       growth_mb_per_100_rounds=(100 * grow / rounds_seen) if rounds_seen >= 5 else None)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--sites", type=int, default=16)
    ap.add_argument("--fault-every", type=float, default=3.0, help="mean rounds between faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--round-timeout", type=float, default=60.0)
    ap.add_argument("--broker", default=os.environ.get("FEDBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    ap.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of RSS over time")
    ap.add_argument("--smoke", action="store_true", help="2 sites, 3 rounds, a fault after round 1: checks the bench "
                                                         "runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sites, args.rounds, args.fault_every, args.round_timeout = 2, 3, 1e-9, 30.0

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=160)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fedbus-soak-"))
    faults: list[dict[str, Any]] = []
    round_end: dict[int, float] = {}
    with Federation(root, sites=args.sites, broker_url=args.broker) as fed:
        t_start = time.monotonic()
        fed.start_sites(timeout=1200)
        console.print(f"{args.sites} sites up in {time.monotonic() - t_start:.0f} s; state in {root}")
        min_fit = max(1, math.ceil(0.75 * args.sites))
        doc = experiment(rounds=args.rounds, sites=args.sites, min_fit=min_fit, round_timeout_s=args.round_timeout)
        run_id = f"soak-{fed.tag}"
        sampler = RssSampler(fed)
        sampler.start()
        fed.start_coordinator(fed.write_experiment(doc), run_id=run_id)
        next_fault = 1 + rng.expovariate(1 / args.fault_every)
        done = 0
        tick = threading.Event()
        while fed.coordinator.poll() is None:
            committed = fed.rounds_committed(run_id)
            now = time.monotonic() - sampler.t0
            for r in committed:
                round_end.setdefault(r, now)
            if len(committed) > done:
                done = len(committed)
                console.print(f"round {done}/{args.rounds} committed", end="\r")
                if done >= next_fault and done < args.rounds:
                    next_fault = done + max(1.0, rng.expovariate(1 / args.fault_every))
                    if rng.random() < 0.6:
                        site = rng.choice(fed.sites)
                        if site.alive():
                            fed.kill_site(site.site_id)
                            fed.start_site(site.site_id, wait=False)
                            faults.append({"round": done, "fault": "kill -9 + restart", "site": site.site_id})
                    else:
                        fed.close_connections("soak")
                        faults.append({"round": done, "fault": "close all connections"})
            for s in fed.sites:  # a site that died on its own is a finding; restart and record it
                if s.proc is not None and not s.alive() and s.proc.returncode not in (-9, 0):
                    faults.append({"round": done, "fault": f"site exited by itself ({s.proc.returncode})",
                                   "site": s.site_id})
                    fed.start_site(s.site_id, wait=False)
            tick.wait(0.5)
        rc, out = fed.wait_coordinator(60)
        sampler.stop()
        wall = time.monotonic() - t_start
        store = fed.store()
        rounds = store.rounds(run_id)
        updates = store.updates(run_id, kind="Update")
        store.close()
        dead = fed.dead_letters()
        accepted = [(u["round"], u["site"]) for u in updates if u["verdict"] == "accepted"]
        double = [k for k, n in collections.Counter(accepted).items() if n > 1]
        report = {
            "status": (out or {}).get("status"), "exit_code": rc, "rounds_planned": args.rounds,
            "rounds_committed": len(rounds), "sites": args.sites, "wall_s": wall,
            "round_s_median": sorted(r["wall_s"] for r in rounds)[len(rounds) // 2] if rounds else None,
            "rounds_retried": [r["round"] for r in rounds if r["attempts"] > 1],
            "partial_rounds": [{"round": r["round"], "replies": r["replies"]} for r in rounds if r["replies"] < args.sites],
            "updates_accepted": len(accepted), "accepted_twice": double,
            "verdicts": dict(collections.Counter(u["verdict"] for u in updates)),
            "dead_lettered": len(dead),
            "dead_reasons": dict(collections.Counter((d["reason"] or "none").split(":")[0] for d in dead)),
            "faults": faults,
            "memory": growth(sampler.samples, [round_end[r] for r in sorted(round_end)], max(3, args.rounds // 10)),
        }
    table = Table(title=f"soak: {report['rounds_committed']}/{args.rounds} rounds, {args.sites} sites, "
                        f"{len(faults)} faults, {wall:.0f} s")
    for col in ("process", "pid", "rounds lived", "RSS after warm-up MB", "RSS end MB", "peak MB", "growth MB",
                "rounds measured", "MB / 100 rounds"):
        table.add_column(col, justify="right")

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for m in report["memory"]:
        table.add_row(m["process"], str(m["pid"]), str(m["rounds_lived"]), f(m["rss_start_mb"], ".1f"),
                      f(m["rss_end_mb"], ".1f"), f(m["rss_peak_mb"], ".1f"), f(m["growth_mb"], "+.1f"),
                      str(m["rounds"]), f(m["growth_mb_per_100_rounds"], "+.1f"))
    console.print(table)
    console.print(f"status {report['status']} (exit {rc}); median round {report['round_s_median']}; "
                  f"retried rounds {report['rounds_retried']}; partial rounds {len(report['partial_rounds'])}")
    console.print(f"updates: {report['verdicts']}; accepted twice: {double or 'none'}")
    console.print(f"dead-lettered: {len(dead)} {report['dead_reasons']}")
    console.print(f"faults: {faults}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 5))
        series: dict[tuple[str, int], list[tuple[float, float]]] = collections.defaultdict(list)
        for t, role, pid, rss in sampler.samples:
            if rss >= 1.0:  # a killed, not yet reaped process reads 0
                series[(role, pid)].append((t, rss))
        for (role, _pid), pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=role if role == "coordinator" else None)
        for r, t in round_end.items():
            if r % max(1, args.rounds // 10) == 0:
                ax.axvline(t, color="grey", lw=0.3)
        ax.set(xlabel="seconds", ylabel="RSS (MB)", title="RSS of every process during the soak")
        ax.legend()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
    ok = report["status"] == "completed" and not double
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
