#!/usr/bin/env python
"""Wire codec figures: seal / open time and memory for models of growing size.

    .venv/bin/python bench/codec.py [--sizes-mb 1,10,100] [--repeats 3] [--json]

For each size it prints seal and open wall time (median of repeats), throughput, the
share of time spent in Ed25519 and SHA-256 (the floor: signing hashes the body twice,
verifying once, audit hashes body and frame), and the extra memory ``open_frame``
allocates as a ratio of the frame size (zero-copy decode: should stay far below 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.codec import decode_frame, encode_envelope, new_envelope, open_frame, seal, signed_digest  # noqa: E402
from protocol.messages import Update  # noqa: E402
from protocol.signing import Signer, TrustStore  # noqa: E402


def model(size_mb: float) -> tuple[tuple[str, np.ndarray], ...]:
    """A few layers of float32 adding up to ``size_mb`` MiB, like a real state dict."""
    total = int(size_mb * 2**20 / 4)
    rng = np.random.default_rng(0)
    sizes = [total // 2, total // 4, total // 8, total - total // 2 - total // 4 - total // 8]
    return tuple((f"layer{i}.weight", rng.standard_normal(n, dtype=np.float32)) for i, n in enumerate(sizes))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size_mb: float, repeats: int) -> dict:
    signer = Signer.generate()
    trust = TrustStore()
    trust.add("site-1", signer.public_pem())
    update = Update(task_id="t", weights=model(size_mb), num_examples=100, metrics={"after_loss": 0.3},
                    epsilon=1.0, delta=1e-5, base_round=1)
    env = new_envelope(update, federation="fed", run_id="run", round=1, sender="site-1", recipient="coordinator")
    frame = seal(env, signer)
    _, kid, body, sig = decode_frame(frame)
    body_bytes = bytes(body)

    seal_s = timed(lambda: seal(env, signer), repeats)
    open_s = timed(lambda: open_frame(frame, trust), repeats)
    encode_s = timed(lambda: encode_envelope(env), repeats)
    # what a frame's signature covers (frame v2): the body's sha256 under a fixed prefix
    sign_s = timed(lambda: signer.sign(signed_digest(body_bytes)), repeats)
    verify_s = timed(lambda: trust.verify(kid, signed_digest(body), sig), repeats)
    sha_s = timed(lambda: hashlib.sha256(frame).digest(), repeats)  # the body's is in verify_s (signed_digest)

    tracemalloc.start()
    opened = open_frame(frame, trust)
    _, open_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    zero_copy = all(
        np.shares_memory(arr, np.frombuffer(frame, np.uint8)) for _, arr in opened.envelope.payload.weights
    )
    mb = len(frame) / 2**20
    return {
        "frame_mib": round(mb, 2),
        "seal_s": round(seal_s, 4),
        "open_s": round(open_s, 4),
        "seal_mib_per_s": round(mb / seal_s, 1),
        "open_mib_per_s": round(mb / open_s, 1),
        "encode_body_s": round(encode_s, 4),
        "sign_s": round(sign_s, 4),
        "verify_s": round(verify_s, 4),
        "sha256_body_and_frame_s": round(sha_s, 4),
        "seal_crypto_share": round(sign_s / seal_s, 2),
        "open_crypto_share": round((verify_s + sha_s) / open_s, 2),
        "open_peak_alloc_bytes": open_peak,
        "open_alloc_over_frame": round(open_peak / len(frame), 5),
        "decoded_arrays_share_frame_memory": zero_copy,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="1,10,100")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    ap.add_argument("--smoke", action="store_true", help="one 1 MB frame, once: checks the bench runs (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes_mb, args.repeats = "1", 1
    rows = [measure(float(s), args.repeats) for s in args.sizes_mb.split(",")]
    if args.json:
        print(json.dumps({"codec": rows}, indent=2))
        return
    for r in rows:
        print(
            f"{r['frame_mib']:>8.1f} MiB  seal {r['seal_s'] * 1000:8.1f} ms ({r['seal_mib_per_s']:7.1f} MiB/s, "
            f"{r['seal_crypto_share']:.0%} Ed25519)  open {r['open_s'] * 1000:8.1f} ms "
            f"({r['open_mib_per_s']:7.1f} MiB/s, {r['open_crypto_share']:.0%} Ed25519+SHA-256)  "
            f"open allocates {r['open_peak_alloc_bytes'] / 1024:.0f} KiB = {r['open_alloc_over_frame']:.4%} of the frame, "
            f"zero-copy={r['decoded_arrays_share_frame_memory']}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
