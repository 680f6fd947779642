"""Privacy randomness the coordinator can neither see nor choose.

DP-SGD is private only if its noise and its Poisson batch sampling are unpredictable to
whoever receives the model. Opacus' ``secure_mode`` needs ``torchcsprng``, which has no
build for this torch, and a ``torch.Generator`` holds at most a 64-bit seed (mt19937).
So the site draws both from its own generator: AES-256 in counter mode (``cryptography``,
OpenSSL) keyed with 256 bits from ``os.urandom`` for every task. Its output is
indistinguishable from random to anyone without the key, and the key never leaves the
process. Gaussian samples are Box-Muller over 53-bit uniforms, summed 2n = 4 at a time
and rescaled, exactly the defence Opacus' ``secure_mode`` uses against floating-point
attacks on the noise (Mironov 2012; Opacus ``_generate_noise`` notes).

Reproducible research runs key the same generator from a site-local seed, the task's seed
and, for any release but a seed's first (or one identical to it), a digest of everything the
release is computed from (``reproducible_from``; ``site_worker.noise_keys`` decides): only
when the site's policy says ``reproducible_dp = true``, and every Update then says so. The
digest is why a coordinator repeating a seed never gets the same noise on a different release
(issue 20, class 6); keying the first release by the seeds alone is why a rerun whose model
differs in the last bit (a coordinator's sum in another arrival order) draws the same noise.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Iterator

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32  # AES-256: 256 bits of OS entropy per task
_CHUNK = 1 << 22  # uniforms per keystream call (32 MiB): bounds the temporary buffer


class SecureRandom:
    """A CSPRNG stream (AES-256-CTR) with uniform, Gaussian and Bernoulli draws."""

    def __init__(self, key: bytes, *, reproducible: bool = False) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.reproducible = reproducible

    @classmethod
    def secret(cls) -> "SecureRandom":
        """Fresh 256-bit key from the OS: the default for every DP task."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def reproducible_from(cls, site_seed: int, task_seed: int, purpose: str, inputs: bytes) -> "SecureRandom":
        """Deterministic stream for research runs (site seed + task seed + ``inputs``, the
        digest of what the release is computed from): NOT secret from anyone who learns the
        site seed and the data; only used when the site policy turns it on."""
        material = f"fedbus-reproducible-dp\0{int(site_seed)}\0{int(task_seed)}\0{purpose}\0".encode() + inputs
        return cls(hashlib.sha256(material).digest(), reproducible=True)

    def _u64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._enc.update(bytes(8 * n)), dtype="<u8")

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in the open interval (0, 1), 53 bits each."""
        out = np.empty(n, dtype=np.float64)
        for i in range(0, n, _CHUNK):
            k = min(_CHUNK, n - i)
            out[i : i + k] = ((self._u64(k) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        return out

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` N(0, 1) samples by Box-Muller (both outputs used)."""
        m = (n + 1) // 2
        u1, u2 = self.uniform(m), self.uniform(m)
        r = np.sqrt(-2.0 * np.log(u1))
        t = 2.0 * math.pi * u2
        return np.concatenate([r * np.cos(t), r * np.sin(t)])[:n]

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std²) noise shaped like ``reference``: the mean of 4 draws times 2, as Opacus'
        ``secure_mode`` does, so the low bits of one Box-Muller sample do not show."""
        n = reference.numel()
        if std == 0 or n == 0:
            return torch.zeros_like(reference)
        z = self.standard_normal(4 * n).reshape(4, n).sum(axis=0) / 2.0
        return torch.from_numpy(z * std).to(dtype=reference.dtype).reshape(reference.shape)

    def bernoulli_indices(self, n: int, p: float) -> torch.Tensor:
        """Indices of the rows kept by independent Bernoulli(p) draws (one Poisson batch)."""
        return torch.from_numpy(np.flatnonzero(self.uniform(n) < p))


def poisson_batches(n: int, sample_rate: float, steps: int, rng: SecureRandom) -> Iterator[torch.Tensor]:
    """Opacus' Poisson sampling (``UniformWithReplacementSampler``) with the secret stream:
    every step keeps each row with probability ``sample_rate``; batches may be empty."""
    for _ in range(steps):
        yield rng.bernoulli_indices(n, sample_rate)


def poisson_batch_bound(n: int, sample_rate: float) -> int:
    """A batch size Poisson sampling exceeds with probability below ~1e-9 per step
    (mean + 6 standard deviations, Chernoff-safe for the small-mean case by the +6)."""
    mean = n * sample_rate
    return min(n, int(math.ceil(mean + 6.0 * math.sqrt(mean * (1 - sample_rate)) + 6)))
