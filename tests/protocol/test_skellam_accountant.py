"""The pooled-DP accountant (protocol/secagg/skellam.py): sound against Opacus, tight where it should be.

- The Zhu-Wang subsampled bound, applied to the Gaussian's RDP alpha/(2 sigma^2), is never below
  Opacus' exact sampled-Gaussian RDP (sound), equals it at q = 1, and its epsilon stays within
  a stated factor of Opacus' epsilon.
- Skellam RDP tends to the Gaussian's of the same variance as mu grows.
- The planner's mu is the smallest meeting the target (just inside passes, 1 % less fails); the
  step planner's count likewise.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from protocol.secagg import skellam as S

INT_ORDERS = list(range(2, 64))
# The largest epsilon ratio (ours / Opacus exact) over the grid below, 100 steps, delta 1e-5. The
# general upper bound's factor 3 and e^((l-1) eps(l)) terms cost most at small q and large sigma.
EPS_FACTOR = 3.5


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
def test_the_subsampled_bound_on_the_gaussian_is_sound_and_within_a_stated_factor(q: float, sigma: float) -> None:
    ours = np.array([S.subsampled_rdp(a, q, lambda o: o / (2 * sigma * sigma)) for a in INT_ORDERS])
    exact = np.array(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=INT_ORDERS))
    assert np.all(ours >= exact * (1 - 1e-9)), "below Opacus' exact sampled-Gaussian RDP: unsound"
    if q == 1.0:
        np.testing.assert_allclose(ours, exact, rtol=1e-12)
    e_ours = S.epsilon_from_rdp(ours * 100, 1e-5, INT_ORDERS)
    e_exact = S.epsilon_from_rdp(exact * 100, 1e-5, INT_ORDERS)
    assert e_exact * (1 - 1e-9) <= e_ours <= EPS_FACTOR * e_exact


def test_the_bound_never_exceeds_the_unsampled_mechanism_and_grows_with_q() -> None:
    mech = lambda a: a / 2.0  # noqa: E731  (sigma = 1)
    for a in (2, 5, 20):
        vals = [S.subsampled_rdp(a, q, mech) for q in (0.0, 0.01, 0.1, 0.5, 1.0)]
        assert vals[0] == 0.0 and vals[-1] == mech(a)
        assert all(x <= y + 1e-12 for x, y in zip(vals, vals[1:]))
        assert all(v <= mech(a) + 1e-12 for v in vals)


@pytest.mark.parametrize("bad", [1, 2.5, 0, True])
def test_a_non_integer_or_too_small_order_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="integer order >= 2"):
        S.subsampled_rdp(bad, 0.1, lambda a: a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling rate"):
        S.subsampled_rdp(3, 1.01, lambda a: a)


def test_skellam_rdp_tends_to_the_gaussians_of_the_same_variance() -> None:
    l1, l2 = S.sensitivities(1.0, 256.0, 50)
    gaps = []
    for mu in (1e3, 1e5, 1e7, 1e9):
        sigma = math.sqrt(2 * mu) / l2  # Sk(mu, mu) has variance 2 mu
        for a in (2, 8, 32):
            sk, gauss = S.skellam_rdp(a, mu, l1, l2), a / (2 * sigma * sigma)
            assert sk >= gauss  # never cheaper than the Gaussian
        gaps.append(S.skellam_rdp(8, mu, l1, l2) / (8 / (2 * sigma * sigma)) - 1)
    assert all(b < a for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-4


def test_sensitivities_cover_one_records_rounded_vector() -> None:
    rng = np.random.default_rng(1)  # test data only; no privacy noise here
    clip, scale, d = 0.5, 100.0, 40
    l1, l2 = S.sensitivities(clip, scale, d)
    for _ in range(200):
        g = rng.normal(size=d)
        g *= clip / np.linalg.norm(g)
        r = np.rint(g * scale)
        assert np.linalg.norm(r) <= l2 and np.abs(r).sum() <= l1
    assert l2 == scale * clip + math.sqrt(d) and l1 == min(math.sqrt(d) * l2, l2 * l2)


def _eps(mu: float, *, steps: int, q: float, l1: float, l2: float) -> float:
    return S.epsilon_of([S.SkellamEntry(mu, l1, l2, q, steps)], delta=1e-5)


@pytest.mark.parametrize("q,steps", [(1.0, 10), (0.2, 50)])
def test_the_planner_finds_the_smallest_mu_meeting_the_target(q: float, steps: int) -> None:
    l1, l2 = S.sensitivities(0.5, 1024.0, 26)
    mu = S.plan_mu(target_epsilon=1.0, delta=1e-5, steps=steps, sample_rate=q, l1=l1, l2=l2)
    assert _eps(mu, steps=steps, q=q, l1=l1, l2=l2) <= 1.0  # just inside
    assert _eps(mu * 0.99, steps=steps, q=q, l1=l1, l2=l2) > 1.0  # 1 % less noise: outside


def test_the_step_planner_finds_the_most_steps_within_the_target() -> None:
    l1, l2 = S.sensitivities(0.5, 1024.0, 26)
    mu = 5e7
    n = S.max_steps(target_epsilon=1.0, delta=1e-5, mu=mu, sample_rate=0.3, l1=l1, l2=l2)
    assert n >= 1
    assert _eps(mu, steps=n, q=0.3, l1=l1, l2=l2) <= 1.0
    assert _eps(mu, steps=n + 1, q=0.3, l1=l1, l2=l2) > 1.0


def test_nothing_spent_is_zero_and_no_noise_is_infinite() -> None:
    assert S.epsilon_of([], delta=1e-5) == 0.0
    assert math.isinf(S.skellam_rdp(2, 0.0, 1.0, 1.0))
