"""Sites that answer instantly: the coordinator's and the bus's cost with training taken out.

An echo site verifies each task with the coordinator's key (production codec and
signing), answers a ``TrainTask`` with ``weights + 0.001`` and an ``EvalTask`` with fixed
metrics, signs the reply with its own enrolled key and publishes it with confirms, then
acks the task: the same wire work a real site does, minus the training. Like a real site it
first says hello (a signed ``SiteHello`` announcing ``rows`` rows of the run's dataset): the
coordinator bounds every reported count by the announced rows and dead-letters updates from a
site it never heard from (``num_examples_bound``). Used by
``bench/scale.py`` where hundreds of sites or 50 M-parameter models make real training
impossible on a laptop.

``python -m bench._echo_sites ...`` runs one echo site as its own process (``run_process``), as
deployed sites run (each on its own machine): the model sweep starts one per site, so their
hashing, signing and publishing no longer share one interpreter's GIL. The in-memory sweep keeps
them in its process (one in-memory bus).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.codec import new_envelope, open_frame, seal
from protocol.messages import DatasetInfo, EvalResult, EvalTask, SiteHello, TrainTask, Update
from protocol.model_blob import MODEL_CHUNK_HEADER
from protocol.signing import Signer, TrustStore
from protocol.transport.base import Bus, Delivery
from protocol.transport.topology import CONTROL, UPDATES, site_queue
from site_worker.model_cache import ModelCache

EVAL_METRICS = {"loss": 0.5, "accuracy": 0.8, "auc": 0.8, "f1": 0.5, "n": 50.0}
NUM_EXAMPLES = 100  # what each Update claims; the hello announces ROWS >= every count reported
ROWS = 1000


def _plus(w: Any, delta: float) -> np.ndarray:
    """``w + delta``, in place where ``w`` is writable (a model resolved from the site's cache is its
    own buffer, as a real site's optimizer updates its parameters in place); else a new array."""
    a = np.asarray(w)
    if a.flags.writeable:
        a += np.asarray(delta, dtype=a.dtype)
        return a
    return a + np.asarray(delta, dtype=a.dtype)


class EchoSite:
    """One instant-answer site on ``bus`` (which it owns: one connection per site on AMQP)."""

    def __init__(self, bus: Bus, *, site_id: str, signer: Signer, federation: str, coordinator_pub: bytes,
                 dataset: str = "heart_failure", rows: int = ROWS, state_dir: Path | None = None) -> None:
        self.bus = bus
        # Models published by hash (coordinator/models.py) land in this cache, as on a real site.
        self.models = ModelCache(state_dir or Path(tempfile.mkdtemp(prefix=f"echo-{site_id}-")))
        self.dataset = dataset
        self.rows = rows
        self.site_id = site_id
        self.signer = signer
        self.federation = federation
        self.trust = TrustStore()
        self.trust.add("coordinator", coordinator_pub)
        self.answered = 0
        # Wall-clock stamps (time.time(), comparable with the coordinator's log) of each model chunk
        # stored and of each task's steps: where a round's time goes (bench/scale.py --logs).
        self.chunk_times: list[float] = []
        self.timeline: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self._consumer: Any = None

    def start(self) -> None:
        self._consumer = self.bus.consume(site_queue(self.site_id), self._on_task, prefetch=1)
        self.say_hello()

    def say_hello(self) -> None:
        """Announce ``rows`` rows of ``dataset`` (metadata only), as ``site_worker`` does at start."""
        info = DatasetInfo(name=self.dataset, rows=self.rows, columns=("x", "y"),
                           feature_types={"x": "numeric"}, target="y")
        env = new_envelope(SiteHello(site_id=self.site_id, software_version="echo", datasets=(info,)),
                           federation=self.federation, run_id="", round=0, sender=self.site_id,
                           recipient="coordinator")
        self.bus.publish(CONTROL, self.federation, seal(env, self.signer), message_id=env.message_id)

    def _on_task(self, d: Delivery) -> None:
        claimed = (d.headers or {}).get(MODEL_CHUNK_HEADER)
        if claimed is not None:  # a chunk of a published model: verified, stored, acked (site_worker.daemon)
            self.models.put(claimed, d.body)
            d.ack()
            self.chunk_times.append(time.time())
            return
        stamps = {"task": time.time()}
        env = open_frame(d.body, self.trust).envelope
        p = env.payload
        if isinstance(p, (TrainTask, EvalTask)) and p.model_sha256:
            p = dataclasses.replace(p, weights=self.models.resolve(p))
        stamps["opened"] = time.time()
        reply: Any
        if isinstance(p, TrainTask):
            weights = tuple((n, _plus(w, 0.001)) for n, w in p.weights)
            reply = Update(task_id=env.message_id, weights=weights, num_examples=NUM_EXAMPLES,
                           metrics={"train_s": 0.0, "after_loss": 0.5, "after_accuracy": 0.8, "n_val": 20.0},
                           epsilon=None, delta=None, base_round=p.base_round)
        elif isinstance(p, EvalTask):
            reply = EvalResult(task_id=env.message_id, num_examples=50, metrics=dict(EVAL_METRICS),
                               base_round=p.base_round)
        else:
            d.ack()
            return
        out = new_envelope(reply, federation=self.federation, run_id=env.run_id, round=env.round,
                           sender=self.site_id, recipient="coordinator")
        stamps["answered"] = time.time()
        frame = seal(out, self.signer)
        stamps["sealed"] = time.time()
        del reply, p, env
        d.release_body()
        self.bus.publish(UPDATES, self.federation, frame, message_id=out.message_id)
        d.ack()
        stamps["published"] = time.time()
        with self._lock:
            self.answered += 1
            self.timeline.append(stamps)

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()


def make_keys(keys_dir: Path, site_ids: list[str]) -> dict[str, Signer]:
    """A fresh Ed25519 key per site (written as production writes them)."""
    from protocol.signing import generate_keypair

    return {s: Signer.from_file(generate_keypair(s, keys_dir)[0]) for s in site_ids}


def run_process(argv: list[str] | None = None) -> int:
    """One echo site until SIGTERM; prints ``ready`` once it consumes and has said hello, and writes
    its timeline (``chunk_times``, ``timeline``, ``answered``) as JSON to ``--timeline`` at exit."""
    ap = argparse.ArgumentParser(description="one echo site (bench/scale.py's model sweep)")
    for name in ("--url", "--site-id", "--key", "--federation", "--coordinator-pub", "--dataset", "--state",
                 "--timeline"):
        ap.add_argument(name, required=True)
    args = ap.parse_args(argv)
    from protocol.transport import open_bus

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    site = EchoSite(open_bus(args.url), site_id=args.site_id, signer=Signer.from_file(Path(args.key)),
                    federation=args.federation, coordinator_pub=Path(args.coordinator_pub).read_bytes(),
                    dataset=args.dataset, state_dir=Path(args.state))
    site.start()
    print("ready", flush=True)
    while not stop.wait(0.5):
        pass
    site.stop()
    site.bus.close()
    Path(args.timeline).write_text(json.dumps({"chunks": site.chunk_times, "tasks": site.timeline,
                                               "answered": site.answered}))
    return 0


class EchoProcess:
    """``run_process`` in a child process, seen from the bench (``stop`` returns its timeline)."""

    def __init__(self, *, url: str, site_id: str, key: Path, federation: str, coordinator_pub: Path, dataset: str,
                 root: Path, env: dict[str, str], cwd: Path, ready_timeout_s: float = 120.0) -> None:
        self.site_id = site_id
        root.mkdir(parents=True, exist_ok=True)
        self.timeline_path = root / f"{site_id}.timeline.json"
        self.log_path = root / f"{site_id}.log"
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench._echo_sites", "--url", url, "--site-id", site_id, "--key", str(key),
                 "--federation", federation, "--coordinator-pub", str(coordinator_pub), "--dataset", dataset,
                 "--state", str(root / site_id), "--timeline", str(self.timeline_path)],
                cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self._ready_timeout_s = ready_timeout_s

    def wait_ready(self) -> None:
        """Block until the site consumes and said hello (its first line); raise with its log if it died."""
        ready = threading.Event()

        def read() -> None:  # log lines may come first: wait for "ready" or the end of its output
            for line in self.proc.stdout or ():
                if line.strip() == "ready":
                    ready.set()
                    return

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self._ready_timeout_s):
            self.proc.kill()
            raise RuntimeError(f"echo site {self.site_id} did not start:\n"
                               f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, and the site's timeline (empty if it wrote none)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            return dict(json.loads(self.timeline_path.read_text()))
        except (OSError, ValueError):
            return {"chunks": [], "tasks": [], "answered": 0}


if __name__ == "__main__":
    sys.exit(run_process())
