"""Chaos on the publish-once model path (issue 23): models go by hash (``--model-inline-below 0``);
a site is frozen with its round-1 model and task waiting in its queue, the coordinator is killed
-9 after publishing, the broker restarts, the frozen site is killed -9 holding a chunk it never
acked. After a restart and ``--resume`` the run completes, every update counts once, and the final
model equals the fault-free run's (same production code, in memory, models inline)."""

from __future__ import annotations

import pytest

from tests.chaos.harness import experiment, reference_weights, wait_for
from tests.chaos.test_chaos import RUN_S, START_S, audit_passes, completed, counted_once, dead_reasons_ok, same_model

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.broker]

BY_HASH = ["--model-inline-below", "0"]


def test_model_by_hash_survives_coordinator_and_site_kill_and_broker_restart(make_federation) -> None:
    fed = make_federation(sites=3)
    fed.start_sites(timeout=START_S)
    doc = experiment(rounds=2, sites=3, round_timeout_s=120)
    path = fed.write_experiment(doc)
    run_id = f"model-chaos-{fed.tag}"
    frozen = fed.site(2)
    fed.pause_site(2)  # its chunks and task arrive and wait, unacked or unconsumed
    try:
        fed.start_coordinator(path, run_id=run_id, extra=BY_HASH)
        for i in (0, 1):
            wait_for(lambda i=i: [x for x in fed.site(i).sent(run_id) if x["round"] == 1], timeout=RUN_S,
                     what=f"site {i + 1}'s round-1 update", on_fail=fed.diagnostics)
        assert fed.site(0).events("model_chunk_stored"), "the model did not travel by hash"
        assert fed.rounds_committed(run_id) == []  # round 1 waits for the frozen site
        assert fed.kill_coordinator() == -9
        fed.restart_broker()
    finally:
        assert fed.kill_site(2) == -9  # frozen, mid-transfer: what it held goes back to its queue
    assert not frozen.sent(run_id)
    fed.start_site(2, timeout=START_S)
    fed.start_coordinator(path, run_id=run_id, resume=True, extra=BY_HASH)
    out = completed(fed, rounds=2)
    assert all(r["replies"] == 3 for r in out["rounds"])
    assert frozen.events("model_chunk_stored") and not frozen.events("model_unavailable")
    counted_once(fed, run_id, rounds=[1, 2], sites=fed.site_ids)
    audit_passes(fed, run_id)
    dead_reasons_ok(fed.dead_letters())
    same_model(fed.final_weights(run_id), reference_weights(fed, doc).weights, what="after kills and a broker restart")
