#!/usr/bin/env python
"""One command, one federated job, four systems side by side: fedbus, Flower, Flower's simulation
engine, and a no-framework floor.

    .venv/bin/python bench/vs_flower.py [--repeats 3] [--rounds 15] [--json]
        [--systems fedbus,flower,flower_simulation,floor] [--broker amqp://...]

The job (bench/_vs_flower_common.py): heart_disease_uci, four natural hospitals, MLP
25 -> 64 -> 32 -> 1, Adam 1e-3, batch 32, 5 local epochs, 15 rounds, FedAvg, same preprocessing
and seeds everywhere. Final accuracy/AUC are computed here, by the same code, from each
system's final global weights on the union of the four hospitals' test splits.

How each system runs (as a user deploys it):
- flower: ``flower-superlink --insecure --disable-runtime-dependency-installation`` plus four
  ``flower-supernode --insecure`` processes on 127.0.0.1, then ``flwr run APP bench`` of the Flower
  app this script writes into a temporary folder (bench/flower_app/ + a copy of the common module).
- flower_simulation: the same ServerApp/ClientApp through ``flwr.simulation.run_simulation`` (Ray).
- fedbus: four ``fedbus site run`` daemons plus ``fedbus coordinator run`` on the local RabbitMQ.
- floor: the same training and averaging in one Python loop, one process.

Measures (medians over ``--repeats`` runs):
- wall_s: from the run command's start to the server's own "finished" timestamp (site/supernode
  daemons are already up, as they would be in production).
- round_s, overhead_s: from the server's per-round timestamps; overhead = round time minus the
  slowest site's training time as the site measured it (median over rounds).
- peak_rss_mb: peak of the summed RSS of the server side's process tree, sampled every 0.1 s
  (SuperLink + SuperExec + ServerApp; the coordinator process; the simulation driver; the floor).
- wire_bytes_per_round: bytes relayed by a counting TCP proxy between the sites and the hub (the
  SuperLink's Fleet API; the RabbitMQ broker), i.e. TCP payload both directions, per round. That is
  what crosses the hospital network boundary; fedbus's coordinator-broker bytes are reported
  apart (``extra.hub_bytes_per_round``). The simulation engine and the floor have no wire.
Progress and the table go to stderr; ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import _vs_flower_common as common  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SYSTEMS = ("fedbus", "flower", "flower_simulation", "floor")
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"
console = Console(stderr=True)


BenchError = common.BenchError


# ------------------------------------------------------------------------- process helpers


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TreeSampler(threading.Thread):
    """Samples the summed RSS of some root processes and all their descendants.

    Also remembers every descendant it saw, so teardown can end detached grandchildren
    (Flower's SuperExec starts in its own session) that this bench started indirectly.
    """

    def __init__(self, roots: Sequence[int], *, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.roots = [psutil.Process(pid) for pid in roots]
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.seen: dict[int, float] = {}
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        total = 0
        for root in self.roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    total += p.memory_info().rss
                    self.seen.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
        self.peak_bytes = max(self.peak_bytes, total)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._sample()
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak_bytes / 2**20


def end_processes(procs: Sequence[subprocess.Popen], seen: dict[int, float] | None = None,
                  *, grace_s: float = 10.0) -> None:
    """Terminate what this bench started (and the descendants it saw), then kill leftovers."""
    targets: list[psutil.Process] = []
    for proc in procs:
        try:
            p = psutil.Process(proc.pid)
            targets.append(p)
            targets.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    for pid, created in (seen or {}).items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:  # the very process we saw, not a reused pid
                targets.append(p)
        except psutil.Error:
            pass
    unique = {p.pid: p for p in targets}
    for p in unique.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(unique.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str,
               interval_s: float = 0.2, alive: Sequence[subprocess.Popen] = ()) -> None:
    """Poll ``predicate``; fail naming ``what`` on timeout or when a watched process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in alive:
            if proc.poll() is not None:
                raise BenchError(f"{what}: process {proc.args[0] if isinstance(proc.args, list) else proc.args} "
                                 f"exited with code {proc.returncode}")
        time.sleep(interval_s)
    raise BenchError(f"{what}: not done after {timeout_s:.0f} s")


# --------------------------------------------------------------------- counting TCP proxy


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts payload bytes per direction and per client class.

    ``classify(peer_port)`` names the client (e.g. "site" or "hub") from the port the client
    connected from; it runs once per connection, before relaying starts.
    """

    def __init__(self, target_port: int, *, classify: Callable[[int], str] | None = None) -> None:
        self.target_port = target_port
        self.classify = classify or (lambda _port: "site")
        self.port = 0
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> CountingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = fut.result(timeout=10)
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def _add(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + n

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> None:
        try:
            while data := await reader.read(1 << 16):
                self._add(key, len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except (ConnectionError, OSError, RuntimeError):
                pass

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        peer_port = client_w.get_extra_info("peername")[1]
        label = await self._loop.run_in_executor(None, self.classify, peer_port)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, up_w, f"{label}.up"),
                             self._pipe(up_r, client_w, f"{label}.down"))

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def total(self, label: str | None = None) -> int:
        with self._lock:
            return sum(v for k, v in self.counts.items() if label is None or k.split(".")[0] == label)

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def pid_of_client_port(port: int) -> int | None:
    """The local process that owns the TCP connection from 127.0.0.1:``port``."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


# ---------------------------------------------------------------------------- Flower app


def write_flower_app(dest: Path) -> Path:
    """Write the Flower app (pyproject.toml, ServerApp, ClientApp, the job module) into dest."""
    package = dest / "vsflower_app"
    package.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BENCH_DIR / "flower_app" / "pyproject.toml", dest / "pyproject.toml")
    for name in ("server_app.py", "client_app.py"):
        shutil.copyfile(BENCH_DIR / "flower_app" / name, package / name)
    shutil.copyfile(BENCH_DIR / "_vs_flower_common.py", package / "common.py")
    (package / "__init__.py").write_text('"""fedbus vs Flower benchmark app."""\n')
    return dest


def flower_env(home: Path) -> dict[str, str]:
    """Environment of an activated venv with its own FLWR_HOME (so ~/.flwr stays untouched)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.pop("VSFLOWER_RUN_CONFIG", None)
    return env


def _run_config_arg(spec: common.JobSpec, out: Path) -> str:
    items = [f"{k}={v}" for k, v in common.spec_run_config(spec).items()]
    items.append(f"out-dir='{out}'")
    return " ".join(items)


def _record_from_server_doc(doc: dict, t0: float, weights_path: Path, *, spec: common.JobSpec,
                            test: tuple[np.ndarray, np.ndarray]) -> common.RunRecord:
    rounds = doc["rounds"]
    if len(rounds) != spec.rounds or any(r.get("errors") for r in rounds):
        raise BenchError(f"the ServerApp finished {len(rounds)} of {spec.rounds} rounds "
                         f"(errors: {[r.get('errors') for r in rounds]})")
    with np.load(weights_path) as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    metrics = common.evaluate(weights, *test, spec=spec)
    return common.RunRecord(
        wall_s=doc["finished"] - t0,
        round_s=[r["round_s"] for r in rounds],
        slowest_train_s=[r["slowest_train_s"] for r in rounds],
        accuracy=metrics["accuracy"], auc=metrics["auc"],
    )


def run_flower(spec: common.JobSpec, work: Path, *, test, timeout_s: float) -> common.RunRecord:
    """Flower's deployment engine: SuperLink + 4 SuperNodes on 127.0.0.1, then ``flwr run``."""
    home, out, logs = work / "flwr_home", work / "out", work / "logs"
    for d in (home, out, logs):
        d.mkdir(parents=True, exist_ok=True)
    app = write_flower_app(work / "app")
    env = flower_env(home)
    port = free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    procs: list[subprocess.Popen] = []
    sampler: TreeSampler | None = None
    proxy: CountingProxy | None = None
    try:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=work, stdout=open(logs / "superlink.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(superlink)
        sampler = TreeSampler([superlink.pid])
        sampler.start()

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout_s=120, what=f"flower-superlink health (log {logs}/superlink.log)",
                   alive=[superlink])
        proxy = CountingProxy(port).start()
        for i in range(len(common.HOSPITALS)):
            procs.append(subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{proxy.port}",
                 "--port", str(free_port()),
                 "--node-config", f"partition-id={i} num-partitions={len(common.HOSPITALS)}"],
                env=env, cwd=work, stdout=open(logs / f"supernode-{i}.log", "wb"),
                stderr=subprocess.STDOUT))

        def nodes_online() -> bool:
            res = subprocess.run(["flwr", "supernode", "ls", "bench", "--format", "json"], env=env,
                                 cwd=work, capture_output=True, text=True)
            try:
                nodes = json.loads(res.stdout).get("nodes", [])
            except json.JSONDecodeError:
                return False
            return sum(n.get("status") == "online" for n in nodes) >= len(common.HOSPITALS)

        wait_until(nodes_online, timeout_s=180, interval_s=1.0, what="four SuperNodes online",
                   alive=procs)
        proxy.reset()
        t0 = time.time()
        started = subprocess.run(["flwr", "run", str(app), "bench", "--run-config",
                                  _run_config_arg(spec, out), "--format", "json"],
                                 env=env, cwd=work, capture_output=True, text=True, timeout=300)
        if started.returncode != 0:
            raise BenchError(f"flwr run failed ({started.returncode}): {started.stdout[-2000:]} "
                             f"{started.stderr[-2000:]}")
        run_id = json.loads(started.stdout).get("run-id")
        wait_until(lambda: (out / "result.json").exists(), timeout_s=timeout_s, interval_s=0.5,
                   what=f"Flower run {run_id} (logs in {logs})", alive=procs)
        wire = proxy.total()
        peak = sampler.stop()
        doc = json.loads((out / "result.json").read_text())
        record = _record_from_server_doc(doc, t0, out / "weights.npz", spec=spec, test=test)
        record.peak_rss_mb = peak
        record.wire_bytes = wire
        record.extra["flower_reported_bytes"] = _flower_reported_bytes(env, work, run_id)
        return record
    finally:
        if proxy is not None:
            proxy.close()
        seen = sampler.seen if sampler is not None else None
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        end_processes(procs, seen)


def _flower_reported_bytes(env: dict[str, str], work: Path, run_id: str | None) -> int | None:
    """Flower's own per-run traffic count (``flwr ls``), kept as a cross-check of the proxy."""
    res = subprocess.run(["flwr", "ls", "bench", "--format", "json"], env=env, cwd=work,
                         capture_output=True, text=True)
    try:
        for run in json.loads(res.stdout).get("runs", []):
            if run.get("run-id") == run_id:
                return int(run["network-traffic"]["total-bytes"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return None


SIM_DRIVER = """\
import sys
sys.path.insert(0, {app!r})
from flwr.simulation import run_simulation
from vsflower_app.client_app import app as client_app
from vsflower_app.server_app import app as server_app

run_simulation(server_app=server_app, client_app=client_app, num_supernodes={n},
               backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}})
"""


def run_flower_simulation(spec: common.JobSpec, work: Path, *, test, timeout_s: float) -> common.RunRecord:
    """Flower's simulation engine (Ray) running the same ServerApp and ClientApp."""
    out, logs = work / "out", work / "logs"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    app = write_flower_app(work / "app")
    driver = work / "sim_driver.py"
    driver.write_text(SIM_DRIVER.format(app=str(app), n=len(common.HOSPITALS)))
    env = flower_env(work / "flwr_home")
    env["VSFLOWER_RUN_CONFIG"] = json.dumps({**common.spec_run_config(spec), "out-dir": str(out)})
    env["RAY_DEDUP_LOGS"] = "0"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, cwd=work,
                            stdout=open(logs / "simulation.log", "wb"), stderr=subprocess.STDOUT)
    tree = TreeSampler([proc.pid])
    # The ServerApp runs in the driver process: its own RSS is the "server" figure.
    driver_only = _SingleSampler([proc.pid])
    driver_only.start()
    tree.start()
    try:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"Flower simulation still running after {timeout_s:.0f} s "
                             f"(log {logs}/simulation.log)") from e
        if proc.returncode != 0 or not (out / "result.json").exists():
            raise BenchError(f"Flower simulation exited {proc.returncode} without a result "
                             f"(log {logs}/simulation.log)")
        doc = json.loads((out / "result.json").read_text())
        record = _record_from_server_doc(doc, t0, out / "weights.npz", spec=spec, test=test)
        record.peak_rss_mb = driver_only.stop()
        record.extra["tree_peak_rss_mb"] = tree.stop()
        record.extra["server_wall_s"] = doc["finished"] - doc["started"]
        return record
    finally:
        if driver_only.is_alive():
            driver_only.stop()
        if tree.is_alive():
            tree.stop()
        end_processes([proc], tree.seen)


class _SingleSampler(TreeSampler):
    """Peak RSS of one process only (not its children)."""

    def _sample(self) -> None:
        for root in self.roots:
            try:
                self.peak_bytes = max(self.peak_bytes, root.memory_info().rss)
            except psutil.Error:
                pass


def run_floor(spec: common.JobSpec, work: Path, *, test, timeout_s: float) -> common.RunRecord:
    """The no-framework floor in its own process (so its memory is measured apart from ours)."""
    out = work / "out"
    proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "_vs_flower_common.py"), str(out),
                             str(spec.rounds)], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=open(work / "floor.log", "wb"))
    sampler = _SingleSampler([proc.pid])
    sampler.start()
    try:
        proc.wait(timeout=timeout_s)
    finally:
        peak = sampler.stop()
        end_processes([proc])
    if proc.returncode != 0:
        raise BenchError(f"floor exited {proc.returncode} (log {work}/floor.log)")
    doc = json.loads((out / "result.json").read_text())
    return common.RunRecord(wall_s=doc["wall_s"], round_s=doc["round_s"],
                            slowest_train_s=doc["slowest_train_s"], accuracy=doc["accuracy"],
                            auc=doc["auc"], peak_rss_mb=peak, wire_bytes=0)


# --------------------------------------------------------------------------------- fedbus


def run_fedbus(spec: common.JobSpec, work: Path, *, test, timeout_s: float,
               broker: str) -> common.RunRecord:
    """fedbus: four site-worker daemons + the coordinator on RabbitMQ (see bench/_vs_flower_fedbus.py)."""
    try:
        import _vs_flower_fedbus as fedbus_side
    except ImportError as e:
        raise BenchError(f"the fedbus side is not available yet: {e}") from e
    return fedbus_side.run(spec, work, test=test, timeout_s=timeout_s, broker=broker,
                           proxy_cls=CountingProxy, sampler_cls=TreeSampler,
                           end_processes=end_processes, wait_until=wait_until,
                           pid_of_client_port=pid_of_client_port)


# --------------------------------------------------------------------------------- output


def render_table(doc: dict) -> Table:
    """The side-by-side table (medians)."""
    table = Table(title=f"fedbus vs Flower — heart_disease_uci, 4 hospitals "
                        f"(medians of {doc.get('repeats')} run(s))")
    for col in ("system", "wall s", "round s", "overhead ms", "peak RSS MB", "wire KB/round",
                "accuracy", "AUC"):
        table.add_column(col, justify="right" if col != "system" else "left")

    def fmt(v, scale=1.0, digits=2):
        return "—" if v is None else f"{v * scale:.{digits}f}"

    for name in SYSTEMS:
        s = doc.get(name)
        if not s:
            err = (doc.get("errors") or {}).get(name)
            table.add_row(name, *(["—"] * 7) if not err else ["failed", *["—"] * 6])
            continue
        table.add_row(name, fmt(s["wall_s"]), fmt(s["round_s"], digits=3), fmt(s["overhead_s"], 1000, 1),
                      fmt(s["peak_rss_mb"], digits=0), fmt(s["wire_bytes_per_round"], 1 / 1024, 1),
                      fmt(s["accuracy"], digits=3), fmt(s["auc"], digits=3))
    table.add_row("fedbus / flower", fmt(doc["ratio_wall"], digits=3), fmt(doc["ratio_round"], digits=3),
                  fmt(doc["ratio_overhead"], digits=3), fmt(doc["ratio_peak_rss"], digits=2),
                  fmt(doc["ratio_wire"], digits=2), "", "")
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per system; medians reported")
    parser.add_argument("--rounds", type=int, default=15, help="federated rounds (job default 15)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--broker", default=os.environ.get("FEDBUS_AMQP_URL", DEFAULT_BROKER),
                        help="RabbitMQ URL for fedbus")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (logs)")
    parser.add_argument("--json", action="store_true", help="print the JSON document on stdout")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be at least 1")
    args.systems = systems
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = common.JobSpec(rounds=args.rounds)
    test = common.union_test(common.load_sites(spec=spec))
    runners: dict[str, Callable[..., common.RunRecord]] = {
        "floor": run_floor,
        "flower_simulation": run_flower_simulation,
        "flower": run_flower,
        "fedbus": lambda s, w, **kw: run_fedbus(s, w, broker=args.broker, **kw),
    }
    records: dict[str, list[common.RunRecord]] = {name: [] for name in args.systems}
    errors: dict[str, str] = {}
    root = Path(tempfile.mkdtemp(prefix="vs_flower_"))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for repeat in range(args.repeats):
            for name in args.systems:
                if name in errors:
                    continue
                task = progress.add_task(f"{name} run {repeat + 1}/{args.repeats}", total=None)
                work = root / f"{name}-{repeat + 1}"
                work.mkdir()
                try:
                    record = runners[name](spec, work, test=test, timeout_s=args.timeout)
                except BenchError as e:
                    errors[name] = str(e)
                    progress.update(task, description=f"[red]{name} run {repeat + 1}: {e}")
                    progress.stop_task(task)
                    continue
                records[name].append(record)
                progress.update(task, description=(
                    f"{name} run {repeat + 1}/{args.repeats}: wall {record.wall_s:.1f} s, "
                    f"accuracy {record.accuracy:.3f}"))
                progress.stop_task(task)
    systems = {name: (common.summarize(runs) if runs else None) for name, runs in records.items()}
    for name, runs in records.items():
        if runs and systems[name] is not None:
            systems[name]["extra"] = [r.extra for r in runs]
    doc = common.report(systems)
    doc["repeats"] = args.repeats
    doc["rounds"] = args.rounds
    doc["errors"] = errors
    doc["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    console.print(render_table(doc))
    for name, message in errors.items():
        console.print(f"[red]{name} failed:[/red] {message}")
    met = doc["targets"]["met"]
    console.print(f"targets: wall ≤ 0.1× Flower: {met['wall']}, overhead ≤ 50 ms: {met['overhead']}, "
                  f"accuracy ±1 point: {met['accuracy']}")
    if args.keep:
        console.print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
