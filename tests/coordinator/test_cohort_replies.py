"""What the cohort collector accepts as a site's answer (coordinator/cohort.py): only the reply to the
StatsTask it sent that site, once, in the layout it asked for, counting no more rows than the site
announced. Everything else is refused with a reason (and dead-lettered by ``collect``)."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.cohort import CohortCollector
from coordinator.state import StateStore
from protocol.codec import new_envelope
from protocol.config import load_experiment
from protocol.messages import Declined, EvalResult, StatsResult
from protocol.signing import Signer

ROOT = Path(__file__).resolve().parents[2]


def test_only_the_answer_to_our_own_task_in_our_layout_is_taken(tmp_path):
    exp = load_experiment(json.loads((ROOT / "examples" / "heart_disease.json").read_text()))
    store = StateStore(tmp_path)
    for site in ("a", "b"):
        store.enroll(site, Signer.generate().public_pem())
    store.record_hello("a", {"datasets": [{"name": "heart_disease", "rows": 100}]})
    c = CohortCollector(exp, bus=None, state_dir=tmp_path, signer=Signer.generate(), federation="f")  # type: ignore[arg-type]
    assert c.sites == ["a", "b"]
    sent = {"t" * 32: "a", "u" * 32: "b"}
    replies: dict = {"a": None, "b": None}

    def reply(payload, sender="a", run_id="cohort-1"):
        env = new_envelope(payload, federation="f", run_id=run_id, round=0, sender=sender, recipient="coordinator")
        return c._refuse(env, payload, sender, sent, replies, "cohort-1")

    good = StatsResult(task_id="t" * 32, values=tuple([0.0] * c.spec.size()), n=100, noise_sd=1.0, mode="dp",
                       layout=c.spec.digest(), epsilon=1.0, delta=1e-5, accountant="rdp")
    assert reply(good) is None
    assert reply(good, run_id="cohort-2").startswith("not_for_this_cohort")
    assert reply(StatsResult(**{**good.__dict__, "task_id": "u" * 32})).startswith("not_for_this_cohort")  # b's task
    assert reply(EvalResult(task_id="t" * 32, num_examples=1, metrics={}, base_round=0)).startswith("not_for_this")
    assert reply(StatsResult(**{**good.__dict__, "layout": "0" * 16})).startswith("bad_layout")
    assert reply(StatsResult(**{**good.__dict__, "values": good.values[:-1]})).startswith("bad_layout")
    assert reply(StatsResult(**{**good.__dict__, "n": 101})).startswith("count_bound")  # one above the hello's rows
    assert reply(Declined(task_id="u" * 32, reason="policy", detail="stats: ..."), sender="b") is None
    replies["a"] = good
    assert reply(good).startswith("duplicate")
