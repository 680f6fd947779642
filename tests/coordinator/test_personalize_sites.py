"""After the rounds the coordinator sends each real site worker the final model; the daemons
personalise under their own budget and report both models on their fixed test split."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coordinator.run import Coordinator
from coordinator.state import StateStore
from protocol.signing import Signer, generate_keypair
from protocol.transport import open_bus
from protocol.transport.base import Topology
from protocol.config import load_experiment
from protocol.model import build_model, load_tensors
from site_worker import run_budget
from site_worker.data import prepare
from site_worker.metrics import evaluate
from site_worker.splits import SplitKey
from site_worker.config import load_site_config
from site_worker.daemon import SiteWorker
from site_worker.final_model import FinalStore
from site_worker.ledger import PrivacyLedger, epsilon_of
from tests.site_worker.support import heart_failure_csv, site_toml

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"accuracy", "auc", "f1", "sensitivity", "specificity", "n_test"}


def defined_fields(y_test) -> set[str]:
    """The FIELDS a site reports under exact metrics for a test split with labels ``y_test``.

    The split is the site's secret (drawn from the OS on first start), so a ~100-row hospital's
    ~20 test rows hold no death about 1 time in 1,000 (0.8 ** ~32 positives): sensitivity and AUC
    are then undefined and rightly left out (or None); likewise specificity with no survivor."""
    pos, neg = bool((y_test == 1).any()), bool((y_test == 0).any())
    return (FIELDS - {"sensitivity", "specificity", "auc"}) | ({"sensitivity"} if pos else set()) \
        | ({"specificity"} if neg else set()) | ({"auc"} if pos and neg else set())


def personalised_experiment(rounds: int = 2, **changes):
    doc = json.loads((ROOT / "examples" / "heart_failure.json").read_text())
    doc["training"]["rounds"] = rounds
    doc["training"]["personalization"] = {"mode": "last_layer", "epochs": 2}
    doc["federated"]["parameters"]["fraction_eval"] = 0.0
    for k, v in changes.items():
        node = doc
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return doc


def start_sites(tmp_path: Path, url: str, fed: str, *, n: int = 3, policy: dict | None = None,
                in_process: bool = True):
    kdir = tmp_path / "keys"
    ckey, cpub = generate_keypair("coordinator", kdir)
    state = tmp_path / "coord"
    store = StateStore(state)
    # shuffled: the file is sorted by follow-up time, so its last third holds almost no deaths
    data = pd.read_csv(heart_failure_csv(tmp_path / "hf.csv")).sample(frac=1.0, random_state=0)
    sites, workers, configs, tomls = [], [], {}, {}
    bounds = np.linspace(0, len(data), n + 1).astype(int)
    for i in range(n):
        sid = f"hosp-{i + 1}-{uuid.uuid4().hex[:6]}"
        skey, spub = generate_keypair(sid, kdir)
        store.enroll(sid, spub.read_bytes())
        sdir = tmp_path / sid
        sdir.mkdir()
        data.iloc[bounds[i]:bounds[i + 1]].to_csv(sdir / "hf.csv", index=False)
        keys = type("K", (), {"site_key": skey, "coordinator_pub": cpub})
        tomls[sid] = site_toml(sdir, site_id=sid, federation=fed, broker_url=url, keys=keys,
                               datasets={"heart_failure": {"path": str(sdir / "hf.csv"), "target": "DEATH_EVENT"}},
                               policy={"max_epsilon": 100.0, "max_sample_rate": 1.0, "metrics": "exact",
                                       **(policy or {})})
        cfg = load_site_config(tomls[sid])
        sites.append(sid)
        configs[sid] = cfg
        if in_process:
            workers.append(SiteWorker(cfg, bus=open_bus(url)))
    store.close()
    return Signer.from_file(ckey), state, sites, workers, configs, tomls


@pytest.fixture
def memory_sites(tmp_path):
    url = f"memory://pers-{uuid.uuid4().hex[:8]}"
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    signer, state, sites, workers, configs, _ = start_sites(tmp_path, url, fed)
    bus = open_bus(url)
    bus.declare(Topology(sites=sites, federations=[fed]))
    for w in workers:
        w.start()
    yield bus, signer, state, fed, sites, workers, configs
    for w in workers:
        w.stop(grace_s=2)
    bus.close()


def check_personalised_run(doc, *, sites, workers, configs, exp):
    final = doc["final"]
    assert final["split"] == "test" and set(final["per_site"]) == set(sites)
    for w in workers or []:
        assert w.stats["personalized"] == 1, w.stats
    for site in sites:
        cfg = configs[site]
        data = prepare(cfg.datasets["heart_failure"], load_experiment(exp).dataset, input_shape=(11,),
                       key=SplitKey.load_or_create(cfg.state_dir, test_fraction=cfg.policy.test_fraction))
        defined = defined_fields(data.y_test)
        m = final["per_site"][site]
        p = m["personalized"]
        for block in (m, p):
            assert {k for k in FIELDS if block.get(k) is not None} == defined, (site, block)
        assert m["majority_class_accuracy"] is not None
        assert p["n_test"] and p["accuracy"] is not None
        # the site keeps both models, and the figures it sent, in its own state dir
        finals = FinalStore(cfg.state_dir)
        reply = finals.reply(doc["run_id"], "heart_failure")
        assert reply is not None and reply["metrics"]["personalized_accuracy"] == pytest.approx(p["accuracy"])
        g, pers = finals.load(doc["run_id"], "heart_failure", "global"), finals.load(doc["run_id"], "heart_failure",
                                                                                 "personalized")
        assert set(g) == set(pers) and any(not np.array_equal(g[k], pers[k]) for k in g)
        # exact metrics: the figures are the kept models' own, on the site's fixed test split
        for name, block in (("global", m), ("personalized", p)):
            model = build_model(load_experiment(exp).architecture.layers, seed=0)
            load_tensors(model, finals.load(doc["run_id"], "heart_failure", name))
            want = evaluate(model, data.x_test, data.y_test, loss_name="bce_with_logits", task="binary")
            assert block["accuracy"] == pytest.approx(want["accuracy"]) and block["n_test"] == len(data.x_test)
        # the fine-tune was charged to the site's ledger, under this run, inside its total
        ledger = PrivacyLedger(cfg.state_dir)
        kinds = [r["kind"] for r in ledger.releases("heart_failure") if r.get("run_id") == doc["run_id"]]
        assert kinds.count("train") == len(doc["rounds"]) + 1, kinds
        spent = epsilon_of(run_budget.run_spent(ledger, "heart_failure", doc["run_id"]),
                           delta=doc["privacy"]["delta"], accountant=doc["privacy"]["accountant"])
        assert spent <= exp["training"]["optimizer"]["differential_privacy"]["total_epsilon"] + 1e-6
        # the epsilon the result reports for the site is what its ledger holds after the fine-tune
        assert doc["epsilon"][site] == pytest.approx(ledger.spent("heart_failure", delta=doc["privacy"]["delta"],
                                                                  accountant=doc["privacy"]["accountant"]))
    assert final["personalized"]["n_sites"] == len(sites) and final["personalized"]["mean_accuracy"] is not None


@pytest.mark.slow
def test_daemons_personalise_the_final_model_and_report_both(memory_sites, capsys):
    bus, signer, state, fed, sites, workers, configs = memory_sites
    exp = personalised_experiment()
    coord = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=fed, progress=True)
    result = coord.run()
    assert result.ok, result.reason
    doc = result.to_json()
    check_personalised_run(doc, sites=sites, workers=workers, configs=configs, exp=exp)
    # the privacy plan was shown before round 1 and is stored with the result
    err = capsys.readouterr().err
    assert "privacy plan: total ε ≤ 8 per site at δ = 1e-05 (rdp accountant)" in err
    privacy = doc["privacy"]
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp" and privacy["total_epsilon"] == 8.0
    assert set(privacy["planned_epsilon"]) == set(sites)
    for site in sites:
        planned = privacy["planned_epsilon"][site]
        assert 0 < planned <= 8.0 + 1e-6
        # planned from announced rows: the site's real split differs by a few rows, so close, not equal
        assert doc["epsilon"][site] == pytest.approx(planned, rel=0.1)
    stored = StateStore(state).run(doc["run_id"])["result"]
    assert stored["final"]["per_site"] == json.loads(json.dumps(doc["final"]["per_site"]))
    assert stored["privacy"]["planned_epsilon"] == privacy["planned_epsilon"]


@pytest.mark.broker
@pytest.mark.slow
def test_fedbus_site_run_processes_personalise_over_rabbitmq(tmp_path, amqp_url):
    """`fedbus coordinator run` and three `fedbus site run` daemons on the real broker."""
    import subprocess
    import sys

    from tests.site_worker.test_worker_process import SiteProcess

    fed = f"fed-{uuid.uuid4().hex[:8]}"
    _, state, sites, _, configs, tomls = start_sites(tmp_path, amqp_url, fed, in_process=False)
    bus = open_bus(amqp_url)
    procs = []
    try:
        bus.declare(Topology(sites=sites, federations=[fed]))  # `fedbus broker provision` in production
        procs = [SiteProcess(tomls[s]) for s in sites]
        for p in procs:
            p.wait_for("site_started", timeout=120)
        exp = personalised_experiment()
        exp_path = tmp_path / "exp.json"
        exp_path.write_text(json.dumps(exp))
        cmd = [sys.executable, "-m", "fedbus.cli", "coordinator", "run", str(exp_path), "--broker", amqp_url,
               "--state", str(state), "--key", str(tmp_path / "keys" / "coordinator.key"), "--federation", fed,
               "--json", "--no-progress", *[a for s in sites for a in ("--site", s)]]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        doc = json.loads(run.stdout.strip().splitlines()[-1])
        assert doc["status"] == "completed", doc.get("reason")
        # the plan is on the terminal before round 1, in the log, and in the result
        err = run.stderr
        assert "privacy plan: total ε ≤ 8 per site at δ = 1e-05 (rdp accountant)" in err
        assert err.index("privacy plan: total") < err.index("TrainTask") if "TrainTask" in err else True
        logged = [json.loads(line) for line in (state / "coordinator.log.jsonl").read_text().splitlines()
                  if '"privacy plan"' in line]
        assert logged and set(logged[0]["planned_epsilon"]) == set(sites)
        assert doc["privacy"]["planned_epsilon"] == logged[0]["planned_epsilon"]
        for p in procs:
            p.wait_for("personalized", timeout=60, run_id=doc["run_id"])
        check_personalised_run(doc, sites=sites, workers=None, configs=configs, exp=exp)
    finally:
        for p in procs:
            p.kill()
        bus.close()
