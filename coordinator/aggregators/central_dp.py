"""Central differential privacy as a wrapper around any synchronous aggregator.

Each update's delta from the round's global model is clipped to L2 norm
``clip_norm``; Gaussian noise with standard deviation ``noise_multiplier · clip_norm / n``
(n = updates in the round) is added to the aggregate. The noise is seeded from
(seed, round), so a resumed run adds the same noise.
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like
from protocol.messages import Tensors


def l2_norm(arrays) -> float:
    return float(np.sqrt(sum(float(np.dot(a.reshape(-1).astype(np.float64), a.reshape(-1).astype(np.float64))) for a in arrays)))


def clip_delta(weights: Tensors, reference: Tensors, clip_norm: float) -> Tensors:
    """``reference + Δ · min(1, clip_norm / ‖Δ‖)`` with Δ = weights − reference."""
    delta = [np.asarray(w, dtype=np.float64) - r for (_, w), (_, r) in zip(weights, reference, strict=True)]
    norm = l2_norm(delta)
    scale = 1.0 if norm <= clip_norm or norm == 0.0 else clip_norm / norm
    return like(reference, [r + d * scale for (_, r), d in zip(reference, delta, strict=True)])


class CentralDP(Aggregator):
    synchronous = True

    def __init__(self, inner: Aggregator, *, clip_norm: float, noise_multiplier: float, seed: int = 0) -> None:
        if not inner.synchronous:
            raise ValueError(f"federated.central_dp wraps synchronous aggregators only, not {inner.name}")
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError(
                f"federated.central_dp: clip_norm must be > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}"
            )
        self.inner = inner
        self.name = f"{inner.name}+central_dp"
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.seed = seed
        self._reference: Tensors = ()
        self._round = 0
        self._n = 0

    def begin_round(self, server_round: int, global_weights: Tensors) -> None:
        self._round, self._reference, self._n = server_round, global_weights, 0
        self.inner.begin_round(server_round, global_weights)

    def add(self, contribution: Contribution) -> None:
        clipped = clip_delta(contribution.weights, self._reference, self.clip_norm)
        self._n += 1
        self.inner.add(
            Contribution(
                site=contribution.site,
                weights=clipped,
                num_examples=contribution.num_examples,
                base_round=contribution.base_round,
                metrics=contribution.metrics,
            )
        )

    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm / max(self._n, 1)

    def finish_round(self) -> Tensors:
        aggregate = self.inner.finish_round()
        rng = np.random.default_rng([self.seed, self._round, 0xD9])
        std = self.noise_std()
        return like(aggregate, [a + rng.normal(0.0, std, size=a.shape) for _, a in aggregate])

    def state(self):
        return self.inner.state()

    def load_state(self, arrays) -> None:
        self.inner.load_state(arrays)
