"""Bus throughput: fedbus's AMQP bus vs raw pika doing the same work, and the memory bus.

The work, per message: publish persistently to ``fedbus.tasks`` with ``mandatory`` and
wait for *that message's* publisher confirm (no batching: fedbus's ``publish`` returns
after its own confirm, so raw pika waits per message too), consume it with the same
prefetch and ack it. Time runs from the first publish until the last ack. Runs
alternate (raw, fedbus, raw, fedbus, ...) on the same broker and the best of each is
kept, to damp noise from other load on the machine.

    python bench/bus_throughput.py [--url amqp://...] [--rounds 2] [--quick]

Target (issue 3): fedbus >= 0.8 x raw pika for 1 MiB frames and up.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pika  # noqa: E402  (the bench compares against raw pika on purpose)

from protocol.transport import Topology, open_bus  # noqa: E402
from protocol.transport.topology import TASKS, site_queue  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
PREFETCH = 8


def fedbus_run(url: str, site: str, body: bytes, n: int) -> float:
    pub, sub = open_bus(url), open_bus(url)
    done = threading.Event()
    count = 0

    def handler(d) -> None:  # type: ignore[no-untyped-def]
        nonlocal count
        d.ack()
        count += 1
        if count == n:
            done.set()

    c = sub.consume(site_queue(site), handler, prefetch=PREFETCH)
    t0 = time.perf_counter()
    for _ in range(n):
        pub.publish(TASKS, site, body, message_id=uuid.uuid4().hex)
    if not done.wait(600):
        raise RuntimeError(f"fedbus: only {count}/{n} consumed")
    elapsed = time.perf_counter() - t0
    c.cancel()
    pub.close()
    sub.close()
    return elapsed


def raw_run(url: str, site: str, body: bytes, n: int) -> float:
    params = pika.URLParameters(url)
    user = params.credentials.username
    done = threading.Event()
    ready = threading.Event()

    def consume() -> None:
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=PREFETCH)
        count = 0

        def on_message(ch, method, props, data) -> None:  # type: ignore[no-untyped-def]
            nonlocal count
            ch.basic_ack(method.delivery_tag)
            count += 1
            if count == n:
                done.set()

        ch.basic_consume(site_queue(site), on_message)
        ready.set()
        while not done.is_set():
            conn.process_data_events(time_limit=0.2)
        conn.close()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    ready.wait(30)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    t0 = time.perf_counter()
    for _ in range(n):
        props = pika.BasicProperties(delivery_mode=2, message_id=uuid.uuid4().hex, user_id=user, headers={})
        ch.basic_publish(TASKS, site, body, properties=props, mandatory=True)
    if not done.wait(600):
        raise RuntimeError("raw pika: not all consumed")
    elapsed = time.perf_counter() - t0
    t.join(10)
    conn.close()
    return elapsed


def memory_run(body: bytes, n: int) -> float:
    url = f"memory://bench-{uuid.uuid4().hex[:8]}"
    bus = open_bus(url)
    bus.declare(Topology(sites=["s"]))
    done = threading.Event()
    count = 0

    def handler(d) -> None:  # type: ignore[no-untyped-def]
        nonlocal count
        d.ack()
        count += 1
        if count == n:
            done.set()

    c = bus.consume(site_queue("s"), handler, prefetch=PREFETCH)
    t0 = time.perf_counter()
    for _ in range(n):
        bus.publish(TASKS, "s", body, message_id=uuid.uuid4().hex)
    done.wait(600)
    elapsed = time.perf_counter() - t0
    c.cancel()
    bus.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("FEDBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer messages")
    ap.add_argument("--smoke", action="store_true", help="a few messages, one round: checks the bench runs (seconds)")
    args = ap.parse_args(argv)
    scale = 0.01 if args.smoke else 0.2 if args.quick else 1.0
    if args.smoke:
        args.rounds = 1
    cases = [("1 KiB", KiB, max(1, int(3000 * scale))), ("1 MiB", MiB, max(1, int(300 * scale))),
             ("8 MiB", 8 * MiB, max(1, int(40 * scale)))]

    site = f"bench-{uuid.uuid4().hex[:8]}"
    admin = open_bus(args.url)
    admin.declare(Topology(sites=[site]))
    print(f"broker {pika.URLParameters(args.url).host}, prefetch {PREFETCH}, persistent, confirm per message, "
          f"best of {args.rounds} alternating rounds", file=sys.stderr)
    rows = []
    try:
        for label, size, n in cases:
            body = os.urandom(size)
            best = {"raw": float("inf"), "fedbus": float("inf")}
            for r in range(args.rounds):
                for kind, fn in (("raw", raw_run), ("fedbus", fedbus_run)):
                    print(f"  {label}: {kind} round {r + 1}/{args.rounds} ({n} messages)...", file=sys.stderr, flush=True)
                    best[kind] = min(best[kind], fn(args.url, site, body, n))
            rows.append((label, size, n, n / best["raw"], n / best["fedbus"]))
        mem = [(label, n * 5 if size == KiB else n, size) for label, size, n in cases[:2]]
        mem_rows = [(label, size, m, m / memory_run(os.urandom(size), m)) for label, m, size in mem]
    finally:
        admin.delete_queue(site_queue(site))  # type: ignore[attr-defined]
        admin.close()

    print(f"{'frame':>7} {'n':>5} {'raw pika msg/s':>15} {'fedbus msg/s':>13} {'raw MB/s':>9} {'fedbus MB/s':>12} {'ratio':>6}")
    for label, size, n, raw, fed in rows:
        print(f"{label:>7} {n:>5} {raw:>15.1f} {fed:>13.1f} {raw * size / 1e6:>9.1f} {fed * size / 1e6:>12.1f} {fed / raw:>6.2f}")
    print("in-memory bus (publish + consume + ack):")
    for label, size, m, rate in mem_rows:
        print(f"{label:>7} {m:>5} {rate:>15.1f} msg/s {rate * size / 1e6:>9.1f} MB/s")
    ok = all(fed / raw >= 0.8 for label, size, n, raw, fed in rows if size >= MiB)
    print(f"target fedbus >= 0.8 x raw pika for >= 1 MiB: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
