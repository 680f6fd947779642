"""How round time and coordinator memory grow with the number of sites and the model size.

Three sweeps, each running the production ``Coordinator``:

* **sites, in memory** (1, 10, 100, 1,000): coordinator and *echo sites* (``bench/_echo_sites.py``:
  verify, answer, sign, publish; no training) in one process on the in-memory bus, one fresh
  process per point so its peak RSS (``VmHWM``) belongs to that point alone;
* **sites, RabbitMQ processes** (1, 2, 4, 8, 16): ``fedbus coordinator run`` plus that many real
  ``fedbus site run`` processes (DP training of the heart-failure MLP), coordinator peak RSS
  sampled from ``/proc``;
* **model size, RabbitMQ** (10 K, 100 K, 1 M, 10 M, 50 M parameters, or ``--sizes``; frames over
  8 MiB travel chunked) with 3 echo sites (``--sites 3,10``), each its own process logged in as
  its own broker user (``provision``, as deployed sites are; deleted after the point), and
  ``fedbus coordinator run`` as a child process. Per point: ``params``, ``model_mb``, ``sites``,
  ``round_s`` (median), ``coordinator_peak_rss_mb`` (VmHWM), ``coordinator_egress_mb_per_round``
  (the coordinator's bytes to the broker, from the kernel's socket counters, over the rounds) and
  ``raw_pika_s`` (bare pika moving the same bytes: ``sites`` model-sized frames down, the same up).

Prints a rich table (stderr), writes a PNG (matplotlib Agg) to ``--out`` and, with ``--json``,
the figures as JSON. ``--quick`` runs a reduced sweep. Expected: cost linear in
sites x model bytes; the ``per site·MB`` column shows where it is not.

    .venv/bin/python bench/scale.py --quick
    .venv/bin/python bench/scale.py --out bench/out/scale.png --json bench/out/scale.json
    .venv/bin/python bench/scale.py --only model --sizes 1e6,1e7 --sites 3,10 --json OUT.json
    .venv/bin/python bench/scale.py --smoke           # seconds: checks the bench still runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
HIDDEN_FOR = {10_000: 714, 100_000: 7_143, 1_000_000: 71_429, 10_000_000: 714_286, 50_000_000: 3_571_429,
              100_000_000: 7_142_857}


def hidden_for(params: int) -> int:
    """Hidden width giving about ``params`` parameters (12 -> hidden -> 1 has 14·hidden + 1)."""
    return HIDDEN_FOR.get(params) or max(1, round((params - 1) / 14))


def nominal_size(params: int) -> int:
    """The sweep size (10 K, 100 K, ...) a measured parameter count belongs to."""
    return min(HIDDEN_FOR, key=lambda k: abs(k - params))


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class PeakRss:
    """Samples a process's peak RSS (VmHWM, kernel-kept) until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            v = _status_kb(self.pid, "VmHWM")
            if v:
                self.peak_kb = max(self.peak_kb, v)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak_kb / 1024


ROUND_TIMEOUT_S = 600.0  # --smoke: 20 s, so a bench whose rounds cannot complete fails in a minute, not hangs


def model_experiment(*, rounds: int, sites: int, hidden: int | None, round_timeout_s: float | None = None) -> dict[str, Any]:
    """Heart-failure experiment; ``hidden`` swaps the MLP for 12 -> hidden -> 1 (≈ 14·hidden parameters)."""
    round_timeout_s = ROUND_TIMEOUT_S if round_timeout_s is None else round_timeout_s
    from tests.chaos.harness import experiment

    layers = None
    if hidden is not None:
        layers = [
            {"type": "input", "params": {"features": 12}},
            {"type": "Linear", "params": {"in_features": 12, "out_features": hidden}},
            {"type": "ReLU", "params": {}},
            {"type": "Linear", "params": {"in_features": hidden, "out_features": 1}},
            {"type": "output", "params": {"features": 1}},
        ]
    doc = experiment(rounds=rounds, sites=sites, round_timeout_s=round_timeout_s, layers=layers)
    doc["federated"]["parameters"]["fraction_eval"] = 0.0
    # Echo sites do not train, so no site DP: with it the coordinator's privacy plan imports Opacus
    # (and torch with it) for its accountant, which is the plan's cost, not the model transfer's.
    doc["training"]["optimizer"].pop("differential_privacy", None)
    return doc


def parameter_count(doc: dict[str, Any]) -> int:
    from protocol.config import load_experiment
    from protocol.model import summarize

    return int(summarize(load_experiment(doc).architecture.layers).parameters)


# ----------------------------------------------------------------------------- points


def point_memory(sites: int, rounds: int, hidden: int | None) -> dict[str, Any]:
    """One in-memory point (run in a fresh process by ``--point``)."""
    from bench._echo_sites import EchoSite, make_keys
    from coordinator.run import Coordinator
    from coordinator.state import StateStore
    from protocol.logs import configure_logging
    from protocol.signing import Signer, generate_keypair
    from protocol.transport import open_bus
    from protocol.transport.base import Topology

    configure_logging("cli", level="warning")
    root = Path(tempfile.mkdtemp(prefix="fedbus-scale-"))
    tag = uuid.uuid4().hex[:8]
    fed, url = f"scale-{tag}", f"memory://scale-{tag}"
    ids = [f"s{i:04d}-{tag}" for i in range(sites)]
    signers = make_keys(root / "keys", ids)
    ckey, cpub = generate_keypair("coordinator", root / "keys")
    store = StateStore(root / "coord")
    for s in ids:
        store.enroll(s, (root / "keys" / f"{s}.pub").read_bytes())
    store.close()
    bus = open_bus(url)
    bus.declare(Topology(sites=ids, federations=[fed]))
    echo = [EchoSite(bus, site_id=s, signer=signers[s], federation=fed, coordinator_pub=cpub.read_bytes()) for s in ids]
    for e in echo:
        e.start()
    doc = model_experiment(rounds=rounds, sites=sites, hidden=hidden)
    from protocol.config import load_experiment
    from protocol.model import build_model

    build_model(load_experiment(doc).architecture.layers, seed=0)  # torch loaded before the baseline
    before = _status_kb(os.getpid(), "VmRSS") / 1024
    t0 = time.perf_counter()
    result = Coordinator(doc, bus=bus, state_dir=root / "coord", signer=Signer.from_file(ckey), federation=fed,
                         sites=ids, progress=False).run()
    wall = time.perf_counter() - t0
    peak = _status_kb(os.getpid(), "VmHWM") / 1024
    for e in echo:
        e.stop()
    shutil.rmtree(root, ignore_errors=True)
    if not result.ok:
        raise RuntimeError(f"memory point sites={sites} failed: {result.reason}")
    return {"sweep": "memory-sites", "sites": sites, "params": parameter_count(doc),
            "round_s": statistics.median(r["wall_s"] for r in result.rounds), "wall_s": wall,
            "peak_rss_mb": peak, "rss_increase_mb": peak - before}


def run_point_process(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(Path(__file__)), "--point", json.dumps(spec)], cwd=str(REPO), env=env,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"point {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _coordinator(fed: Any, doc: dict[str, Any], run_id: str, timeout: float) -> tuple[dict[str, Any], float]:
    proc = fed.start_coordinator(fed.write_experiment(doc, f"{run_id}.json"), run_id=run_id)
    peak = PeakRss(proc.pid)
    try:
        rc, out = fed.wait_coordinator(timeout)
    finally:
        mb = peak.stop()
    if rc != 0 or not out or out.get("status") != "completed":
        raise RuntimeError(f"coordinator run {run_id} failed ({rc}):\n{fed.diagnostics()}")
    return out, mb


def point_processes(sites: int, rounds: int, broker: str) -> dict[str, Any]:
    from tests.chaos.harness import Federation

    root = Path(tempfile.mkdtemp(prefix="fedbus-scale-"))
    with Federation(root, sites=sites, broker_url=broker) as fed:
        t0 = time.perf_counter()
        fed.start_sites(timeout=900)
        start_s = time.perf_counter() - t0
        doc = model_experiment(rounds=rounds, sites=sites, hidden=None)
        out, mb = _coordinator(fed, doc, f"scale-{fed.tag}", timeout=900)
    shutil.rmtree(root, ignore_errors=True)
    rounds_ = out["rounds"]
    train = [r["wall_s"] for r in rounds_]
    return {"sweep": "amqp-sites", "sites": sites, "params": parameter_count(doc),
            "round_s": statistics.median(train), "train_s": out["timing"]["train_s"] / max(1, len(rounds_)),
            "peak_rss_mb": mb, "sites_start_s": start_s}


class SocketBytes:
    """Bytes one process sent and received on its TCP connections to ``port`` (the broker), read
    from the kernel's per-socket counters (``ss -ti``: ``bytes_acked`` / ``bytes_received``) every
    50 ms until it exits. Connections that close keep their last reading; what a socket moves in
    its final 50 ms before the process exits is missed (the run's last small messages)."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.series: list[tuple[float, int, int]] = []  # (time.time(), bytes sent, bytes received) so far
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def sample(self) -> None:
        import re

        try:
            out = subprocess.run(["ss", "-tinpH", "state", "established", f"( dport = :{self.port} )"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        lines = out.splitlines()
        for head, info in zip(lines[::2], lines[1::2]):
            if f"pid={self.pid}," not in head:
                continue
            local = head.split()[2]
            for key, store in (("bytes_acked", self.sent), ("bytes_received", self.received)):
                m = re.search(rf"\b{key}:(\d+)", info)
                if m:
                    store[local] = max(store.get(local, 0), int(m.group(1)))

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()
            sent, received = sum(self.sent.values()), sum(self.received.values())
            if not self.series or self.series[-1][1:] != (sent, received):
                self.series.append((time.time(), sent, received))

    def stop(self) -> tuple[int, int]:
        """(bytes sent, bytes received) over every connection seen."""
        self._stop.set()
        self._t.join()
        return sum(self.sent.values()), sum(self.received.values())


def raw_pika_s(url: str, frame_bytes: int, copies: int) -> float:
    """Bare pika moving one round's bytes: ``copies`` frames of ``frame_bytes`` from one publisher
    to a consumer (the tasks), then the same back (the updates); persistent, publisher confirms,
    in chunks of at most the bus's chunk size (RabbitMQ 4 refuses messages over 16 MiB)."""
    from bench.bus_throughput import raw_run
    from protocol.transport import open_bus
    from protocol.transport.base import DEFAULT_CHUNK_SIZE, Topology
    from protocol.transport.topology import site_queue

    chunks = max(1, -(-frame_bytes // DEFAULT_CHUNK_SIZE))
    body = os.urandom(-(-frame_bytes // chunks))
    queue = f"rawpika-{uuid.uuid4().hex[:8]}"
    admin = open_bus(url)
    admin.declare(Topology(sites=[queue]))
    try:
        return sum(raw_run(url, queue, body, copies * chunks) for _direction in ("tasks", "updates"))
    finally:
        admin.delete_queue(site_queue(queue))  # type: ignore[attr-defined]
        admin.close()


def point_model(params: int, sites: int, rounds: int, broker: str, *, hidden: int | None = None,
                logs: Path | None = None) -> dict[str, Any]:
    """One model-size point on RabbitMQ: ``fedbus coordinator run`` (a child process: its peak RSS
    and its bytes to and from the broker are its own) and ``sites`` echo sites, each its own process
    (as deployed sites are: their hashing, signing and publishing do not share one GIL)."""
    from urllib.parse import urlsplit

    from bench._echo_sites import EchoProcess
    from protocol.transport.provision import deprovision, provision, user_url
    from tests.chaos.harness import Federation

    root = Path(tempfile.mkdtemp(prefix="fedbus-scale-"))
    doc = model_experiment(rounds=rounds, sites=sites, hidden=hidden or hidden_for(params))
    n = parameter_count(doc)
    with Federation(root, sites=sites, broker_url=broker) as fed:
        raw_s = raw_pika_s(fed.url, n * 4, sites)
        # Each echo site logs in as its own broker user, as `fedbus broker provision` makes them (user =
        # site id, least privilege): the coordinator's reassembly quotas are per broker user, so sites
        # sharing the bench's admin user would queue behind one another's updates, as no deployment does.
        creds = provision(fed.url, sites=fed.site_ids)
        echo: list[EchoProcess] = []
        timelines: dict[str, dict[str, Any]] = {}
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        try:
            echo += [EchoProcess(url=user_url(fed.url, s, creds.passwords[s]), site_id=s, key=fed.keys / f"{s}.key",
                                 federation=fed.federation, coordinator_pub=fed.coordinator_pub,
                                 dataset=doc["dataset"]["name"], root=root / "echo", env=env, cwd=REPO)
                     for s in fed.site_ids]
            for e in echo:
                e.wait_ready()
            proc = fed.start_coordinator(fed.write_experiment(doc, f"scale-{fed.tag}.json"), run_id=f"scale-{fed.tag}")
            peak, wire = PeakRss(proc.pid), SocketBytes(proc.pid, urlsplit(fed.url).port or 5672)
            try:
                rc, out = fed.wait_coordinator(1800)
            finally:
                mb, (sent, received) = peak.stop(), wire.stop()
            if rc != 0 or not out or out.get("status") != "completed":
                raise RuntimeError(f"coordinator run failed ({rc}):\n{fed.diagnostics()}")
            log_text = fed.coordinator_log.read_text(errors="replace")
        finally:
            for e in echo:
                timelines[e.site_id] = e.stop()
            deprovision(fed.url, sorted(creds.passwords))
        if logs is not None:  # the coordinator's own timeline (where a round's time goes)
            logs.mkdir(parents=True, exist_ok=True)
            name = f"{params}x{sites}"
            shutil.copy(fed.coordinator_log, logs / f"coordinator-{name}.log")
            (logs / f"timeline-{name}.json").write_text(json.dumps({
                "coordinator_wire": wire.series,
                "sites": {s: {"chunks": t.get("chunks", []), "tasks": t.get("tasks", [])} for s, t in timelines.items()}}))
    shutil.rmtree(root, ignore_errors=True)  # checkpoints and stored bodies: GBs at 50 M parameters
    model_mb = n * 4 / 2**20
    done = max(1, len(out["rounds"]))
    return {"sweep": "amqp-model", "sites": sites, "params": n, "model_mb": model_mb,
            "round_s": statistics.median(r["wall_s"] for r in out["rounds"]), "rounds": done,
            "coordinator_peak_rss_mb": mb, "peak_rss_mb": mb,
            "coordinator_egress_mb_per_round": sent / 2**20 / done,
            "coordinator_ingress_mb_per_round": received / 2**20 / done,
            "egress_over_model": sent / 2**20 / done / model_mb,
            "raw_pika_s": raw_s, "round_over_raw_pika": statistics.median(r["wall_s"] for r in out["rounds"]) / raw_s,
            "round_s_each": [r["wall_s"] for r in out["rounds"]], "broker_users": "per site",
            "echo_sites": "one process each",
            # Updates the coordinator's consumer refused for reassembly capacity and requeued (each is
            # received again: the bytes of its chunks that were in the window were dropped).
            "capacity_requeues": log_text.count("chunked transfer requeued for capacity"),
            "chunks_per_frame": -(-(n * 4) // (8 * 2**20)),
            # The coordinator's own VmHWM before its first model-sized buffer and at its end (result "memory").
            "coordinator_floor_rss_mb": (out.get("memory") or {}).get("floor_mb"),
            "coordinator_self_peak_rss_mb": (out.get("memory") or {}).get("peak_mb")}


# ----------------------------------------------------------------------------- report


def add_linearity(rows: list[dict[str, Any]]) -> None:
    """``per_site_mb_ms``: round time per (site x model MB); flat = linear."""
    for r in rows:
        mb = r["params"] * 4 / 2**20
        r["per_site_mb_ms"] = 1000 * r["round_s"] / (r["sites"] * mb)


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fedbus scale: median round time and coordinator peak RSS")
    for col in ("sweep", "sites", "params", "model MB", "round s", "ms per site·MB", "peak RSS MB", "note"):
        t.add_column(col, justify="right")
    for r in rows:
        note = ""
        if r["sweep"] == "memory-sites":
            note = f"+{r['rss_increase_mb']:.0f} MB during run (coord+sites+bus)"
        elif r["sweep"] == "amqp-sites":
            note = f"train {r['train_s']:.2f} s/round; start {r['sites_start_s']:.0f} s"
        else:
            note = f"{r['chunks_per_frame']} chunk(s)/frame"
            if "coordinator_egress_mb_per_round" in r:
                note += (f"; egress {r['coordinator_egress_mb_per_round']:.1f} MB/round = "
                         f"{r['egress_over_model']:.2f} x model; raw pika {r['raw_pika_s']:.2f} s")
        t.add_row(r["sweep"], str(r["sites"]), f"{r['params']:,}", f"{r['params'] * 4 / 2**20:.2f}",
                  f"{r['round_s']:.3f}", f"{r['per_site_mb_ms']:.1f}", f"{r['peak_rss_mb']:.0f}", note)
    Console(stderr=True, width=170).print(t)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if all(r["sweep"] == "amqp-model" for r in rows):  # --only model: its panel alone
        fig, one = plt.subplots(1, 1, figsize=(7, 4.5))
        ax = [fig.add_subplot(frameon=False), fig.add_subplot(frameon=False), one]
        for a in ax[:2]:
            a.set_visible(False)
    else:
        fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    for sweep, style in (("memory-sites", "o-"), ("amqp-sites", "s-")):
        pts = [r for r in rows if r["sweep"] == sweep]
        if pts:
            ax[0].plot([r["sites"] for r in pts], [r["round_s"] for r in pts], style, label=sweep)
            ax[1].plot([r["sites"] for r in pts], [r["peak_rss_mb"] for r in pts], style, label=sweep)
    ax[0].set(xscale="log", yscale="log", xlabel="sites", ylabel="median round time (s)", title="round time vs sites")
    ax[1].set(xscale="log", xlabel="sites", ylabel="peak RSS (MB)", title="peak memory vs sites")
    model = [r for r in rows if r["sweep"] == "amqp-model"]
    if model:
        ax2 = ax[2].twinx()
        for k in sorted({r["sites"] for r in model}):
            pts = [r for r in model if r["sites"] == k]
            x = [r["params"] for r in pts]
            ax[2].plot(x, [r["round_s"] for r in pts], "o-", label=f"round s, {k} sites")
            ax2.plot(x, [r["peak_rss_mb"] for r in pts], "s--", label=f"coordinator peak RSS MB, {k} sites")
        ax2.set_ylabel("coordinator peak RSS (MB, dashed)")
        ax2.set_yscale("log")
        ax[2].legend(fontsize=7, loc="upper left")
    ax[2].set(xscale="log", yscale="log", xlabel="model parameters", ylabel="median round time (s)",
              title="model size (echo sites, RabbitMQ)")
    for a in ax[:2]:
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sweep (minutes, not tens of minutes)")
    ap.add_argument("--smoke", action="store_true", help="2 sites in memory and 300 K parameters x 2 echo sites on "
                                                         "RabbitMQ, one round, output in a temporary folder: checks "
                                                         "the bench runs (seconds)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scale.png", help="PNG plot path")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--broker", default=os.environ.get("FEDBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("memory", "processes", "model"), action="append",
                    help="run only these sweeps (repeat)")
    ap.add_argument("--sizes", default=None,
                    help="model sweep: comma-separated parameter counts (e.g. 1e6,1e7; default 10K..50M)")
    ap.add_argument("--sites", default="3", help="model sweep: comma-separated echo-site counts (default 3)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="JSON of an earlier run: its points are kept and not measured again")
    ap.add_argument("--logs", type=Path, default=None, help="model sweep: keep each point's coordinator log here")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        spec = json.loads(args.point)
        print(json.dumps(point_memory(spec["sites"], spec["rounds"], spec.get("hidden"))))
        return 0

    from rich.progress import Progress

    sweeps = set(args.only or ("memory", "processes", "model"))
    mem_sites = [1, 10, 100] if args.quick else [1, 10, 100, 1000]
    proc_sites = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16]
    sizes = [10_000, 100_000, 1_000_000, 10_000_000] if args.quick else list(HIDDEN_FOR)
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    model_sites = [int(x) for x in args.sites.split(",") if x.strip()]
    model_rounds = max(2, args.rounds - 1)
    if args.smoke:
        global ROUND_TIMEOUT_S
        ROUND_TIMEOUT_S = 20.0
        sweeps = (sweeps & {"memory", "model"}) or {"memory", "model"}
        # 300 K parameters (1.2 MB): over coordinator.models.INLINE_BELOW, so the model goes by hash
        mem_sites, sizes, model_sites, model_rounds, args.rounds = [2], [300_000], [2], 1, 1
        tmp = Path(tempfile.mkdtemp(prefix="scale-smoke-"))
        args.out, args.json = tmp / "scale.png", args.json or tmp / "scale.json"
    jobs: list[tuple[str, Any]] = []
    if "memory" in sweeps:
        jobs += [("memory", n) for n in mem_sites]
    if "processes" in sweeps:
        jobs += [("processes", n) for n in proc_sites]
    if "model" in sweeps:
        jobs += [("model", (p, k)) for p in sizes for k in model_sites]
    rows: list[dict[str, Any]] = json.loads(args.reuse.read_text()) if args.reuse and args.reuse.exists() else []

    def key(r: dict[str, Any]) -> tuple[str, Any]:
        return (r["sweep"], (nominal_size(r["params"]), r["sites"]) if r["sweep"] == "amqp-model" else r["sites"])

    have = {key(r) for r in rows}
    names = {"memory": "memory-sites", "processes": "amqp-sites", "model": "amqp-model"}
    jobs = [(k, n) for k, n in jobs if (names[k], n) not in have]
    with Progress(transient=True) as progress:
        task = progress.add_task("scale", total=len(jobs))
        for kind, n in jobs:
            progress.update(task, description=f"{kind} {n}")
            if kind == "memory":
                point = {"sites": n, "rounds": args.rounds}
                # the smoke run measures nothing: no fresh process per point
                rows.append(point_memory(n, args.rounds, None) if args.smoke else run_point_process(point, 3600))
            elif kind == "processes":
                rows.append(point_processes(n, args.rounds, args.broker))
            else:
                rows.append(point_model(n[0], n[1], model_rounds, args.broker, logs=args.logs))
            progress.advance(task)
    order = {"memory-sites": 0, "amqp-sites": 1, "amqp-model": 2}
    rows.sort(key=lambda r: (order[r["sweep"]], r["sites"], r["params"]))
    add_linearity(rows)
    print_table(rows)
    plot(rows, args.out)
    print(f"plot: {args.out}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"figures: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
