"""Crash safety on RabbitMQ: `kill -9` a coordinator process mid-round, then `--resume`.

The coordinator runs as a real subprocess (`python -m fedbus.cli coordinator run`); the
sites are fake sites in this process on their own AMQP connections. Site 3 holds its
round-2 reply until the coordinator is dead, so the kill always lands mid-round with
round 1 committed and two round-2 updates delivered but not acked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.checkpoints import load_tensors
from coordinator.state import StateStore
from tests.coordinator.conftest import experiment

REPO = Path(__file__).resolve().parents[2]
OFFSETS = ((1.0, 10), (2.0, 30), (4.0, 60))


def _coordinator_cmd(fed, exp_path: Path, run_id: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedbus.cli", "coordinator", "run", str(exp_path), "--broker", fed.bus_url,
           "--state", str(fed.state_dir), "--federation", fed.federation, "--run-id", run_id, "--no-progress", "--json"]
    for s in fed.sites:
        cmd += ["--site", s.site_id]
    return cmd + list(extra)


@pytest.mark.slow
@pytest.mark.broker
def test_kill_9_mid_round_then_resume_loses_and_double_counts_nothing(amqp_federation, federation, tmp_path):
    fed = amqp_federation
    gate = threading.Event()
    for i, (offset, n) in enumerate(OFFSETS):
        fed.add_site(offset, n, gate={2: gate} if i == 2 else {})
    exp = experiment(rounds=3, parameters={"min_fit_clients": 3, "min_available_clients": 3})
    exp["federated"]["round_timeout_s"] = 60
    exp_path = tmp_path / "exp.json"
    exp_path.write_text(json.dumps(exp))
    (fed.state_dir / "coordinator.key").write_bytes(fed.signer.private_pem())
    os.chmod(fed.state_dir / "coordinator.key", 0o600)
    fed.start_sites()
    run_id = f"resume-{fed.federation}"
    env = dict(os.environ, PYTHONPATH=str(REPO))

    first = subprocess.Popen(_coordinator_cmd(fed, exp_path, run_id), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert fed.sites[0].wait_replied("Update", 2, timeout=120), "site 1 never got its round-2 task"
        assert fed.sites[1].wait_replied("Update", 2, timeout=60)
        with fed.sites[2]._cond:
            assert fed.sites[2]._cond.wait_for(
                lambda: any(e.round == 2 and e.type == "TrainTask" for e in fed.sites[2].tasks), timeout=60)
    finally:
        first.kill()  # SIGKILL: no clean-up, no acks, no final commit
        first.wait(timeout=30)
    assert first.returncode == -9
    store = StateStore(fed.state_dir)
    assert [r["round"] for r in store.rounds(run_id)] == [1]  # killed with round 2 open
    assert store.run(run_id)["status"] == "running"

    gate.set()  # site 3 now answers its round-2 task: the update waits in the queue
    assert fed.sites[2].wait_replied("Update", 2, timeout=60)
    second = subprocess.run(_coordinator_cmd(fed, exp_path, run_id, "--resume"), cwd=REPO, env=env,
                            capture_output=True, timeout=240)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    doc = json.loads(second.stdout)
    assert doc["status"] == "completed" and [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert all(r["replies"] == 3 for r in doc["rounds"])

    # exactly one accepted update per (round, site): nothing lost, nothing counted twice
    accepted = [(u["round"], u["site"]) for u in store.updates(run_id, verdict="accepted", kind="Update")]
    assert sorted(accepted) == sorted((r, s.site_id) for r in (1, 2, 3) for s in fed.sites)
    extra = [u for u in store.updates(run_id, kind="Update") if u["verdict"] != "accepted"]
    assert extra and all(u["verdict"] in ("duplicate", "late") for u in extra)  # re-sent tasks' second answers

    # the final model equals an uninterrupted run of the same experiment (memory bus, same sites' behaviour)
    for offset, n in OFFSETS:
        federation.add_site(offset, n)
    federation.start_sites()
    reference = federation.coordinator(exp).run()
    assert reference.ok
    final = load_tensors(fed.state_dir / store.last_round(run_id)["checkpoint_path"])
    for (name, a), (_, b) in zip(final, reference.weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
    initial = load_tensors(fed.state_dir / store.run(run_id)["initial_checkpoint"])
    np.testing.assert_allclose(final[0][1], initial[0][1] + 3 * 3.1, rtol=1e-5)  # 3 rounds of (10+60+240)/100
