"""Central (user-level) differential privacy as a wrapper around any synchronous aggregator.

The DP-FedAvg mechanism of McMahan et al. 2018 ("Learning differentially private
recurrent language models"): each update's delta from the round's global model is
clipped to L2 norm ``clip_norm`` (C); the clipped deltas are *summed with equal
weights* (``num_examples`` plays no part: a site claiming 10^6 rows weighs what a site
with one row weighs); Gaussian noise N(0, (zC)²) is added to the sum, and the sum is
divided by the *expected* number of clients (``expected_clients`` = qN), fixed before
the round, never by the realised count. One site changes the result by at most C/qN,
and the noise has std zC/qN: the effective noise multiplier is z, whatever the
counts. The noised mean delta is then handed to the inner aggregator as one update
(post-processing, so FedAdam & co. keep working and the guarantee stays).

The noise comes from a secret: 256 bits of OS entropy kept in the coordinator's state
directory (``secret_file``), never in the experiment. Each round's generator is
Philox4x64 keyed with HMAC-SHA256(secret, context ‖ round), so a resumed round adds
exactly the same noise and nobody without the secret can rebuild it.
``epsilon`` is Opacus' RDP accountant over the rounds run, each a sampled Gaussian
mechanism with noise z and sampling rate q = sampled / available.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from coordinator.aggregators.base import Aggregator, Contribution, like
from coordinator.aggregators.interfaces import FitPlan
from coordinator.sampling import sample_sites
from protocol.messages import TaskConfig, Tensors

SECRET_BYTES = 32  # 256 bits


def l2_norm(arrays) -> float:
    return float(np.sqrt(sum(float(np.dot(a.reshape(-1).astype(np.float64), a.reshape(-1).astype(np.float64))) for a in arrays)))


def clip_delta(weights: Tensors, reference: Tensors, clip_norm: float) -> list[np.ndarray]:
    """``Δ · min(1, clip_norm / ‖Δ‖)`` with Δ = weights − reference (float64)."""
    delta = [np.asarray(w, dtype=np.float64) - r for (_, w), (_, r) in zip(weights, reference, strict=True)]
    norm = l2_norm(delta)
    scale = 1.0 if norm <= clip_norm or norm == 0.0 else clip_norm / norm
    return [d * scale for d in delta]


def load_or_create_secret(path: str | Path) -> bytes:
    """The coordinator's central-DP secret: read it, or draw 256 bits from the OS and persist them (0600)."""
    from protocol.durable import write_atomic

    p = Path(path)
    if p.exists():
        data = p.read_bytes()
        if len(data) != SECRET_BYTES:
            raise ValueError(f"{p}: a central-DP secret must be {SECRET_BYTES} bytes, found {len(data)}; "
                             "restore it from a backup (deleting it makes resumed rounds add different noise)")
        return data
    secret = os.urandom(SECRET_BYTES)
    write_atomic(p, secret, mode=0o600)
    return secret


class CentralDP(Aggregator):
    """Clip, sum with equal weights, add N(0, (zC)²), divide by the expected client count."""

    synchronous = True

    def __init__(self, inner: Aggregator, *, clip_norm: float, noise_multiplier: float, secret: bytes,
                 expected_clients: float | None = None, context: str = "") -> None:
        if not inner.synchronous:
            raise ValueError(f"federated.central_dp wraps synchronous aggregators only, not {inner.name}")
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError(
                f"federated.central_dp: clip_norm must be > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}"
            )
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise ValueError("central DP needs a secret of at least 128 bits (load_or_create_secret)")
        self.inner = inner
        self.name = f"{inner.name}+central_dp"
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = expected_clients  # qN; the run loop sets it per round before finish_round
        self.context = context  # the run id: each run's noise is independent
        self._secret = bytes(secret)
        self._reference: Tensors = ()
        self._sum: list[np.ndarray] = []
        self._round = 0
        self._n = 0

    def begin_round(self, server_round: int, global_weights: Tensors) -> None:
        self._round, self._reference, self._n = server_round, global_weights, 0
        self._sum = [np.zeros(a.shape, dtype=np.float64) for _, a in global_weights]
        self.inner.begin_round(server_round, global_weights)

    def add(self, contribution: Contribution) -> None:
        for acc, d in zip(self._sum, clip_delta(contribution.weights, self._reference, self.clip_norm), strict=True):
            acc += d
        self._n += 1

    def denominator(self) -> float:
        """The fixed denominator qN (the realised count only if the run loop never set it)."""
        return float(self.expected_clients) if self.expected_clients else float(max(self._n, 1))

    def noise_std(self) -> float:
        """Std of the noise on each coordinate of the aggregate: zC / qN."""
        return self.noise_multiplier * self.clip_norm / self.denominator()

    def rng(self, server_round: int) -> np.random.Generator:
        """The round's noise generator, keyed from the secret (reproducible by its holder only)."""
        key = hmac.new(self._secret, f"fedbus-central-dp:{self.context}:{server_round}".encode(), hashlib.sha256)
        return np.random.Generator(np.random.Philox(key=int.from_bytes(key.digest()[:16], "little")))

    def sampling_seed(self) -> int:
        """A secret seed for choosing the round's sites (amplification by sampling needs a secret sample)."""
        key = hmac.new(self._secret, f"fedbus-central-dp-sampling:{self.context}".encode(), hashlib.sha256)
        return int.from_bytes(key.digest()[:4], "little") & 0x7FFFFFFF

    def start_run(self, run_id: str, seed: int) -> None:
        """Each run's noise and sample are independent of every other's (keyed with the run id)."""
        super().start_run(run_id, seed)
        self.context = run_id
        self.inner.start_run(run_id, seed)

    def configure_fit(self, server_round: int, available: Sequence[str], count: int, *,
                      attempt: int = 0) -> FitPlan:
        """A secret sample of the round's sites; the first attempt fixes qN, the DP denominator,
        before any reply (a retry's extra sites do not change it)."""
        sites = sample_sites(list(available), count, seed=self.sampling_seed(), round=server_round, attempt=attempt)
        if attempt == 0:
            self.expected_clients = len(sites)
        return FitPlan(sites=sites, config=self.task_config(server_round), expected=len(sites))

    def task_config(self, server_round: int) -> TaskConfig:
        return self.inner.task_config(server_round)

    def finish_round(self) -> Tensors:
        rng = self.rng(self._round)
        sigma = self.noise_multiplier * self.clip_norm
        m = self.denominator()
        noised = [r + (s + rng.normal(0.0, sigma, size=s.shape)) / m
                  for (_, r), s in zip(self._reference, self._sum, strict=True)]
        self.inner.add(Contribution(site="central_dp", weights=like(self._reference, noised), num_examples=1,
                                    base_round=self._round - 1))
        return self.inner.finish_round()

    def state(self):
        return self.inner.state()

    def load_state(self, arrays) -> None:
        self.inner.load_state(arrays)


def central_epsilon(noise_multiplier: float, sample_rates: list[float], delta: float) -> float | None:
    """ε of the rounds run (one sampled Gaussian mechanism each) by Opacus' RDP accountant; None if z = 0."""
    if not sample_rates:
        return 0.0
    if noise_multiplier <= 0:
        return None  # no noise: no finite ε
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    history: dict[float, int] = {}
    for q in sample_rates:
        history[float(q)] = history.get(float(q), 0) + 1
    acc.history = [(float(noise_multiplier), q, steps) for q, steps in history.items()]
    return float(acc.get_epsilon(delta=delta))
