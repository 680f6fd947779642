"""Which runs secure aggregation can protect, checked when the experiment is validated.

Masking hides every single update from the coordinator, so whatever needs one update in the
clear cannot run under it: FedAsync (each update is merged alone: its "sum" is that update),
robust Flower strategies (Krum, median, trimmed mean look at each update), the coordinator's
per-update norm check and central DP's per-update clipping (the sites clip to
``secure_aggregation.clip`` instead). Each refusal is one line naming the key and the way out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from protocol.config_error import ConfigError
from protocol.secagg.field import HALF, QuantConfig

if TYPE_CHECKING:
    from protocol.config import Experiment
    from protocol.secagg.skellam import SkellamEntry

WHERE = "federated.secure_aggregation"
SYNC_AGGREGATORS = ("FedAvg", "FedAvgM", "FedAdam", "FedProx")  # server steps on the average only
# Flower strategies whose aggregate_fit reads each client's update (robust aggregation).
NEEDS_INDIVIDUAL_UPDATES = ("Krum", "MultiKrum", "Bulyan", "FedMedian", "FedTrimmedAvg")


def check_aggregator(name: str, parameters: Mapping[str, Any], *, central_dp: bool, min_contributors: int,
                     threshold: int, privacy: int, clip: float, scale: float, max_sites: int) -> None:
    """Refuse an aggregator, parameter or coding that secure aggregation cannot honour."""
    if not 0 <= privacy < threshold:
        raise ConfigError(f"{WHERE}.privacy", f"must be >= 0 and below threshold ({threshold}), got {privacy}")
    if threshold > max_sites:
        raise ConfigError(f"{WHERE}.threshold", f"must be <= max_sites ({max_sites}), got {threshold}")
    QuantConfig(clip, scale, max_sites)  # the bit budget: raises ConfigError naming scale
    if name == "FedAsync":
        raise ConfigError("federated.name", "FedAsync merges each update alone, so secure aggregation would unmask "
                                            "single updates; use FedBuff (buffer_size >= min_contributors)")
    if name.startswith("flower:"):
        strategy = name.split(":", 1)[1]
        if strategy in NEEDS_INDIVIDUAL_UPDATES:
            raise ConfigError("federated.name", f"{strategy} needs each site's update in the clear (robust aggregation), "
                                                "which secure aggregation hides; use FedAvg or FedBuff")
        raise ConfigError("federated.name", f"Flower strategies receive individual updates (aggregate_fit); under "
                                            f"secure aggregation use {', '.join(SYNC_AGGREGATORS)} or FedBuff")
    if name == "FedBuff":
        k = int(parameters.get("buffer_size", parameters.get("weighting", 2)))
        if k < min_contributors:
            raise ConfigError("federated.parameters.buffer_size", f"{k} is below secure_aggregation.min_contributors "
                                                                  f"({min_contributors}): sites would refuse to unmask")
        spec = parameters.get("staleness", "constant")
        kind = spec.get("function", spec.get("type", "constant")) if isinstance(spec, Mapping) else spec
        if kind != "constant":
            raise ConfigError("federated.parameters.staleness", f"{kind!r} weights each update by its own staleness, "
                                                                "which a masked update cannot be multiplied by; under "
                                                                "secure aggregation FedBuff uses constant (the default)")
    elif name in SYNC_AGGREGATORS:
        if int(parameters.get("min_fit_clients", 1)) < min_contributors:
            raise ConfigError("federated.parameters.min_fit_clients",
                              f"must be >= secure_aggregation.min_contributors ({min_contributors}): a round closed "
                              "with fewer updates could not be unmasked")
    else:
        raise ConfigError("federated.name", f"{name!r} is not known to work on a sum of updates; under secure "
                                            f"aggregation use {', '.join(SYNC_AGGREGATORS)} or FedBuff")
    if "norm_bound" in parameters:
        raise ConfigError("federated.parameters.norm_bound", "the coordinator cannot measure a masked update; under "
                                                             "secure aggregation sites clip to secure_aggregation.clip")
    if central_dp:
        raise ConfigError("federated.central_dp", "central DP clips each update at the coordinator, which secure "
                                                  "aggregation hides; leave it out and set secure_aggregation.dp = "
                                                  "\"central\" (each site clips its update and adds its noise share)")


DP_MODES = ("off", "pooled", "central")


def central_rate(fraction_fit: float, min_fit_clients: int, sites: int) -> float:
    """The central mode's site sampling rate q: the coordinator draws ``max(ceil(fraction_fit x N),
    min_fit_clients)`` (at most N) of the roster's N sites each round, from its secret
    (``coordinator.sampling.sample_count``: the same formula), so every site is in a round with
    probability k/N, which is at least ``fraction_fit`` (a few sites: ceil and min_fit_clients)."""
    if sites < 1:
        raise ValueError(f"a roster has at least one site, got {sites}")
    return min(sites, max(math.ceil(fraction_fit * sites), int(min_fit_clients))) / sites


def central_sample_rate(experiment: Experiment, sites: int) -> float:
    """The q a central-mode site's ledger charges each Skellam release at: the sync loop's k/N of a
    roster of ``sites`` (``central_rate``: the coordinator samples from its secret); under FedBuff 1,
    since the coordinator keeps every site busy and samples no one, so no amplification by
    subsampling applies to an update a site masks."""
    fed = experiment.federated
    if fed.name == "FedBuff":
        return 1.0
    return central_rate(fed.fraction_fit, fed.min_fit_clients, sites)


def central_entry(experiment: Experiment, sites: int, *, steps: int | None = None) -> SkellamEntry:
    """The ledger entry of a central-mode site in a roster of ``sites`` (``skellam.SkellamEntry``):
    ``steps`` Skellam releases Sk(mu, mu) on one site's clipped, rounded update (d = every model
    value), at ``central_sample_rate``. Default: the whole run's T = ``training.rounds`` releases
    (sync: T sampled rounds, charged at once; FedBuff: at most T masked updates, each charged on its
    own as one un-subsampled release). The site charges it and the plan and ``site check`` show it."""
    from protocol.secagg import skellam

    sa = experiment.federated.secure_aggregation
    assert sa is not None and sa.dp == "central"
    l1, l2 = skellam.sensitivities(sa.clip, sa.scale, central_dim(experiment))
    return skellam.SkellamEntry(pooled_mu(experiment), l1, l2, central_sample_rate(experiment, sites),
                                int(experiment.training.rounds if steps is None else steps))


def pooled_entry(experiment: Experiment, *, steps: int | None = None) -> SkellamEntry:
    """The ledger entry of a pooled-mode site: ``steps`` (default the run's T = ``training.rounds``)
    DP-SGD steps of Sk(mu, mu) on one record's rounded clipped gradient (d = the trainable values), at
    the records' Poisson rate ``sample_rate`` (the site samples its own records, in either loop)."""
    from protocol.model import summarize
    from protocol.secagg import skellam

    sa = experiment.federated.secure_aggregation
    assert sa is not None and sa.dp == "pooled"
    l1, l2 = skellam.sensitivities(sa.clip, sa.scale, summarize(experiment.architecture.layers).trainable)
    return skellam.SkellamEntry(pooled_mu(experiment), l1, l2, float(sa.sample_rate),
                                int(experiment.training.rounds if steps is None else steps))


def central_per_update(experiment: Experiment) -> bool:
    """Whether a central-mode site charges each masked update as it masks it (FedBuff: q = 1, exact)
    rather than the whole run's T sampled rounds on its first update (the sync loop: amplification by
    sampling counts every round, sampled or not, so the run is charged at once)."""
    return experiment.federated.name == "FedBuff"


def central_dim(experiment: Experiment) -> int:
    """d of the central mode: every value of the model's update (the delta of all its parameters)."""
    from protocol.model import summarize

    return int(summarize(experiment.architecture.layers).parameters)


def pooled_mu(experiment: Experiment) -> float:
    """The Skellam parameter mu of a ``dp = "pooled"`` or ``"central"`` run: from ``noise_multiplier``
    (2 mu = (sigma Delta2)^2, the Gaussian's variance) or the least mu meeting ``target_epsilon`` over
    the run's rounds (one step each) at ``delta`` (``protocol.secagg.skellam.plan_mu``, the one
    Skellam planner). Pooled: Delta2 of one record's rounded clipped gradient, Poisson rate
    ``sample_rate``. Central: Delta2 of one site's rounded clipped update, site sampling rate
    ``fraction_fit`` (the site's ledger charges its roster's k/N, ``central_rate``, never less);
    under FedBuff q = 1 (``central_sample_rate``: no coordinator sampling)."""
    from protocol.model import summarize
    from protocol.secagg import skellam

    sa = experiment.federated.secure_aggregation
    assert sa is not None
    central = sa.dp == "central"
    dim = central_dim(experiment) if central else summarize(experiment.architecture.layers).trainable
    l1, l2 = skellam.sensitivities(sa.clip, sa.scale, dim)
    if sa.noise_multiplier is not None:
        return 0.5 * (sa.noise_multiplier * l2) ** 2
    assert sa.target_epsilon is not None
    if central:
        q = 1.0 if central_per_update(experiment) else experiment.federated.fraction_fit
    else:
        q = sa.sample_rate
    return skellam.plan_mu(target_epsilon=sa.target_epsilon, delta=sa.delta, steps=int(experiment.training.rounds),
                           sample_rate=q, l1=l1, l2=l2)


def check_pooled(experiment: Experiment) -> None:
    """Refuse a pooled- or central-mode experiment that is incomplete, runs where it cannot, or would
    overflow the field: ``max_sites`` batch sums of ``max_batch`` rows (central: one clipped update
    per site, ``max_batch`` = 1) plus the noise of the sum out to ``NOISE_TAIL_SDS`` standard
    deviations (m = 1, the most noise any site may add) must stay within the field's 2**30 - 1."""
    from protocol.secagg import skellam

    sa = experiment.federated.secure_aggregation
    assert sa is not None
    if sa.dp not in DP_MODES:
        raise ConfigError(f"{WHERE}.dp", f"must be one of {', '.join(DP_MODES)}, got {sa.dp!r}")
    mode = sa.dp
    if (sa.noise_multiplier is None) == (sa.target_epsilon is None):
        raise ConfigError(f"{WHERE}.dp", f'{mode} needs exactly one of noise_multiplier or target_epsilon')
    name = experiment.federated.name
    if name not in SYNC_AGGREGATORS and name != "FedBuff":
        raise ConfigError(f"{WHERE}.dp", f"{mode} takes one step per site per sum; use "
                                         f"{', '.join(SYNC_AGGREGATORS)} or FedBuff, not {name!r}")
    if name == "FedBuff":
        params = experiment.federated.parameters
        k = int(params.get("buffer_size", params.get("weighting", 2)))
        if k > sa.max_sites:  # a buffer holds one update per site: more than the roster's sites never closes
            raise ConfigError("federated.parameters.buffer_size",
                              f"{k} exceeds secure_aggregation.max_sites ({sa.max_sites}): under dp = \"{mode}\" a "
                              "buffer holds one update of each of buffer_size distinct sites")
    if experiment.training.dp is not None:
        raise ConfigError(f"{WHERE}.dp", f"{mode} adds the noise itself (a share per site); disable "
                                         "training.optimizer.differential_privacy")
    batch = sa.max_batch
    if mode == "central":
        for key in ("sample_rate", "max_batch"):  # record-level knobs: the central mode samples sites
            if getattr(sa, key) != type(sa).model_fields[key].default:  # (the wire writes every default)
                raise ConfigError(f"{WHERE}.{key}", "belongs to dp = \"pooled\"; the central mode clips each site's "
                                                    "whole update and samples sites with federated.parameters."
                                                    "fraction_fit")
        batch = 1  # one clipped update per site
    mu = pooled_mu(experiment)
    bound = skellam.field_bound(sites=sa.max_sites, max_batch=batch, clip=sa.clip, scale=sa.scale, mu=mu,
                                honest=1)
    if bound > HALF:
        per = math.floor(sa.scale * sa.clip + 0.5)
        raise ConfigError(f"{WHERE}.scale", f"{sa.max_sites} sites x max_batch {batch} x round(clip x scale) "
                                            f"{per} plus {skellam.NOISE_TAIL_SDS:g} SDs of the noise = {bound} exceeds "
                                            f"the field's {HALF}: lower scale, max_batch or max_sites")
