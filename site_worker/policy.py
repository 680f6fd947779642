"""The hospital's own rules, checked before any training: a task that breaks one is declined.

The coordinator cannot override these: they are read from the site's config only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from protocol.dp_plan import check_accountant
from protocol.layers import row_mixing_message
from protocol.policy import PolicyViolation, SitePolicy

if TYPE_CHECKING:
    from protocol.config import Experiment

MARKER_LAYERS = {"input", "output"}  # shape markers, not computation


def dp_settings(experiment: Experiment) -> Any | None:
    """The experiment's DP block when DP is on, else None."""
    dp = experiment.training.optimizer.differential_privacy
    if dp is None or not getattr(dp, "enabled", True):
        return None
    return dp


def check_layers(policy: SitePolicy, experiment: Experiment, *, buffers: Sequence[str] = ()) -> None:
    """What the site can verify about the model itself: every layer computes each row's output
    from that row alone (always: a row-mixing layer breaks DP-SGD's clipping and every DP
    metrics release), and no buffers under DP training or DP metrics (state that is not a
    weight travels in the Update un-noised and cannot be checked). ``buffers`` are the
    model's buffer names (``ModelSummary.buffers``)."""
    for layer in experiment.chain.row_mixing:
        raise PolicyViolation(
            f"row_independent: layer architecture.layers[{layer.index}] of type {layer.type!r}: "
            f"{row_mixing_message(layer)}")
    if buffers and (dp_settings(experiment) is not None or policy.metrics == "dp"):
        first = buffers[0].split(".", 1)[0]
        raise PolicyViolation(
            f"buffers: layer architecture.layers[{first}] carries buffers ({', '.join(buffers)}), state that is "
            "not a trainable weight: it would leave the site without noise and its values cannot be checked, so "
            "this site refuses it under differential privacy (DP training or policy.metrics = \"dp\"); "
            "use layers without running state (GroupNorm, LayerNorm)")


def check_policy(policy: SitePolicy, experiment: Experiment, *, parameters: int, buffers: Sequence[str] = ()) -> None:
    """Layer whitelist, what the layers do (``check_layers``), parameter count, aggregator, DP
    on and strong enough (what can be checked without the data; ``dp.site_plan`` checks the
    rest once the rows are known). Every refusal names the policy setting, so the
    coordinator's operator knows what to change."""
    if policy.allowed_layers is not None:
        allowed = {t.lower() for t in policy.allowed_layers} | MARKER_LAYERS
        for i, layer in enumerate(experiment.architecture.layers):
            if layer.type.lower() not in allowed:
                raise PolicyViolation(
                    f"allowed_layers: layer architecture.layers[{i}] of type {layer.type!r} is not allowed by this "
                    f"site (allowed: {', '.join(policy.allowed_layers)})")
    check_layers(policy, experiment, buffers=buffers)
    if policy.max_parameters is not None and parameters > policy.max_parameters:
        raise PolicyViolation(f"max_parameters: model has {parameters} parameters, this site allows at most "
                              f"{policy.max_parameters}")
    secagg = experiment.federated.secure_aggregation
    if policy.secure_aggregation == "required" and secagg is None:
        raise PolicyViolation("secure_aggregation: this site sends updates only under federated.secure_aggregation "
                              "(its policy says required); the coordinator would see this site's update in the clear")
    if policy.secure_aggregation == "off" and secagg is not None:
        raise PolicyViolation("secure_aggregation: this site does not take part in secure aggregation (its policy "
                              "says off); run without federated.secure_aggregation or ask the site to allow it")
    if secagg is not None and secagg.dp != "off":
        check_pooled_policy(policy, experiment)
    if secagg is not None and secagg.min_contributors < policy.secure_aggregation_min_contributors:
        raise PolicyViolation(f"secure_aggregation_min_contributors: the experiment unmasks sums of "
                              f"{secagg.min_contributors} update(s), this site requires at least "
                              f"{policy.secure_aggregation_min_contributors}")
    agg = experiment.federated.name
    if policy.allowed_aggregators is not None and agg not in policy.allowed_aggregators:
        raise PolicyViolation(f"allowed_aggregators: aggregator {agg!r} is not allowed by this site "
                              f"(allowed: {', '.join(policy.allowed_aggregators)})")
    dp = dp_settings(experiment)
    if dp is None:
        if secagg is not None and secagg.dp in ("pooled", "central"):
            return  # DP comes from the sites' Skellam shares (check_pooled_policy)
        if not policy.allow_no_dp:
            raise PolicyViolation("allow_no_dp: differential privacy is off for this experiment and this site "
                                  "requires it")
        return
    total = getattr(dp, "total_epsilon", None)
    if dp.noise_multiplier is None and dp.target_epsilon is None and total is None:
        raise PolicyViolation("differential privacy needs noise_multiplier, target_epsilon or total_epsilon")
    if total is not None and policy.max_epsilon is not None and total > policy.max_epsilon:
        raise PolicyViolation(f"max_epsilon: total epsilon {total} for the run exceeds this site's max_epsilon "
                              f"{policy.max_epsilon}")
    check_accountant(policy, dp)
    if dp.noise_multiplier is not None and dp.target_epsilon is None:
        check_noise(policy, float(dp.noise_multiplier))
    if dp.target_epsilon is not None and policy.max_epsilon is not None and dp.target_epsilon > policy.max_epsilon:
        raise PolicyViolation(f"max_epsilon: target epsilon {dp.target_epsilon} exceeds this site's max_epsilon "
                              f"{policy.max_epsilon}")


def check_pooled_policy(policy: SitePolicy, experiment: Experiment) -> None:
    """Pooled DP (``federated.secure_aggregation.dp = "pooled"``): the site's share composes with its
    other releases in RDP only, its m must fit under the roster's K, and the pooled noise must
    meet the site's ``min_noise_multiplier`` (as a Gaussian of the same variance)."""
    from protocol.model import summarize
    from protocol.secagg import skellam
    from protocol.secagg.rules import central_dim, pooled_mu

    sa = experiment.federated.secure_aggregation
    assert sa is not None
    if sa.dp not in ("pooled", "central"):
        raise PolicyViolation(f"secure_aggregation: this site does not know dp = {sa.dp!r}")
    if policy.accountant != "rdp":
        raise PolicyViolation(f"accountant: {sa.dp} DP steps compose in RDP; this site's policy.accountant is "
                              f"{policy.accountant!r}")
    if sa.min_contributors < policy.assume_honest_sites:
        raise PolicyViolation(f"assume_honest_sites: the experiment unmasks sums of {sa.min_contributors} site(s), "
                              f"fewer than the {policy.assume_honest_sites} noise shares this site assumes")
    dim = central_dim(experiment) if sa.dp == "central" else summarize(experiment.architecture.layers).trainable
    _, l2 = skellam.sensitivities(sa.clip, sa.scale, dim)
    sigma = skellam.gaussian_equivalent(pooled_mu(experiment), l2)
    check_noise(policy, sigma)
    if sa.target_epsilon is not None and policy.max_epsilon is not None and sa.target_epsilon > policy.max_epsilon:
        raise PolicyViolation(f"max_epsilon: target epsilon {sa.target_epsilon} exceeds this site's max_epsilon "
                              f"{policy.max_epsilon}")


def check_noise(policy: SitePolicy, noise_multiplier: float) -> None:
    """Minimum noise multiplier (also applied to the noise Opacus derives from a target ε)."""
    if noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation(f"min_noise_multiplier: noise multiplier {noise_multiplier:g} is below this site's "
                              f"policy.min_noise_multiplier {policy.min_noise_multiplier:g}")
