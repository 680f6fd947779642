"""The privacy plan counts the final test's union release of a secure run (issue 22 item 5),
exactly as the site's ledger charges it: one more metrics release, only where the run sends a
union vector (secure aggregation, sync or FedBuff, classification, no personalisation) and the site's
metrics policy is dp."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.config import load_experiment
from protocol.dp_plan import release_entries, union_release_entries
from protocol.policy import SitePolicy
from protocol.privacy_plan import plan_run

HEART_FAILURE = Path(__file__).resolve().parents[2] / "examples" / "heart_failure.json"
DP = SitePolicy(metrics="dp")


def _experiment(secure: bool = True, name: str | None = None, scale: float = 65536.0) -> Any:
    exp = json.loads(HEART_FAILURE.read_text())
    if secure:
        exp["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": 2, "scale": scale}
    if name is not None:
        exp["federated"]["name"] = name
    return load_experiment(exp)


@pytest.mark.parametrize("name", [None, "FedBuff"])
def test_a_secure_run_plans_the_union_release_as_the_site_charges_it(name):
    """The sync loop and FedBuff's buffers end with the same final test, union vector included."""
    plan = plan_run(_experiment(name=name), n_train=100, policy=DP)
    charged = release_entries(DP) + union_release_entries(DP)  # site_worker/handlers.py's final EvalTask
    assert list(plan.final_fixed) == [tuple(e) for e in charged] and len(charged) == 2


def test_no_union_release_is_planned_where_no_union_vector_is_sent():
    assert len(plan_run(_experiment(secure=False), n_train=100, policy=DP).final_fixed) == 1  # no secure sum
    assert plan_run(_experiment(), n_train=100, policy=SitePolicy(metrics="exact")).final_fixed == ()


def test_a_roster_too_coarse_for_counts_sends_no_union_vector():
    """C x S >= 4 x COUNT_CAP (4 field levels per row): the default C = 1, S = 2**16 just inside, one
    level less just outside (e.g. the pooled mode's gradient-sized rosters)."""
    from protocol.secagg.union import COUNT_CAP, LEVELS_PER_COUNT, union_planned

    edge = LEVELS_PER_COUNT * COUNT_CAP  # clip 1.0
    assert union_planned(_experiment(scale=edge)) and edge == 65536.0
    assert not union_planned(_experiment(scale=edge - 1))
    assert len(plan_run(_experiment(scale=edge - 1), n_train=100, policy=DP).final_fixed) == 1
