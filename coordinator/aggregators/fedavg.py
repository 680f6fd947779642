"""Streaming FedAvg: a running weighted sum, so memory stays O(model) for any number of sites."""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like, register
from protocol.messages import Tensors


_CHUNK = 1 << 15  # elements per step of the generic path: 256 KiB of float64, stays in L2


def _saxpy():
    """BLAS ``y += a·x`` for float32 (one pass over memory, no temporary); None without scipy."""
    try:
        from scipy.linalg.blas import saxpy
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return None
    return saxpy


class WeightedSum:
    """Accumulates ``Σ n_i · w_i`` and ``Σ n_i`` in buffers allocated once per model.

    ``accumulator="float32"`` (default) adds float32 tensors with BLAS ``saxpy``: one
    streaming pass, as fast as ``np.add``; relative rounding ~1e-7·√sites.
    ``"float64"`` keeps float64 sums (exact to ~1e-16, about half the speed); other
    dtypes always use float64.
    """

    def __init__(self, reference: Tensors, *, accumulator: str = "float32") -> None:
        if accumulator not in ("float32", "float64"):
            raise ValueError(f"federated.parameters.accumulator must be float32 or float64, got {accumulator!r}")
        # Names and dtypes only (all ``like`` reads): holding the arrays would keep the run's initial
        # model alive for the whole run, a fourth model in the coordinator (issue 23).
        self.reference: Tensors = tuple((n, np.empty(0, dtype=np.asarray(a).dtype)) for n, a in reference)
        self._axpy = _saxpy() if accumulator == "float32" else None
        self._shapes = [(np.shape(a), np.float32 if (self._axpy is not None and np.asarray(a).dtype == np.float32)
                         else np.float64) for _, a in reference]
        self.acc = self._zeros()
        self.total = 0.0
        self.count = 0
        self._scratch = np.empty(_CHUNK, dtype=np.float64)

    def _zeros(self) -> list[np.ndarray]:
        # Fresh zeroed buffers (calloc: pages the kernel zeroes as the first add writes them) rather
        # than ``fill(0)``, a pass over the model on the round's critical path.
        return [np.zeros(shape, dtype=dtype) for shape, dtype in self._shapes]

    def reset(self) -> None:
        self.acc = []  # the old sum freed before the new one is made: never two accumulators
        self.acc = self._zeros()
        self.total = 0.0
        self.count = 0

    def add(self, weights: Tensors, weight: float) -> None:
        """``acc += weight · w`` per tensor, never allocating a model-sized temporary."""
        if not self.acc:  # handed over by take_mean
            self.acc = self._zeros()
        for acc, (_, w) in zip(self.acc, weights, strict=True):
            a = acc.reshape(-1)
            x = np.asarray(w).reshape(-1)
            if a.size != x.size:
                raise ValueError(f"tensor has {x.size} elements, the model's has {a.size}")
            if acc.dtype == np.float32 and x.dtype == np.float32 and x.flags.c_contiguous:
                self._axpy(x, a, a=weight)  # in place on ``a``
                continue
            # Generic path: scale a cache-sized chunk into one scratch buffer, then add.
            for start in range(0, a.size, _CHUNK):
                stop = min(start + _CHUNK, a.size)
                tmp = self._scratch[: stop - start]
                np.multiply(x[start:stop], weight, out=tmp, casting="unsafe")
                np.add(a[start:stop], tmp, out=a[start:stop], casting="unsafe")
        self.total += weight
        self.count += 1

    def mean(self) -> Tensors:
        if self.total <= 0:
            raise ValueError("no weight was added to the sum (every update had num_examples = 0?)")
        return like(self.reference, [a / self.total for a in self.acc])

    def take_mean(self) -> Tensors:
        """``mean()`` divided in place in the accumulator, which is handed over as the mean: no new
        model-sized buffer at the end of a round (0.3-0.5 s at 100 M parameters, on the round's
        critical path). The sum is then empty: the next ``reset`` or ``add`` makes a new accumulator."""
        if self.total <= 0:
            raise ValueError("no weight was added to the sum (every update had num_examples = 0?)")
        if any(a.dtype != r.dtype for a, (_, r) in zip(self.acc, self.reference, strict=True)):
            return self.mean()  # a float64 sum of float32 weights: the cast makes a new buffer anyway
        out, self.acc = self.acc, []
        for a in out:
            np.divide(a, self.total, out=a)
        self.total, self.count = 0.0, 0
        return like(self.reference, out)


@register("FedAvg")
class FedAvg(Aggregator):
    """McMahan et al.: the mean of site models weighted by ``num_examples``."""

    name = "FedAvg"
    synchronous = True

    def __init__(self, *, parameters: dict[str, Any], initial: Tensors, seed: int = 0) -> None:
        super().__init__(parameters=parameters, initial=initial, seed=seed)
        self._sum = WeightedSum(initial, accumulator=str(parameters.get("accumulator", "float32")))

    def begin_round(self, server_round: int, global_weights: Tensors) -> None:
        self._sum.reset()

    def add(self, contribution: Contribution) -> None:
        if contribution.num_examples <= 0:
            raise ValueError(f"update from {contribution.site} has num_examples={contribution.num_examples}; must be > 0")
        self._sum.add(contribution.weights, float(contribution.num_examples))

    def finish_round(self) -> Tensors:
        return self._sum.take_mean()  # the sum is reset by the next begin_round
