#!/usr/bin/env python
"""Secure aggregation's own cost per round: CPU seconds and bytes per site, no bus.

    .venv/bin/python bench/secure_aggregation.py [--sites 3,10] [--params 1000000,10000000] [--json]
    .venv/bin/python bench/secure_aggregation.py --smoke        # 3 sites x 10,000 parameters, seconds

For each point it runs the real protocol in functions (``protocol/secagg``, ``site_worker/secagg.py``,
``coordinator/secagg.py``: quantise, ChaCha20 mask, MDS shares, X25519 + AES-GCM per recipient,
durable site state) and reports, per site: the time to mask and seal its shares, to open the
N - 1 shares it receives, and to answer one unmask request; for the coordinator: the time to
sum N masked vectors and decode the mask sum from U answers. Bytes per site are what a site
sends (masked update, N - 1 sealed shares, one answer) over what it sends without secure
aggregation (a float32 update). U = ceil(2N/3), T = 1 (a third of the sites may drop after uploading).

``--bus URL`` (``amqp://...`` or ``memory``) also times real rounds: the production coordinator
and site workers (one OS process per site on RabbitMQ) train a 11-H-H-1 MLP of about ``params`` parameters
on heart_failure for 2 rounds with and without ``federated.secure_aggregation``;
``round_time_ratio`` is the mean round wall time with over without (round 1 included: the
roster exchange happens before it). On RabbitMQ each site logs in as its own least-privilege broker
user (``simulate(broker_users=True)``), as deployed sites do. Without ``--bus`` it is null.

    .venv/bin/python bench/secure_aggregation.py --sites 3 --params 1000000 --bus amqp://guest:guest@127.0.0.1:5672/%2F --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.secagg import CoordinatorSecAgg, weighted_mean  # noqa: E402
from protocol.secagg.coding import Coding  # noqa: E402
from protocol.signing import Signer, TrustStore  # noqa: E402
from site_worker.secagg import SiteSecAgg, weighted_vector  # noqa: E402

RUN = "bench-secagg"


def point(n: int, params: int) -> dict:
    u, t = max(2, math.ceil(2 * n / 3)), 1
    length = params + 1  # the weight rides in the masked vector
    with tempfile.TemporaryDirectory() as tmp:
        coord = Signer.generate()
        coordinators, peers = TrustStore(), TrustStore()
        coordinators.add("coordinator", coord.public_pem())
        names = [f"site-{i:02d}" for i in range(n)]
        signers = {s: Signer.generate() for s in names}
        for s in names:
            peers.add(s, signers[s].public_pem())
        sites = {s: SiteSecAgg(Path(tmp) / s, s, signers[s], coordinators, peers) for s in names}
        c = CoordinatorSecAgg.build(coord, RUN, [sites[s].key_binding(RUN) for s in names], min_contributors=2,
                                    threshold=u, privacy=t, clip=1.0, scale=2.0**16, length=length)
        for s in names:
            sites[s].commit_roster(c.roster, c.signed_roster)
        rng = np.random.default_rng(0)
        delta = rng.normal(0, 0.01, params).astype(np.float32)
        mask_s, open_s, answer_s, sent = [], [], [], []
        masked = c.new_sum()
        t_sum = 0.0
        for s in names:
            t0 = time.perf_counter()
            out = sites[s].mask(RUN, 1, weighted_vector(delta, 100, 1000))
            mask_s.append(time.perf_counter() - t0)
            sent.append(4 * length + sum(len(b) for b in out.sealed.values()))
            for r, sealed in out.sealed.items():
                t0 = time.perf_counter()
                sites[r].receive_share(RUN, s, 1, sealed)
                open_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            masked.add(s, 1, out.masked)
            t_sum += time.perf_counter() - t0
        req, signed = c.request(masked)
        answers = {}
        for s in names[:u]:
            t0 = time.perf_counter()
            answers[s] = sites[s].answer(req, signed)
            answer_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        total = c.unmask(masked, answers)
        t_decode = time.perf_counter() - t0
        err = float(np.abs(weighted_mean(total) - delta.astype(np.float64)).max())
        piece = Coding(n, u, t, length).piece
        per_site_bytes = float(np.mean(sent)) + 4 * piece
        return {
            "sites": n, "params": params, "threshold": u, "privacy": t,
            "site_mask_and_seal_s": float(np.mean(mask_s)),
            "site_open_shares_s": float(np.sum(open_s) / n),
            "site_answer_s": float(np.mean(answer_s)),
            "coordinator_sum_s": t_sum, "coordinator_decode_s": t_decode,
            "bytes_per_site": per_site_bytes, "plain_bytes_per_site": 4.0 * params,
            "bytes_per_site_ratio": per_site_bytes / (4.0 * params),
            "round_time_ratio": None,
            "max_abs_error": err,
        }


def _mlp_experiment(n: int, params: int, secure: bool) -> dict:
    exp = json.loads((Path(__file__).resolve().parents[1] / "examples" / "heart_failure.json").read_text())
    # 11-H-H-1: 12H + H*H + H + H + 1 = H**2 + 14H + 1 parameters, H values per row (the sites' memory policy)
    hidden = max(1, int((-14 + math.sqrt(196 + 4 * (params - 1))) / 2))
    exp["architecture"]["layers"] = [
        {"name": "Input Layer", "type": "input", "params": {"features": 11}, "readonly": True},
        {"name": "Linear", "type": "Linear", "params": {"in_features": 11, "out_features": hidden, "bias": True}},
        {"name": "ReLU", "type": "ReLU", "params": {}},
        {"name": "Linear", "type": "Linear", "params": {"in_features": hidden, "out_features": hidden, "bias": True}},
        {"name": "ReLU", "type": "ReLU", "params": {}},
        {"name": "Linear", "type": "Linear", "params": {"in_features": hidden, "out_features": 1, "bias": True}},
        {"name": "Output Layer", "type": "output", "params": {"features": 1}, "readonly": True},
    ]
    exp["training"]["optimizer"].pop("differential_privacy", None)
    # a site's default max_train_memory_mb (2048) bounds batch x parameters x 4 bytes: 256 rows at 1 M,
    # 37 at 10 M (batch 256 at 10 M would ask 10 GB, and every site declines)
    exp["training"]["batch_size"] = max(1, min(256, int(1.5e9 / (4 * params))))
    exp["federated"]["parameters"].update(min_fit_clients=n, min_available_clients=n, fraction_eval=0.0)
    exp["federated"]["round_timeout_s"] = 600
    if secure:
        exp["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": max(2, math.ceil(2 * n / 3))}
    return exp


def round_time_ratio(n: int, params: int, bus: str) -> dict:
    """Mean round wall time of a real run with secure aggregation over one without (same bus)."""
    import uuid

    from simulator.run import simulate

    times = {}
    for secure in (False, True):
        # broker_users: each site process logs in as its own broker user, as deployed sites do (the
        # coordinator's reassembly quota is per user: ten sites sharing one user queue their masked
        # updates behind one another, and the updates are received twice)
        doc = simulate(_mlp_experiment(n, params, secure), sites=n, rounds=2, broker=bus, progress=False,
                       site_suffix=f"-{uuid.uuid4().hex[:6]}", broker_users=bus.startswith("amqp"))
        times[secure] = float(np.mean([r["wall_s"] for r in doc["rounds"]]))
    return {"round_s": times[False], "secure_round_s": times[True], "round_time_ratio": times[True] / times[False]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", default="3,10")
    ap.add_argument("--params", default="1000000,10000000")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="3 sites x 10,000 parameters, the rounds on the in-memory bus")
    ap.add_argument("--bus", default=None, help="also time real rounds on this broker (amqp://... or memory)")
    a = ap.parse_args()
    from protocol.logs import configure_logging

    configure_logging("cli", "warning")  # on stderr: --json's stdout is the JSON document alone
    sites = [3] if a.smoke else [int(x) for x in a.sites.split(",")]
    params = [10_000] if a.smoke else [int(x) for x in a.params.split(",")]
    points = [point(n, p) for n in sites for p in params]
    if a.smoke and not a.bus:
        a.bus = "memory"  # the round-time path runs too, so a protocol change that breaks it fails the suite
    if a.bus:
        for pt in points:
            pt.update(round_time_ratio(pt["sites"], pt["params"], a.bus), bus=a.bus.split("@")[-1])
    if a.json:
        print(json.dumps(points))
        return
    for pt in points:
        print(f"{pt['sites']:>3} sites x {pt['params']:>9,} params: mask+seal {pt['site_mask_and_seal_s']:.2f}s, "
              f"open {pt['site_open_shares_s']:.2f}s, answer {pt['site_answer_s']:.2f}s per site; coordinator "
              f"sum {pt['coordinator_sum_s']:.2f}s decode {pt['coordinator_decode_s']:.2f}s; bytes/site "
              f"x{pt['bytes_per_site_ratio']:.2f}; max error {pt['max_abs_error']:.1e}"
              + (f"; round time x{pt['round_time_ratio']:.2f} ({pt['secure_round_s']:.2f}s / {pt['round_s']:.2f}s)"
                 if pt.get("round_time_ratio") else ""))


if __name__ == "__main__":
    main()
