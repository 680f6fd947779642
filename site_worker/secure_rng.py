"""Privacy randomness the coordinator can neither see nor choose.

DP-SGD is private only if its noise and its Poisson batch sampling are unpredictable to
whoever receives the model. Opacus' ``secure_mode`` needs ``torchcsprng``, which has no
build for this torch, and a ``torch.Generator`` holds at most a 64-bit seed (mt19937).
So the site draws both from its own generator: AES-256 in counter mode (``cryptography``,
OpenSSL) keyed with 256 bits from ``os.urandom`` for every task. Its output is
indistinguishable from random to anyone without the key, and the key never leaves the
process. DP-SGD's noise (``gaussian_like``) is Box-Muller summed 2n = 4 at a time and halved,
exactly the defence Opacus' ``secure_mode`` uses against floating-point attacks on the noise
(Mironov 2012; Opacus ``_generate_noise`` notes): one Box-Muller sample's low bits follow
from its two uniforms, the sum of four hides them. It runs vectorised in float32 (torch),
the precision the gradients it is added to have, over the same AES-CTR stream (issue 23:
about 9x faster than the float64 NumPy path, ``bench/secure_noise.py``). The radius'
uniform keeps 63 bits of depth (a float32 has the exponent range for it), so each draw's
tail reaches 9.3 sigma instead of the 5.9 of a 24-bit uniform; the angle's needs 24 bits.
Small releases (metrics, ``standard_normal``) keep the float64 path.

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
# Noise values per keystream call of ``gaussian_like``: each takes 4 draws, 2 Box-Muller pairs
# of a 64-bit radius word and a 32-bit angle word (24 bytes a value, 6 MiB a chunk). Part of
# the stream's layout: changing it changes a reproducible run's noise.
_NOISE_CHUNK = 1 << 18
_PAIR_BYTES = 12
_MASK63 = (1 << 63) - 1
_MASK24 = (1 << 24) - 1
_PTRS_MIN = 10.0  # Poisson rates from here on use PTRS (its constants are fitted for lam >= 10)


class SecureRandom:
    """A CSPRNG stream (AES-256-CTR) with uniform, Gaussian and Bernoulli draws."""

    def __init__(self, key: bytes, *, reproducible: bool = False) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self.reproducible = reproducible
        self._zeros = b""  # CTR's plaintext: reused across calls

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

    def _keystream(self, nbytes: int) -> bytearray:
        """``nbytes`` of keystream, written in place (``update_into``: no output allocation)."""
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
        zeros = self._zeros
        buf = bytearray(nbytes + 15)  # OpenSSL may write up to a block past the input
        self._enc.update_into(memoryview(zeros)[:nbytes], buf)
        return buf

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
        out = torch.empty(n, dtype=torch.float32)
        for i in range(0, n, _NOISE_CHUNK):
            k = min(_NOISE_CHUNK, n - i)
            torch.mul(self._noise32(k), std / 2.0, out=out[i : i + k])
        return out.to(dtype=reference.dtype).reshape(reference.shape)

    def _noise32(self, k: int) -> torch.Tensor:
        """``k`` sums of 4 float32 N(0, 1) Box-Muller draws (variance 4) from 24k stream bytes:
        2k radius words (64 bits, 63 used) then 2k angle words (32 bits, 24 used)."""
        pairs = 2 * k
        raw = torch.frombuffer(self._keystream(_PAIR_BYTES * pairs), dtype=torch.uint8)
        u1 = radius_uniform(raw[: 8 * pairs].view(torch.int64))
        angle = (raw[8 * pairs : _PAIR_BYTES * pairs].view(torch.int32) & _MASK24).to(torch.float32)
        angle.add_(0.5).mul_(2.0 * math.pi * 2.0**-24)
        radius = u1.log_().mul_(-2.0).sqrt_()
        c, s = torch.cos(angle).mul_(radius), torch.sin(angle).mul_(radius)
        # Fixed order of the four adds, so a reproducible run's noise does not depend on threads.
        return c[:k].add_(c[k:]).add_(s[:k]).add_(s[k:])

    def poisson(self, lam: float, n: int) -> np.ndarray:
        """``n`` Poisson(``lam``) draws (int64) from this stream: exact inversion by sequential
        search below ``_PTRS_MIN``, above it Hormann's transformed rejection with squeeze (PTRS,
        1993; the algorithm NumPy's ``random_poisson_ptrs`` runs), each rejected draw redrawn. Both
        are exact up to float64 rounding of the acceptance test (lgamma, log): the pooled mode's
        privacy noise (``skellam``), so never numpy's default generator."""
        if not (math.isfinite(lam) and lam >= 0) or n < 0:
            raise ValueError(f"poisson needs a finite rate >= 0 and n >= 0, got {lam!r}, {n!r}")
        if lam == 0 or n == 0:
            return np.zeros(n, dtype=np.int64)
        return self._poisson_small(lam, n) if lam < _PTRS_MIN else self._poisson_ptrs(lam, n)

    def _poisson_small(self, lam: float, n: int) -> np.ndarray:
        """Inversion: the smallest k with F(k) >= u; the loop ends (F -> 1) within ~lam + 40 terms."""
        u = self.uniform(n)
        k = np.zeros(n, dtype=np.int64)
        p = math.exp(-lam)
        cdf = np.full(n, p)
        j = 0
        active = u > cdf
        while active.any() and j < 1000:
            j += 1
            p *= lam / j
            k[active] += 1
            cdf[active] += p
            active &= u > cdf
        return k

    def _poisson_ptrs(self, lam: float, n: int) -> np.ndarray:
        from scipy.special import gammaln  # imported on first use: most tasks never draw a Poisson

        slam, loglam = math.sqrt(lam), math.log(lam)
        b = 0.931 + 2.53 * slam
        a = -0.059 + 0.02483 * b
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        vr = 0.9277 - 3.6224 / (b - 2)
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            u = self.uniform(todo.size) - 0.5
            v = self.uniform(todo.size)
            us = 0.5 - np.abs(u)
            k = np.floor((2 * a / us + b) * u + lam + 0.43)
            fast = (us >= 0.07) & (v <= vr)
            valid = (k >= 0) & ~((us < 0.013) & (v > us))
            kk = np.maximum(k, 0.0)
            lg = gammaln(kk + 1.0)
            slow = valid & (np.log(v) + math.log(invalpha) - np.log(a / (us * us) + b) <= -lam + kk * loglam - lg)
            ok = fast | slow
            out[todo[ok]] = k[ok].astype(np.int64)
            todo = todo[~ok]
        return out

    def skellam(self, mu: float, n: int) -> np.ndarray:
        """``n`` Sk(mu, mu) draws: the difference of two independent Poisson(mu) (variance 2*mu).
        A sum of shares Sk(mu_i, mu_i) is exactly Sk(sum mu_i, sum mu_i)."""
        return self.poisson(mu, n) - self.poisson(mu, n)

    def bernoulli_indices(self, n: int, p: float) -> torch.Tensor:
        """Indices of the rows kept by independent Bernoulli(p) draws (one Poisson batch)."""
        return torch.from_numpy(np.flatnonzero(self.uniform(n) < p))


def radius_uniform(words: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in (0, 1] from 64-bit words (63 bits used): the smallest is 2^-64, a
    Box-Muller radius of 9.4; 1 only by rounding (radius 0), never 0 (an infinite radius)."""
    return (words & _MASK63).to(torch.float32).add_(0.5).mul_(2.0**-63)


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
