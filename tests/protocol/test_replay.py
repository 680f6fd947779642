"""Replay guard: seen ids, recipient/run/round, clock skew, bounded memory, persistence."""

from __future__ import annotations

import threading

import pytest

from protocol.codec import new_envelope
from protocol.errors import ClockSkew, ReplayedMessage, WrongRecipient, WrongRound, WrongRun
from protocol.messages import RunControl
from protocol.replay import ReplayGuard


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def env(message_id=None, *, sent_at=1_000_000.0, recipient="site-1", run_id="run-1", round=4):
    return new_envelope(RunControl(action="stop"), federation="fed", run_id=run_id, round=round,
                        sender="coordinator", recipient=recipient, message_id=message_id, sent_at=sent_at)


def test_check_accepts_a_fresh_matching_message_and_records_nothing():
    guard = ReplayGuard(clock=Clock())
    e = env()
    guard.check(e, recipient="site-1", run_id="run-1", round=4)
    guard.check(e, recipient="site-1", run_id="run-1", round=4)  # still fresh: check does not record
    assert not guard.seen(e.message_id)


def test_replayed_message_is_rejected_after_mark_seen():
    guard = ReplayGuard(clock=Clock())
    e = env()
    guard.mark_seen(e.message_id)
    assert guard.seen(e.message_id)
    with pytest.raises(ReplayedMessage, match=e.message_id):
        guard.check(e)


@pytest.mark.parametrize(
    "expect, error, message",
    [
        (dict(recipient="site-2"), WrongRecipient, "addressed to 'site-1', not 'site-2'"),
        (dict(run_id="run-2"), WrongRun, "run 'run-1', expected 'run-2'"),
        (dict(round=5), WrongRound, "round 4, expected round 5"),
    ],
)
def test_wrong_recipient_run_and_round(expect, error, message):
    guard = ReplayGuard(clock=Clock())
    with pytest.raises(error, match=message):
        guard.check(env(), **expect)


@pytest.mark.parametrize("offset, direction", [(301.0, "behind"), (-301.0, "ahead of")])
def test_clock_skew_in_either_direction(offset, direction):
    clock = Clock()
    guard = ReplayGuard(max_skew_s=300, clock=clock)
    e = env(sent_at=clock.now)
    clock.now += offset
    with pytest.raises(ClockSkew, match=f"301.0 s {direction}"):
        guard.check(e)


def test_skew_boundary_is_inclusive():
    clock = Clock()
    guard = ReplayGuard(max_skew_s=10, clock=clock)
    guard.check(env(sent_at=clock.now - 10))
    guard.check(env(sent_at=clock.now + 10))
    with pytest.raises(ClockSkew):
        guard.check(env(sent_at=clock.now + 10.001))


def test_non_finite_sent_at_is_clock_skew():
    guard = ReplayGuard(clock=Clock())
    with pytest.raises(ClockSkew):
        guard.check(env(sent_at=float("nan")))


def test_ids_older_than_the_window_are_forgotten_and_their_replays_fail_on_skew():
    clock = Clock()
    guard = ReplayGuard(max_skew_s=10, clock=clock)
    old = env(sent_at=clock.now)
    guard.mark_seen(old.message_id)
    clock.now += 21  # past 2 * max_skew_s
    guard.mark_seen("newer")
    assert not guard.seen(old.message_id) and len(guard) == 1
    with pytest.raises(ClockSkew):
        guard.check(old)


def test_capacity_evicts_oldest_first():
    guard = ReplayGuard(capacity=3, clock=Clock())
    for i in range(5):
        guard.mark_seen(f"id{i}")
    assert len(guard) == 3
    assert [guard.seen(f"id{i}") for i in range(5)] == [False, False, True, True, True]


def test_ids_survive_a_restart(tmp_path):
    clock = Clock()
    path = tmp_path / "seen.log"
    guard = ReplayGuard(path=path, clock=clock)
    e = env()
    guard.mark_seen(e.message_id)
    guard.close()
    again = ReplayGuard(path=path, clock=clock)
    with pytest.raises(ReplayedMessage):
        again.check(e)


def test_persisted_file_stays_bounded_and_tolerates_damage(tmp_path):
    clock = Clock()
    path = tmp_path / "seen.log"
    guard = ReplayGuard(max_skew_s=1, path=path, clock=clock, fsync=False)
    for i in range(3000):
        clock.now += 0.5  # each id outlives the 2 s window after 4 more
        guard.mark_seen(f"m{i}")
    guard.close()
    lines = path.read_text().splitlines()
    assert len(lines) < 1100  # compacted, not 3000
    assert lines[-1].startswith("m2999\t")
    with path.open("a") as f:
        f.write("garbage-without-tab\nm-bad\tnot-a-number\n")
    again = ReplayGuard(max_skew_s=1, path=path, clock=clock)
    assert again.seen("m2999") and not again.seen("m0") and not again.seen("garbage-without-tab")


def test_mark_seen_refuses_ids_that_would_corrupt_the_file(tmp_path):
    guard = ReplayGuard(path=tmp_path / "seen.log", clock=Clock())
    for bad in ("", "a\nb", "a\tb"):
        with pytest.raises(ValueError, match="message_id"):
            guard.mark_seen(bad)


def test_concurrent_marks_from_consumer_threads(tmp_path):
    guard = ReplayGuard(path=tmp_path / "seen.log", fsync=False)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                guard.mark_seen(f"t{t}-{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors
    assert len(guard) == 800
    guard.close()
    assert len(ReplayGuard(path=tmp_path / "seen.log")) == 800


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_skew_s"):
        ReplayGuard(max_skew_s=0)
    with pytest.raises(ValueError, match="capacity"):
        ReplayGuard(capacity=0)


def test_replayed_and_misrouted_frames_end_to_end():
    """What a receiver does: open_frame, then check, then mark_seen once handled."""
    import numpy as np

    from protocol.codec import open_frame, seal
    from protocol.messages import Update
    from protocol.signing import Signer, TrustStore

    site = Signer.generate()
    trust = TrustStore()
    trust.add("site-1", site.public_pem())
    guard = ReplayGuard()
    update = Update(task_id="t", weights=(("w", np.zeros(4, np.float32)),), num_examples=4, metrics={},
                    epsilon=None, delta=None, base_round=1)
    env = new_envelope(update, federation="fed", run_id="run-1", round=2, sender="site-1", recipient="coordinator")
    frame = seal(env, site)
    expect = dict(recipient="coordinator", run_id="run-1", round=2)

    opened = open_frame(frame, trust)
    guard.check(opened.envelope, **expect)
    guard.mark_seen(opened.envelope.message_id)
    with pytest.raises(ReplayedMessage):
        guard.check(open_frame(frame, trust).envelope, **expect)

    for change, error in ((dict(recipient="site-2"), WrongRecipient), (dict(run_id="run-0"), WrongRun),
                          (dict(round=1), WrongRound)):
        other = new_envelope(update, **{**dict(federation="fed", run_id="run-1", round=2, sender="site-1",
                                                recipient="coordinator"), **change})
        with pytest.raises(error):
            guard.check(open_frame(seal(other, site), trust).envelope, **expect)


def test_replay_window_both_sides_with_a_sender_clock_at_the_skew_edge():
    """A message may carry a sent_at up to max_skew_s ahead, and a copy passes the skew check
    until max_skew_s after that: so its id must be remembered for exactly 2·max_skew_s after it
    was marked. At that instant a replay is still refused as a replay (an id forgotten one
    moment early would let it through the skew check); a moment later the id is forgotten and
    the copy fails on skew instead. Both sides, with the other bound (capacity) relaxed."""
    clock = Clock()
    guard = ReplayGuard(max_skew_s=10, capacity=10**6, clock=clock)
    assert guard.window_s == 20
    marked = clock.now
    e = env(sent_at=marked + 10)  # the sender's clock at the edge of the skew, ahead
    guard.check(e)
    guard.mark_seen(e.message_id)

    clock.now = marked + 20  # the last instant a copy passes the skew check (inclusive)
    guard.mark_seen("later")  # forgetting runs on mark
    assert guard.seen(e.message_id)
    with pytest.raises(ReplayedMessage):
        guard.check(e)

    clock.now = marked + 20.001
    guard.mark_seen("later-still")
    assert not guard.seen(e.message_id) and len(guard) == 2
    with pytest.raises(ClockSkew):
        guard.check(e)


def test_capacity_is_a_bound_of_its_own_inside_the_window():
    """Within the time window, capacity alone bounds memory: exactly capacity ids are kept."""
    clock = Clock()
    guard = ReplayGuard(max_skew_s=3600, capacity=2, clock=clock)
    guard.mark_seen("a")
    guard.mark_seen("b")
    assert guard.seen("a") and guard.seen("b") and len(guard) == 2
    guard.mark_seen("c")
    assert not guard.seen("a") and guard.seen("b") and guard.seen("c") and len(guard) == 2
