#!/usr/bin/env python
"""Secure DP noise: milliseconds per million values, before and after the float32 path.

    .venv/bin/python bench/secure_noise.py [--millions 1,4] [--repeats 5] [--json OUT] [--smoke]

``before`` is the float64 NumPy path DP-SGD used until issue 23 (4 Box-Muller draws a value
over 53-bit uniforms from AES-256-CTR, summed and halved; ``SecureRandom.standard_normal`` is
that path and still serves small releases); ``after`` is ``SecureRandom.gaussian_like`` (the
same 4-draw sum over the same stream, vectorised in float32 with torch); ``torch.normal`` (a
seedable mt19937/Philox stream, not secret) is the floor. Each figure is the median of the
repeats, in one process, so the ratio is what counts on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from site_worker.secure_rng import SecureRandom  # noqa: E402


def before(rng: SecureRandom, ref: torch.Tensor, std: float) -> torch.Tensor:
    """The float64 path as it was: ``standard_normal(4n)`` summed 4 at a time, halved."""
    n = ref.numel()
    z = rng.standard_normal(4 * n).reshape(4, n).sum(axis=0) / 2.0
    return torch.from_numpy(z * std).to(dtype=ref.dtype).reshape(ref.shape)


def ms_per_million(fn: Callable[[], object], n: int, repeats: int) -> float:
    fn()  # warm-up: allocator, OpenSSL context
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 / (n / 1e6)


def measure(millions: float, repeats: int) -> dict[str, float]:
    n = int(millions * 1_000_000)
    ref = torch.zeros(n, dtype=torch.float32)
    rng = SecureRandom.secret()
    row = {
        "values": float(n),
        "before_ms_per_m": ms_per_million(lambda: before(rng, ref, 1.0), n, repeats),
        "after_ms_per_m": ms_per_million(lambda: rng.gaussian_like(ref, 1.0), n, repeats),
        "torch_normal_ms_per_m": ms_per_million(lambda: torch.normal(0.0, 1.0, size=(n,)), n, repeats),
    }
    row["speedup"] = row["before_ms_per_m"] / row["after_ms_per_m"]
    return {k: round(v, 2) for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--millions", default="1,4", help="comma-separated sizes, in millions of values")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--smoke", action="store_true", help="0.1 M values, 2 repeats (seconds)")
    args = ap.parse_args(argv)
    sizes = [0.1] if args.smoke else [float(x) for x in args.millions.split(",")]
    repeats = 2 if args.smoke else args.repeats
    rows = [measure(m, repeats) for m in sizes]
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'values':>10} {'before ms/M':>12} {'after ms/M':>11} {'torch.normal':>13} {'speedup':>8}")
    for r in rows:
        print(f"{int(r['values']):>10} {r['before_ms_per_m']:>12.1f} {r['after_ms_per_m']:>11.1f} "
              f"{r['torch_normal_ms_per_m']:>13.1f} {r['speedup']:>7.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
