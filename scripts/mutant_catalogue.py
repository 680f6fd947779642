"""The curated semantic mutants of ``make mutants``: one broken guarantee each, and who must notice.

Each mutant is a list of exact text replacements ``(file, old, new)``; ``old`` must occur
exactly once in ``file``, otherwise the mutant is *stale* (the code moved and the mutant
no longer plants the bug it names) and ``make mutants`` fails loudly instead of passing.
``tests`` are the pytest node ids that must fail with the mutant in place; ``marks`` narrows
them (``"not broker"`` proves the in-memory suite alone catches it). ``broker`` mutants need
RabbitMQ; ``private_broker`` ones restart the broker and run only against a node the runner
may restart (``--private-broker``), never the shared one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` (which must occur exactly once) with ``new`` in ``file``."""

    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    marks: str | None = None
    broker: bool = False
    private_broker: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


RUN = "coordinator/run.py"
HANDLERS = "site_worker/handlers.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ wire protocol
    Mutant(
        "signature-not-verified", "an Ed25519 signature that does not verify is refused",
        (Edit("protocol/signing.py", "            key.verify(bytes(sig), body)\n", "            pass\n"),),
        ("tests/protocol/test_signing.py", "tests/protocol/test_codec.py"),
    ),
    Mutant(
        "replay-seen-check-off", "a site's replay guard refuses a message id it has handled",
        (Edit("protocol/replay.py", "        if self.seen(env.message_id):\n", "        if False:\n"),),
        ("tests/protocol/test_replay.py",),
    ),
    Mutant(
        "chunk-hash-not-checked", "a reassembled body whose sha256 differs is refused",
        (Edit("protocol/chunking.py", "    if got != digest:\n", "    if False:\n"),),
        ("tests/protocol/test_chunking.py",),
    ),
    Mutant(
        "dead-letter-reason-dropped-memory", "a rejected frame waits in fedbus.dead with its reason (memory bus)",
        (Edit("protocol/transport/memory.py", "REASON_HEADER: reason or \"\",", "REASON_HEADER: \"\","),),
        ("tests/transport/test_memory.py", "tests/transport/test_conformance.py"), marks="not broker",
    ),
    Mutant(
        "dead-letter-reason-dropped-amqp", "a rejected frame waits in fedbus.dead with its reason (RabbitMQ)",
        (Edit("protocol/transport/amqp.py", "dl_headers = {**headers, REASON_HEADER: reason, ",
              "dl_headers = {**headers, REASON_HEADER: \"\", "),),
        ("tests/transport/test_conformance.py",), marks="broker", broker=True,
    ),
    # ------------------------------------------------------------------ coordinator: counting
    Mutant(
        "coord-message-id-dedup-removed", "a message id the coordinator already holds or committed is not counted again",
        (Edit(RUN, "        if mid in held:\n", "        if False:\n"),
         Edit(RUN, "        if self.store.accepted_message(mid):\n", "        if False:\n")),
        ("tests/coordinator/test_run_memory.py", "tests/coordinator/test_at_least_once_memory.py"), marks="not broker",
    ),
    Mutant(
        "coord-duplicate-answer-counted", "a site's second answer in a round is ignored",
        (Edit(RUN, "        if site in accepted or site in replied:\n", "        if False:\n"),),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "ack-before-commit", "an update is acked only once the round that includes it is committed",
        (Edit(RUN, "        delivery.release_body()  # held until the commit: keep its tag, not its bytes\n",
              "        delivery.ack()\n        delivery.release_body()\n"),
         Edit(RUN, "        for h in held.values():  # only now is every held update's effect durable\n"
                   "            h.delivery.ack()\n",
              "        for h in held.values():\n            pass\n")),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "late-update-counted", "an update for a closed round is logged and dropped, never aggregated",
        (Edit(RUN, "                self._settle(delivery, opened, verdict=\"late\", reason=f\"for round {env.round}, now in round {rnd}\", round=rnd)\n",
              "                self.agg.add(Contribution(site=site, weights=p.weights, num_examples=p.num_examples,\n"
              "                                          base_round=p.base_round, metrics=dict(p.metrics)))\n"
              "                self._settle(delivery, opened, verdict=\"late\", reason=f\"for round {env.round}, now in round {rnd}\", round=rnd)\n"),),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "resume-reruns-last-round", "--resume continues after the last committed round",
        (Edit(RUN, "        return weights, int(last[\"round\"]) + 1\n", "        return weights, int(last[\"round\"])\n"),),
        ("tests/coordinator/test_run_memory.py",), marks="not broker",
    ),
    # ------------------------------------------------------------------ aggregation
    Mutant(
        "fedavg-equal-weights", "FedAvg weighs each update by its num_examples",
        (Edit("coordinator/aggregators/fedavg.py", "self._sum.add(contribution.weights, float(contribution.num_examples))",
              "self._sum.add(contribution.weights, 1.0)"),),
        ("tests/coordinator/test_aggregators.py", "tests/coordinator/test_run_memory.py"),
    ),
    Mutant(
        "staleness-constant", "FedAsync/FedBuff discount an update by its staleness s(tau)",
        (Edit("coordinator/aggregators/staleness.py", "        if self.kind == \"constant\":\n", "        if True:\n"),),
        ("tests/coordinator/test_aggregators.py",),
    ),
    Mutant(
        "flower-num-examples-1", "Flower strategies see each site's real num_examples",
        (Edit("coordinator/aggregators/flower.py", "            num_examples=int(c.num_examples),\n",
              "            num_examples=1,\n"),),
        ("tests/coordinator/test_flower_adapter.py",),
    ),
    # ------------------------------------------------------------------ site privacy
    Mutant(
        "ledger-ignores-history", "each release is charged on top of everything the dataset spent before",
        (Edit(HANDLERS, "            history = self.ledger.history(task.dataset)\n", "            history = []\n"),),
        ("tests/site_worker/test_ledger_accumulates.py",), marks="not broker",
    ),
    Mutant(
        "budget-check-after-training", "a task over max_epsilon is declined before any training",
        (Edit(HANDLERS, "            if cap is not None and projected > cap:\n", "            if False:\n"),
         Edit(HANDLERS, "            self.ledger.record(task.dataset, result.history, task_id=env.message_id)\n",
              "            self.ledger.record(task.dataset, result.history, task_id=env.message_id)\n"
              "            if cap is not None and result.epsilon > cap:\n"
              "                raise _Decline(\"budget\", \"over max_epsilon\", {\"epsilon_spent\": spent, \"max_epsilon\": cap,\n"
              "                                         \"epsilon_projected\": result.epsilon, \"delta\": plan.delta})\n")),
        ("tests/site_worker/test_ledger_accumulates.py", "tests/site_worker/test_worker_memory.py"), marks="not broker",
    ),
    Mutant(
        "median-imputation-zero", "a missing value is imputed with the training rows' median",
        (Edit("site_worker/data.py", "        med = np.nanmedian(train) if np.any(~np.isnan(train)) else 0.0\n",
              "        med = 0.0\n"),),
        ("tests/site_worker/test_data.py",),
    ),
]

# ---------------------------------------------------------------------- the chaos harness itself
# A fault test must prove its fault happened: with the faults turned into no-ops, the test fails.
MUTANTS.append(Mutant(
    "chaos-broker-faults-noop", "the chaos test's broker restart and forced close really happen, mid-round",
    (Edit("tests/chaos/harness.py", '        rabbitmqctl("close_all_connections", "-p", self.vhost, reason)\n',
          "        return None\n"),
     Edit("tests/chaos/harness.py", '        rabbitmqctl("stop_app")\n        rabbitmqctl("start_app")\n',
          "        return None\n")),
    ("tests/chaos/test_chaos.py::test_broker_restart_and_forced_connection_close_mid_round",),
    broker=True, private_broker=True,
))
