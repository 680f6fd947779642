"""Issue 20 classes 3 and 5: every wire message type fuzzed (hypothesis) through the real
coordinator inbox and the real site worker, on the in-memory bus and on RabbitMQ; and the
known attacks (a ``-inf`` policy in a hello, ``n_val = 1e300``, the empty-chunk jam).

Messages are drawn from ``tests/wire_strategies.py``, which reads the message registry and
``protocol/bounds.py``: one in-bound and one out-of-bound draw per type and example, each
sealed with a real enrolled key (so the coordinator's or site's own checks are what refuse
them). What must hold: no exception escapes a handler (no ``handler_error`` or
``internal_error`` letter), every refusal is dead-lettered with a reason, every message
outside its bounds is refused as ``out_of_bounds``/``malformed``, and a ``--resume`` after
the fuzzed messages completes.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.state import StateStore
from protocol.codec import new_envelope
from protocol.messages import DatasetInfo, EvalTask, PersonalizeTask, RunControl, SiteHello, StatsTask, TrainTask
from protocol.transport.layout import chunk_header_to_amqp
from protocol.transport.topology import CONTROL, UPDATES
from tests.adversarial.malicious_site import Federation, experiment, seal_raw, with_payload
from tests.adversarial.site_harness import attack  # noqa: F401  (fixture: a real SiteWorker on both buses)
from site_worker.secagg_handlers import SECAGG_TASKS
from tests.wire_strategies import MESSAGE_CLASSES, broken, payload

# The training-path tasks, each of which must get an answer before the honest task is sent.
ANSWERED = (TrainTask, EvalTask, PersonalizeTask)

BAD_REASONS = ("out_of_bounds:", "malformed:")
# What a site accepts at all (site_worker/daemon.py); any other type is refused by its type
# first, so an out-of-bound one of those may read "unexpected_type" (refused either way).
SITE_TYPES = (TrainTask, EvalTask, PersonalizeTask, StatsTask, RunControl, *SECAGG_TASKS)
ESCAPED = ("handler_error", "internal_error")
SLOW = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.broker)])
def make_fed(request, tmp_path):
    made: list[Federation] = []

    def make(**bus_opts) -> Federation:
        url = f"memory://fuzz-{uuid.uuid4().hex[:8]}" if request.param == "memory" else request.getfixturevalue("amqp_url")
        fed = Federation(url, tmp_path / f"state-{uuid.uuid4().hex[:6]}", bus_opts=bus_opts)
        made.append(fed)
        return fed

    make.param = request.param  # type: ignore[attr-defined]
    yield make
    for fed in made:
        fed.close()


def _exp(rounds: int = 1, *, dp: bool = False, timeout_s: float = 10) -> dict:
    exp = experiment(rounds=rounds, parameters={"min_fit_clients": 2, "min_available_clients": 2})
    exp["federated"]["round_timeout_s"] = timeout_s
    if dp:  # so the coordinator plans privacy from each hello's policy (where -inf used to raise)
        exp["training"]["optimizer"] = {"type": "adam", "differential_privacy": {"noise_multiplier": 1.0}}
    return exp


def _draw_frames(data, site, *, run_id: str, round: int, task_id: str | None) -> tuple[list, set[str]]:
    """Per message type, one in-bound and one out-of-bound message, sealed by ``site``'s real key:
    ``([(exchange, frame, message_id)], ids of the out-of-bound ones)``."""
    frames, bad = [], set()
    for cls in MESSAGE_CLASSES:
        good = data.draw(payload(cls), label=f"good {cls.__name__}")
        wrong, field = data.draw(broken(cls), label=f"broken {cls.__name__}")
        for p, is_bad in ((good, False), (wrong, True)):
            if task_id is not None and hasattr(p, "task_id") and data.draw(st.booleans(), label="real task id"):
                p = dataclasses.replace(p, task_id=task_id)
            if isinstance(p, SiteHello) and data.draw(st.booleans(), label="own site id"):
                p = dataclasses.replace(p, site_id=site.site_id)
            env = new_envelope(p, federation=site.federation, run_id=run_id, round=round, sender=site.site_id,
                               recipient="coordinator")
            exchange = CONTROL if isinstance(p, SiteHello) else UPDATES
            frames.append((exchange, seal_raw(env, site.signer), env.message_id))
            if is_bad:
                bad.add(env.message_id)
    return frames, bad


def _check_letters(fed: Federation, bad: set[str], store: StateStore, run_id: str) -> None:
    dead = dict(fed.dead_letters())
    assert not [r for r in dead.values() if r.startswith(ESCAPED)], "an exception escaped a handler"
    for mid in bad:  # every message outside its bounds: refused at decode, with the reason
        assert mid in dead, f"out-of-bound message {mid} was not dead-lettered"
        assert dead[mid].startswith(BAD_REASONS), dead[mid]
    for row in store.updates(run_id, verdict="rejected"):  # every refusal the inbox logged: a letter with a reason
        if row["message_id"] in bad:
            assert row["reason"].startswith(BAD_REASONS)
        assert dead.get(row["message_id"]), row


def _resume(fed: Federation, run_id: str, rounds: int) -> None:
    store = StateStore(fed.state_dir)
    store.finish_run(run_id, status="running", reason=None, result=None)
    with store._tx() as db:
        db.execute("UPDATE runs SET rounds_planned=? WHERE run_id=?", (rounds, run_id))
    store.close()


@settings(max_examples=1, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_every_wire_message_type_fuzzed_through_the_coordinator_then_resume(make_fed, data):
    fed = make_fed()
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    bad_ids: set[str] = set()

    def fuzz(site, task_env, honest_env, frame):  # mid-round, with the run's id, round and the real task id
        frames, bad = _draw_frames(data, site, run_id=task_env.run_id, round=task_env.round,
                                   task_id=task_env.message_id)
        bad_ids.update(bad)
        for exchange, f, mid in frames:
            site.bus.publish(exchange, site.federation, f, message_id=mid)
        return [(frame, honest_env.message_id)]

    fuzzer = fed.add_site(2.0, 20, attack=fuzz)
    fed.start_sites()
    run_id = f"fuzz-{uuid.uuid4().hex[:6]}"
    exp = _exp(rounds=1, dp=True)
    first = fed.coordinator(exp, run_id=run_id).run()
    assert first.ok, first.reason
    # More fuzz waits in the queues for the resumed run (a poison message would kill every resume).
    frames, bad = _draw_frames(data, fuzzer, run_id=run_id, round=2, task_id=None)
    bad_ids.update(bad)
    for exchange, f, mid in frames:
        fuzzer.bus.publish(exchange, fed.federation, f, message_id=mid)
    _resume(fed, run_id, rounds=2)
    resumed = fed.coordinator(_exp(rounds=2, dp=True),
                              run_id=run_id, resume=True).run()
    assert resumed.ok, resumed.reason
    assert [r["round"] for r in resumed.rounds] == [1, 2]
    deadline = time.monotonic() + 30
    while not bad_ids <= {m for m, _ in fed.dead_letters()} and time.monotonic() < deadline:
        time.sleep(0.2)  # hellos are settled by their own consumer: wait for the letters, bounded
    _check_letters(fed, bad_ids, StateStore(fed.state_dir), run_id)


# ------------------------------------------------------------------ the site's handler
def _site_letters(bus_url: str, ids: set[str]) -> dict[str, str]:
    """Reason header of each dead letter whose message id is in ``ids``."""
    if bus_url.startswith("memory"):
        from urllib.parse import urlsplit

        from protocol.transport.memory import get_broker

        return {d.message_id: d.reason or "" for d in get_broker(urlsplit(bus_url).netloc).dead_letters()
                if d.message_id in ids}
    import pika

    from protocol.transport.topology import DEAD, REASON_HEADER

    conn = pika.BlockingConnection(pika.URLParameters(bus_url))
    try:
        ch, out = conn.channel(), {}
        while True:
            method, props, _ = ch.basic_get(DEAD, auto_ack=False)
            if method is None:
                return out
            if props.message_id in ids:
                out[props.message_id] = str((props.headers or {}).get(REASON_HEADER, ""))
    finally:
        conn.close()


@settings(max_examples=2, deadline=None, suppress_health_check=SLOW)
@given(data=st.data())
def test_every_wire_message_type_fuzzed_through_the_site_worker(attack, bus_url, data):
    site = attack()
    coord = site.coordinator
    bad, tasks, answered = set(), set(), set()
    not_for_sites: set[str] = set()  # bad messages of a type no site accepts
    for cls in MESSAGE_CLASSES:
        for p, is_bad in ((data.draw(payload(cls)), False), (data.draw(broken(cls))[0], True)):
            if isinstance(p, ANSWERED) and hasattr(p, "deadline"):
                p = dataclasses.replace(p, deadline=time.time() + 600) if not is_bad else p
            env = new_envelope(p, federation=coord.federation, run_id=coord.run_id, round=1, sender="coordinator",
                               recipient=coord.site_id)
            try:
                frame = seal_raw(env, coord.signer)
            except TypeError:  # a value the codec cannot even write (a str for a DatasetInfo): never on the wire
                continue
            coord.publish_frame(frame, env.message_id)
            (bad if is_bad else tasks).add(env.message_id)
            if is_bad and not isinstance(p, SITE_TYPES):
                not_for_sites.add(env.message_id)
            # a task naming its model by hash that the site cannot verify is dead-lettered, not answered
            if not is_bad and isinstance(p, ANSWERED) and not p.model_sha256:
                answered.add(env.message_id)
    while answered:  # every in-bound task gets an answer (a decline: the fuzzed experiment is no experiment)
        reply = coord.replies.get(timeout=60)
        answered.discard(reply.payload.task_id)
    # late answers to other fuzzed task types (a StatsTask, a secure-aggregation one); an answer to a
    # bad one is skipped here too, and fails below as a bad message that was not dead-lettered
    coord.stale = tasks | bad
    site.still_serves()  # an honest task after the fuzz: a normal, accounted update
    deadline = time.monotonic() + 90  # a condition, not a sleep: generous for a loaded two-worker run
    letters = _site_letters(bus_url, bad)
    while set(letters) != bad and time.monotonic() < deadline:
        time.sleep(0.2)
        letters = _site_letters(bus_url, bad)
    assert set(letters) == bad
    wrong = {m: r for m, r in letters.items()
             if not (r.startswith(BAD_REASONS) or (m in not_for_sites and r.startswith("unexpected_type:")))}
    assert not wrong, wrong
    assert site.worker.stats["rejected"] >= len(bad)
    escaped = _site_letters(bus_url, tasks)
    assert not [r for r in escaped.values() if r.startswith(ESCAPED)], escaped


# ------------------------------------------------------------------ known attacks
def _hello(site, **policy) -> tuple[bytes, str]:
    info = DatasetInfo(name="toy", rows=100, columns=("a", "b", "c", "y"),
                       feature_types={"a": "numeric", "b": "numeric", "c": "numeric"}, target="y")
    env = new_envelope(SiteHello(site_id=site.site_id, software_version="evil", datasets=(info,), policy=policy),
                       federation=site.federation, run_id="", round=0, sender=site.site_id, recipient="coordinator")
    return seal_raw(env, site.signer), env.message_id


def test_minus_inf_hello_is_refused_and_the_run_and_its_resume_complete(make_fed):
    fed = make_fed()
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    evil = fed.add_site(2.0, 20)
    fed.start_sites()
    frame, mid = _hello(evil, max_sample_rate=-math.inf)
    evil.bus.publish(CONTROL, fed.federation, frame, message_id=mid)
    run_id = f"inf-{uuid.uuid4().hex[:6]}"
    dp = {"dp": True}
    first = fed.coordinator(_exp(rounds=1, **dp), run_id=run_id).run()
    assert first.ok, first.reason
    reason = dict(fed.dead_letters())[mid]
    assert reason.startswith("out_of_bounds: payload.policy.max_sample_rate: must be a finite number"), reason
    _resume(fed, run_id, rounds=2)
    frame, mid2 = _hello(evil, max_sample_rate=-math.inf)  # again, waiting for the resume
    evil.bus.publish(CONTROL, fed.federation, frame, message_id=mid2)
    resumed = fed.coordinator(_exp(rounds=2, **dp), run_id=run_id, resume=True).run()
    assert resumed.ok, resumed.reason
    assert [r["round"] for r in resumed.rounds] == [1, 2]
    assert dict(fed.dead_letters())[mid2].startswith("out_of_bounds: payload.policy.max_sample_rate")


def test_a_stored_hello_the_plan_cannot_use_does_not_stop_the_plan(tmp_path):
    """An old state dir (before bounds) holding a ``-inf`` policy: the plan names the site, raises nothing."""
    from coordinator import privacy_plan
    from protocol.config import load_experiment

    exp = load_experiment(_exp(rounds=2, dp=True))
    hello = {"datasets": [{"name": "toy", "rows": 100}], "policy": {"max_sample_rate": -math.inf}}
    # test_fraction inf overflows int(): an OverflowError, neither a TypeError nor a ValueError
    overflow = {"datasets": [{"name": "toy", "rows": 100}], "policy": {"test_fraction": math.inf}}
    plan = privacy_plan.plan(exp, {"evil": hello, "overflow": overflow,
                                   "ok": {"datasets": [{"name": "toy", "rows": 100}], "policy": {}}})
    assert "error" in plan["sites"]["evil"] and "planned_epsilon" in plan["sites"]["ok"]
    assert "OverflowError" in plan["sites"]["overflow"]["error"]


@pytest.mark.parametrize("n_val, refused", [(1e300, "out_of_bounds: payload.metrics.n_val"),
                                            (101.0, "count_bound:"), (100.0, None)])
def test_n_val_is_bounded_by_the_rows_the_site_announced(make_fed, n_val, refused):
    fed = make_fed()
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)

    def claim(site, task_env, honest_env, frame):
        metrics = dict(honest_env.payload.metrics, n_val=n_val, after_accuracy=1.0)
        out = [with_payload(site, task_env, honest_env, metrics=metrics)]
        site._attack_ids = out
        return out

    bad = fed.add_site(2.0, 20, attack=claim)
    fed.start_sites()
    result = fed.coordinator(_exp(rounds=2, timeout_s=3)).run()  # the refused site never answers: 3 s rounds
    assert result.ok, result.reason
    assert len(result.rounds) == 2  # no early stop from a forged accuracy weight
    store = StateStore(fed.state_dir)
    rows = [u for u in store.updates(result.run_id, verdict="rejected") if u["site"] == bad.site_id]
    accepted = [u for u in store.updates(result.run_id, verdict="accepted", kind="Update") if u["site"] == bad.site_id]
    if refused is None:  # the edge: exactly the announced rows is fine
        assert len(accepted) == 2 and not rows
    else:
        assert not accepted and len(rows) == 2 and all(r["reason"].startswith(refused) for r in rows), rows
        dead = dict(fed.dead_letters())
        assert all(dead[mid].startswith(refused) for _, mid in bad._attack_ids)


def test_empty_chunk_jam_is_refused_while_an_honest_round_completes(make_fed):
    fed = make_fed(max_reassembly_bytes=64 * 1024)
    honest = [fed.add_site(1.0, 10, chunk_size=64), fed.add_site(3.0, 30, chunk_size=64)]
    fed.start_sites()
    jam_n = 5_000 if fed.memory else 2_000  # of the 65,534 the header promises: its shape, in seconds
    header = {"transfer_id": uuid.uuid4().hex, "count": 65_535, "sha256": "0" * 64, "total_size": 0}
    from protocol.transport import open_bus

    jam = open_bus(fed.bus_url, **({"user": "mallory"} if fed.memory else {}))
    ids = []
    for i in range(jam_n):
        mid = uuid.uuid4().hex
        jam.publish(UPDATES, fed.federation, b"", message_id=mid, headers=chunk_header_to_amqp({**header, "index": i}))
        ids.append(mid)
    jam.close()
    t0 = time.monotonic()
    result = fed.coordinator(_exp(rounds=1, timeout_s=90)).run()  # the honest replies queue behind the jam
    assert result.ok, result.reason
    assert time.monotonic() - t0 < 120  # not the 300 s reassembly timeout
    store = StateStore(fed.state_dir)
    assert {u["site"] for u in store.updates(result.run_id, verdict="accepted", kind="Update")} == {
        s.site_id for s in honest}
    deadline = time.monotonic() + 60
    dead = dict(fed.dead_letters())
    while len(set(ids) & set(dead)) < jam_n and time.monotonic() < deadline:
        time.sleep(0.5)
        dead = dict(fed.dead_letters())
    assert set(ids) <= set(dead)
    assert all("cannot carry total_size=0" in dead[m] for m in ids[:50])
