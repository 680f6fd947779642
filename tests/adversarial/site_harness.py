"""A malicious coordinator against a real site worker, over the in-memory bus or RabbitMQ.

The attacker holds the real coordinator key, so every frame it sends is a genuine,
signed ``TrainTask``/``EvalTask`` the site must verify and answer; what it controls is
everything a coordinator chooses: the experiment, the weights, the task seed, the
split asked for, the per-round overrides. The site is the production ``SiteWorker``
(in this process, so a test can also watch what it allocates), configured by a real
``site.toml``. After every attack ``still_serves`` sends an honest task: the site must
answer it with a normal, accounted update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protocol.config import load_experiment
from protocol.messages import EvalTask, TaskConfig, TrainTask, Update
from protocol.transport import open_bus
from site_worker.config import SiteConfig, load_site_config
from site_worker.daemon import SiteWorker
from site_worker.data import PreparedData, prepare
from site_worker.splits import SplitKey

from tests.site_worker.support import (
    TestCoordinator,
    experiment_dict,
    heart_failure_csv,
    initial_weights,
    make_keys,
    site_toml,
    uid,
)

DATASET = "heart_failure"
HONEST = {"training.epochs": 1}


class MaliciousCoordinator(TestCoordinator):
    """Signs whatever tasks the attacker wants with the coordinator's real key."""

    __test__ = False
    stale: "set[str] | frozenset[str]" = frozenset()  # task ids whose (late) answers send() skips

    def send(self, task: TrainTask | EvalTask, *, round: int = 1, timeout: float = 120.0) -> Any:
        env = self.task_envelope(task, round=round)
        self.publish(env)
        reply = self.reply(timeout=timeout)
        while reply.payload.task_id in self.stale:  # an answer to an earlier, fuzzed task: not this one's
            reply = self.reply(timeout=timeout)
        assert reply.payload.task_id == env.message_id, reply
        return reply.payload

    def train(self, exp: dict[str, Any], *, seed: int = 7, weights=None, config: dict[str, Any] | None = None,
              round: int = 1, dataset: str = DATASET) -> Any:  # type: ignore[override]
        task = TrainTask(experiment=exp, weights=weights if weights is not None else initial_weights(exp),
                         dataset=dataset, base_round=round - 1, seed=seed, deadline=time.time() + 600,
                         config=TaskConfig(**(config or {})))
        return self.send(task, round=round)

    def evaluate(self, exp: dict[str, Any], *, split: str = "test", weights=None, seed: int = 3,
                 round: int = 1, dataset: str = DATASET) -> Any:  # type: ignore[override]
        task = EvalTask(experiment=exp, weights=weights if weights is not None else initial_weights(exp),
                        dataset=dataset, base_round=round, seed=seed, deadline=time.time() + 600, split=split)
        return self.send(task, round=round)


@dataclass
class AttackedSite:
    coordinator: MaliciousCoordinator
    worker: SiteWorker
    config: SiteConfig
    tmp: Path

    @property
    def ledger(self):
        return self.worker.ledger

    def data(self, exp: dict[str, Any] | None = None) -> PreparedData:
        """The rows the site trains/validates/tests on (read from its own state dir, as its
        operator could; the coordinator never sees this)."""
        e = load_experiment(exp or experiment_dict(**HONEST))
        key = SplitKey.load_or_create(self.config.state_dir, test_fraction=self.config.policy.test_fraction)
        return prepare(self.config.datasets[DATASET], e.dataset, key=key, input_shape=(12,))

    def still_serves(self) -> Update:
        """After the attack: an honest DP task gets an accounted update."""
        reply = self.coordinator.train(experiment_dict(**HONEST), seed=101, round=99)
        assert isinstance(reply, Update), reply
        assert reply.epsilon is not None and reply.epsilon > 0 and reply.delta is not None
        return reply


def start_site(tmp: Path, bus_url: str, *, policy: dict[str, Any], extra: dict[str, Any] | None = None,
               state_dir: Path | None = None) -> AttackedSite:
    tmp.mkdir(parents=True, exist_ok=True)
    site_id, fed = uid("site"), uid("fed")
    keys = make_keys(tmp, site_id)
    csv = tmp / "hf.csv"
    if not csv.exists():
        heart_failure_csv(csv)
    more = dict(extra or {})
    if state_dir is not None:
        more["state_dir"] = str(state_dir)
    cfg = load_site_config(site_toml(tmp, site_id=site_id, federation=fed, broker_url=bus_url, keys=keys,
                                     datasets={DATASET: {"path": str(csv), "target": "DEATH_EVENT"}},
                                     policy=policy, extra=more))
    bus = open_bus(bus_url)
    coord = MaliciousCoordinator(bus, keys.coordinator, federation=fed, site_id=site_id, site_pub=keys.site_pub)
    worker = SiteWorker(cfg, bus=open_bus(bus_url))
    worker.start()
    return AttackedSite(coordinator=coord, worker=worker, config=cfg, tmp=tmp)


def stop_site(site: AttackedSite) -> None:
    site.worker.stop(grace_s=2)
    site.coordinator.close()
    site.coordinator.bus.close()
    site.worker.bus.close()


# The hospital's policy in these tests: deploy/site.toml's defaults, a generous budget.
POLICY = {"max_epsilon": 200.0, "max_steps_per_task": 1000}


@pytest.fixture
def attack(tmp_path, bus_url):
    """``attack(**policy)``: a real site (in-memory bus and RabbitMQ) with deploy/site.toml's
    defaults plus ``POLICY`` and the given policy settings; stopped after the test."""
    sites: list[AttackedSite] = []

    def start(**policy: Any) -> AttackedSite:
        site = start_site(tmp_path / f"site{len(sites)}", bus_url, policy={**POLICY, **policy})
        sites.append(site)
        return site

    yield start
    for site in sites:
        stop_site(site)
