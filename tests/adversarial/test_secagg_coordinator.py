"""A malicious coordinator against the sites' secure-aggregation rules (issue 22, item 2).

Each attack is played with real keys and real shares; each fails at every site, and the site
names the rule it applied (``SecAggRefused.rule``)."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.secagg.coding import NotEnoughShares
from protocol.secagg.keys import AgreementKey
from protocol.secagg.statements import Roster, UnmaskRequest, sign
from protocol.signing import Signer
from site_worker.secagg import SecAggRefused
from tests.adversarial.secagg_federation import RUN, federation


def _values(sites, seed=0, length=6):
    rng = np.random.default_rng(seed)
    return {s: rng.uniform(-1, 1, length) for s in sites}


def _refusals(fed, req, signed, sites=None):
    rules = {}
    for name in sites or fed.sites:
        with pytest.raises(SecAggRefused) as e:
            fed.sites[name].answer(req, signed)
        rules[name] = e.value.rule
    return rules


def test_honest_round_unmasks_the_sum_even_after_a_contributor_drops(tmp_path):
    fed = federation(tmp_path, 4, threshold=3)
    values = _values(fed.sites)
    masked = fed.coordinator.new_sum()
    fed.upload(1, values, masked)
    req, signed = fed.coordinator.request(masked)
    answers = {s: fed.sites[s].answer(req, signed) for s in ["site-1", "site-2", "site-3"]}  # site-0 dropped
    got = fed.coordinator.unmask(masked, answers)
    assert np.abs(got - np.sum(list(values.values()), axis=0)).max() <= fed.coordinator.quant.error_bound(4)
    with pytest.raises(NotEnoughShares):  # two answers: nothing decoded
        fed.coordinator.unmask(masked, {s: answers[s] for s in ["site-1", "site-2"]})


def test_a_buffer_of_one_is_refused_and_min_contributors_is_answered_at_the_edge(tmp_path):
    fed = federation(tmp_path, 4, threshold=3, min_contributors=3)
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites), masked)
    one = masked.contributors[:1]
    req = UnmaskRequest(RUN, fed.coordinator.roster.digest(), "one", tuple(one))
    assert set(_refusals(fed, req, sign(fed.coord_signer, req)).values()) == {"min_contributors"}
    two = UnmaskRequest(RUN, fed.coordinator.roster.digest(), "two", tuple(masked.contributors[:2]))  # K - 1
    assert set(_refusals(fed, two, sign(fed.coord_signer, two)).values()) == {"min_contributors"}
    three = UnmaskRequest(RUN, fed.coordinator.roster.digest(), "three", tuple(masked.contributors[:3]))  # K
    for s in ["site-0", "site-1", "site-3"]:
        assert len(fed.sites[s].answer(three, sign(fed.coord_signer, three))) > 0


def test_two_requests_differing_by_one_hospital_are_refused(tmp_path):
    fed = federation(tmp_path, 4, threshold=3)
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites), masked)
    everyone = masked.contributors
    req, signed = fed.coordinator.request(masked)
    for s in ["site-0", "site-1", "site-2"]:
        fed.sites[s].answer(req, signed)
    # the same request redelivered gets the same answer (nothing new revealed)
    assert fed.sites["site-0"].answer(req, signed) == fed.sites["site-0"].answer(req, signed)
    # now ask for everyone but site-3: the difference would be site-3's update
    minus = UnmaskRequest(RUN, fed.coordinator.roster.digest(), "minus", tuple(everyone[:3]))
    assert set(_refusals(fed, minus, sign(fed.coord_signer, minus), ["site-0", "site-1", "site-2"]).values()) \
        == {"update_reused"}
    # the same request id reused for another set is refused too
    again = UnmaskRequest(RUN, fed.coordinator.roster.digest(), req.request_id, tuple(everyone[:3]))
    assert _refusals(fed, again, sign(fed.coord_signer, again), ["site-0"]) == {"site-0": "update_reused"}


def test_the_rule_survives_a_restart(tmp_path):
    fed = federation(tmp_path, 3, threshold=2)
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites), masked)
    req, signed = fed.coordinator.request(masked)
    fed.sites["site-0"].answer(req, signed)
    fed.restart("site-0", tmp_path)
    minus = UnmaskRequest(RUN, fed.coordinator.roster.digest(), "minus", tuple(masked.contributors[:2]))
    assert _refusals(fed, minus, sign(fed.coord_signer, minus), ["site-0"]) == {"site-0": "update_reused"}


def test_a_forged_roster_is_refused(tmp_path):
    fed = federation(tmp_path, 3, threshold=2)
    honest = fed.coordinator.roster
    site = fed.sites["site-0"]
    # 1. signed by someone other than the coordinator (a new run, so nothing is committed yet)
    mallory = Signer.generate()
    new_run = Roster("run-2", honest.sites, tuple(fed.sites[s].key_binding("run-2") for s in honest.sites),
                     2, 2, 1, 1.0, 2.0**16, 6)
    with pytest.raises(SecAggRefused) as e:
        site.commit_roster(new_run, sign(mallory, new_run))
    assert e.value.rule == "roster_signature"
    # 2. signed by the coordinator, but site-1's X25519 key is the coordinator's own (a MITM on the shares)
    fake = AgreementKey().bind(fed.coord_signer, "site-1", "run-2")
    mitm = Roster("run-2", new_run.sites, (new_run.bindings[0], fake, new_run.bindings[2]), 2, 2, 1, 1.0, 2.0**16, 6)
    with pytest.raises(SecAggRefused) as e:
        site.commit_roster(mitm, sign(fed.coord_signer, mitm))
    assert e.value.rule == "roster_signature"
    # 3. properly signed, but different from the roster the site committed to (a threshold of 1)
    weaker = Roster(RUN, honest.sites, honest.bindings, 2, 1, 0, 1.0, 2.0**16, 6)
    with pytest.raises(SecAggRefused) as e:
        site.commit_roster(weaker, sign(fed.coord_signer, weaker))
    assert e.value.rule == "roster_changed"
    # 4. a request naming a roster other than the committed one, and an unsigned request
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites), masked)
    other = UnmaskRequest(RUN, weaker.digest(), "q", tuple(masked.contributors))
    assert _refusals(fed, other, sign(fed.coord_signer, other), ["site-0"]) == {"site-0": "roster_mismatch"}
    req, _ = fed.coordinator.request(masked)
    assert _refusals(fed, req, sign(mallory, req), ["site-0"]) == {"site-0": "request_signature"}


def test_a_roster_below_the_sites_floor_is_refused(tmp_path):
    fed = federation(tmp_path, 3, threshold=2)
    r = fed.coordinator.roster
    run = "run-3"
    low = Roster(run, r.sites, tuple(fed.sites[s].key_binding(run) for s in r.sites), 1, 2, 1, 1.0, 2.0**16, 6)
    with pytest.raises(SecAggRefused) as e:
        fed.sites["site-0"].commit_roster(low, sign(fed.coord_signer, low))
    assert e.value.rule == "min_contributors"


def test_two_daemons_on_one_state_dir_cannot_both_answer_overlapping_requests(tmp_path):
    """Check and record are one step under the run's file lock, across processes sharing a state dir."""
    import fcntl
    import threading

    from site_worker.secagg import SiteSecAgg

    fed = federation(tmp_path, 3, threshold=2)
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites), masked)
    a = fed.sites["site-0"]
    b = SiteSecAgg(tmp_path / "site-0", "site-0", a.signer, fed.coordinators, fed.peers)  # a second daemon
    everyone, signed = fed.coordinator.request(masked)
    minus = UnmaskRequest(RUN, fed.coordinator.roster.digest(), "minus", tuple(masked.contributors[:2]))
    results: dict[str, object] = {}

    def run(name, site, req, s):
        try:
            results[name] = site.answer(req, s)
        except SecAggRefused as e:
            results[name] = e.rule

    with open(a._path(RUN).with_suffix(".lock"), "a+b") as lf:  # a third process holds the run's lock
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=run, args=("b", b, everyone, signed))
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive() and "b" not in results  # waits for the lock instead of reading stale state
        fcntl.flock(lf.fileno(), fcntl.LOCK_UN)
    t.join(timeout=30)
    assert isinstance(results["b"], bytes)
    run("a", a, minus, sign(fed.coord_signer, minus))
    assert results["a"] == "update_reused"


def test_k_updates_from_fewer_than_k_hospitals_are_refused(tmp_path):
    """Under FedBuff a site may upload several updates; K of them from K - 1 sites would let a
    coalition isolate one hospital's own sum, so the rule counts distinct sites."""
    fed = federation(tmp_path, 4, threshold=3, min_contributors=3)
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites, 1), masked)
    fed.upload(2, {"site-0": _values(["site-0"], 2)["site-0"]}, masked)
    digest = fed.coordinator.roster.digest()
    two_sites = UnmaskRequest(RUN, digest, "two", (("site-0", 1), ("site-0", 2), ("site-1", 1)))
    assert set(_refusals(fed, two_sites, sign(fed.coord_signer, two_sites), ["site-2", "site-3"]).values()) \
        == {"min_contributors"}
    three_sites = UnmaskRequest(RUN, digest, "three", (("site-0", 1), ("site-0", 2), ("site-1", 1), ("site-2", 1)))
    assert fed.sites["site-3"].answer(three_sites, sign(fed.coord_signer, three_sites))


def test_split_view_requests_to_two_groups_of_sites_cannot_both_be_unmasked(tmp_path):
    """Two overlapping requests sent to two different groups of sites, each group seeing one:
    a roster with U at most half the sites is refused (two disjoint groups of U could answer),
    and with U above half, the second group cannot reach U answers."""
    fed = federation(tmp_path, 4, threshold=3)
    r = fed.coordinator.roster
    half = Roster("run-half", r.sites, tuple(fed.sites[s].key_binding("run-half") for s in r.sites), 2, 2, 1, 1.0,
                  2.0**16, 6)  # U = 2 of 4
    for s in r.sites:
        with pytest.raises(SecAggRefused) as e:
            fed.sites[s].commit_roster(half, sign(fed.coord_signer, half))
        assert e.value.rule == "threshold"
    masked = fed.coordinator.new_sum()
    fed.upload(1, _values(fed.sites), masked)
    req, signed = fed.coordinator.request(masked)
    first = {s: fed.sites[s].answer(req, signed) for s in ["site-0", "site-1", "site-2"]}  # group 1: U answers
    minus = UnmaskRequest(RUN, r.digest(), "minus", tuple(masked.contributors[:3]))
    ms = sign(fed.coord_signer, minus)
    second = {}
    for s in fed.sites:  # every site is asked; only those that never answered the first may answer
        try:
            second[s] = fed.sites[s].answer(minus, ms)
        except SecAggRefused as e:
            assert e.rule == "update_reused"
    assert list(second) == ["site-3"]
    fed.coordinator.unmask(masked, first)
    with pytest.raises(NotEnoughShares):
        fed.coordinator.unmask(masked, second)
