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
    timeout_s: float | None = None  # overrides the runner's per-mutant timeout (chaos tests are slow)
    tags: tuple[str, ...] = field(default_factory=tuple)


RUN = "coordinator/run.py"
INBOX = "coordinator/inbox.py"
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
        (Edit("protocol/transport/consumer.py", "dl_headers = {**headers, REASON_HEADER: reason, ",
              "dl_headers = {**headers, REASON_HEADER: \"\", "),),
        ("tests/transport/test_conformance.py",), marks="broker", broker=True,
    ),
    Mutant(
        "broker-cancel-resubscribes-at-once", "a consumer the broker cancels waits for its queue to be back, "
        "then consumes again on the same channel (nothing lost, nothing done twice)",
        (Edit("protocol/transport/consumer.py",
              "        while not self._stop.is_set() and time.monotonic() < deadline and not self._queue_exists():\n",
              "        while False:\n"),),
        ("tests/transport/test_consumer_cancel.py",), broker=True,
    ),
    Mutant(
        "connect-budget-per-node", "a broker never reached fails in connect_timeout_s, however many nodes and "
        "addresses it has and however they fail (silent, black-holed, DNS)",
        (Edit("protocol/transport/connector.py",
              "            return limit if deadline is None else min(limit, max(_MIN_ATTEMPT_S, deadline - time.monotonic()))\n",
              "            return limit\n"),
         Edit("protocol/transport/connector.py",
              "            if left is not None and left <= 0 and last is not None:\n",
              "            if False:\n")),
        ("tests/transport/test_connect_path.py::test_a_silent_cluster_fails_in_the_connect_timeout_not_per_node",
         "tests/transport/test_connect_path.py::test_a_resolver_that_never_answers_fails_in_the_connect_timeout"),
    ),
    Mutant(
        "site-warms-up-before-the-broker-check", "a site daemon learns that its broker is absent before it pays for "
        "torch and its warm-up (exit 1 in ~10 s whatever the load)",
        (Edit("fedbus/cli_site.py", "            reach(cfg.broker_url, tls=cfg.tls)  # before torch's imports: an absent broker fails in 10 s\n",
              "            pass\n"),),
        ("tests/transport/test_connect_path.py::test_site_on_a_dead_broker_exits_1_before_its_warm_up",),
    ),
    Mutant(
        "coordinator-starts-up-before-the-broker-check", "a coordinator learns that its broker is absent before "
        "it pays for torch and its start-up (exit 1 in ~10 s whatever the load)",
        (Edit("fedbus/cli_coordinator_run.py", "                reach(broker, tls=tls)\n", "                pass\n"),),
        ("tests/transport/test_connect_path.py::test_coordinator_on_a_dead_broker_exits_1_with_one_line",),
    ),
    Mutant(
        "coordinator-dead-broker-retry-chatter", "a coordinator on a broker that is not there says so in one line, "
        "not in its start-up check's retries",
        (Edit("fedbus/cli_coordinator_run.py", "        configure_logging(\"cli\", level=\"warning\")\n",
              "        configure_logging(\"cli\")\n"),),
        ("tests/transport/test_connect_path.py::test_coordinator_on_a_dead_broker_exits_1_with_one_line",),
    ),
    # ------------------------------------------------------------------ coordinator: counting
    Mutant(
        "coord-message-id-dedup-removed", "a message id the coordinator already holds or committed is not counted again",
        (Edit(INBOX, "        if mid in held:\n", "        if False:\n"),
         Edit(INBOX, "        if self.store.accepted_message(mid):\n", "        if False:\n")),
        ("tests/coordinator/test_run_memory.py", "tests/coordinator/test_at_least_once_memory.py"), marks="not broker",
    ),
    Mutant(
        "coord-duplicate-answer-counted", "a site's second answer in a round is ignored",
        (Edit(RUN, "        if site in accepted or site in replied:\n", "        if False:\n"),),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "async-duplicate-task-merged", "FedAsync merges one answer per task; a second answer is settled as a duplicate",
        (Edit(RUN, "            if any(h.row.task_id == p.task_id for h in held.values()) or "
                   "self.store.task_answered(self.run_id, p.task_id):\n", "            if False:\n"),),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "ack-before-commit", "an update is acked only once the round that includes it is committed",
        (Edit(INBOX, "        msg.delivery.release_body()  # acked by the commit that includes it, not before\n",
              "        msg.delivery.ack()\n        msg.delivery.release_body()\n"),
         Edit(RUN, "        for h in held.values():  # only now is every held update's effect durable\n"
                   "            h.delivery.ack()\n",
              "        for h in held.values():\n            pass\n")),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "late-update-counted", "an update for a closed round is logged and dropped, never aggregated",
        (Edit(RUN, "                    return self.inbox.settle(msg, verdict=\"late\", reason=f\"for round {env.round}, now in round {rnd}\",\n",
              "                    from coordinator.aggregators import Contribution\n"
              "                    self.agg.add(Contribution(site=site, weights=p.weights, num_examples=p.num_examples,\n"
              "                                              base_round=p.base_round, metrics=dict(p.metrics)))\n"
              "                    return self.inbox.settle(msg, verdict=\"late\", reason=f\"for round {env.round}, now in round {rnd}\",\n"),),
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
        (Edit("site_worker/ledger.py", "            history = merge([e for r in rel for e in r[\"entries\"]])\n            spent =",
              "            history = []\n            spent ="),),
        ("tests/site_worker/test_ledger_accumulates.py", "tests/adversarial/test_coordinator_attacks_site.py"), marks="not broker",
    ),
    Mutant(
        "budget-check-after-training", "a task over max_epsilon is declined before any training",
        (Edit(HANDLERS, "            epsilon = self._reserve(task.dataset, env, kind=\"train\", entries=entries, delta=plan.delta)\n"
                        "        try:\n",
              "            pass\n        try:\n"),
         Edit(HANDLERS, "        after = release_metrics(result.model,",
              "        if plan is not None:\n"
              "            epsilon = self._reserve(task.dataset, env, kind=\"train\", entries=entries, delta=plan.delta)\n"
              "        after = release_metrics(result.model,")),
        ("tests/site_worker/test_ledger_accumulates.py", "tests/site_worker/test_worker_memory.py"), marks="not broker",
    ),
    Mutant(
        "median-imputation-zero", "a missing value is imputed with the training rows' median",
        (Edit("site_worker/data.py", "        med = np.nanmedian(train) if np.any(~np.isnan(train)) else 0.0\n",
              "        med = 0.0\n"),),
        ("tests/site_worker/test_data.py",),
    ),
    Mutant(
        "fixed-scaling-site-fitted", "a column with a fixed dataset.scaling is standardised with those public numbers, not the site's own",
        (Edit("site_worker/data.py", "        if cols[0] in fixed:\n", "        if False:\n"),),
        ("tests/site_worker/test_data.py::test_fixed_scaling_reads_a_value_the_same_way_at_every_site",),
    ),
    Mutant(
        "personalize-keeps-last-epoch", "personalisation keeps the checkpoint with the lowest validation loss",
        (Edit("site_worker/personalize.py",
              "    kept = select_checkpoint(model, checkpoints, data, loss_name=spec.loss) if p.select == \"validation\" else None\n",
              "    kept = None\n"),),
        ("tests/site_worker/test_personalize.py",),
    ),
]

# ---------------------------------------------------------------------- issue 10: nobody trusted with another's bounds
MUTANTS += [
    Mutant(
        "site-noise-seeded-from-task", "a site's DP noise is secret, never derived from what the coordinator sent",
        (Edit("site_worker/dp.py", "    return SecureRandom.secret()\n",
              "    return SecureRandom.reproducible_from(0, task_seed, purpose)\n"),),
        ("tests/site_worker/test_site_owns_dp.py", "tests/adversarial/test_coordinator_attacks_site.py"), marks="not broker",
    ),
    Mutant(
        "trainer-noise-seeded-from-task", "the trainer's default DP randomness is secret, not the task seed",
        (Edit("site_worker/trainer.py", "rng = rng or SecureRandom.secret()",
              "rng = rng or SecureRandom.reproducible_from(0, spec.seed, \"train\")"),),
        ("tests/site_worker/test_training.py",),
    ),
    Mutant(
        "delta-from-experiment", "epsilon is accounted at the site's delta, not the one the experiment asks for",
        (Edit("site_worker/dp.py", "plan = plan_dp(spec, n_train, delta=delta, accountant=policy.accountant,",
              "plan = plan_dp(spec, n_train, delta=None, accountant=policy.accountant,"),),
        ("tests/site_worker/test_site_owns_dp.py", "tests/adversarial/test_coordinator_attacks_site.py"), marks="not broker",
    ),
    Mutant(
        "min-noise-unchecked", "a task whose planned noise (e.g. derived from a target epsilon) is below min_noise_multiplier is declined",
        (Edit("site_worker/dp.py", "    if plan.noise_multiplier < policy.min_noise_multiplier:\n", "    if False:\n"),),
        ("tests/site_worker/test_site_owns_dp.py", "tests/adversarial/test_coordinator_attacks_site.py"), marks="not broker",
    ),
    Mutant(
        "num-examples-unbounded", "a site's num_examples is capped by the rows its SiteHello announced",
        (Edit(INBOX, "        if p.num_examples > rows:\n", "        if False:\n"),),
        ("tests/adversarial/test_malicious_site.py",), marks="not broker",
    ),
    Mutant(
        "message-id-not-validated", "a message id is exactly a uuid4 hex (it can never name a path)",
        (Edit("protocol/codec.py", "    if not _MESSAGE_ID.fullmatch(message_id):\n", "    if False:\n"),),
        ("tests/protocol/test_codec.py", "tests/adversarial/test_malicious_site.py"), marks="not broker",
    ),
    Mutant(
        "central-dp-noise-without-secret", "central DP noise is keyed by the coordinator's secret, not public data",
        (Edit("coordinator/aggregators/central_dp.py",
              "key = hmac.new(self._secret, f\"fedbus-central-dp:{self.context}:{server_round}\".encode(), hashlib.sha256)",
              "key = hmac.new(b\"public\", f\"fedbus-central-dp:{self.context}:{server_round}\".encode(), hashlib.sha256)"),),
        ("tests/coordinator/test_central_dp_secret.py", "tests/adversarial/test_central_dp.py"), marks="not broker",
    ),
    Mutant(
        "round-test-ignores-eval-cap", "a per-round test is not asked of a site whose max_evaluations_per_run "
        "leaves room only for the final test",
        (Edit(RUN, "            if isinstance(cap, int) and used[site] + 2 > cap:", "            if False:"),),
        ("tests/coordinator/test_round_test_eval.py",), marks="not broker",
    ),
    # ------------------------------------------------------------------ final model / personalisation
    Mutant(
        "personalize-any-run", "a site personalises only the final model of a run it trained in (no fresh budget)",
        (Edit(HANDLERS, "        last = self.joined.last_round(env.run_id, task.dataset)\n",
              "        last = self.joined.last_round(env.run_id, task.dataset) or 0\n"),),
        ("tests/adversarial/test_coordinator_attacks_final.py",), marks="not broker",
    ),
    Mutant(
        "personalize-twice-per-run", "one personalisation per run: a fresh task id for the same run is declined",
        (Edit(HANDLERS, "        done = self.finals.reply(env.run_id, task.dataset)\n", "        done = None\n"),),
        ("tests/adversarial/test_coordinator_attacks_final.py",), marks="not broker",
    ),
    Mutant(
        "personalize-decline-keeps-metrics-charge", "a declined fine-tune releases nothing and charges nothing",
        (Edit(HANDLERS, "            self.ledger.cancel(task.dataset, env.message_id)  # no metrics left the site\n",
              "            pass\n"),),
        ("tests/adversarial/test_coordinator_attacks_final.py",), marks="not broker",
    ),
    Mutant(
        "personalize-epochs-unbounded", "the fine-tune after the rounds is bounded by the site's max_epochs",
        (Edit(HANDLERS, "                check_epochs(policy, int(exp.training.personalization.epochs))\n",
              "                pass\n"),),
        ("tests/adversarial/test_coordinator_attacks_final.py",), marks="not broker",
    ),
    Mutant(
        "final-release-two-mechanisms", "the two final models' test metrics are one release (joint sensitivity)",
        (Edit("site_worker/final_model.py", "    sens = math.sqrt(sum(s * s for _, _, s in parts))\n",
              "    sens = max(s for _, _, s in parts)\n"),),
        ("tests/site_worker/test_final_release.py",), marks="not broker",
    ),
    Mutant(
        "dp-one-class-unflagged", "under metrics = dp a model whose noisy counts show one predicted class is flagged (an estimate)",
        (Edit("site_worker/final_model.py", "    if near[0] != near[1]:\n", "    if False:\n"),),
        ("tests/site_worker/test_final_release.py::test_dp_release_estimates_a_one_class_model_from_the_noisy_counts",
         "tests/simulator/test_report.py::test_a_dp_estimate_of_a_one_class_model_reaches_the_report_and_the_tables"),
    ),
    Mutant(
        "dp-counts-above-announced-rows", "a DP release never counts more rows than the site announced (else the coordinator drops an honest, charged reply)",
        (Edit("site_worker/release.py", "    return {k: (float(min(v, rows)) if k == \"n\" else v) for k, v in metrics.items()}\n",
              "    return dict(metrics)\n"),),
        ("tests/site_worker/test_site_owns_dp.py::test_a_noisy_row_count_is_never_released_above_the_rows_the_site_announced",),
    ),
    # ------------------------------------------------------------------ the run's privacy plan
    Mutant(
        "plan-fine-tune-at-the-rounds-noise", "without total_epsilon the plan gives the fine-tune the noise the site solves for it",
        (Edit("site_worker/run_budget.py",
              "            tune_sigma = plan_dp(tune, n_train, delta=delta, accountant=accountant).noise_multiplier\n",
              "            tune_sigma = sigma\n"),),
        ("tests/coordinator/test_privacy_plan_modes.py::test_target_epsilon_per_task_plans_the_fine_tune_at_its_own_noise",),
    ),
    Mutant(
        "plan-test-evaluations-uncounted", "the plan (and a run budget's noise) counts the test releases of federated.test_every",
        (Edit("site_worker/run_budget.py", "    tests = tuple(e for _ in range(test_rounds(experiment)) for e in one)\n",
              "    tests = ()\n"),),
        ("tests/site_worker/test_run_budget.py::test_periodic_test_evaluations_are_in_the_plan_and_in_each_tasks_noise",
         "tests/coordinator/test_privacy_plan_modes.py::test_noise_multiplier_run_spends_exactly_its_plan"),
    ),
    Mutant(
        "plan-ignores-site-policy", "a plan says a site declines where its policy refuses a task, instead of a figure",
        (Edit("site_worker/run_budget.py",
              "    site_plan(policy, spec, n_train=n_train, rows=rows, noise_multiplier=plan.noise_multiplier if fixed else None)\n",
              "    pass\n"),),
        ("tests/coordinator/test_privacy_plan_modes.py::test_plan_and_its_lines_without_total_epsilon",),
    ),
    Mutant(
        "plan-bound-unlabelled", "a sampled run's plan says it is an upper bound (it counts every round at every site)",
        (Edit("coordinator/privacy_plan.py", "    if not sampled:\n        return None\n", "    return None\n"),),
        ("tests/coordinator/test_privacy_plan_modes.py::test_a_sampled_run_says_its_plan_is_an_upper_bound",),
    ),
    # ------------------------------------------------------------------ dashboard: results that say what they are
    Mutant(
        "dashboard-holdout-shown-as-test", "the dashboard's \"test\" is the sites' fixed test splits, never the simulator's held-out rows",
        (Edit("fedbus/dashboard/views.py", '        "test": _pick(test) if test else None,\n',
              '        "test": _pick(test) if test else _pick(holdout) if isinstance(holdout, dict) else None,\n'),),
        ("tests/dashboard/test_api.py::test_held_out_rows_are_labelled_held_out_and_never_test",),
    ),
    Mutant(
        "dashboard-one-class-unflagged", "the run page warns where a site's model predicts one class",
        (Edit("fedbus/dashboard/results.py", "    if not isinstance(m, dict):\n        return None\n", "    return None\n"),),
        ("tests/dashboard/test_api.py::test_a_site_whose_model_predicts_one_class_is_flagged",),
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
    broker=True, private_broker=True, timeout_s=900.0,
))

# ---------------------------------------------------------------------- wire: bounds per field and chunks (issue 20, 3 and 5)
_BOUNDS = "tests/protocol/test_bounds.py"
_FUZZ = "tests/adversarial/test_wire_fuzz.py"
MUTANTS.extend([
    Mutant(
        "wire-bounds-unchecked", "every wire field's value is checked against protocol/bounds.py at decode",
        (Edit("protocol/codec.py",
              '        bounds.check(cls.__name__, name, kwargs[name], f"{path}.{name}")  # the value, before any handler\n',
              ""),),
        (f"{_BOUNDS}::test_the_minus_inf_policy_is_out_of_bounds_with_its_path",
         f"{_FUZZ}::test_minus_inf_hello_is_refused_and_the_run_and_its_resume_complete[memory]"),
    ),
    Mutant(
        "plan-raises-on-bad-policy", "one site's announced policy can never stop the privacy plan (or a --resume)",
        (Edit("coordinator/privacy_plan.py",
              "        except Exception as e:  # noqa: BLE001 - one site's summary (its word) must never stop the run or its resume\n",
              "        except (TypeError, ValueError) as e:\n"),),
        (f"{_FUZZ}::test_a_stored_hello_the_plan_cannot_use_does_not_stop_the_plan",),
    ),
    Mutant(
        "count-metrics-unbounded", "n, n_val, personalized_n are bounded by the rows the site announced",
        (Edit(INBOX, "            if v is not None and v > rows:\n", "            if False:\n"),),
        (f"{_FUZZ}::test_n_val_is_bounded_by_the_rows_the_site_announced[memory-101.0-count_bound:]",),
    ),
    Mutant(
        "chunk-count-unchecked", "a chunk count must fit total_size (total_size=0 with 65,535 chunks is refused)",
        (Edit("protocol/chunking.py", "    if count > max(1, total):\n", "    if False:\n"),),
        (f"{_BOUNDS}::test_count_must_match_total_size",
         f"{_FUZZ}::test_empty_chunk_jam_is_refused_while_an_honest_round_completes[memory]"),
    ),
    Mutant(
        "chunk-window-for-bogus-header", "a consumer opens prefetch room only for a valid transfer within its user's cap",
        (Edit("protocol/chunking.py", "    except ChunkError:\n        return 1\n",
              "    except ChunkError:\n        return int(header.get(\"count\", 1))\n"),),
        (f"{_BOUNDS}::test_count_must_match_total_size",),
    ),
    Mutant(
        "empty-chunk-accepted", "zero-length chunks are refused (only an empty body is one empty chunk)",
        (Edit("protocol/chunking.py", "        if size == 0 and total > 0:\n", "        if False:\n"),),
        (f"{_BOUNDS}::test_zero_length_chunks_are_refused_and_an_empty_body_still_travels",),
    ),
    Mutant(
        "chunk-size-unchecked", "every chunk but the last has one size and the count matches it",
        (Edit("protocol/chunking.py",
              "            t.chunk_size = _chunk_size(t.chunk_size, index=index, count=count, total=total, size=size)\n",
              "            pass\n"),),
        (f"{_BOUNDS}::test_every_chunk_but_the_last_has_one_size",),
    ),
    Mutant(
        "user-chunk-cap-off", "chunks in progress per broker user are capped (max_user_chunks)",
        (Edit("protocol/chunking.py", "        if my_chunks + count > self.max_user_chunks:\n", "        if False:\n"),),
        (f"{_BOUNDS}::test_user_chunk_cap_at_its_edge_with_the_global_cap_relaxed",),
    ),
])
