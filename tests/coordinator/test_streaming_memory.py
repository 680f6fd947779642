"""Streaming FedAvg keeps memory O(model): peak for 200 updates ≈ peak for 10.

Each update goes the coordinator's way: signed frame → ``open_frame`` (verify, zero-copy
decode) → ``check_weights`` → ``FedAvg.add`` → dropped. tracemalloc sees numpy's
buffers, the frames and the accumulators.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np

from coordinator.aggregators import Contribution, get_aggregator
from coordinator.validation import check_weights
from protocol.codec import new_envelope, open_frame, seal
from protocol.messages import Update
from protocol.signing import Signer, TrustStore

SHAPES = (("0.weight", (128, 256)), ("0.bias", (128,)), ("1.weight", (64, 128)), ("1.bias", (64,)))


def _ingest(n: int, signer: Signer, trust: TrustStore, reference) -> tuple[int, dict]:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    agg = get_aggregator("FedAvg", parameters={}, initial=reference)
    agg.begin_round(1, reference)
    for i in range(n):
        weights = tuple((name, a + np.float32(i % 7)) for name, a in reference)
        env = new_envelope(Update(task_id="t", weights=weights, num_examples=1 + i % 3, metrics={}, epsilon=None,
                                  delta=None, base_round=0), federation="f", run_id="r", round=1, sender="site",
                           recipient="coordinator")
        del weights
        frame = seal(env, signer)
        del env
        opened = open_frame(frame, trust)
        p = opened.envelope.payload
        check_weights(p.weights, reference)
        agg.add(Contribution("site", p.weights, p.num_examples))
        del frame, opened, p
    out = dict(agg.finish_round())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, out


def test_peak_memory_does_not_grow_with_the_number_of_updates():
    rng = np.random.default_rng(0)
    reference = tuple((n, rng.normal(size=s).astype(np.float32)) for n, s in SHAPES)
    model_bytes = sum(a.nbytes for _, a in reference)
    signer = Signer.generate()
    trust = TrustStore()
    trust.add("site", signer.public_pem())
    peak10, out10 = _ingest(10, signer, trust, reference)
    peak200, out200 = _ingest(200, signer, trust, reference)
    assert peak200 < 1.15 * peak10, (peak10, peak200)
    assert peak200 < 12 * model_bytes  # a handful of model-sized buffers, never one per update
    # and the sum is right: weights i%7 with num_examples 1 + i%3
    i = np.arange(200)
    expected = float(np.sum((i % 7) * (1 + i % 3)) / np.sum(1 + i % 3))
    np.testing.assert_allclose(out200["0.bias"], reference[1][1] + expected, rtol=1e-5)
