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

from protocol.secagg.field import P
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


def _combine(coeffs: list[int], rows: np.ndarray) -> np.ndarray:
    """sum_k coeffs[k] * rows[k] mod p, reducing after every product (int64-safe)."""
    acc = np.zeros(rows.shape[1], dtype=np.int64)
    for c, row in zip(coeffs, rows, strict=True):
        if c:
            acc = (acc + row * c) % P
    return acc


def mask_and_shares(key: bytes, coding: Coding) -> tuple[np.ndarray, np.ndarray]:
    """The mask (``coding.length`` elements) and its N shares (N x L), all from ChaCha20(key)."""
    u = coding.threshold
    stream = field_stream(key, u * coding.piece)
    pieces = stream.reshape(u, coding.piece)  # U - T mask pieces, then T noise pieces
    shares = np.stack([_combine(_powers(j + 1, u), pieces) for j in range(coding.sites)])
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
    rows = np.stack([np.asarray(aggregated[j], dtype=np.int64) for j in idx])
    if rows.shape != (u, coding.piece):
        raise ValueError(f"aggregated shares must be {coding.piece} elements each, got {rows.shape[1:]}")
    inv = _inverse([_powers(j + 1, u) for j in idx])
    pieces = [_combine(inv[k], rows) for k in range(u - coding.privacy)]
    return np.concatenate(pieces)[: coding.length]
