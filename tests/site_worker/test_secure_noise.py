"""DP-SGD's noise (``SecureRandom.gaussian_like``, the float32 path of issue 23): Gaussian with
the requested sigma, a function of its secret key alone, and laid out so chunks never repeat.

The key below is fixed for these tests only (a KS test on a fresh key would fail one run in
a thousand); every task's real key comes from ``os.urandom``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from site_worker import secure_rng
from site_worker.secure_rng import SecureRandom

TEST_KEY = bytes(range(32))
N = 200_000
SIGMA = 3.0


def _noise(key: bytes = TEST_KEY, n: int = N, std: float = SIGMA, dtype: torch.dtype = torch.float32) -> np.ndarray:
    return SecureRandom(key).gaussian_like(torch.zeros(n, dtype=dtype), std).numpy()


def test_the_noise_is_gaussian_with_the_requested_sigma() -> None:
    z = _noise()
    assert z.dtype == np.float32 and np.isfinite(z).all()
    # KS against N(0, sigma^2): a sigma 2 % off gives sqrt(N) * D of about 2.1 (p ~ 1e-4).
    assert stats.kstest(z.astype(np.float64), "norm", args=(0.0, SIGMA)).pvalue > 1e-3
    assert stats.kstest(z.astype(np.float64), "norm", args=(0.0, SIGMA * 1.02)).pvalue < 1e-3
    assert stats.kstest(z.astype(np.float64), "norm", args=(0.0, SIGMA * 0.98)).pvalue < 1e-3
    # Sample sigma within 4 standard errors (sigma / sqrt(2N) ~ 0.16 %).
    assert abs(z.std() / SIGMA - 1) < 4 / np.sqrt(2 * N)
    assert abs(z.mean()) < 4 * SIGMA / np.sqrt(N)


def test_the_stream_is_keyed_by_its_secret() -> None:
    a, again = _noise(n=1000), _noise(n=1000)
    np.testing.assert_array_equal(a, again)  # a function of the key (reproducible research runs)
    other = _noise(bytes(31) + b"\x01", n=1000)
    assert not np.isclose(a, other).any()  # a key one bit off: unrelated noise
    fresh = [SecureRandom.secret().gaussian_like(torch.zeros(1000), 1.0).numpy() for _ in range(2)]
    assert not np.isclose(fresh[0], fresh[1]).any()  # every task's own 256 bits from the OS


def test_the_noise_does_not_depend_on_the_reference_dtype() -> None:
    """The adversarial tests rebuild a site's noise on float64 tensors; the site's are float32."""
    np.testing.assert_array_equal(_noise(n=999, dtype=torch.float64).astype(np.float32), _noise(n=999))


def test_chunks_continue_the_stream() -> None:
    k = secure_rng._NOISE_CHUNK
    z = _noise(n=k + 7, std=1.0)
    np.testing.assert_array_equal(z[:k], _noise(n=k, std=1.0))  # the first chunk is the short call's
    assert not np.isclose(z[k:], z[:7]).any()  # the next one is new stream, not a repeat


def test_zero_sigma_is_no_noise() -> None:
    assert not _noise(n=10, std=0.0).any()


def test_the_radius_uniform_reaches_deep_tails() -> None:
    """The radius word keeps 63 bits: the smallest uniform gives a draw of 9.4 sigma (a 24-bit
    uniform would stop at 5.9), none is zero (an infinite radius), none above 1."""
    words = torch.tensor([0, 1, -1, (1 << 63) - 1, -(1 << 63)], dtype=torch.int64)
    radius = secure_rng.radius_uniform(words).log().mul(-2.0).sqrt()
    assert torch.isfinite(radius).all() and (radius >= 0).all()
    assert radius[0] > 9.4 and radius[1] > 9.3 and radius[4] > 9.4  # -(1 << 63): the sign bit alone
    assert radius[2] == 0 and radius[3] == 0
