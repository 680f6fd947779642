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
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
import _vs_flower_common as common  # noqa: E402
from _vs_flower_procs import (  # noqa: E402
    CountingProxy,
    ProcessSampler,
    TreeSampler,
    end_processes,
    free_port,
    spawn,
    wait_until,
)

VENV_BIN = Path(sys.executable).parent
SYSTEMS = ("fedbus", "flower", "flower_simulation", "floor")
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"
console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)


BenchError = common.BenchError


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


def flower_ports() -> dict[str, int]:
    """Free ports for the SuperLink's four APIs (flwr 1.32's defaults 9091-9093 may be taken)."""
    return {name: free_port() for name in ("fleet", "serverappio", "control", "health")}


def superlink_command(ports: dict[str, int]) -> list[str]:
    """``flower-superlink`` as flwr 1.32 takes it: one address flag per API (no --host/--port)."""
    return ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
            "--fleet-api-address", f"127.0.0.1:{ports['fleet']}",
            "--serverappio-api-address", f"127.0.0.1:{ports['serverappio']}",
            "--control-api-address", f"127.0.0.1:{ports['control']}",
            "--health-server-address", f"127.0.0.1:{ports['health']}"]


def supernode_command(partition: int, fleet_port: int) -> list[str]:
    """``flower-supernode`` for hospital ``partition``: the Fleet API address and its own ClientAppIo port."""
    return ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{fleet_port}",
            "--clientappio-api-address", f"127.0.0.1:{free_port()}",
            "--node-config", f"partition-id={partition} num-partitions={len(common.HOSPITALS)}"]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def run_flower(spec: common.JobSpec, work: Path, *, test, timeout_s: float) -> common.RunRecord:
    """Flower's deployment engine: SuperLink + 4 SuperNodes on 127.0.0.1, then ``flwr run``."""
    home, out, logs = work / "flwr_home", work / "out", work / "logs"
    for d in (home, out, logs):
        d.mkdir(parents=True, exist_ok=True)
    app = write_flower_app(work / "app")
    env = flower_env(home)
    ports = flower_ports()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{ports["control"]}"\ninsecure = true\n')
    procs: list[subprocess.Popen] = []
    sampler: TreeSampler | None = None
    proxy: CountingProxy | None = None
    try:
        superlink = spawn(superlink_command(ports), log=logs / "superlink.log", env=env, cwd=work)
        procs.append(superlink)
        sampler = TreeSampler([superlink.pid])
        sampler.start()
        wait_until(lambda: listening(ports["control"]) and listening(ports["fleet"]), timeout_s=120,
                   what=f"flower-superlink's Control and Fleet APIs (log {logs}/superlink.log)", alive=[superlink])
        proxy = CountingProxy(ports["fleet"]).start()
        for i in range(len(common.HOSPITALS)):
            procs.append(spawn(supernode_command(i, proxy.port), log=logs / f"supernode-{i}.log", env=env, cwd=work))

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
        last_check = [time.monotonic()]

        def finished() -> bool:
            if (out / "result.json").exists():
                return True
            if time.monotonic() - last_check[0] > 60:  # a failed ServerApp writes nothing: ask Flower
                last_check[0] = time.monotonic()
                status = _flower_run(env, work, run_id).get("status", "")
                if status.startswith("finished:") and not (out / "result.json").exists():
                    raise BenchError(f"Flower run {run_id} ended {status} without a result (logs in {logs})")
            return False

        wait_until(finished, timeout_s=timeout_s, interval_s=0.5, what=f"Flower run {run_id} (logs in {logs})",
                   alive=procs)
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


def probe_flower(work: Path, *, timeout_s: float = 120.0) -> float:
    """The smoke check of the Flower side: the installed flwr's SuperLink and one SuperNode start
    with the command lines ``run_flower`` uses and the node comes online (``flwr supernode ls``
    through ``$FLWR_HOME/config.toml``), without a run (a Flower round costs tens of seconds
    here). Returns the seconds it took; raises BenchError naming what failed."""
    home, logs = work / "flwr_home", work / "logs"
    for d in (home, logs):
        d.mkdir(parents=True, exist_ok=True)
    env = flower_env(home)
    ports = flower_ports()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{ports["control"]}"\ninsecure = true\n')
    t0 = time.monotonic()
    procs = [spawn(superlink_command(ports), log=logs / "superlink.log", env=env, cwd=work)]
    try:
        wait_until(lambda: listening(ports["control"]) and listening(ports["fleet"]), timeout_s=timeout_s,
                   what=f"flower-superlink's Control and Fleet APIs (log {logs}/superlink.log)", alive=procs)
        procs.append(spawn(supernode_command(0, ports["fleet"]), log=logs / "supernode-0.log", env=env, cwd=work))

        def online() -> bool:
            res = subprocess.run(["flwr", "supernode", "ls", "bench", "--format", "json"], env=env, cwd=work,
                                 capture_output=True, text=True)
            try:
                return any(n.get("status") == "online" for n in json.loads(res.stdout).get("nodes", []))
            except json.JSONDecodeError:
                return False

        # each `flwr` call is a Python start with flwr's imports (~1.5 CPU s): poll gently
        wait_until(online, timeout_s=timeout_s, interval_s=2.0, what="a SuperNode online (flwr supernode ls)",
                   alive=procs)
        return time.monotonic() - t0
    finally:
        end_processes(procs)


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _flower_run(env: dict[str, str], work: Path, run_id: str | None) -> dict:
    """The run's entry in ``flwr ls --format json`` (empty when unknown)."""
    res = subprocess.run(["flwr", "ls", "bench", "--format", "json"], env=env, cwd=work,
                         capture_output=True, text=True)
    try:
        runs = json.loads(res.stdout).get("runs", [])
    except json.JSONDecodeError:
        return {}
    return next((r for r in runs if r.get("run-id") == run_id), {})


def _flower_reported_bytes(env: dict[str, str], work: Path, run_id: str | None) -> int | None:
    """Flower's own per-run traffic count (``flwr ls``), kept as a cross-check of the proxy."""
    try:
        return int(_flower_run(env, work, run_id)["network-traffic"]["total-bytes"])
    except (KeyError, TypeError, ValueError):
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
    proc = spawn([sys.executable, str(driver)], log=logs / "simulation.log", env=env, cwd=work)
    tree = TreeSampler([proc.pid])
    # The ServerApp runs in the driver process: its own RSS is the "server" figure.
    driver_only = ProcessSampler([proc.pid])
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


def run_floor(spec: common.JobSpec, work: Path, *, test, timeout_s: float) -> common.RunRecord:
    """The no-framework floor in its own process (so its memory is measured apart from ours)."""
    out = work / "out"
    t0 = time.time()
    proc = spawn([sys.executable, str(BENCH_DIR / "_vs_flower_common.py"), str(out), str(spec.rounds),
                  str(spec.local_epochs)],
                 log=work / "floor.log", cwd=work)
    sampler = ProcessSampler([proc.pid])
    sampler.start()
    try:
        proc.wait(timeout=timeout_s)
    finally:
        peak = sampler.stop()
        end_processes([proc])
    if proc.returncode != 0:
        raise BenchError(f"floor exited {proc.returncode} (log {work}/floor.log)")
    doc = json.loads((out / "result.json").read_text())
    # wall_s is the loop's own (after the imports); process_wall_s counts from the spawn, as
    # fedbus's wall_s counts from the coordinator process's spawn.
    return common.RunRecord(wall_s=doc["wall_s"], round_s=doc["round_s"],
                            slowest_train_s=doc["slowest_train_s"], accuracy=doc["accuracy"],
                            auc=doc["auc"], peak_rss_mb=peak, wire_bytes=0,
                            extra={"process_wall_s": time.time() - t0})


# --------------------------------------------------------------------------------- fedbus


def run_fedbus(spec: common.JobSpec, work: Path, *, test, timeout_s: float,
               broker: str) -> common.RunRecord:
    """fedbus: four site-worker daemons + the coordinator on RabbitMQ (see bench/_vs_flower_fedbus.py)."""
    try:
        import _vs_flower_fedbus as fedbus_side
    except ImportError as e:
        raise BenchError(f"the fedbus side is not available yet: {e}") from e
    return fedbus_side.run(spec, work, test=test, timeout_s=timeout_s, broker=broker)


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


def notes(doc: dict) -> list[str]:
    """Lines under the table: where fedbus's overhead goes, Flower's own byte count."""
    out = []

    def med(system: str, key: str) -> float | None:
        values = [e.get(key) for e in ((doc.get(system) or {}).get("extra") or []) if e.get(key) is not None]
        return common._median(values) if values else None

    site, hub = med("fedbus", "overhead_site_side_s"), med("fedbus", "overhead_hub_side_s")
    if site is not None and hub is not None:
        out.append(f"fedbus overhead split (median): inside the slowest site's task but outside training "
                   f"{site * 1000:.0f} ms, coordinator + broker {hub * 1000:.0f} ms")
    hub_bytes = med("fedbus", "hub_bytes_per_round")
    if hub_bytes is not None:
        out.append(f"fedbus coordinator<->broker bytes per round: {hub_bytes / 1024:.1f} KB "
                   "(not in wire KB/round, which counts the sites' side)")
    flower_bytes = med("flower", "flower_reported_bytes")
    rounds = doc.get("rounds") or 1
    if flower_bytes is not None:
        out.append(f"Flower's own traffic count (flwr ls): {flower_bytes / rounds / 1024:.1f} KB/round "
                   "(message payloads; the proxy figure adds HTTP framing and the SuperNodes' polling)")
    return out


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
    parser.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (job default 5)")
    parser.add_argument("--smoke", action="store_true",
                        help="fedbus and floor, one round of one epoch, and Flower's SuperLink + a SuperNode "
                             "started and seen online (no Flower run): checks the bench runs (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.systems, args.rounds, args.repeats, args.local_epochs = "fedbus,floor", 1, 1, 1
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.repeats < 1 or args.rounds < 1 or (args.local_epochs is not None and args.local_epochs < 1):
        parser.error("--repeats, --rounds and --local-epochs must be at least 1")
    args.systems = systems
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = common.JobSpec(rounds=args.rounds, **({} if args.local_epochs is None else
                                                 {"local_epochs": args.local_epochs}))
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
    if args.smoke:
        work = root / "flower-probe"
        work.mkdir()
        try:
            console.print(f"flower: SuperLink + SuperNode online in {probe_flower(work):.1f} s (flwr "
                          f"{_flwr_version()})")
        except (BenchError, OSError) as e:
            errors["flower"] = f"SuperLink/SuperNode probe: {e}"
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
    for line in notes(doc):
        console.print(line)
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
