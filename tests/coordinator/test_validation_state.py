"""Update checks and the state store, without a bus."""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from coordinator.checkpoints import load_tensors, save_tensors
from coordinator.state import StateError, StateStore, UpdateRow
from coordinator.validation import Rejected, check_envelope, check_weights
from protocol.codec import new_envelope
from protocol.messages import RunControl
from protocol.signing import Signer

REF = (("w", np.zeros((2, 3), np.float32)), ("b", np.zeros(3, np.float32)))


@pytest.mark.parametrize(
    "weights, reason, words",
    [
        ((("w", np.zeros((2, 3), np.float32)),), "wrong_shape", "1 tensors"),
        ((("x", np.zeros((2, 3), np.float32)), ("b", np.zeros(3, np.float32))), "wrong_shape", "'x'"),
        ((("w", np.zeros((3, 2), np.float32)), ("b", np.zeros(3, np.float32))), "wrong_shape", "[3, 2]"),
        ((("w", np.zeros((2, 3), np.float64)), ("b", np.zeros(3, np.float32))), "wrong_dtype", "float64"),
        ((("w", np.array([[0, np.inf, 0], [0, 0, 0]], np.float32)), ("b", np.zeros(3, np.float32))), "non_finite", "1 NaN"),
    ],
)
def test_check_weights_rejects_with_a_reason(weights, reason, words):
    with pytest.raises(Rejected) as e:
        check_weights(weights, REF)
    assert e.value.reason == reason and words in e.value.detail


def test_norm_bound_and_large_finite_values():
    big = (("w", np.full((2, 3), 3e38, np.float32)), ("b", np.zeros(3, np.float32)))
    check_weights(big, REF)  # finite, however large: the float64 sum does not overflow
    ok = (("w", np.full((2, 3), 0.1, np.float32)), ("b", np.zeros(3, np.float32)))
    check_weights(ok, REF, norm_bound=1.0)
    with pytest.raises(Rejected, match=r"L2 norm 7.348 > norm_bound 1"):  # sqrt(6 * 9)
        check_weights((("w", np.full((2, 3), 3.0, np.float32)), ("b", np.zeros(3, np.float32))), REF, norm_bound=1.0)


def test_check_envelope():
    env = new_envelope(RunControl(action="stop"), federation="f", run_id="r", round=1, sender="s", recipient="coordinator")
    check_envelope(env, federation="f", run_id="r")
    for kw, reason in (({"federation": "g", "run_id": "r"}, "wrong_federation"),
                       ({"federation": "f", "run_id": "q"}, "wrong_run")):
        with pytest.raises(Rejected) as e:
            check_envelope(env, **kw)
        assert e.value.reason == reason
    with pytest.raises(Rejected, match="ahead of the coordinator's clock"):
        check_envelope(env, federation="f", run_id="r", now=time.time() - 3600)
    check_envelope(env, federation="f", run_id="r", now=time.time() + 86400)  # waited in the queue: fine


def test_state_store_enroll_runs_updates(tmp_path):
    store = StateStore(tmp_path)
    s = Signer.generate()
    kid = store.enroll("site-a", s.public_pem())
    assert kid == s.kid and store.key(kid)[0] == "site-a"
    s2 = Signer.generate()
    store.enroll("site-a", s2.public_pem())  # re-enrolled: the old key stays auditable
    assert store.key(kid)[0] == "site-a" and store.site("site-a")["kid"] == s2.kid
    with pytest.raises(StateError, match="not an Ed25519 public key"):
        store.enroll("bad", b"junk")
    store.create_run(run_id="r1", federation="f", aggregator="FedAvg", experiment={"a": 1}, seed=1, rounds=2,
                     sites=[], coordinator_kid=None)
    with pytest.raises(StateError, match="already exists"):
        store.create_run(run_id="r1", federation="f", aggregator="FedAvg", experiment={}, seed=1, rounds=2, sites=[],
                         coordinator_kid=None)
    assert store.latest_unfinished("f") == "r1" and store.latest_unfinished("g") is None
    store.record([UpdateRow(run_id="r1", round=1, message_id="m1", site="site-a", kind="Update", bytes=10,
                            verdict="rejected", reason="wrong_shape: x")])
    assert not store.accepted_message("m1")
    assert store.updates("r1")[0]["reason"] == "wrong_shape: x"
    with pytest.raises(StateError, match="no run 'nope'.*r1"):
        store.run("nope")


def test_state_schema_version_is_checked(tmp_path):
    StateStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "coordinator.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 99"):
        StateStore(tmp_path)


def test_checkpoint_round_trip_keeps_order_and_checks_hash(tmp_path):
    tensors = (("z", np.arange(3, dtype=np.float32)), ("a", np.ones((2, 2), np.float32)))
    sha = save_tensors(tmp_path / "c.safetensors", tensors)
    back = load_tensors(tmp_path / "c.safetensors", sha256=sha)
    assert [n for n, _ in back] == ["z", "a"]
    np.testing.assert_array_equal(back[1][1], tensors[1][1])
    with pytest.raises(ValueError, match="the state database recorded"):
        load_tensors(tmp_path / "c.safetensors", sha256="0" * 64)
