"""The asynchronous loops' rule for a silent federation (coordinator/rounds/patience.py), at its
edges: the deadline itself is still waited on, just past it is one silent deadline; giving up
comes after max_round_retries silent deadlines in a row, not at them; anything heard resets."""

from __future__ import annotations

import pytest

from coordinator.rounds import patience as mod
from coordinator.rounds.patience import Patience


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(mod.time, "time", lambda: now[0])
    return now


def test_the_deadline_edge_and_the_retries_edge(clock: list[float]) -> None:
    p = Patience(10.0, retries=2)
    assert p.deadline == 1010.0
    clock[0] = 1009.999
    assert not p.silent() and p.misses == 0  # just inside: wait on
    for miss in (1, 2, 3):
        clock[0] = p.deadline  # at the deadline: it has passed
        assert p.silent() and p.misses == miss and p.deadline == clock[0] + 10.0
        assert p.exhausted == (miss > 2)  # give up after 2 retries, on the third silent deadline


def test_hearing_anything_starts_afresh_and_a_restart_keeps_the_count(clock: list[float]) -> None:
    p = Patience(5.0, retries=1)
    clock[0] += 5.0
    assert p.silent() and p.misses == 1
    clock[0] += 1.0
    p.restart()  # a new version sent: fresh deadline, the silence in a row kept
    assert p.deadline == clock[0] + 5.0 and p.misses == 1
    p.heard()
    assert p.misses == 0 and not p.exhausted and p.deadline == clock[0] + 5.0
