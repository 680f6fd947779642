"""Which runs secure aggregation can protect, checked when the experiment is validated.

Masking hides every single update from the coordinator, so whatever needs one update in the
clear cannot run under it: FedAsync (each update is merged alone: its "sum" is that update),
robust Flower strategies (Krum, median, trimmed mean look at each update), the coordinator's
per-update norm check and central DP's per-update clipping (the sites clip to
``secure_aggregation.clip`` instead). Each refusal is one line naming the key and the way out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.config_error import ConfigError
from protocol.secagg.field import QuantConfig

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
                                                  "aggregation hides; leave it out (sites add the noise themselves)")
