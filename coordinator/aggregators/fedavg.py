"""Streaming FedAvg: a running weighted sum, so memory stays O(model) for any number of sites."""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like, register
from protocol.messages import Tensors


_CHUNK = 1 << 15  # elements per step: 256 KiB of float64, stays in L2


class WeightedSum:
    """Accumulates ``Σ n_i · w_i`` and ``Σ n_i`` in float64 buffers allocated once per model."""

    def __init__(self, reference: Tensors) -> None:
        self.reference = reference
        self.acc = [np.zeros(a.shape, dtype=np.float64) for _, a in reference]
        self.total = 0.0
        self.count = 0
        self._scratch = np.empty(_CHUNK, dtype=np.float64)

    def reset(self) -> None:
        for a in self.acc:
            a.fill(0.0)
        self.total = 0.0
        self.count = 0

    def add(self, weights: Tensors, weight: float) -> None:
        """``acc += weight · w`` per tensor, in cache-sized chunks through one scratch buffer.

        ``acc += w * weight`` would allocate a model-sized temporary per tensor and
        stream it through memory twice; the chunked form keeps the temporary in cache.
        """
        for acc, (_, w) in zip(self.acc, weights, strict=True):
            a = acc.reshape(-1)
            x = np.asarray(w).reshape(-1)
            if a.size != x.size:
                raise ValueError(f"tensor has {x.size} elements, the model's has {a.size}")
            for start in range(0, a.size, _CHUNK):
                stop = min(start + _CHUNK, a.size)
                tmp = self._scratch[: stop - start]
                np.multiply(x[start:stop], weight, out=tmp, casting="unsafe")
                np.add(a[start:stop], tmp, out=a[start:stop])
        self.total += weight
        self.count += 1

    def mean(self) -> Tensors:
        if self.total <= 0:
            raise ValueError("no weight was added to the sum (every update had num_examples = 0?)")
        return like(self.reference, [a / self.total for a in self.acc])


@register("FedAvg")
class FedAvg(Aggregator):
    """McMahan et al.: the mean of site models weighted by ``num_examples``."""

    name = "FedAvg"
    synchronous = True

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self._sum = WeightedSum(initial)

    def begin_round(self, server_round: int, global_weights: Tensors) -> None:
        self._sum.reset()

    def add(self, contribution: Contribution) -> None:
        if contribution.num_examples <= 0:
            raise ValueError(f"update from {contribution.site} has num_examples={contribution.num_examples}; must be > 0")
        self._sum.add(contribution.weights, float(contribution.num_examples))

    def finish_round(self) -> Tensors:
        return self._sum.mean()
