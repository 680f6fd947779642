"""A malicious site against a real coordinator: each coordinator-side attack of issue 10 fails.

Every bus test runs on the in-memory bus and on RabbitMQ. The run always completes
with the honest sites, and the refusal is named in the update log and in the dead
letter's reason header. Expected models are hand-computed: FakeSite returns the task's
weights plus its offset, so FedAvg moves every element by Σ nᵢ·offsetᵢ / Σ nᵢ.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.state import StateError, StateStore
from protocol.chunking import split_body
from protocol.signing import Signer
from protocol.transport import open_bus
from protocol.transport.layout import chunk_header_to_amqp
from protocol.transport.topology import UPDATES
from tests.adversarial.malicious_site import (
    Federation,
    claim_examples,
    experiment,
    initial_weights,
    mean_offset,
    with_message_id,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.broker)])
def make_fed(request, tmp_path):
    made: list[Federation] = []

    def make(**bus_opts) -> Federation:
        url = f"memory://adv-{uuid.uuid4().hex[:8]}" if request.param == "memory" else request.getfixturevalue("amqp_url")
        fed = Federation(url, tmp_path / f"state-{len(made)}", bus_opts=bus_opts)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


def _exp(rounds: int = 2, timeout_s: float = 5, **params) -> dict:
    exp = experiment(rounds=rounds, parameters={"min_fit_clients": 2, "min_available_clients": 2, **params})
    exp["federated"]["round_timeout_s"] = timeout_s  # a rejected site never "answers": rounds close at the deadline
    return exp


def _rejected(result, site) -> list[str]:
    return [r["reason"] for r in result.rejected if r["site"] == site.site_id]


def _dead_reasons(fed: Federation, site) -> list[str]:
    mids = {m for _, m in getattr(site, "_attack_ids", [])}
    return [reason for mid, reason in fed.dead_letters() if not mids or mid in mids]


# ------------------------------------------------------------------ num_examples
def test_inflated_num_examples_does_not_move_the_fedavg_mean(make_fed):
    fed = make_fed()
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    bad = fed.add_site(100.0, 10, attack=claim_examples(10**12))
    fed.start_sites()
    exp = _exp(rounds=2)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    # honest FedAvg per round: (10·1 + 30·3) / 40 = 2.5; two rounds -> +5.0 everywhere.
    # With the claim trusted it would be ≈ +100 per round.
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 5.0, atol=1e-4)
    reasons = _rejected(result, bad)
    assert len(reasons) == 2 and all(r.startswith("num_examples_bound: ") for r in reasons)
    assert "claims num_examples=1000000000000" in reasons[0] and "announced 100 rows" in reasons[0]
    assert sum(r.startswith("num_examples_bound: ") for _, r in fed.dead_letters()) == 2


def test_num_examples_2_64_minus_1_is_rejected_and_never_poisons_resume(make_fed):
    class Crash(BaseException):
        """A coordinator killed while committing round 2 (nothing acked, state left running)."""

    fed = make_fed()
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    bad = fed.add_site(100.0, 10, attack=claim_examples(2**64 - 1))
    fed.start_sites()
    exp = _exp(rounds=2)
    run_id = f"poison-{uuid.uuid4().hex[:6]}"
    first = fed.coordinator(exp, run_id=run_id)
    commit = first.store.commit_round

    def crash_on_round_2(row, updates):
        if row.round == 2:
            raise Crash()
        return commit(row, updates)

    first.store.commit_round = crash_on_round_2
    with pytest.raises(Crash):
        first.run()
    store = StateStore(fed.state_dir)
    assert store.run(run_id)["status"] == "running" and [r["round"] for r in store.rounds(run_id)] == [1]
    for frame in list(bad.sent):  # the poison waits in the queue for the resumed coordinator
        bad.publish(frame, uuid.uuid4().hex)

    result = fed.coordinator(exp, run_id=run_id, resume=True).run()
    assert result.ok, result.reason
    assert [r["round"] for r in result.rounds] == [1, 2]
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 5.0, atol=1e-4)
    reasons = [u["reason"] for u in store.updates(run_id, verdict="rejected") if u["site"] == bad.site_id]
    assert reasons and all("payload.num_examples: 18446744073709551615 is outside the signed 64-bit range" in r
                           for r in reasons)
    assert all(u["num_examples"] <= 30 for u in store.updates(run_id, verdict="accepted"))


# ------------------------------------------------------------------ path traversal
def test_message_id_path_traversal_writes_nothing_outside_the_state_dir(make_fed, tmp_path):
    tag = uuid.uuid4().hex[:8]
    escapes = [f"../../../../escaped-{tag}", str(tmp_path / f"absolute-{tag}")]

    def attack(site, task_env, honest_env, frame):
        out = []
        for mid in escapes:
            f, _ = with_message_id(site, task_env, honest_env, mid)
            out.append((f, mid))
        return out + [(frame, honest_env.message_id)]  # then its honest update: accepted

    fed = make_fed()
    fed.add_site(1.0, 10)
    bad = fed.add_site(3.0, 30, attack=attack)
    fed.start_sites()
    result = fed.coordinator(_exp(rounds=1)).run()
    assert result.ok, result.reason
    bodies = fed.state_dir / "runs" / result.run_id / "bodies"
    for mid in escapes:
        assert not (bodies / f"{mid}.body").resolve().exists()
        assert not Path(f"{mid}.body").exists()
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and fed.state_dir not in p.parents]
    assert outside == []
    names = sorted(p.name for p in bodies.iterdir())
    assert names and all(re.fullmatch(r"[0-9a-f]{64}\.body", n) for n in names)
    for p in bodies.iterdir():  # named by the hash of what they hold
        assert hashlib.sha256(p.read_bytes()).hexdigest() + ".body" == p.name
    reasons = _rejected(result, bad)
    assert len(reasons) == 2 and all(r.startswith("malformed: envelope.message_id: expected 32 lowercase hex") for r in reasons)
    assert {mid for mid, r in fed.dead_letters() if "envelope.message_id" in r} == set(escapes)


# ------------------------------------------------------------------ chunk jamming
def test_chunk_jamming_does_not_block_an_honest_transfer(make_fed):
    budget = 64 * 1024
    fed = make_fed(max_reassembly_bytes=budget, reassembly_timeout_s=1.5)
    honest = [fed.add_site(1.0, 10, chunk_size=64), fed.add_site(3.0, 30, chunk_size=64)]
    fed.start_sites()
    # Jammers: no key, no enrollment, 10 bytes each, declaring a transfer as large as a
    # sender may reserve (half the budget). On the memory bus each has its own broker
    # user, so together they fill the budget; on RabbitMQ they share the sites' user.
    jam_ids = []
    for i in range(2):
        jam = open_bus(fed.bus_url, **({"user": f"mallory-{i}"} if fed.memory else {}))
        h, piece = split_body(os.urandom(budget // 2), chunk_size=budget // 4)[0]
        mid = uuid.uuid4().hex
        jam.publish(UPDATES, fed.federation, bytes(piece), message_id=mid, headers=chunk_header_to_amqp(h))
        jam_ids.append(mid)
        jam.close()
    exp = _exp(rounds=1, timeout_s=30)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 2.5, atol=1e-4)
    store = StateStore(fed.state_dir)
    accepted = {u["site"] for u in store.updates(result.run_id, verdict="accepted", kind="Update")}
    assert accepted == {s.site_id for s in honest}
    dead = fed.dead_letters()
    assert {mid for mid, _ in dead} == set(jam_ids)  # the jam is dead-lettered, the honest transfers are not
    assert all("timed out after 1.5s" in r for _, r in dead)


# ------------------------------------------------------------------ handler errors
def test_a_message_that_raises_inside_handling_is_dead_lettered_and_the_run_completes(make_fed, monkeypatch):
    from coordinator.aggregators.fedavg import FedAvg

    fed = make_fed()
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    bad = fed.add_site(100.0, 10)
    add = FedAvg.add

    def add_or_raise(self, contribution):  # a bug one crafted update triggers inside aggregation
        if contribution.site == bad.site_id:
            raise RuntimeError("crafted update broke the aggregator")
        return add(self, contribution)

    monkeypatch.setattr(FedAvg, "add", add_or_raise)
    fed.start_sites()
    exp = _exp(rounds=2)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 5.0, atol=1e-4)
    want = "internal_error: RuntimeError: crafted update broke the aggregator"
    assert _rejected(result, bad) == [want, want]
    assert [r for _, r in fed.dead_letters()] == [want, want]


# ------------------------------------------------------------------ enrollment
def test_enroll_refuses_a_key_another_site_uses_and_legacy_duplicates_do_not_raise(tmp_path):
    state = tmp_path / "state"
    key = Signer.generate()
    store = StateStore(state)
    store.enroll("site-a", key.public_pem())
    with pytest.raises(StateError, match="already enrolled for site 'site-a'"):
        store.enroll("site-b", key.public_pem())
    assert [s["site_id"] for s in store.sites()] == ["site-a"]
    store.enroll("site-a", key.public_pem())  # re-enrolling one's own key is fine

    pub = tmp_path / "stolen.pub"
    pub.write_bytes(key.public_pem())
    cli = subprocess.run([sys.executable, "-m", "fedbus.cli", "coordinator", "enroll", "site-c", str(pub),
                          "--state", str(state)], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert cli.returncode == 2 and "already enrolled for site 'site-a'" in cli.stderr

    # A duplicate left by an older fedbus: trust_store() keeps the first enrollment, never raises.
    store._db.execute("INSERT INTO sites (site_id, kid, public_pem, enrolled_at) VALUES (?, ?, ?, ?)",
                      ("site-legacy", store.site("site-a")["kid"], key.public_pem().decode(), 1e12))
    trust = store.trust_store()
    assert trust.identity(store.site("site-a")["kid"]) == "site-a"


def test_a_run_goes_on_with_a_legacy_duplicate_key_in_the_state(make_fed):
    fed = make_fed()
    a = fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    store = StateStore(fed.state_dir)
    store._db.execute("INSERT INTO sites (site_id, kid, public_pem, enrolled_at) VALUES (?, ?, ?, ?)",
                      ("site-legacy", store.site(a.site_id)["kid"], a.signer.public_pem().decode(), 1e12))
    fed.start_sites()
    exp = _exp(rounds=1)
    result = fed.coordinator(exp).run()
    assert result.ok, result.reason
    np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 2.5, atol=1e-4)


# ------------------------------------------------------------------ site signals
def test_a_site_with_reproducible_dp_noise_is_shown_per_site_and_in_the_result(tmp_path):
    from tests.adversarial.malicious_site import with_payload

    fed = Federation(f"memory://adv-{uuid.uuid4().hex[:8]}", tmp_path / "state")
    try:
        fed.add_site(1.0, 10)
        research = fed.add_site(3.0, 30, attack=lambda site, t, h, f: [with_payload(site, t, h, reproducible=True)])
        fed.start_sites()
        result = fed.coordinator(_exp(rounds=1)).run()
    finally:
        fed.close()
    assert result.ok, result.reason
    assert result.to_json()["privacy"]["reproducible_dp"] == [research.site_id]
    per_site = StateStore(fed.state_dir).rounds(result.run_id)[0]["metrics"]["per_site"]
    assert {s: m["reproducible"] for s, m in per_site.items()} == {fed.sites[0].site_id: False, research.site_id: True}


@pytest.mark.broker
@pytest.mark.slow
def test_chunk_jamming_by_one_broker_user_leaves_the_others_room_on_rabbitmq(amqp_url, local_broker, tmp_path):
    """Per-site broker users (as `fedbus broker provision` makes them): the broker vouches for
    each chunk's user_id, so a jammer asking for the whole budget gets half (its second
    transfer is requeued, not reserved) and the honest sites' transfers go through at once."""
    from protocol.transport.provision import deprovision, provision, user_url

    tag = uuid.uuid4().hex[:6]
    a, b, jammer = f"site-a-{tag}", f"site-b-{tag}", f"mallory-{tag}"
    creds = provision(amqp_url, sites=[a, b, jammer])
    budget = 64 * 1024
    fed = Federation(amqp_url, tmp_path / "state", bus_opts={"max_reassembly_bytes": budget, "reassembly_timeout_s": 60})
    try:
        for sid, offset, n in ((a, 1.0, 10), (b, 3.0, 30)):
            fed.add_site(offset, n, site_id=sid, bus_url=user_url(amqp_url, sid, creds.passwords[sid]), chunk_size=64)
        fed.start_sites()
        jam = open_bus(user_url(amqp_url, jammer, creds.passwords[jammer]))
        for _ in range(2):  # together the whole budget, if one user could reserve it all
            h, piece = split_body(os.urandom(budget // 2), chunk_size=budget // 4)[0]
            jam.publish(UPDATES, fed.federation, bytes(piece), message_id=uuid.uuid4().hex,
                        headers=chunk_header_to_amqp(h))
        jam.close()
        exp = _exp(rounds=1, timeout_s=20)  # the jam holds its reservation for 60 s: longer than the round
        result = fed.coordinator(exp).run()
        assert result.ok, result.reason
        np.testing.assert_allclose(mean_offset(result.weights, initial_weights(exp)), 2.5, atol=1e-4)
        accepted = {u["site"] for u in StateStore(fed.state_dir).updates(result.run_id, verdict="accepted", kind="Update")}
        assert accepted == {a, b}
        assert fed.dead_letters() == []  # nothing honest was refused
    finally:
        fed.close()
        deprovision(amqp_url, [a, b, jammer])
