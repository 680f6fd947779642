"""The accountant of the record-level pooled-cost mode: Skellam noise, Poisson subsampling, RDP.

In ``federated.secure_aggregation.dp = "pooled"`` every site takes one DP-SGD step a round on
its Poisson batch: per-sample gradients clipped to C, scaled by s and rounded per sample, summed,
plus Sk(mu/m, mu/m) per coordinate. The secure sum of m honest shares is exactly Sk(mu, mu)
(Skellam is closed under sums), so each record is protected by the pooled noise, once.

- ``skellam_rdp``: Agarwal, Kairouz, Liu 2021 ("The Skellam Mechanism for Differentially Private
  Federated Learning", Thm 3.5), for Sk(mu, mu) noise and an integer vector of L1/L2
  sensitivity (Delta1, Delta2). We use 2*alpha where the paper has 2*alpha - 1 (conservative).
- ``subsampled_rdp``: the general upper bound for a Poisson-subsampled mechanism at integer
  alpha >= 2 (Zhu & Wang 2019, "Poisson subsampled RDP", Thm 8's upper bound; autodp's
  ``upper_bound=True``), never above the mechanism's own RDP (joint convexity).
- composition is a sum over steps; (epsilon, delta) is Opacus' conversion
  (``opacus.accountants.analysis.rdp.get_privacy_spent``) at the integer orders of Opacus'
  default list, so the site's ledger can add these steps to its Gaussian history.

Here, in ``protocol/``, so the experiment's planner and the site's ledger share one arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

ACCOUNTANT = "skellam-rdp"
# Opacus' RDPAccountant.DEFAULT_ALPHAS (1.1 .. 10.9 by 0.1, then 12 .. 63): the bound below holds at
# integer orders only, so the fractional ones count as +inf (never chosen by the conversion).
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
NOISE_TAIL_SDS = 10.0  # the field must hold the noise of a sum out to this many standard deviations


def sensitivities(clip: float, scale: float, dim: int) -> tuple[float, float]:
    """(Delta1, Delta2) of one record's integer contribution: round(s * g) with ||g||_2 <= C is
    within sqrt(d)/2 of s * g, so ||.||_2 <= s*C + sqrt(d) (the brief's slack); ||.||_1 is at most
    sqrt(d) * Delta2, and at most Delta2**2 because every non-zero coordinate is an integer."""
    if not (clip > 0 and scale >= 1 and dim >= 1):
        raise ValueError(f"sensitivities need clip > 0, scale >= 1, dim >= 1; got {clip}, {scale}, {dim}")
    l2 = scale * clip + math.sqrt(dim)
    return min(math.sqrt(dim) * l2, l2 * l2), l2


def skellam_rdp(alpha: float, mu: float, l1: float, l2: float) -> float:
    """RDP at order ``alpha`` of adding Sk(mu, mu) per coordinate to an integer vector of L1/L2
    sensitivity ``l1``/``l2`` (AKL21 Thm 3.5, with 2*alpha for 2*alpha - 1)."""
    if mu <= 0:
        return math.inf
    gauss = alpha * l2 * l2 / (4.0 * mu)
    return gauss + min((2.0 * alpha * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu), 3.0 * l1 / (4.0 * mu))


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    if top == -math.inf or top == math.inf:
        return top
    return top + math.log(sum(math.exp(x - top) for x in xs))


def subsampled_rdp(alpha: int, q: float, rdp: object) -> float:
    """RDP at integer ``alpha`` >= 2 of the mechanism whose RDP is ``rdp(order)``, run on a Poisson
    sample of rate ``q`` (Zhu & Wang 2019's general upper bound, computed in log space):

        log[(1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
            + 3 sum_{l=3..a} C(a,l) (1-q)^(a-l) q^l e^((l-1) eps(l))] / (a - 1)

    capped by ``rdp(alpha)`` (subsampling never costs more); q = 1 is the mechanism itself."""
    if isinstance(alpha, bool) or int(alpha) != alpha or alpha < 2:
        raise ValueError(f"the subsampled bound needs an integer order >= 2, got {alpha!r}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {q!r}")
    a = int(alpha)
    eps = rdp  # callable: order -> RDP of the unsampled mechanism
    assert callable(eps)
    base = float(eps(a))
    if q == 0.0:
        return 0.0
    if q == 1.0 or math.isinf(base):
        return base
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * l1q + math.log(a * q - q + 1),
             _log_binom(a, 2) + 2 * lq + (a - 2) * l1q + float(eps(2))]
    terms += [math.log(3.0) + _log_binom(a, j) + (a - j) * l1q + j * lq + (j - 1) * float(eps(j))
              for j in range(3, a + 1)]
    return min(base, _logsumexp(terms) / (a - 1))


def step_rdp(mu: float, l1: float, l2: float, q: float, orders: Iterable[float] = ORDERS) -> np.ndarray:
    """RDP of one pooled step (Sk(mu, mu) on a Poisson batch of rate ``q``) at each order; +inf at
    non-integer orders."""
    mech = lambda a: skellam_rdp(a, mu, l1, l2)  # noqa: E731
    return np.array([subsampled_rdp(int(a), q, mech) if float(a).is_integer() and a >= 2 else math.inf
                     for a in orders], dtype=float)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """(epsilon, delta) from an RDP curve as Opacus converts it (its ``get_privacy_spent``)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    r = np.asarray(rdp, dtype=float)
    finite = np.isfinite(r)
    if not finite.any():
        return math.inf
    eps, _ = get_privacy_spent(orders=[o for o, f in zip(orders, finite) if f], rdp=r[finite], delta=delta)
    return float(eps)


@dataclass(frozen=True)
class SkellamEntry:
    """``steps`` pooled steps with pooled noise Sk(mu, mu), sensitivities (l1, l2), sampling rate q:
    what a site's ledger records for the pooled mode (``as_list`` on disk)."""

    mu: float
    l1: float
    l2: float
    sample_rate: float
    steps: int

    def rdp(self, orders: Sequence[float] = ORDERS) -> np.ndarray:
        return step_rdp(self.mu, self.l1, self.l2, self.sample_rate, orders) * int(self.steps)

    def as_list(self) -> list[float | int]:
        return [float(self.mu), float(self.l1), float(self.l2), float(self.sample_rate), int(self.steps)]

    @classmethod
    def from_list(cls, row: Sequence[float | int]) -> SkellamEntry:
        mu, l1, l2, q, n = row
        return cls(float(mu), float(l1), float(l2), float(q), int(n))


def epsilon_of(entries: Iterable[SkellamEntry], *, delta: float, gaussian_rdp: np.ndarray | None = None) -> float:
    """epsilon at ``delta`` of the composed entries (plus a Gaussian history's RDP at ``ORDERS``, the
    site's other releases); 0 for nothing."""
    total = np.zeros(len(ORDERS)) if gaussian_rdp is None else np.asarray(gaussian_rdp, dtype=float).copy()
    any_ = gaussian_rdp is not None
    for e in entries:
        total = total + e.rdp()
        any_ = True
    return epsilon_from_rdp(total, delta) if any_ else 0.0


def plan_mu(*, target_epsilon: float, delta: float, steps: int, sample_rate: float, l1: float, l2: float,
            rel_tol: float = 1e-3) -> float:
    """The smallest pooled mu (to ``rel_tol``) whose ``steps`` steps spend at most ``target_epsilon``."""
    if not (target_epsilon > 0 and 0 < delta < 1 and steps >= 1):
        raise ValueError(f"plan_mu needs target_epsilon > 0, 0 < delta < 1, steps >= 1; got "
                         f"{target_epsilon}, {delta}, {steps}")

    def eps(mu: float) -> float:
        return epsilon_of([SkellamEntry(mu, l1, l2, sample_rate, steps)], delta=delta)

    hi = l2 * l2
    while eps(hi) > target_epsilon:
        hi *= 4.0
        if hi > 1e40:
            raise ValueError(f"no mu reaches epsilon {target_epsilon:g} at delta {delta:g} in {steps} steps")
    lo = hi / 4.0
    while eps(lo) <= target_epsilon and lo > 1e-12:
        hi, lo = lo, lo / 4.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def max_steps(*, target_epsilon: float, delta: float, mu: float, sample_rate: float, l1: float, l2: float,
              limit: int = 100_000) -> int:
    """The most pooled steps with noise ``mu`` whose epsilon stays within ``target_epsilon`` (0: none)."""
    per = step_rdp(mu, l1, l2, sample_rate)
    lo, hi = 0, 1
    while hi <= limit and epsilon_from_rdp(per * hi, delta) <= target_epsilon:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon_from_rdp(per * mid, delta) <= target_epsilon else (lo, mid)
    return lo


def gaussian_equivalent(mu: float, l2: float) -> float:
    """The noise multiplier of the Gaussian with the pooled noise's variance 2*mu (for reports)."""
    return math.sqrt(2.0 * mu) / l2


def field_bound(*, sites: int, max_batch: int, clip: float, scale: float, mu: float, honest: int) -> int:
    """The largest magnitude a coordinate of the secure sum can reach (up to the stated noise tail):
    ``sites`` batch sums of at most ``max_batch`` records of round(s*g_j), |g_j| <= C, plus the
    sum of ``sites`` shares Sk(mu/m, mu/m), variance 2*mu*sites/m, out to ``NOISE_TAIL_SDS`` SDs."""
    per_record = math.floor(scale * clip + 0.5)
    noise = NOISE_TAIL_SDS * math.sqrt(2.0 * mu * sites / max(1, honest))
    return int(sites * max_batch * per_record + math.ceil(noise))


__all__ = ["ACCOUNTANT", "NOISE_TAIL_SDS", "ORDERS", "SkellamEntry", "epsilon_from_rdp", "epsilon_of",
           "field_bound", "gaussian_equivalent", "max_steps", "plan_mu", "sensitivities", "skellam_rdp",
           "step_rdp", "subsampled_rdp"]
