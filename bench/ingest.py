"""Coordinator update-ingest benchmark (issue 5).

Prints, for a model of ``--params`` float32 parameters (default 10 M = 40 MB a frame):

1. raw pika consume throughput (MB/s) of the frames' bytes (8 MiB chunks, as on the wire);
2. ingest rate (MB/s) of the same frames through the coordinator's path —
   ``open_frame`` (Ed25519 verify + zero-copy decode) + ``check_weights`` + streaming
   ``FedAvg.add`` — from memory (one thread), and end to end from RabbitMQ through
   ``AmqpBus`` with the coordinator's pipeline (verify on the bus worker thread, check +
   add on the run loop's); ratio ingest / raw (target >= 0.8);
3. aggregation alone (``WeightedSum.add``) vs ``np.add`` memory bandwidth on the same
   arrays (target >= 0.5);
4. tracemalloc peak of ingesting 10 vs 200 updates (streaming: ratio ~1).

Usage: ``python bench/ingest.py [--broker amqp://...] [--params 10000000] [--updates 8]
[--memory-updates 10,200] [--json]``. Without a reachable broker the pika parts are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.aggregators import Contribution, get_aggregator  # noqa: E402
from coordinator.aggregators.fedavg import WeightedSum  # noqa: E402
from coordinator.inbox import open_delivery  # noqa: E402
from coordinator.validation import check_weights  # noqa: E402
from protocol.codec import new_envelope, open_frame, seal  # noqa: E402
from protocol.messages import Update  # noqa: E402
from protocol.signing import Signer, TrustStore  # noqa: E402

MB = 1e6
CHUNK = 8 * 2**20


def model(params: int) -> tuple:
    """A ~``params`` float32 model of a few tensors, like an MLP's state_dict."""
    rng = np.random.default_rng(0)
    width = 1024
    rows = max(1, params // width - 1)
    return (("0.weight", rng.normal(size=(rows, width)).astype(np.float32)),
            ("0.bias", rng.normal(size=(width,)).astype(np.float32)),
            ("1.weight", rng.normal(size=(1, width)).astype(np.float32)))


def frame_for(reference, i: int, signer: Signer) -> bytes:
    weights = tuple((n, a + np.float32(i % 5)) for n, a in reference)
    env = new_envelope(Update(task_id=uuid.uuid4().hex, weights=weights, num_examples=10 + i, metrics={},
                              epsilon=None, delta=None, base_round=0),
                       federation="bench", run_id="bench", round=1, sender="site", recipient="coordinator")
    return seal(env, signer)


def ingest_one(frame, trust, reference, agg) -> None:
    opened = open_frame(frame, trust)
    p = opened.envelope.payload
    check_weights(p.weights, reference)
    agg.add(Contribution("site", p.weights, p.num_examples))


def bench_processing(frames, trust, reference) -> float:
    agg = get_aggregator("FedAvg", parameters={}, initial=reference)
    agg.begin_round(1, reference)
    t = time.perf_counter()
    for f in frames:
        ingest_one(f, trust, reference, agg)
    agg.finish_round()
    return sum(len(f) for f in frames) / (time.perf_counter() - t) / MB


def bench_raw_pika(url: str, frames) -> float:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    q = ch.queue_declare(queue=f"bench.raw.{uuid.uuid4().hex[:8]}", exclusive=True).method.queue
    n = 0
    for f in frames:
        for start in range(0, len(f), CHUNK):
            ch.basic_publish("", q, bytes(f[start:start + CHUNK]))  # seal() frames are bytearrays
            n += 1
    total = sum(len(f) for f in frames)
    got = [0, 0]

    def on_msg(channel, method, props, body):
        got[0] += 1
        got[1] += len(body)
        channel.basic_ack(method.delivery_tag)
        if got[0] == n:
            channel.stop_consuming()

    ch.basic_qos(prefetch_count=100)
    ch.basic_consume(q, on_msg)
    t = time.perf_counter()
    ch.start_consuming()
    dt = time.perf_counter() - t
    assert got[1] == total
    conn.close()
    return total / dt / MB


def bench_bus_ingest(url: str, frames, trust, reference) -> float:
    from protocol.transport import Topology, open_bus
    from protocol.transport.topology import UPDATES, updates_queue

    fed = f"bench-{uuid.uuid4().hex[:8]}"
    bus = open_bus(url)
    bus.declare(Topology(federations=[fed]))
    for f in frames:
        bus.publish(UPDATES, fed, f, message_id=uuid.uuid4().hex)
    inbox: queue.Queue = queue.Queue()
    agg = get_aggregator("FedAvg", parameters={}, initial=reference)
    agg.begin_round(1, reference)
    t = time.perf_counter()
    # the coordinator's pipeline: verify + decode on the bus worker thread, check + add here
    consumer = bus.consume(updates_queue(fed), lambda d: inbox.put(open_delivery(d, trust)), prefetch=1000)
    held = []
    for _ in frames:
        inbound = inbox.get(timeout=300)
        assert inbound.error is None, inbound.error
        p = inbound.opened.envelope.payload
        check_weights(p.weights, reference)
        agg.add(Contribution("site", p.weights, p.num_examples))
        del p
        inbound.delivery.release_body()
        held.append(inbound.delivery)
        del inbound
    agg.finish_round()
    dt = time.perf_counter() - t
    for d in held:
        d.ack()
    consumer.cancel()
    bus.close()
    _delete_queue(url, updates_queue(fed))
    return sum(len(f) for f in frames) / dt / MB


def _delete_queue(url: str, name: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_delete(name)
    conn.close()


def bench_aggregation(reference, repeats: int = 5) -> dict:
    s = WeightedSum(reference)
    ws = [a for _, a in reference]
    nbytes = sum(a.nbytes for a in ws)
    best_agg = best_add32 = best_add64 = float("inf")
    acc32 = [np.zeros_like(a) for a in ws]
    acc64 = [np.zeros(a.shape, np.float64) for a in ws]
    for _ in range(repeats):
        t = time.perf_counter()
        s.add(reference, 3.0)
        best_agg = min(best_agg, time.perf_counter() - t)
        t = time.perf_counter()
        for acc, a in zip(acc32, ws):
            np.add(acc, a, out=acc)
        best_add32 = min(best_add32, time.perf_counter() - t)
        t = time.perf_counter()
        for acc, a in zip(acc64, ws):
            np.add(acc, a, out=acc)
        best_add64 = min(best_add64, time.perf_counter() - t)
    return {
        "aggregate_MBps": nbytes / best_agg / MB,
        "np_add_f32_MBps": nbytes / best_add32 / MB,
        "np_add_f64acc_MBps": nbytes / best_add64 / MB,
        "ratio_vs_np_add_f32": best_add32 / best_agg,
        "ratio_vs_np_add_same_dtypes": best_add64 / best_agg,
    }


def bench_memory(reference, counts, signer, trust) -> dict:
    out = {}
    for n in counts:
        gc.collect()
        tracemalloc.start()
        tracemalloc.reset_peak()
        agg = get_aggregator("FedAvg", parameters={}, initial=reference)
        agg.begin_round(1, reference)
        for i in range(n):
            f = frame_for(reference, i, signer)
            ingest_one(f, trust, reference, agg)
            del f
        agg.finish_round()
        out[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del agg
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=os.environ.get("FEDBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--memory-updates", default="10,200")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="10 K parameters, 2 updates; a broker error fails the run: checks the bench runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.params, args.updates, args.memory_updates = 10_000, 2, "2,4"

    reference = model(args.params)
    params = sum(a.size for _, a in reference)
    signer = Signer.generate()
    trust = TrustStore()
    trust.add("site", signer.public_pem())
    frames = [frame_for(reference, i, signer) for i in range(args.updates)]
    res: dict = {"params": params, "frame_MB": len(frames[0]) / MB, "updates": len(frames)}
    res["ingest_from_memory_MBps"] = bench_processing(frames, trust, reference)
    try:
        res["raw_pika_consume_MBps"] = bench_raw_pika(args.broker, frames)
        res["ingest_via_amqp_bus_MBps"] = bench_bus_ingest(args.broker, frames, trust, reference)
        res["ratio_ingest_vs_raw_pika"] = res["ingest_from_memory_MBps"] / res["raw_pika_consume_MBps"]
        res["ratio_end_to_end_vs_raw_pika"] = res["ingest_via_amqp_bus_MBps"] / res["raw_pika_consume_MBps"]
    except Exception as e:  # noqa: BLE001 - no broker: report the rest
        if args.smoke:
            raise
        res["broker_error"] = f"{type(e).__name__}: {e}"
    del frames
    res["aggregation"] = bench_aggregation(reference)
    counts = [int(x) for x in args.memory_updates.split(",") if x]
    peaks = bench_memory(reference, counts, signer, trust)
    res["peak_memory_MB"] = {str(k): v / MB for k, v in peaks.items()}
    if len(counts) >= 2:
        res["peak_ratio_last_vs_first"] = peaks[counts[-1]] / peaks[counts[0]]
    res["model_MB"] = sum(a.nbytes for _, a in reference) / MB
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"model: {params:,} float32 parameters, frame {res['frame_MB']:.1f} MB, {res['updates']} updates")
    print(f"ingest (verify + decode + check + FedAvg.add) from memory: {res['ingest_from_memory_MBps']:8.1f} MB/s")
    if "raw_pika_consume_MBps" in res:
        print(f"raw pika consume of the same bytes:                      {res['raw_pika_consume_MBps']:8.1f} MB/s")
        print(f"ingest end to end via AmqpBus (consume + all the above): {res['ingest_via_amqp_bus_MBps']:8.1f} MB/s")
        print(f"ratio ingest / raw pika: {res['ratio_ingest_vs_raw_pika']:.2f} (target >= 0.8); "
              f"end-to-end / raw pika: {res['ratio_end_to_end_vs_raw_pika']:.2f}")
    else:
        print(f"broker part skipped: {res['broker_error']}")
    a = res["aggregation"]
    print(f"aggregation alone: {a['aggregate_MBps']:.0f} MB/s; np.add f32: {a['np_add_f32_MBps']:.0f} MB/s; "
          f"np.add into f64 accumulator: {a['np_add_f64acc_MBps']:.0f} MB/s")
    print(f"ratio aggregation / np.add: {a['ratio_vs_np_add_f32']:.2f} vs f32 add, "
          f"{a['ratio_vs_np_add_same_dtypes']:.2f} vs same-dtype add (target >= 0.5)")
    print("peak traced memory: " + ", ".join(f"{k} updates {v:.0f} MB" for k, v in res["peak_memory_MB"].items())
          + f" (model {res['model_MB']:.0f} MB); ratio {res.get('peak_ratio_last_vs_first', float('nan')):.2f}")


if __name__ == "__main__":
    main()
