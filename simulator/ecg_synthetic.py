"""Synthetic single-beat ECG windows: normal sinus beats vs premature ventricular contractions.

Why: the ECG seed trains a 1-D CNN on 185-sample beat windows (normal vs PVC), and the
simulator must run it without downloading MIT-BIH. This generator produces windows
with the morphology a cardiologist would recognise, so the CNN has to learn shape and
timing, not an artefact.

Model (times in seconds, amplitudes in mV, sampled at ``FS`` = 125 Hz like the
widely used MIT-BIH beat-window datasets; a window is ``LENGTH`` = 185 samples,
1.48 s, starting 0.35 s before the R peak of the beat of interest):

* Every beat is a sum of Gaussians ``a * exp(-(t - mu)^2 / (2 sigma^2))``
  (McSharry et al. 2003, "A dynamical model for generating synthetic ECG signals").
* **Normal beat**: P wave (+0.10..0.25 mV, 0.18 s before R), narrow QRS (Q, R, S,
  total ~90 ms), upright T wave whose delay scales with sqrt(RR) (Bazett).
* **PVC**: no P wave; premature (coupling interval 0.50-0.75 of the RR interval);
  wide bizarre QRS (120-200 ms, two merged lobes, either polarity); T wave
  discordant, i.e. opposite in sign to the main QRS deflection and larger; followed
  by a full compensatory pause (next sinus beat at twice the RR after the
  preceding normal beat).
* Hard cases, as in real recordings: 10% of normal beats have a bundle branch block
  (wide QRS, discordant T: a PVC mimic told apart only by the P wave and the timing);
  20% of PVCs are late-coupled (0.80-0.95 RR, half of them after a visible sinus P wave)
  and 25% are narrower, smaller fascicular-looking beats.
* Context: the preceding sinus beat and the following beat are drawn too, so the
  window shows the RR timing around the beat as a real beat window does.
* Variability and noise: heart rate 50-110 bpm with beat-to-beat jitter,
  amplitude scale 0.6-1.4, electrical axis (QRS/T amplitude ratios), baseline
  wander (two sinusoids 0.05-0.5 Hz), powerline interference (50 or 60 Hz, the
  latter aliased at 125 Hz exactly as a real recorder would alias it), white
  Gaussian noise (0.01-0.06 mV) and, in 15% of windows, a burst of muscle noise.

Everything is drawn from ``numpy.random.default_rng(seed)``: same seed, same data.
"""

from __future__ import annotations

import numpy as np

FS = 125.0
LENGTH = 185
PRE_R_S = 0.35  # window start relative to the R peak of the beat of interest

NORMAL, PVC = 0, 1


def _gauss(t: np.ndarray, a: float, mu: float, sigma: float) -> np.ndarray:
    return a * np.exp(-((t - mu) ** 2) / (2.0 * sigma**2))


def _normal_beat(
    t: np.ndarray, r: float, rr: float, scale: float, rng: np.random.Generator, *, bbb: bool = False
) -> np.ndarray:
    """A sinus beat with its R peak at time ``r``.

    ``bbb``: bundle branch block - a *normal-class* beat with a wide QRS and a discordant
    T wave, the classic PVC mimic; only the P wave and the regular timing tell them apart.
    """
    qt = 0.30 * np.sqrt(rr)  # R-to-T-peak delay follows Bazett's sqrt(RR) scaling
    p_amp = rng.uniform(0.10, 0.25)
    r_amp = rng.uniform(0.8, 1.3)
    r_sigma = rng.uniform(0.022, 0.032) if bbb else rng.uniform(0.009, 0.013)
    t_amp = -rng.uniform(0.15, 0.35) if bbb else rng.uniform(0.20, 0.40)
    return scale * (
        _gauss(t, p_amp, r - rng.uniform(0.15, 0.21), rng.uniform(0.020, 0.030))
        + _gauss(t, -rng.uniform(0.05, 0.15), r - 0.028, 0.010)
        + _gauss(t, r_amp, r, r_sigma)
        + _gauss(t, -rng.uniform(0.10, 0.35), r + 0.030 + (0.03 if bbb else 0.0), 0.011)
        + _gauss(t, t_amp, r + qt, rng.uniform(0.045, 0.070))
    )


def _pvc_beat(t: np.ndarray, r: float, scale: float, rng: np.random.Generator, *, subtle: bool = False) -> np.ndarray:
    """An ectopic ventricular beat centred at ``r``: no P, wide QRS, discordant T.

    ``subtle``: a narrower, smaller ectopic beat (fascicular origin) - harder to tell
    from a sinus beat by shape alone.
    """
    polarity = 1.0 if rng.random() < 0.6 else -1.0
    width = rng.uniform(0.018, 0.028) if subtle else rng.uniform(0.030, 0.050)  # QRS ~90-130 / 120-200 ms
    main = polarity * (rng.uniform(0.7, 1.2) if subtle else rng.uniform(1.0, 1.8))
    notch = -polarity * rng.uniform(0.2, 0.6)
    return scale * (
        _gauss(t, main, r, width)
        + _gauss(t, notch, r + rng.uniform(0.04, 0.07), rng.uniform(0.020, 0.035))
        + _gauss(t, -np.sign(main) * rng.uniform(0.35, 0.7), r + rng.uniform(0.26, 0.34), rng.uniform(0.06, 0.09))
    )


def _noise(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    wander = sum(
        rng.uniform(0.02, 0.15) * np.sin(2 * np.pi * rng.uniform(0.05, 0.5) * t + rng.uniform(0, 2 * np.pi))
        for _ in range(2)
    )
    mains = rng.choice([50.0, 60.0])
    powerline = rng.uniform(0.0, 0.05) * np.sin(2 * np.pi * mains * t + rng.uniform(0, 2 * np.pi))
    white = rng.normal(0.0, rng.uniform(0.01, 0.06), size=t.shape)
    if rng.random() < 0.15:  # a burst of muscle (EMG) noise over part of the window
        start = int(rng.integers(0, t.shape[0] - 20))
        burst = white[start : start + int(rng.integers(20, 60))]
        burst += rng.normal(0.0, rng.uniform(0.05, 0.15), size=burst.shape)
    return wander + powerline + white


def beat_window(label: int, rng: np.random.Generator) -> np.ndarray:
    """One ``LENGTH``-sample window (mV) around a beat of class ``label``."""
    t = np.arange(LENGTH) / FS - PRE_R_S  # R peak of the beat of interest at t = 0
    rr = 60.0 / rng.uniform(50.0, 110.0)
    scale = rng.uniform(0.6, 1.4)
    jitter = lambda: rng.normal(0.0, 0.03 * rr)  # noqa: E731 - tiny local helper
    if label == NORMAL:
        bbb = rng.random() < 0.10  # conduction block: wide QRS and discordant T on every beat
        prev_r = -rr + jitter()
        sig = _normal_beat(t, 0.0, rr, scale, rng, bbb=bbb) + _normal_beat(t, prev_r, rr, scale, rng, bbb=bbb)
        sig += _normal_beat(t, rr + jitter(), rr, scale, rng, bbb=bbb)
    else:
        late = rng.random() < 0.20  # late-coupled PVC: barely premature, often after the sinus P wave
        coupling = (rng.uniform(0.80, 0.95) if late else rng.uniform(0.50, 0.75)) * rr
        prev_r = -coupling
        sig = _pvc_beat(t, 0.0, scale, rng, subtle=rng.random() < 0.25) + _normal_beat(t, prev_r, rr, scale, rng)
        if late and rng.random() < 0.5:  # the sinus P wave that the ectopic beat pre-empted
            sig += scale * _gauss(t, rng.uniform(0.10, 0.25), -rng.uniform(0.12, 0.18), rng.uniform(0.020, 0.030))
        # Full compensatory pause: next sinus beat two RR intervals after the previous one.
        sig += _normal_beat(t, prev_r + 2.0 * rr + jitter(), rr, scale, rng)
    return (sig + _noise(t, rng)).astype(np.float32)


def generate(n: int = 3000, *, seed: int = 42, pvc_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows: ``X`` float32 ``(n, 1, 185)`` in mV and ``y`` int64 (0 normal, 1 PVC)."""
    if n < 1:
        raise ValueError(f"ecg_synthetic: n must be >= 1, got {n}")
    if not 0.0 <= pvc_fraction <= 1.0:
        raise ValueError(f"ecg_synthetic: pvc_fraction must be in [0, 1], got {pvc_fraction}")
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pvc_fraction).astype(np.int64)
    x = np.stack([beat_window(int(label), rng) for label in y])[:, None, :]
    return x, y
