"""The fedbus side of bench/vs_flower.py: four ``fedbus site run`` daemons + the coordinator.

Laid out as production lays it out: per-site Ed25519 keys and ``site.toml`` (through
``simulator.workspace.site_toml``), each site's own CSV holding only its train rows (the same
rows Flower and the floor train on; the test rows never reach a site), every site enrolled in
the coordinator's state. The site daemons start first and idle on their queues (as Flower's
SuperNodes do); the timed part is the coordinator process, run through the
``coordinator.run.Coordinator`` API by a small driver script (``fedbus coordinator run`` is the
CLI face of the same class).

The experiment is examples/heart_disease.json with only what the job fixes set explicitly:
rounds and seed, all four sites every round (min_fit/min_available 4), and no per-round
federated evaluation (fraction_eval 0: Flower's ServerApp evaluates nothing per round either;
the site still reports before/after metrics on its local validation rows, as fedbus does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import _vs_flower_common as common
from _vs_flower_procs import CountingProxy, TreeSampler, end_processes, pid_of_client_port, spawn, wait_until

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
EXAMPLE = REPO / "examples" / "heart_disease.json"

DRIVER = """\
import json, sys, time
sys.path.insert(0, {repo!r})
t_start = time.time()
from coordinator.run import Coordinator
from coordinator.state import StateStore
from protocol.signing import Signer
from protocol.transport import open_bus

cfg = json.loads({cfg!r})
bus = open_bus(cfg["url"])
coord = Coordinator(cfg["experiment"], bus=bus, state_dir=cfg["state"], signer=Signer.from_file(cfg["key"]),
                    federation=cfg["federation"], sites=cfg["sites"], progress=False)
result = coord.run()
finished = time.time()
store = StateStore(cfg["state"])
rounds = [{{"round": r["round"], "wall_s": r["wall_s"], "train_s": r["train_s"], "committed_at": r["committed_at"],
           "replies": r["replies"]}} for r in store.rounds(result.run_id)]
store.close()
bus.close()
import numpy as np
weights = result.weights
if weights is None:
    raise SystemExit("the coordinator returned no final weights")
np.savez(cfg["out"] + "/weights.npz", *[np.asarray(a) for _, a in weights])
import resource
usage = resource.getrusage(resource.RUSAGE_SELF)
json.dump({{"started": t_start, "finished": finished, "cpu_s": usage.ru_utime + usage.ru_stime,
           "status": result.status, "reason": result.reason,
           "run_id": result.run_id, "rounds": rounds, "timing": result.timing}},
          open(cfg["out"] + "/result.json", "w"))
"""


def experiment(spec: common.JobSpec) -> dict[str, Any]:
    """examples/heart_disease.json with the job's rounds/seed and all four sites every round."""
    raw = json.loads(EXAMPLE.read_text())
    raw["training"]["rounds"] = spec.rounds
    raw["training"]["seed"] = spec.seed
    raw["training"]["epochs"] = spec.local_epochs
    raw["training"]["batch_size"] = spec.batch_size
    raw["training"]["optimizer"]["learning_rate"] = spec.learning_rate
    raw["dataset"]["validation_fraction"] = spec.validation_fraction
    raw["federated"]["parameters"].update(fraction_fit=1.0, fraction_eval=0.0, min_eval_clients=0,
                                          min_fit_clients=len(common.HOSPITALS),
                                          min_available_clients=len(common.HOSPITALS))
    return raw


def check_alignment() -> list[str]:
    """Differences between the bench's shared job and examples/heart_disease.json (empty = aligned)."""
    raw = json.loads(EXAMPLE.read_text())
    ds = raw["dataset"]
    problems = []
    if tuple(ds.get("features") or ()) != common.FEATURES:
        problems.append(f"features {ds.get('features')} != {list(common.FEATURES)}")
    cats = {k: tuple(v) for k, v in (ds.get("categorical") or {}).items()}
    if cats != common.CATEGORIES:
        problems.append(f"categorical {cats} != {common.CATEGORIES}")
    return problems


def site_task_times(logs: Path, sites: list[str]) -> dict[int, float]:
    """Per round, the slowest site's task time (``task_received`` to ``reply_sent`` in its JSON log)."""
    from datetime import datetime

    received: dict[tuple[int, str], float] = {}
    slowest: dict[int, float] = {}
    for sid in sites:
        for line in (logs / f"{sid}.log").read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("type") != "TrainTask" or "round" not in event:
                continue
            at = datetime.fromisoformat(event["timestamp"]).timestamp()
            key = (int(event["round"]), sid)
            if event.get("event") == "task_received":
                received[key] = at
            elif event.get("event") == "reply_sent" and key in received:
                slowest[key[0]] = max(slowest.get(key[0], 0.0), at - received[key])
    return slowest


def overhead_split(round_s: list[float], train_s: list[float], site_task_s: dict[int, float]) -> dict[str, float | None]:
    """Where a round's overhead goes (medians over rounds): inside the slowest site's task but
    outside its training (data preparation, model build, local validation, signing), and outside
    the sites (coordinator, broker, network)."""
    import statistics

    site_side, hub_side = [], []
    for i, (r, t) in enumerate(zip(round_s, train_s, strict=True), start=1):
        task = site_task_s.get(i)
        if task is not None:
            site_side.append(task - t)
            hub_side.append(r - task)
    return {"overhead_site_side_s": statistics.median(site_side) if site_side else None,
            "overhead_hub_side_s": statistics.median(hub_side) if hub_side else None}


def _site_id(hospital: str) -> str:
    """A fixed id per hospital (``hospital-cleveland``, ...): the coordinator derives each site's
    shuffling and validation seeds from (run seed, round, site id), so fixed ids make fedbus runs
    repeat bit for bit. Runs are kept apart by a fresh federation name and by emptying the site
    queues first (``_reset_queues``)."""
    return "hospital-" + "".join(c if c.isalnum() else "-" for c in hospital.lower())


def _reset_queues(broker: str, names: list[str]) -> None:
    """Delete this bench's fixed site queues so nothing left by an earlier, interrupted run is
    delivered to this one (the declare that follows recreates them empty)."""
    import pika

    params = pika.URLParameters(broker)
    conn = pika.BlockingConnection(params)
    try:
        for name in names:
            ch = conn.channel()
            try:
                ch.queue_delete(queue=name)
            except pika.exceptions.ChannelClosedByBroker:
                continue  # not there (or not ours to delete): the declare below says which
            ch.close()
    finally:
        conn.close()


def _delete_queues(broker: str, names: list[str]) -> None:
    """Best-effort removal of this run's queues from the shared broker: over AMQP (one
    connection, as ``_reset_queues``), then ``rabbitmqctl`` (as root) for any the user may not
    delete; a ``rabbitmqctl`` call per queue costs about a second."""
    from urllib.parse import unquote, urlsplit

    import pika

    left = list(names)
    try:
        conn = pika.BlockingConnection(pika.URLParameters(broker))
    except pika.exceptions.AMQPError:
        conn = None
    if conn is not None:
        try:
            for name in names:
                ch = conn.channel()
                try:
                    ch.queue_delete(queue=name)
                    left.remove(name)
                    ch.close()
                except pika.exceptions.ChannelClosedByBroker:
                    continue
        finally:
            conn.close()
    if not left or not shutil.which("rabbitmqctl"):
        return
    vhost = unquote(urlsplit(broker).path[1:]) or "/"
    for name in left:
        try:
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", "-p", vhost, name], capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pass


def run(spec: common.JobSpec, work: Path, *, test: tuple[np.ndarray, np.ndarray], timeout_s: float,
        broker: str) -> common.RunRecord:
    """One fedbus run; returns the figures (final weights evaluated on the union test split)."""
    sys.path.insert(0, str(REPO))
    from urllib.parse import urlsplit, urlunsplit

    from protocol.signing import generate_keypair
    from protocol.transport import open_bus
    from protocol.transport.base import Topology
    from protocol.transport.topology import control_queue, liveness_queue, site_queue, updates_queue
    from simulator.workspace import enroll, site_toml

    tag = uuid.uuid4().hex[:8]
    federation = f"bench-vsflower-{tag}"
    hospitals = {h: _site_id(h) for h in common.HOSPITALS}
    sites = sorted(hospitals.values())
    out, logs, keys = work / "out", work / "logs", work / "keys"
    for d in (out, logs, keys):
        d.mkdir(parents=True, exist_ok=True)
    state = work / "coordinator"
    ckey, cpub = generate_keypair("coordinator", keys)

    parts = urlsplit(broker)
    broker_port = parts.port or 5672
    coordinator_pids: set[int] = set()

    def classify(peer_port: int) -> str:
        pid = pid_of_client_port(peer_port)
        return "hub" if pid in coordinator_pids else "site"

    proxy = CountingProxy(broker_port, classify=classify).start()
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    proxied = urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))

    frame = common.load_frame()
    pubs = {}
    for hospital, sid in hospitals.items():
        home = work / "sites" / sid
        train, _ = common.split_hospital(frame, hospital, spec=spec)
        data = home / "data" / "train.csv"
        data.parent.mkdir(parents=True, exist_ok=True)
        train.to_csv(data, index=False)
        key, pub = generate_keypair(sid, keys)
        pubs[sid] = pub
        (home / "site.toml").write_text(site_toml(
            site_id=sid, federation=federation, broker_url=proxied, key=key, coordinator_pub=cpub,
            state_dir=home / "state", dataset=json.loads(EXAMPLE.read_text())["dataset"]["name"], train=data,
            target=common.TARGET))
    enroll(state, pubs)

    _reset_queues(broker, [site_queue(s) for s in sites])
    bus = open_bus(broker)
    try:
        bus.declare(Topology(sites=sites, federations=[federation]))
    finally:
        bus.close()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    procs: list[subprocess.Popen] = []
    sampler = None
    try:
        for sid in sites:
            procs.append(spawn(
                [sys.executable, "-m", "fedbus.cli", "site", "run", "--config", str(work / "sites" / sid / "site.toml")],
                log=logs / f"{sid}.log", cwd=REPO, env=env))

        def sites_ready() -> bool:
            return all(b"site_started" in (logs / f"{sid}.log").read_bytes() for sid in sites)

        wait_until(sites_ready, timeout_s=300, interval_s=0.5, what=f"fedbus site daemons started (logs {logs})",
                   alive=procs)
        cfg = {"url": proxied, "experiment": experiment(spec), "state": str(state), "key": str(ckey),
               "federation": federation, "sites": sites, "out": str(out)}
        driver = work / "coordinator_driver.py"
        driver.write_text(DRIVER.format(repo=str(REPO), cfg=json.dumps(cfg)))
        proxy.reset()
        t0 = time.time()
        # VSFLOWER_PROFILE=DIR: the coordinator runs under cProfile, its stats in DIR (bench/README.md)
        profile = os.environ.get("VSFLOWER_PROFILE")
        prof = ["-m", "cProfile", "-o", str(Path(profile) / f"coordinator-{tag}.prof")] if profile else []
        coord = spawn([sys.executable, *prof, str(driver)], log=logs / "coordinator.log", cwd=REPO, env=env)
        coordinator_pids.add(coord.pid)
        procs.append(coord)
        sampler = TreeSampler([coord.pid])
        sampler.start()
        try:
            coord.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise common.BenchError(f"fedbus coordinator still running after {timeout_s:.0f} s (logs {logs})") from e
        peak = sampler.stop()
        # Includes the coordinator's closing evaluation tasks (one small round after the last).
        site_bytes, hub_bytes = proxy.total("site"), proxy.total("hub")
        if coord.returncode != 0 or not (out / "result.json").exists():
            tail = (logs / "coordinator.log").read_text(errors="replace")[-1500:]
            raise common.BenchError(f"fedbus coordinator exited {coord.returncode} (logs {logs}): {tail}")
        doc = json.loads((out / "result.json").read_text())
        if doc["status"] != "completed" or len(doc["rounds"]) != spec.rounds:
            raise common.BenchError(f"fedbus run {doc['run_id']} ended {doc['status']} after "
                                    f"{len(doc['rounds'])} round(s): {doc.get('reason')}")
        rounds = doc["rounds"]
        # Full cycle per round: from the previous round's commit to this one's (tasks out, training,
        # replies, aggregation, checkpoint, commit); round 1 from the coordinator's own wall_s.
        round_s = [rounds[0]["wall_s"]] + [b["committed_at"] - a["committed_at"] for a, b in zip(rounds, rounds[1:])]
        with np.load(out / "weights.npz") as z:
            weights = [z[f"arr_{i}"] for i in range(len(z.files))]
        metrics = common.evaluate(weights, *test, spec=spec)
        site_task_s = site_task_times(logs, sites)
        split = overhead_split(round_s, [r["train_s"] for r in rounds], site_task_s)
        return common.RunRecord(
            wall_s=rounds[-1]["committed_at"] - t0, round_s=round_s,
            slowest_train_s=[r["train_s"] for r in rounds], accuracy=metrics["accuracy"], auc=metrics["auc"],
            peak_rss_mb=peak, wire_bytes=site_bytes,
            extra={"hub_bytes_per_round": hub_bytes / spec.rounds, "process_wall_s": doc["finished"] - t0,
                   "coordinator_cpu_s": doc.get("cpu_s"), "coordinator_started_s": doc["started"] - t0,
                   "coordinator_round_wall_s": [r["wall_s"] for r in rounds], "run_id": doc["run_id"],
                   **split})
    finally:
        seen = sampler.seen if sampler is not None else None
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        end_processes(procs, seen, grace_s=15)
        proxy.close()
        _delete_queues(broker, [*(site_queue(s) for s in sites), updates_queue(federation), control_queue(federation),
                             liveness_queue(federation)])
