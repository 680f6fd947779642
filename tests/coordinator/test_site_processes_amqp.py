"""Real site-worker processes on RabbitMQ: one is killed mid-round, the round closes at the deadline."""

from __future__ import annotations

import threading
import uuid

import pandas as pd
import pytest

from coordinator.run import Coordinator
from coordinator.state import StateStore
from protocol.signing import Signer, generate_keypair
from protocol.transport import open_bus
from protocol.transport.base import Topology
from tests.site_worker.support import experiment_dict, heart_failure_csv, site_toml
from tests.site_worker.test_worker_process import SiteProcess

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_site_process_killed_mid_round_closes_the_round_at_the_deadline_with_the_others(tmp_path, amqp_url):
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    kdir = tmp_path / "keys"
    ckey, cpub = generate_keypair("coordinator", kdir)
    state = tmp_path / "coord"
    store = StateStore(state)
    data = pd.read_csv(heart_failure_csv(tmp_path / "hf.csv"))
    ids, procs = [], []
    bus = open_bus(amqp_url)
    try:
        for i, part in enumerate((data.iloc[0:100], data.iloc[100:200], data.iloc[200:])):
            sid = f"hosp-{i + 1}-{uuid.uuid4().hex[:6]}"
            skey, spub = generate_keypair(sid, kdir)
            store.enroll(sid, spub.read_bytes())
            sdir = tmp_path / sid
            sdir.mkdir()
            part.to_csv(sdir / "hf.csv", index=False)
            keys = type("K", (), {"site_key": skey, "coordinator_pub": cpub})
            ids.append(sid)
            procs.append((sdir, keys))
        bus.declare(Topology(sites=ids, federations=[fed]))  # `fedbus broker provision` in production
        sites = []
        for sid, (sdir, keys) in zip(ids, procs):
            cfg = site_toml(sdir, site_id=sid, federation=fed, broker_url=amqp_url, keys=keys,
                            datasets={"heart_failure": {"path": str(sdir / "hf.csv"), "target": "DEATH_EVENT"}},
                            policy={"max_epsilon": 100.0})
            sites.append(SiteProcess(cfg))
        for p in sites:
            p.wait_for("site_started", timeout=120)

        exp = experiment_dict(**{"training.epochs": 1, "training.rounds": 2,
                                 "federated.parameters.fraction_eval": 0.0,
                                 "federated.parameters.min_fit_clients": 2,
                                 "federated.parameters.min_available_clients": 2})
        coord = Coordinator(exp, bus=bus, state_dir=state, signer=Signer.from_file(ckey), federation=fed, sites=ids,
                            progress=False, round_timeout_s=12)
        out: dict = {}
        runner = threading.Thread(target=lambda: out.setdefault("result", coord.run()))
        runner.start()
        sites[2].wait_for("task_received", timeout=120, round=2, type="TrainTask")
        sites[2].kill()  # SIGKILL while it holds its round-2 task
        runner.join(timeout=180)
        assert not runner.is_alive()
        result = out["result"]
        assert result.ok, result.reason
        assert [r["replies"] for r in result.rounds] == [3, 2]
        assert result.rounds[1]["wall_s"] >= 11.5  # closed at the deadline, with the two live sites
        assert set(result.final["per_site"]) == set(ids[:2])
        accepted = store.updates(result.run_id, verdict="accepted", kind="Update")
        assert sorted((u["round"], u["site"]) for u in accepted) == sorted(
            [(1, s) for s in ids] + [(2, s) for s in ids[:2]])
    finally:
        for p in locals().get("sites", []):
            p.kill()
        bus.close()
