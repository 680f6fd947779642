"""The site's ``secure_aggregation`` policy (issue 22): required / allowed / off, and its floor."""

from __future__ import annotations

import pytest

from protocol.config import load_experiment
from protocol.policy import SitePolicy
from site_worker.config import SiteConfigError, site_config_from_dict
from site_worker.policy import PolicyViolation, check_policy
from tests.site_worker.support import experiment_dict
from tests.site_worker.test_config import base  # noqa: F401  (fixture)

SA = {"min_contributors": 3, "threshold": 2}


def _exp(secagg):
    changes = {"federated.parameters.min_fit_clients": 3, "federated.parameters.min_available_clients": 3}
    if secagg is not None:
        changes["federated.secure_aggregation"] = secagg
    return load_experiment(experiment_dict(**changes))


def _check(mode, secagg, floor=2):
    policy = SitePolicy(allow_no_dp=True, min_noise_multiplier=0.0, secure_aggregation=mode,
                        secure_aggregation_min_contributors=floor)
    check_policy(policy, _exp(secagg), parameters=10)


@pytest.mark.parametrize("mode,secagg,refused", [
    ("required", None, True), ("required", SA, False),
    ("allowed", None, False), ("allowed", SA, False),
    ("off", None, False), ("off", SA, True),
])
def test_the_site_decides_whether_its_update_is_seen_in_the_clear(mode, secagg, refused):
    if refused:
        with pytest.raises(PolicyViolation, match=r"^secure_aggregation: "):
            _check(mode, secagg)
    else:
        _check(mode, secagg)


def test_the_sites_min_contributors_floor_at_its_edge():
    _check("required", SA, floor=3)  # the experiment's 3 meets the floor
    with pytest.raises(PolicyViolation, match=r"^secure_aggregation_min_contributors: "):
        _check("required", SA, floor=4)


def test_site_toml_names_a_bad_mode(base):  # noqa: F811
    raw, tmp = base
    raw["policy"]["secure_aggregation"] = "maybe"
    with pytest.raises(SiteConfigError) as e:
        site_config_from_dict(raw, base_dir=tmp)
    assert e.value.key == "policy.secure_aggregation"
    raw["policy"]["secure_aggregation"] = "required"
    assert site_config_from_dict(raw, base_dir=tmp).policy.secure_aggregation == "required"
