"""LightSecAgg's one-shot mask recovery: MDS shares of each mask, summed, decoded once.

A site's padded mask (length (U - T) * L) is cut into U - T pieces of length L and joined
by T pieces of fresh randomness; share j (j = 0..N-1, one per roster site) is
sum_k piece_k * a_j**k mod p with a_j = j + 1: the columns of a U x N Vandermonde matrix,
so any U shares determine the U pieces (MDS), and any T shares alone are uniformly random
(the T noise rows restricted to any T columns form an invertible matrix): T-privacy.

Shares are linear, so the sum over a contributor set S of site j's shares is share j of
the sum of S's masks. When a round closes, U surviving sites each send that one aggregated
share, and ``decode_sum`` recovers sum_{i in S} mask_i in one step, whoever dropped after
uploading. Fewer than U shares decode nothing (``NotEnoughShares``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.secagg.field import P, reduce
from protocol.secagg.masks import field_stream


class NotEnoughShares(ValueError):
    """Fewer aggregated shares than the threshold U: the mask sum cannot (and must not) be decoded."""


@dataclass(frozen=True)
class Coding:
    """N sites, recovery threshold U, privacy T (0 <= T < U <= N), masks of ``length`` elements."""

    sites: int
    threshold: int
    privacy: int
    length: int

    def __post_init__(self) -> None:
        if not 0 <= self.privacy < self.threshold <= self.sites:
            raise ValueError(
                f"need 0 <= privacy T ({self.privacy}) < threshold U ({self.threshold}) <= sites N ({self.sites})"
            )
        if self.sites >= P - 1:
            raise ValueError("too many sites for the field")
        if self.length < 1:
            raise ValueError(f"a mask has at least one element, got {self.length}")

    @property
    def piece(self) -> int:
        """Length L of one piece, and of one share."""
        return -(-self.length // (self.threshold - self.privacy))

    @property
    def padded(self) -> int:
        return self.piece * (self.threshold - self.privacy)


def _powers(point: int, count: int) -> list[int]:
    return [pow(point, k, P) for k in range(count)]


_EXACT_TERMS = 64  # float64 sums of products (< 2**31 x 2**16 each) stay exact (< 2**53) for up to 64 terms
_BLOCK = 1 << 12  # columns per block: a block's limbs and products stay in cache, and BLAS on one thread


def combine(matrix: list[list[int]], rows: np.ndarray) -> np.ndarray:
    """``matrix @ rows mod p`` for field elements: (R x K) coefficients, (K x L) rows -> (R x L) int64.

    Each row is split into 16-bit and 15-bit limbs and multiplied in float64 by BLAS: a product
    of a coefficient (< 2**31) and a limb (< 2**16) is < 2**47, and a sum of up to 64 of them is
    an integer below 2**53, which float64 holds exactly whatever the order of the additions. The
    two limb products are joined in int64 (2**31 = 1 mod p) and reduced once (``field.reduce``). Past 64 terms it falls
    back to one product and one reduction a term."""
    coeffs = np.asarray(matrix, dtype=np.int64) % P
    r, k = coeffs.shape
    if rows.shape[0] != k:
        raise ValueError(f"{k} coefficients a row but {rows.shape[0]} rows")
    length = rows.shape[1]
    out = np.empty((r, length), dtype=np.int64)
    if k > _EXACT_TERMS:
        for i in range(r):
            acc = np.zeros(length, dtype=np.int64)
            for c, row in zip(coeffs[i], rows, strict=True):
                acc += row * int(c)
                reduce(acc)
            out[i] = acc
        return out
    m = coeffs.astype(np.float64)
    for start in range(0, length, _BLOCK):
        block = rows[:, start : start + _BLOCK]
        high = (m @ (block >> 16).astype(np.float64)).astype(np.int64)  # limbs < 2**15: < 2**52
        low = (m @ (block & 0xFFFF).astype(np.float64)).astype(np.int64)  # limbs < 2**16: < 2**53
        # high * 2**16 = (high >> 15) * 2**31 + (high & 0x7fff) * 2**16, and 2**31 = 1 mod p
        low += high >> 15
        high &= 0x7FFF
        high <<= 16
        low += high  # < 2**53 + 2**37 + 2**31
        out[:, start : start + _BLOCK] = reduce(low)
    return out


def mask_and_shares(key: bytes, coding: Coding) -> tuple[np.ndarray, np.ndarray]:
    """The mask (``coding.length`` elements) and its N shares (N x L), all from ChaCha20(key)."""
    u = coding.threshold
    stream = field_stream(key, u * coding.piece)
    pieces = stream.reshape(u, coding.piece)  # U - T mask pieces, then T noise pieces
    shares = combine([_powers(j + 1, u) for j in range(coding.sites)], pieces)
    return stream[: coding.length], shares


def _inverse(matrix: list[list[int]]) -> list[list[int]]:
    """Inverse of a square matrix mod p (Gauss-Jordan with Python integers)."""
    n = len(matrix)
    a = [[x % P for x in row] + [int(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col]), None)
        if pivot is None:
            raise ValueError("singular matrix: evaluation points must be distinct")
        a[col], a[pivot] = a[pivot], a[col]
        inv = pow(a[col][col], P - 2, P)
        a[col] = [x * inv % P for x in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [(x - f * y) % P for x, y in zip(a[r], a[col], strict=True)]
    return [row[n:] for row in a]


def decode_sum(aggregated: dict[int, np.ndarray], coding: Coding) -> np.ndarray:
    """The sum of the contributors' masks from U aggregated shares {site index j: share}.

    Uses the U lowest indices given; refuses fewer than U before touching any share.
    """
    u = coding.threshold
    if len(aggregated) < u:
        raise NotEnoughShares(
            f"{len(aggregated)} aggregated shares, the threshold is {u}: the mask sum cannot be recovered "
            f"(more than N - U = {coding.sites - u} sites dropped)"
        )
    idx = sorted(aggregated)[:u]
    for j in idx:
        if not 0 <= j < coding.sites:
            raise ValueError(f"share index {j} is outside the roster of {coding.sites}")
    rows = np.empty((u, coding.piece), dtype=np.int64)
    for i, j in enumerate(idx):
        share = np.asarray(aggregated[j], dtype=np.int64)
        if share.shape != (coding.piece,):
            raise ValueError(f"aggregated shares must be {coding.piece} elements each, got {share.shape}")
        rows[i] = share
    inv = _inverse([_powers(j + 1, u) for j in idx])
    pieces = combine(inv[: u - coding.privacy], rows)
    return pieces.reshape(-1)[: coding.length]
