"""Untrusted-task notices are rate-limited per unknown signer and overall (issue 20, class 8).

Before, "once per run" was keyed on the forged task's own run_id: 200 forged tasks with 200
run ids made the site sign 200 notices. The forger plays here with run ids and key ids of
its choosing; the clock is the test's.
"""

from __future__ import annotations

import time

import pytest

from protocol.codec import new_envelope, seal
from protocol.messages import TrainTask
from protocol.signing import Signer
from site_worker.untrusted import BURST, PER_SIGNER_S, WINDOW_S, UntrustedNotices

from tests.site_worker.support import experiment_dict, initial_weights

EXP = experiment_dict(**{"training.epochs": 1})
WEIGHTS = initial_weights(EXP)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _forged(signer: Signer, run_id: str) -> bytes:
    task = TrainTask(experiment=EXP, weights=WEIGHTS, dataset="d", base_round=0, seed=1,
                     deadline=time.time() + 60)
    return seal(new_envelope(task, federation="f", run_id=run_id, round=1, sender="coordinator", recipient="s"),
                signer)


@pytest.fixture
def notices():
    clock = Clock()
    return UntrustedNotices(site_id="s", federation="f", trusted_kid="trusted", clock=clock), clock


def test_one_signer_with_200_run_ids_gets_one_notice_per_interval(notices):
    n, clock = notices
    forger = Signer.generate()
    sent = [n.notice(_forged(forger, f"run-{i}"), sent_at=0.0) for i in range(200)]
    assert sum(e is not None for e in sent) == 1
    assert forger.kid in sent[0].payload.detail
    clock.t += PER_SIGNER_S - 1  # just inside the interval: still quiet
    assert n.notice(_forged(forger, "run-x"), sent_at=0.0) is None
    clock.t += 1  # the interval is over: one more
    assert n.notice(_forged(forger, "run-y"), sent_at=0.0) is not None


def test_invented_key_ids_are_capped_overall(notices):
    n, clock = notices
    forgers = [Signer.generate() for _ in range(BURST + 3)]
    sent = [n.notice(_forged(f, "run"), sent_at=0.0) for f in forgers]
    assert [e is not None for e in sent] == [True] * BURST + [False] * 3  # the cap's edge
    clock.t += WINDOW_S - 0.5  # still inside the window
    assert n.notice(_forged(Signer.generate(), "run"), sent_at=0.0) is None
    clock.t += 0.5  # the window has passed
    assert n.notice(_forged(Signer.generate(), "run"), sent_at=0.0) is not None
