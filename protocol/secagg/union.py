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
mechanism of multiplier σ_u (``policy.union_noise_multiplier``, ``union_release_entries``), which holds while at least K contributors
are honest. ``docs/secure-aggregation.md`` says what a coalition learns.

Field encoding: each value is divided by the public ``COUNT_CAP`` (and multiplied by the roster's
clip C, ``pack``) so that counts of up to ``COUNT_CAP`` rows sit in the roster's clip range [−C, C]
(noise past it is clipped: post-processing); with scale S the quantisation error of a K'-site sum
is at most K'·COUNT_CAP/(2·S·C) per count.

In a run (``union_planned``): the final test ``EvalTask`` of a run under secure aggregation (sync or FedBuff)
carries ``union_tag``; a site whose metrics policy is ``dp`` answers its own release as ever and,
on the same ``EvalResult``, its masked union vector (``union_masked``) with the mask's sealed shares
(``union_shares``), padded to the roster's length (``roster_length`` makes room for it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from protocol import dp_figures

COUNT_CAP = 2.0**14  # rows a site's count may reach in the field's [-1, 1]
RELEASE_BINS = 10  # score bins of the binary histogram (site_worker/release.py's BINS)
CLASSIFICATION_LOSSES = ("bce_with_logits", "cross_entropy")
LEVELS_PER_COUNT = 4  # field levels per row a roster must give: quantisation <= 1/8 row per site


def release_length(*, task: str, loss_name: str, outputs: int) -> int:
    """Values in one model's DP statistics vector, from public shapes alone:
    binary 4 + 2 x BINS + 1, multiclass k x k + 1, regression 3."""
    if task == "regression" or loss_name == "mse":
        return 3
    if outputs <= 2:
        return 4 + 2 * RELEASE_BINS + 1
    return outputs * outputs + 1


def union_planned(experiment: Any) -> bool:
    """The run's final test carries union vectors: secure aggregation (the sync loop or FedBuff's
    buffers: one final evaluation for both), a classification loss, no personalisation (a
    PersonalizeTask's release is two models'), and a roster fine enough for counts: at least ``LEVELS_PER_COUNT``
    field levels per row (C x S >= 4 x COUNT_CAP; the pooled mode's gradient-sized rosters are
    not). The coordinator, the privacy plan and the site's ledger all ask this."""
    fed = experiment.federated
    sa = fed.secure_aggregation
    return (sa is not None
            and float(sa.clip) * float(sa.scale) >= LEVELS_PER_COUNT * COUNT_CAP
            and str(experiment.training.loss_function) in CLASSIFICATION_LOSSES
            and experiment.training.personalization is None)


def roster_length(base: int, *, loss_name: str, outputs: int) -> int:
    """The roster's vector length: the update's ``base`` values, or the union vector if longer."""
    return max(int(base), release_length(task="classification", loss_name=loss_name, outputs=outputs))


def pack(field_values: np.ndarray, length: int, clip: float) -> np.ndarray:
    """A union vector (already ``to_field``) in the roster's [-C, C], zero-padded to ``length``."""
    v = np.asarray(field_values, dtype=np.float64) * float(clip)
    if v.size > length:
        raise ValueError(f"the union vector has {v.size} values, the roster only {length}")
    return np.concatenate([v, np.zeros(length - v.size)])


def unpack(summed: np.ndarray, size: int, clip: float) -> np.ndarray:
    """The summed statistics (counts) from the unmasked sum of packed vectors."""
    return from_field(np.asarray(summed[:size], dtype=np.float64) / float(clip))


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


__all__ = ["CLASSIFICATION_LOSSES", "COUNT_CAP", "LEVELS_PER_COUNT", "RELEASE_BINS", "from_field", "noise_share_sd", "pack", "release_length",
           "roster_length", "to_field", "union_figures", "union_noise_sd", "union_planned", "unpack"]
