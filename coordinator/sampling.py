"""Deterministic choices derived from (seed, round, ...), so a resumed run repeats them."""

from __future__ import annotations

import hashlib
import math

import numpy as np


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the run seed and any labels (round, site, purpose)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def sample_count(available: int, fraction: float, minimum: int) -> int:
    """``max(ceil(fraction · available), minimum)``, at most ``available``."""
    return min(available, max(math.ceil(fraction * available), minimum))


def sample_sites(sites: list[str], count: int, *, seed: int, round: int, purpose: str = "fit", attempt: int = 0) -> list[str]:
    """``count`` of ``sites`` chosen by an RNG seeded from (seed, round, purpose, attempt); sorted."""
    pool = sorted(sites)
    if count >= len(pool):
        return pool
    rng = np.random.default_rng(derive_seed(seed, round, purpose, attempt))
    return sorted(rng.choice(pool, size=count, replace=False).tolist())
