"""The coordinator's checks on what sites send, each played by a malicious site at its edge.

Issue 26, place 1: the envelope's recipient and clock checks, the row bound a site's
SiteHello announces (pinned at first use in a run: a second hello mid-run cannot raise
it) and ``enroll``'s refusal of a key any site held now or in its history. The attacks
are real frames sealed with the attacker's real, enrolled key, over the in-memory bus;
the honest sites' FedAvg mean is hand-computed (FakeSite adds its offset to every weight).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import numpy as np
import pytest

from coordinator.state import StateError, StateStore
from coordinator.validation import Rejected, check_envelope
from protocol.codec import new_envelope, seal
from protocol.messages import DatasetInfo, RunControl, SiteHello
from protocol.signing import Signer
from protocol.transport.topology import CONTROL
from tests.adversarial.malicious_site import Federation, experiment, initial_weights, mean_offset, seal_raw


@pytest.fixture
def fed(tmp_path):
    f = Federation(f"memory://edge-{uuid.uuid4().hex[:8]}", tmp_path / "state")
    yield f
    f.close()


def _exp(rounds: int, timeout_s: float = 3.0) -> dict:
    exp = experiment(rounds=rounds, parameters={"min_fit_clients": 2, "min_available_clients": 2})
    exp["federated"]["round_timeout_s"] = timeout_s  # a refused site never answers: rounds close at the deadline
    return exp


def _reasons(store: StateStore, run_id: str, site) -> list[tuple[int, str, str]]:
    # a frame refused before its envelope is trusted is logged under the site it claims, "(unverified)"
    return [(u["round"], u["verdict"], u["reason"] or "") for u in store.updates(run_id)
            if u["site"] in (site.site_id, f"{site.site_id} (unverified)") and u["kind"] in ("Update", None)]


def _resealed(site, task_env, honest_env, *, recipient: str = "coordinator", sent_at: float | None = None, **changes):
    """The honest reply in a fresh envelope (other recipient or clock), sealed with the site's real key."""
    payload = dataclasses.replace(honest_env.payload, **changes)
    env = new_envelope(payload, federation=site.federation, run_id=task_env.run_id, round=task_env.round,
                       sender=site.site_id, recipient=recipient, sent_at=sent_at)
    return seal_raw(env, site.signer), env.message_id


# ------------------------------------------------------------------ envelope: recipient and clock
def test_recipient_and_clock_are_checked_on_a_signed_update_at_their_edges(fed):
    """A frame addressed to another party, or from a clock beyond max_skew_s ahead, is refused
    with its reason; a clock just inside the skew is accepted (the coordinator's default 300 s)."""
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    elsewhere = fed.add_site(100.0, 10, attack=lambda s, t, h, f: [_resealed(s, t, h, recipient=f"{s.site_id}-peer")])
    ahead = fed.add_site(100.0, 10, attack=lambda s, t, h, f: [_resealed(s, t, h, sent_at=time.time() + 330)])
    # 250 s ahead: inside the 300 s skew with room for a loaded runner; accepted and weighed
    near = fed.add_site(5.0, 20, attack=lambda s, t, h, f: [_resealed(s, t, h, sent_at=time.time() + 250)])
    fed.start_sites()
    exp = _exp(rounds=1)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    store = StateStore(fed.state_dir)
    [(_, verdict, reason)] = _reasons(store, result.run_id, elsewhere)
    assert verdict == "rejected" and reason.startswith("wrong_recipient: "), reason
    assert f"addressed to '{elsewhere.site_id}-peer', not 'coordinator'" in reason
    [(_, verdict, reason)] = _reasons(store, result.run_id, ahead)
    assert verdict == "rejected" and reason.startswith("clock_skew: "), reason
    assert [v for _, v, _ in _reasons(store, result.run_id, near)] == ["accepted"]
    # (10·1 + 30·3 + 20·5) / 60: the refused sites' +100 never reached the model
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 200 / 60, atol=1e-4)
    assert sorted(r.split(":")[0] for _, r in fed.dead_letters()) == ["clock_skew", "wrong_recipient"]


def test_check_envelope_skew_edge_and_recipient():
    """Unit edge of the same checks: exactly max_skew_s ahead passes, a millisecond more fails;
    the past is never bounded here (a frame may wait in the durable queue)."""
    env = new_envelope(RunControl(action="stop"), federation="f", run_id="r", round=1, sender="s",
                       recipient="coordinator", sent_at=1_000_300.0)
    check_envelope(env, federation="f", run_id="r", max_skew_s=300.0, now=1_000_000.0)
    with pytest.raises(Rejected) as e:
        check_envelope(env, federation="f", run_id="r", max_skew_s=300.0, now=999_999.999)
    assert e.value.reason == "clock_skew"
    check_envelope(env, federation="f", run_id="r", max_skew_s=300.0, now=1_000_300.0 + 10 * 86400)
    with pytest.raises(Rejected) as e:
        check_envelope(dataclasses.replace(env, recipient="site-1"), federation="f", run_id="r",
                       now=1_000_000.0)
    assert e.value.reason == "wrong_recipient"


# ------------------------------------------------------------------ the announced row bound, pinned per run
def _hello(site, rows: int) -> None:
    info = DatasetInfo(name="toy", rows=rows, columns=("a", "b", "c", "y"),
                       feature_types={"a": "numeric", "b": "numeric", "c": "numeric"}, target="y")
    env = new_envelope(SiteHello(site_id=site.site_id, software_version="fake", datasets=(info,)),
                       federation=site.federation, run_id="", round=0, sender=site.site_id, recipient="coordinator")
    site.bus.publish(CONTROL, site.federation, seal(env, site.signer), message_id=env.message_id)


def _stored_rows(state_dir, site_id: str) -> int | None:
    store = StateStore(state_dir)
    try:
        s = store.site(site_id)
        return ((s or {}).get("hello") or {}).get("datasets", [{}])[0].get("rows")
    finally:
        store.close()


def test_a_second_hello_mid_run_cannot_raise_the_pinned_row_bound(fed):
    """Round 1: the site claims exactly the 100 rows it announced (the edge: accepted). Round 2:
    it first announces 10^6 rows (the coordinator records that hello) and then claims 1000:
    refused, the bound stays the one pinned at first use in this run."""
    state = fed.state_dir

    def attack(site, task_env, honest_env, frame):
        if task_env.round == 1:
            return [_resealed(site, task_env, honest_env, num_examples=100)]
        _hello(site, 10**6)
        stored = threading.Event()
        deadline = time.monotonic() + 30
        while _stored_rows(state, site.site_id) != 10**6 and time.monotonic() < deadline:
            stored.wait(0.02)  # the coordinator's control consumer records it on its own thread
        assert _stored_rows(state, site.site_id) == 10**6
        return [_resealed(site, task_env, honest_env, num_examples=1000)]

    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    bad = fed.add_site(5.0, 10, attack=attack)
    fed.start_sites()
    exp = _exp(rounds=2)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    rows = _reasons(StateStore(fed.state_dir), result.run_id, bad)
    assert [(r, v) for r, v, _ in rows] == [(1, "accepted"), (2, "rejected")], rows
    assert rows[1][2].startswith("num_examples_bound: ") and "announced 100 rows" in rows[1][2], rows
    # round 1: (10·1 + 30·3 + 100·5) / 140; round 2 without the refused claim: (10·1 + 30·3) / 40
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 600 / 140 + 2.5, atol=1e-4)


def test_one_row_over_the_announced_bound_is_refused(fed):
    """num_examples = announced + 1 is refused (announced exactly is the accepted edge above)."""
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    bad = fed.add_site(5.0, 10, attack=lambda s, t, h, f: [_resealed(s, t, h, num_examples=101)])
    fed.start_sites()
    exp = _exp(rounds=1)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    [(_, verdict, reason)] = _reasons(StateStore(fed.state_dir), result.run_id, bad)
    assert verdict == "rejected" and reason.startswith("num_examples_bound: ") and "num_examples=101" in reason
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 2.5, atol=1e-4)


# ------------------------------------------------------------------ enrollment: one key, one site, ever
def test_enroll_refuses_a_key_another_site_held_in_its_history(tmp_path):
    """site-a rotates from k1 to k2: k1 is no longer its current key, but stays in the key
    history (old signatures stay auditable under site-a's name), so site-b may not enroll it."""
    store = StateStore(tmp_path / "state")
    k1, k2 = Signer.generate(), Signer.generate()
    store.enroll("site-a", k1.public_pem())
    store.enroll("site-a", k2.public_pem())
    assert store.site("site-a")["kid"] == k2.kid and store.key(k1.kid)[0] == "site-a"
    with pytest.raises(StateError, match="already enrolled for site 'site-a'"):
        store.enroll("site-b", k1.public_pem())
    assert [s["site_id"] for s in store.sites()] == ["site-a"] and store.key(k1.kid)[0] == "site-a"
    store.enroll("site-a", k1.public_pem())  # its own old key back: the same site, allowed
    # a revoked key is refused to everyone, its former holder included
    store.revoke("site-a")
    with pytest.raises(StateError, match="was revoked"):
        store.enroll("site-a", k1.public_pem())
    store.enroll("site-b", Signer.generate().public_pem())  # a fresh key is fine
