"""Honest run status: a run where a sampled site gave a round nothing is "completed with gaps",
naming the sites, the rounds and the reasons; one where every sampled site answered is "completed"."""

from __future__ import annotations

from coordinator.rounds.result import describe_gaps, gaps


def _u(rnd: int, site: str, verdict: str, reason: str | None = None, kind: str = "Update") -> dict:
    return {"round": rnd, "site": site, "verdict": verdict, "reason": reason, "kind": kind}


def test_every_sampled_site_answered_no_gaps():
    rounds = [{"round": 1, "sampled": ["a", "b"]}, {"round": 2, "sampled": ["a", "b"]}]
    ups = [_u(r, s, "accepted") for r in (1, 2) for s in ("a", "b")] + [_u(2, "a", "duplicate", "again")]
    assert gaps(rounds, ups) == []


def test_each_missing_round_is_named_with_its_reason():
    rounds = [{"round": 1, "sampled": ["a", "b", "c"]}, {"round": 2, "sampled": ["a", "b", "c"]}]
    ups = [_u(1, "a", "accepted"), _u(1, "b", "accepted"), _u(1, "c", "declined", "budget: ε 41 > 40"),
           _u(2, "a", "accepted"),
           _u(2, "b", "accepted", kind="EvalResult"),  # an evaluation is not the round's update
           _u(2, "c", "rejected", "non_finite: weights"),
           _u(3, "a", "declined", "policy: metrics")]  # the final evaluation, after the last round
    assert gaps(rounds, ups) == [
        {"round": 1, "site": "c", "reason": "declined: budget: ε 41 > 40"},
        {"round": 2, "site": "b", "reason": "no reply by the round's deadline"},
        {"round": 2, "site": "c", "reason": "rejected: non_finite: weights"},
        {"round": 3, "site": "a", "reason": "declined: policy: metrics"},
    ]
    text = describe_gaps(gaps(rounds, ups))
    assert text.startswith("a: round 3 (declined: policy: metrics); b: round 2") and "c: round 1 (declined" in text


def test_a_site_not_sampled_is_no_gap():
    assert gaps([{"round": 1, "sampled": ["a"]}], [_u(1, "a", "accepted")]) == []


def test_an_asynchronous_version_counts_its_contributors_and_only_declines_are_gaps():
    """FedBuff/FedAsync file each update under the version it was trained from, and a version's
    "sampled" sites are the contributors it merged: none of them is a gap (every FedBuff run once
    ended "completed with gaps"), a stale reply is the loop working, and a decline still is one."""
    rounds = [{"round": 1, "sampled": ["a", "b"]}, {"round": 2, "sampled": ["a", "b"]}]
    ups = [_u(0, "a", "accepted"), _u(0, "b", "accepted"), _u(1, "a", "accepted"), _u(1, "b", "late", "stale"),
           _u(1, "b", "accepted"), _u(2, "c", "declined", "budget: ε 41 > 40")]
    assert gaps(rounds, ups, synchronous=False) == [{"round": 2, "site": "c", "reason": "declined: budget: ε 41 > 40"}]
    # the same rows read as a synchronous run: round 2 has no accepted update of a or b
    assert {(g["round"], g["site"]) for g in gaps(rounds, ups)} >= {(2, "a"), (2, "b")}
