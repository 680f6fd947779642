"""``federated.test_every``: per-round test evaluation by real site workers, honest about privacy.

Three hospitals with different policies: one releases DP metrics (each release charged to
its ledger), one withholds metrics (declines), one whose ``max_evaluations_per_run`` leaves
room for only a few evaluations. Oracles: each site's own privacy ledger file and the
policies written here, never numbers typed into the test.
"""

from __future__ import annotations

import json

import pytest

from coordinator.run import Coordinator
from coordinator.state import StateStore
from site_worker.ledger import PrivacyLedger
from tests.site_worker.support import experiment_dict, running_hospitals

POLICIES = {
    "dp": {"max_epsilon": 100.0, "metrics": "dp"},
    "none": {"max_epsilon": 100.0, "metrics": "none"},
    "capped": {"max_epsilon": 100.0, "metrics": "exact", "max_evaluations_per_run": 4},
}


@pytest.fixture
def hospitals(tmp_path):
    with running_hospitals(tmp_path, POLICIES, url_prefix="round-test") as running:
        yield running


def _evals(cfg, run_id: str) -> int:
    return sum(r["kind"] == "eval" and r["run_id"] == run_id for r in PrivacyLedger(cfg.state_dir).releases("heart_failure"))


@pytest.mark.slow
def test_test_every_round_is_released_charged_declined_or_capped_per_site(hospitals):
    bus, signer, state, fed, sites = hospitals
    exp = experiment_dict(**{"training.epochs": 1, "training.rounds": 4, "federated.test_every": 1})
    result = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=fed, progress=False).run()
    assert result.ok, result.reason
    store = StateStore(state)
    rounds = store.rounds(result.run_id)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    dp, none, capped = (sites[k][0] for k in ("dp", "none", "capped"))

    tested = [r for r in rounds if "test_status" in r["metrics"]]
    assert [r["round"] for r in tested] == [1, 2, 3]  # the last round's test is the final evaluation
    for r in tested:
        m, status = r["metrics"], r["metrics"]["test_status"]
        assert status[dp] == "released"
        assert status[none].startswith("declined: policy: metrics")
        assert m["per_site"][dp]["test_n"] > 0 and 0 <= m["per_site"][dp]["test_accuracy"] <= 1
        assert not any(k.startswith("test_") for k in m["per_site"].get(none, {}))
        # the aggregate holds only what was released, weighted by test rows
        released = [s for s, v in status.items() if v == "released"]
        n = sum(m["per_site"][s]["test_n"] for s in released)
        acc = sum(m["per_site"][s]["test_accuracy"] * m["per_site"][s]["test_n"] for s in released) / n
        assert m["test"]["accuracy"] == pytest.approx(acc)

    # The capped site (4 evaluations per run) is asked while a test leaves room for the final one.
    cap = POLICIES["capped"]["max_evaluations_per_run"]
    capped_status = [r["metrics"]["test_status"][capped] for r in tested]
    assert capped_status[0] == "released"
    assert any(s.startswith("not asked: max_evaluations_per_run") for s in capped_status)
    assert _evals(sites["capped"][1], result.run_id) <= cap

    # Every test score the coordinator recorded as released is a release in the site's own ledger:
    # validation each round + the per-round tests + the final test.
    for kind, sid in (("dp", dp), ("capped", capped)):
        released = sum(r["metrics"]["test_status"][sid] == "released" for r in tested)
        answered = {u["message_id"] for u in store.updates(result.run_id, kind="EvalResult") if u["site"] == sid}
        assert _evals(sites[kind][1], result.run_id) == len(answered)
        assert released == sum(1 for u in store.updates(result.run_id, kind="EvalResult")
                               if u["site"] == sid and u["split"] == "test") - (1 if sid in result.final["per_site"] else 0)
    ledger = PrivacyLedger(sites["dp"][1].state_dir).releases("heart_failure")
    assert all(r["entries"] for r in ledger if r["kind"] == "eval")  # dp metrics: each eval is charged
    assert _evals(sites["none"][1], result.run_id) == 0
    store.close()

    # The dashboard shows every site's status: a refusal is "not released" with the site's reason.
    from fastapi.testclient import TestClient

    from fedbus.dashboard.app import create_app
    from fedbus.dashboard.security import Access

    api = TestClient(create_app(state, access=Access(token=None, allow_actions=False, loopback_only=True)),
                     base_url="http://127.0.0.1")
    shown = api.get(f"/api/runs/{result.run_id}/rounds").json()
    assert shown["test_every"] == 1
    for got, r in zip(shown["rounds"], tested):
        assert {s: v["test_status"] for s, v in got["per_site"].items()} == r["metrics"]["test_status"]
        assert got["per_site"][none]["test"] is None and got["per_site"][dp]["test"]["accuracy"] is not None


def test_test_every_defaults_to_off_and_is_validated():
    from protocol.config import ConfigError, load_experiment

    assert load_experiment(experiment_dict()).federated.test_every == 0
    with pytest.raises(ConfigError, match="test_every"):
        load_experiment(experiment_dict(**{"federated.test_every": -1}))
    with pytest.raises(ConfigError, match="test_every"):
        load_experiment(json.loads(json.dumps(experiment_dict(**{"federated.test_evry": 1}))))
