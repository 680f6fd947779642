"""The hospital's own rules, checked before any training: a task that breaks one is declined.

The coordinator cannot override these: they are read from the site's config only.
"""

from __future__ import annotations

from typing import Any

from site_worker.config import SitePolicy

MARKER_LAYERS = {"input", "output"}  # shape markers, not computation


class PolicyViolation(Exception):
    """A task the site refuses; ``str(e)`` says which rule and what the task asked for."""


def dp_settings(experiment: Any) -> Any | None:
    """The experiment's DP block when DP is on, else None."""
    dp = experiment.training.optimizer.differential_privacy
    if dp is None or not getattr(dp, "enabled", True):
        return None
    return dp


def check_policy(policy: SitePolicy, experiment: Any, *, parameters: int) -> None:
    """Layer whitelist, parameter count, aggregator, DP on and strong enough."""
    if policy.allowed_layers is not None:
        allowed = {t.lower() for t in policy.allowed_layers} | MARKER_LAYERS
        for i, layer in enumerate(experiment.architecture.layers):
            if layer.type.lower() not in allowed:
                raise PolicyViolation(
                    f"layer architecture.layers[{i}] of type {layer.type!r} is not allowed by this site "
                    f"(allowed: {', '.join(policy.allowed_layers)})")
    if policy.max_parameters is not None and parameters > policy.max_parameters:
        raise PolicyViolation(f"model has {parameters} parameters, this site allows at most {policy.max_parameters}")
    agg = experiment.federated.name
    if policy.allowed_aggregators is not None and agg not in policy.allowed_aggregators:
        raise PolicyViolation(f"aggregator {agg!r} is not allowed by this site "
                              f"(allowed: {', '.join(policy.allowed_aggregators)})")
    dp = dp_settings(experiment)
    if dp is None:
        if not policy.allow_no_dp:
            raise PolicyViolation("differential privacy is off for this experiment and this site requires it")
        return
    if dp.noise_multiplier is None and dp.target_epsilon is None and getattr(dp, "total_epsilon", None) is None:
        raise PolicyViolation("differential privacy needs noise_multiplier, target_epsilon or total_epsilon")
    if dp.noise_multiplier is not None and dp.target_epsilon is None:
        check_noise(policy, float(dp.noise_multiplier))
    total = getattr(dp, "total_epsilon", None)
    if total is not None and policy.max_epsilon is not None and total > policy.max_epsilon:
        raise PolicyViolation(f"total epsilon {total} exceeds this site's max_epsilon {policy.max_epsilon}")
    if dp.target_epsilon is not None and policy.max_epsilon is not None and dp.target_epsilon > policy.max_epsilon:
        raise PolicyViolation(f"target epsilon {dp.target_epsilon} exceeds this site's max_epsilon {policy.max_epsilon}")


def check_noise(policy: SitePolicy, noise_multiplier: float) -> None:
    """Minimum noise multiplier (also applied to the noise Opacus derives from a target ε)."""
    if policy.min_noise_multiplier is not None and noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation(f"noise multiplier {noise_multiplier:g} is below this site's minimum "
                              f"{policy.min_noise_multiplier:g}")
