"""Checks an update passes before it may touch the global model.

The signature, enrollment and frame limits are checked by ``protocol.codec.open_frame``
(before any payload is decoded); this module adds what only the coordinator knows:
which run and federation it is running, whether the sender is enrolled *and* the
signer, and that the weights have exactly the global model's names, shapes and dtypes,
hold only finite values, and (optionally) move the model by at most ``norm_bound``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from protocol.messages import Envelope, Tensors


class Rejected(Exception):
    """An update refused with a machine ``reason`` (dead-letter header prefix) and words for a person."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def header(self) -> str:
        return f"{self.reason}: {self.detail}"


def check_envelope(
    env: Envelope, *, federation: str, run_id: str, recipient: str = "coordinator",
    max_skew_s: float = 300.0, now: float | None = None,
) -> None:
    """Federation, run, recipient and clock skew of a message addressed to this coordinator."""
    if env.federation != federation:
        raise Rejected("wrong_federation", f"message is for federation {env.federation!r}, this coordinator runs {federation!r}")
    if env.run_id != run_id:
        raise Rejected("wrong_run", f"message is for run {env.run_id!r}, the current run is {run_id!r}")
    if env.recipient != recipient:
        raise Rejected("wrong_recipient", f"message is addressed to {env.recipient!r}, not {recipient!r}")
    # Only the future is bounded: an update may legitimately wait in the durable queue for
    # hours while the coordinator is down; old frames are caught by the run, round and
    # message-id checks instead.
    now = time.time() if now is None else now
    if env.sent_at - now > max_skew_s:
        raise Rejected(
            "clock_skew",
            f"sent_at is {env.sent_at - now:+.0f} s ahead of the coordinator's clock (allowed {max_skew_s:.0f} s); "
            f"check NTP at {env.sender}",
        )


def check_weights(weights: Tensors, reference: Tensors, *, norm_bound: float | None = None) -> None:
    """Same names, shapes and dtypes as ``reference``; finite; ‖w − reference‖₂ ≤ ``norm_bound``."""
    if len(weights) != len(reference):
        raise Rejected(
            "wrong_shape", f"update has {len(weights)} tensors, the global model has {len(reference)}"
        )
    sq = 0.0
    for (name, w), (rname, r) in zip(weights, reference):
        if name != rname:
            raise Rejected("wrong_shape", f"update tensor {name!r} where the global model has {rname!r}")
        if w.shape != r.shape:
            raise Rejected("wrong_shape", f"tensor {name!r} has shape {list(w.shape)}, the global model's is {list(r.shape)}")
        if w.dtype != r.dtype:
            raise Rejected("wrong_dtype", f"tensor {name!r} has dtype {w.dtype}, the global model's is {r.dtype}")
        # A float64 sum of finite float32 values cannot overflow, so a non-finite sum means
        # NaN or ±inf inside, without allocating a boolean mask of the tensor's size.
        if w.dtype.kind == "f" and not math.isfinite(float(np.sum(w, dtype=np.float64))):
            bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
            raise Rejected("non_finite", f"tensor {name!r} holds {bad} NaN or infinite values")
        if norm_bound is not None:
            d = w.astype(np.float64) - r
            sq += float(np.dot(d.reshape(-1), d.reshape(-1)))
    if norm_bound is not None and math.sqrt(sq) > norm_bound:
        raise Rejected("norm_bound", f"update moves the model by L2 norm {math.sqrt(sq):.4g} > norm_bound {norm_bound:g}")
