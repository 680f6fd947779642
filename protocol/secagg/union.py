"""Union metrics from secure sums (issue 22): one DP release for the union of the sites' test rows.

Today each site releases its own statistics vector (``site_worker/release.py``: binary confusion
cells, a (label, score bin) histogram and the clipped loss sum) with Gaussian noise of SD σ·Δ, and
pooling N such releases carries the noise N times (SD √N·σ·Δ on the union). Under secure
aggregation each site instead adds only its **share** of the noise, SD σ·Δ/√K with K the roster's
``min_contributors``, and masks the noisy vector; the coordinator unmasks only the sum of at least
K sites (the sites' rules), which then carries noise of SD at least σ·Δ: the noise is added once for
the union. Per-site figures remain each site's own, separately noised release.

Privacy, honestly: a site's rows in the union release are protected by the noise of every honest
contributor. With K' ≥ K contributors of whom k collude with the coordinator (and subtract their
own noise), the noise left is σ·Δ·√((K' − k)/K); the site's ledger charges the release as a Gaussian
mechanism of multiplier σ (``union_release_entries``), which holds while at least K contributors
are honest. ``docs/secure-aggregation.md`` says what a coalition learns.

Field encoding: each value is divided by the public ``COUNT_CAP`` so that counts of up to
``COUNT_CAP`` rows sit in the roster's clip range [−1, 1] (noise past it is clipped: post-processing);
with scale S the quantisation error of a K'-site sum is at most K'·COUNT_CAP/(2S) per count.
"""

from __future__ import annotations

import math

import numpy as np

from protocol import dp_figures

COUNT_CAP = 2.0**14  # rows a site's count may reach in the field's [-1, 1]


def noise_share_sd(noise_multiplier: float, sensitivity: float, min_contributors: int) -> float:
    """A site's share of the union's noise: SD σ·Δ/√K, so K honest shares add up to σ·Δ."""
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
    return float(noise_multiplier) * float(sensitivity) / math.sqrt(int(min_contributors))


def union_noise_sd(share_sds: list[float]) -> float:
    """The SD of the noise in a sum of contributions, each with its share's SD."""
    return math.sqrt(sum(float(s) ** 2 for s in share_sds))


def to_field(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) / COUNT_CAP


def from_field(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) * COUNT_CAP


def union_figures(layout: str, summed: np.ndarray, *, noise_sd: float, clip: float,
                  rows: int | None = None) -> dict[str, float]:
    """Figures (with 95 % intervals, ``protocol.dp_figures``) of the union from the unmasked sum of
    the sites' noisy statistics vectors (already ``from_field``); ``noise_sd`` its total noise SD."""
    v = np.asarray(summed, dtype=np.float64)
    loss_sum = max(0.0, float(v[-1]))
    if layout == "binary":
        out = dp_figures.confusion_figures(v[:4], noise_sd, rows=rows)
        out.update(dp_figures.auc_figure(v[4:-1], noise_sd, n=out["n"]))
    elif layout.startswith("multiclass:"):
        out = dp_figures.confusion_figures(v[:-1], noise_sd, rows=rows)
    else:
        raise ValueError(f"union figures need a classification release, not {layout!r}")
    out["loss"] = loss_sum * clip / out["n"]
    out["noise_sd"] = float(noise_sd)
    return out


__all__ = ["COUNT_CAP", "from_field", "noise_share_sd", "to_field", "union_figures", "union_noise_sd"]
