"""The site's side of user-level central DP under secure aggregation (``secure_aggregation.dp = "central"``).

DP-FedAvg (McMahan et al. 2018) with the noise added by the sites, in the integers (the Skellam
mechanism, Agarwal, Kairouz, Liu 2021; cf. Kairouz et al. 2021's distributed discrete Gaussian):
each sampled site trains as usual (no per-record noise), takes its update delta = trained -
global, clips the WHOLE delta to L2 <= C, scales by s, rounds to integers and adds its share
Sk(mu/m, mu/m) per coordinate from its secret stream. One site (its whole dataset) moves the
integer sum by at most Delta2 = s*C + sqrt(d) (the rounding's slack, as in the pooled mode), so
the unmasked sum of m honest shares, which carries Sk(mu, mu), is (epsilon, delta)-DP for a
site's data; the coordinator adds nothing and never holds an un-noised sum.

Weights are uniform and public: a weight inside the masked vector would be a row count the
sum reveals (unless it were noised too), so every site counts once and the coordinator divides
by the number of sites it sampled, fixed before the round (``coordinator/rounds/secure.py``).

Accounting (user level): the run is T = ``training.rounds`` sampled Skellam steps at the site
sampling rate q = k/N of the roster (``protocol.secagg.rules.central_rate``); the whole run is
charged to the ledger on the site's first update of the run (one SkellamEntry of T steps), and
the site masks at most T central updates per run (``CentralRefused``, rule ``rounds``), each of
which the secure-aggregation rules let into one unmasked sum at most. Under FedBuff nothing samples
the sites (q = 1, ``central_sample_rate``): each masked update is charged as it is masked, one
un-subsampled step, so the ledger composes at most T of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.secagg import skellam
from site_worker.pooled_dp import PooledRefused, noise_share
from site_worker.secure_rng import SecureRandom


class CentralRefused(PooledRefused):
    """A central-mode update the site will not mask; ``rule`` names the rule."""


def clip_update(delta: np.ndarray, clip: float) -> np.ndarray:
    """``delta * min(1, C / ||delta||_2)`` in float64: the whole update, one site's contribution."""
    d = np.asarray(delta, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(d))
    return d if norm <= clip or norm == 0.0 else d * (clip / norm)


def quantise_update(delta: np.ndarray, *, clip: float, scale: float) -> np.ndarray:
    """round(s * clip_C(delta)), int64: within sqrt(d)/2 of s * clip_C(delta), so one site moves the
    integer sum by at most Delta2 = s*C + sqrt(d) in L2."""
    return np.round(clip_update(delta, clip) * float(scale)).astype(np.int64)


@dataclass(frozen=True)
class CentralShare:
    """What one central-mode contribution needs: the run's public settings and the site's m."""

    clip: float
    scale: float
    mu: float  # the sum of m honest shares is Sk(mu, mu)
    sample_rate: float  # q = k/N, the roster's site sampling rate
    rounds: int  # T: the run's steps, each one sampled Skellam release
    assume_honest_sites: int

    def contribution(self, delta: np.ndarray, rng: SecureRandom) -> np.ndarray:
        """The integer vector this site masks: its rounded clipped update plus its noise share."""
        ints = quantise_update(delta, clip=self.clip, scale=self.scale)
        return ints + noise_share(self.mu, self.assume_honest_sites, ints.size, rng)

    def entry(self, dim: int, *, steps: int | None = None) -> skellam.SkellamEntry:
        """The ledger entry of ``steps`` (default the whole run's T) steps of Sk(mu, mu) at q on a site's
        update of d values (``protocol.secagg.rules.central_entry`` with the roster's d)."""
        l1, l2 = skellam.sensitivities(self.clip, self.scale, dim)
        return skellam.SkellamEntry(self.mu, l1, l2, self.sample_rate, int(self.rounds if steps is None else steps))

    def field_bound(self) -> int:
        """The largest coordinate this site's vector may hold (one clipped update, its share's tail)."""
        return skellam.field_bound(sites=1, max_batch=1, clip=self.clip, scale=self.scale, mu=self.mu,
                                   honest=self.assume_honest_sites)


def check_rounds(masked_before: int, rounds: int) -> None:
    """Refuse a (T+1)-th update of one run: the ledger charged T sampled steps, no more."""
    if masked_before >= rounds:
        raise CentralRefused("rounds", f"this site already masked {masked_before} update(s) of this run, the "
                                       f"{rounds} rounds its ledger was charged for")


__all__ = ["CentralRefused", "CentralShare", "check_rounds", "clip_update", "quantise_update"]
