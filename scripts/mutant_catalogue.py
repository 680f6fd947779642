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


RUN = "coordinator/run.py"  # the orchestrator: create or resume a run (issue 21)
SYNC = "coordinator/rounds/sync.py"  # issue 21 moved the round loop out of run.py into coordinator/rounds/
ASYNC = "coordinator/rounds/asynchronous.py"
CONTEXT = "coordinator/rounds/context.py"
EVALUATION = "coordinator/rounds/evaluation.py"
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
        (Edit("fedbus/cli_coordinator_run.py", "                reach(fed.broker, tls=fed.tls)\n", "                pass\n"),),
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
        (Edit(SYNC, "        if site in accepted or site in replied:\n", "        if False:\n"),),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "async-duplicate-task-merged", "FedAsync merges one answer per task; a second answer is settled as a duplicate",
        (Edit("coordinator/rounds/answers.py", "    if any(h.row.task_id == p.task_id for h in held.values()) or "
                     "ctx.store.task_answered(ctx.run_id, p.task_id):\n", "    if False:\n"),),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "ack-before-commit", "an update is acked only once the round that includes it is committed",
        (Edit(INBOX, "        msg.delivery.release_body()  # acked by the commit that includes it, not before\n",
              "        msg.delivery.ack()\n        msg.delivery.release_body()\n"),
         Edit(CONTEXT, "        for h in held.values():  # only now is every held update's effect durable\n"
                   "            h.delivery.ack()\n",
              "        for h in held.values():\n            pass\n")),
        ("tests/coordinator/test_at_least_once_memory.py",), marks="not broker",
    ),
    Mutant(
        "late-update-counted", "an update for a closed round is logged and dropped, never aggregated",
        (Edit(SYNC, "                    return inbox.settle(msg, verdict=\"late\", reason=f\"for round {env.round}, now in round {rnd}\",\n",
              "                    from coordinator.aggregators import Contribution\n"
              "                    self.agg.add(Contribution(site=site, weights=p.weights, num_examples=p.num_examples,\n"
              "                                              base_round=p.base_round, metrics=dict(p.metrics)))\n"
              "                    return inbox.settle(msg, verdict=\"late\", reason=f\"for round {env.round}, now in round {rnd}\",\n"),),
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
        (Edit("site_worker/ledger.py",
              "            history, before = merge([e for r in rel for e in r[\"entries\"]]), _skellam_rows(rel)\n"
              "            spent =",
              "            history, before = [], []\n            spent ="),),
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
        (Edit("protocol/dp_plan.py", "plan = plan_dp(spec, n_train, delta=delta, accountant=policy.accountant,",
              "plan = plan_dp(spec, n_train, delta=None, accountant=policy.accountant,"),),
        ("tests/site_worker/test_site_owns_dp.py", "tests/adversarial/test_coordinator_attacks_site.py"), marks="not broker",
    ),
    Mutant(
        "min-noise-unchecked", "a task whose planned noise (e.g. derived from a target epsilon) is below min_noise_multiplier is declined",
        (Edit("protocol/dp_plan.py", "    if plan.noise_multiplier < policy.min_noise_multiplier:\n", "    if False:\n"),),
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
        (Edit(EVALUATION, "            if isinstance(cap, int) and used[site] + 2 > cap:", "            if False:"),),
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
        (Edit("protocol/dp_figures.py",  # the flag now reads the projected matrix (issue 24)
              "        out[\"predicts_one_class\"] = float(c[0] + c[2] == 0 or c[1] + c[3] == 0)\n",
              "        out[\"predicts_one_class\"] = 0.0\n"),),
        ("tests/site_worker/test_final_release.py::test_dp_release_estimates_a_one_class_model_from_the_noisy_counts",
         "tests/simulator/test_report.py::test_a_dp_estimate_of_a_one_class_model_reaches_the_report_and_the_tables"),
    ),
    Mutant(
        "dp-counts-above-announced-rows", "a DP release never counts more rows than the site announced (else the coordinator drops an honest, charged reply)",
        (Edit("protocol/dp_figures.py", "    return min(n, float(rows)) if rows is not None and rows >= 1 else n\n",
              "    return n\n"),),
        ("tests/site_worker/test_site_owns_dp.py::test_a_noisy_row_count_is_never_released_above_the_rows_the_site_announced",),
    ),
    # ------------------------------------------------------------------ the run's privacy plan
    # (protocol/privacy_plan.py and protocol/dp_plan.py since issue 21: shared by site and coordinator)
    Mutant(
        "plan-fine-tune-at-the-rounds-noise", "without total_epsilon the plan gives the fine-tune the noise the site solves for it",
        (Edit("protocol/privacy_plan.py",
              "            tune_sigma = plan_dp(tune, n_train, delta=delta, accountant=accountant).noise_multiplier\n",
              "            tune_sigma = sigma\n"),),
        ("tests/coordinator/test_privacy_plan_modes.py::test_target_epsilon_per_task_plans_the_fine_tune_at_its_own_noise",),
    ),
    Mutant(
        "plan-test-evaluations-uncounted", "the plan (and a run budget's noise) counts the test releases of federated.test_every",
        (Edit("protocol/privacy_plan.py", "    tests = tuple(e for _ in range(test_rounds(experiment)) for e in one)\n",
              "    tests = ()\n"),),
        ("tests/site_worker/test_run_budget.py::test_periodic_test_evaluations_are_in_the_plan_and_in_each_tasks_noise",
         "tests/coordinator/test_privacy_plan_modes.py::test_noise_multiplier_run_spends_exactly_its_plan"),
    ),
    Mutant(
        "plan-ignores-site-policy", "a plan says a site declines where its policy refuses a task, instead of a figure",
        (Edit("protocol/privacy_plan.py",
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

# ---------------------------------------------------------------------- arch (issue 21): the shared core
MUTANTS.extend([
    Mutant(
        "broker-url-drops-ipv6-brackets", "a password put into an IPv6 broker URL keeps the host's brackets",
        (Edit("protocol/broker_url.py", '        host = f"[{self.host}]" if ":" in self.host else self.host\n',
              "        host = self.host\n"),),
        ("tests/protocol/test_broker_url.py::test_site_config",),
    ),
    Mutant(
        "site-id-rule-128", "a site id is at most 64 characters on every path",
        (Edit("protocol/ids.py", 'rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}"', 'rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"'),),
        ("tests/protocol/test_ids.py::test_site_config_takes_64_and_refuses_65",),
    ),
])

# ---------------------------------------------------------------------- layers: a verifiable model language (issue 20 item 1)
_ROWS = "tests/site_worker/test_row_independence.py"
_LAYER_ATTACKS = "tests/adversarial/test_layer_attacks.py"
MUTANTS.extend([
    Mutant(
        "layers-row-mixing-allowed-at-site", "a site refuses every layer that mixes rows, on every task path",
        (Edit("site_worker/policy.py", "    for layer in experiment.chain.row_mixing:\n", "    for layer in ():\n"),),
        (f"{_LAYER_ATTACKS}::test_every_batchnorm_variant_is_declined_naming_the_layer_on_every_path",
         f"{_ROWS}::test_a_row_mixing_type_does_mix_rows_and_every_site_declines_it"),
    ),
    Mutant(
        "layers-batchnorm-declared-row-independent", "each layer type's row_independent declaration is true of torch",
        (Edit("protocol/layers.py", "        row_independent=False,\n", "        row_independent=True,\n"),),
        (f"{_ROWS}::test_one_row_never_moves_another_rows_output_or_clipped_gradient",),
    ),
    Mutant(
        "layers-config-allows-row-mixing-under-dp", "a DP experiment with a row-mixing layer is invalid, saying what to use",
        (Edit("protocol/config.py", "            for layer in chain.row_mixing:\n", "            for layer in ():\n"),),
        (f"{_ROWS}::test_a_row_mixing_type_does_mix_rows_and_every_site_declines_it",),
    ),
    Mutant(
        "layers-buffers-allowed-under-dp", "a model with buffers is refused under DP training or DP metrics",
        (Edit("site_worker/policy.py",
              "    if buffers and (dp_settings(experiment) is not None or policy.metrics == \"dp\"):\n",
              "    if False:\n"),),
        (f"{_LAYER_ATTACKS}::test_a_model_with_buffers_is_declined_under_dp_training_or_dp_metrics_only",),
    ),
    Mutant(
        "layers-train-activations-uncounted", "the training memory bound counts activations, not only weights",
        (Edit("site_worker/dp.py", "    return (batch * (per_sample + activations) * 4 + 4 * parameters * 4) / 2**20\n",
              "    return (batch * per_sample * 4 + 4 * parameters * 4) / 2**20\n"),),
        (f"{_LAYER_ATTACKS}::test_training_activations_are_bounded_with_the_per_sample_factor",),
    ),
    Mutant(
        "layers-conv-scratch-uncounted", "a Conv1d's padded input and per-sample unfold count in the bound",
        (Edit("protocol/layers.py",
              "        return channels * (length + pad) + channels * k * out[1]  # padded input + Opacus' unfold\n",
              "        return 0\n"),),
        (f"{_LAYER_ATTACKS}::test_training_activations_are_bounded_with_the_per_sample_factor",),
    ),
    Mutant(
        "layers-train-memory-at-nominal-batch", "the training memory bound uses the Poisson batch bound under DP",
        (Edit("site_worker/dp.py",
              "    batch = poisson_batch_bound(n_train, sample_rate) if sample_rate is not None else min(batch_size, n_train)\n",
              "    batch = min(batch_size, n_train)\n"),),
        (f"{_LAYER_ATTACKS}::test_a_model_that_fits_at_batch_size_but_not_at_the_poisson_bound_is_declined_at_the_edge",),
    ),
    Mutant(
        "layers-eval-memory-unbounded", "evaluation memory is bounded from the shapes before anything is allocated",
        (Edit("site_worker/dp.py", "    if mb > policy.max_eval_memory_mb:\n", "    if False:\n"),),
        (f"{_LAYER_ATTACKS}::test_memory_bombs_are_declined_before_anything_is_allocated",
         f"{_LAYER_ATTACKS}::test_evaluation_memory_and_release_size_are_bounded_at_the_edge"),
    ),
    Mutant(
        "layers-release-size-unbounded", "a DP metrics release vector is bounded by max_release_values",
        (Edit("site_worker/dp.py", "    if policy.metrics == \"dp\" and release_values > policy.max_release_values:\n",
              "    if False:\n"),),
        (f"{_LAYER_ATTACKS}::test_memory_bombs_are_declined_before_anything_is_allocated",
         f"{_LAYER_ATTACKS}::test_evaluation_memory_and_release_size_are_bounded_at_the_edge"),
    ),
    Mutant(
        "layers-layernorm-without-bias-trained", "a LayerNorm Opacus cannot clip is declined under DP, not crashed on",
        (Edit(HANDLERS, "        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None and module.bias is None:\n",
              "        if False:\n"),),
        (f"{_LAYER_ATTACKS}::test_a_layernorm_opacus_cannot_clip_is_declined_not_crashed_on",),
    ),
])

# ---------------------------------------------------------------------- secrets (issue 20 class 7, issue 26's is_loopback)
# No credential in clear beyond this machine: the dashboard's token and pages, provisioning's admin
# credential and new passwords; and "this machine" decided by name, never by a prefix.
_ACCESS = "tests/dashboard/test_access.py"
_MGMT = "tests/transport/test_management_tls.py"
MUTANTS.extend([
    Mutant(
        "loopback-127-prefix", "only a loopback IP address is loopback: 127.evil.example is someone's DNS name (rebinding)",
        (Edit("protocol/loopback.py", '    if h.lower() == "localhost":\n',
              '    if h.lower() == "localhost" or h.startswith("127."):\n'),),
        (f"{_ACCESS}::test_look_alike_host_names_are_not_loopback",),
    ),
    Mutant(
        "loopback-localhost-prefix", "localhost is loopback by exact name only: localhost.evil.example is not",
        (Edit("protocol/loopback.py", '    if h.lower() == "localhost":\n', '    if h.lower().startswith("localhost"):\n'),),
        (f"{_ACCESS}::test_look_alike_host_names_are_not_loopback",),
    ),
    Mutant(
        "dashboard-token-from-url", "the dashboard never takes its token from a URL (logs, proxies, history, relays)",
        (Edit("fedbus/dashboard/security.py", '            if "token" in request.query_params:', "            if False:"),
         Edit("fedbus/dashboard/security.py",
              "        if a.token_ok(bearer) or a.token_ok(request.cookies.get(COOKIE)):\n",
              "        if (a.token_ok(bearer) or a.token_ok(request.cookies.get(COOKIE))\n"
              "                or a.token_ok(request.query_params.get(\"token\"))):\n")),
        (f"{_ACCESS}::test_dashboard_over_tls_signs_in_by_post_and_never_takes_the_token_from_a_url",),
    ),
    Mutant(
        "dashboard-plain-http-beyond-localhost", "coordinator serve refuses to listen beyond localhost without TLS",
        (Edit("fedbus/dashboard/server.py", "    if not loopback and not tls:\n", "    if False:\n"),),
        (f"{_ACCESS}::test_beyond_localhost_needs_tls_and_a_token",),
    ),
    Mutant(
        "dashboard-cookie-not-secure", "under TLS the session cookie is Secure (never sent over plain HTTP)",
        (Edit("fedbus/dashboard/security.py", 'samesite="strict", path="/", secure=a.tls)\n',
              'samesite="strict", path="/", secure=False)\n'),),
        (f"{_ACCESS}::test_dashboard_over_tls_signs_in_by_post_and_never_takes_the_token_from_a_url",),
    ),
    Mutant(
        "dashboard-login-cross-origin", "the sign-in form is accepted from our own origin only (no login CSRF)",
        (Edit("fedbus/dashboard/security.py",
              "            return login_page(users=a.users is not None, token=a.token is not None)\n"
              "        problem = self._origin_problem(request)\n",
              "            return login_page(users=a.users is not None, token=a.token is not None)\n"
              "        problem = None\n"),),
        (f"{_ACCESS}::test_dashboard_over_tls_signs_in_by_post_and_never_takes_the_token_from_a_url",),
    ),
    Mutant(
        "provision-plain-http-beyond-loopback", "provisioning never sends the admin credential over plain HTTP beyond this machine",
        (Edit("protocol/transport/provision.py", '    if p.scheme == "http" and not is_loopback(p.hostname):\n', "    if False:\n"),),
        (f"{_MGMT}::test_plain_http_with_credentials_to_another_host_is_refused_before_any_connection",
         f"{_MGMT}::test_cli_refuses_plain_http_beyond_loopback_in_one_line"),
    ),
    Mutant(
        "provision-amqps-management-over-http", "an amqps:// broker's management API is spoken over HTTPS by default",
        (Edit("protocol/transport/provision.py", '    if p.scheme.lower() == "amqps":\n', "    if False:\n"),),
        (f"{_MGMT}::test_an_amqps_broker_means_https_management",),
    ),
    Mutant(
        "provision-management-unverified", "the management API's certificate is verified against the federation CA and host name",
        (Edit("protocol/transport/provision.py", "        return ssl_context(tls)\n", "        return ssl._create_unverified_context()\n"),),
        (f"{_MGMT}::test_management_over_https_verified_with_the_federation_ca",),
    ),
    Mutant(
        "provision-impostor-falls-back", "a management API that fails verification is an error, never a silent fall-back",
        (Edit("protocol/transport/provision.py",
              "            if isinstance(reason, ssl.SSLCertVerificationError):  # never fall back past an impostor\n",
              "            if False:\n"),
         Edit("protocol/transport/provision.py", "            if isinstance(reason, ssl.SSLError):\n", "            if False:\n")),
        (f"{_MGMT}::test_management_over_https_verified_with_the_federation_ca",),
    ),
    Mutant(
        "provision-follows-redirects", "a redirect from the management API is never followed with the credentials",
        (Edit("protocol/transport/provision.py", "urllib.request.ProxyHandler({}), _NoRedirect(),", "urllib.request.ProxyHandler({}),"),),
        (f"{_MGMT}::test_a_redirect_is_never_followed_with_the_credentials",),
    ),
    Mutant(
        "kits-site-toml-rewritten", "a re-provision never resets the hospital's site.toml (its own budget)",
        (Edit("fedbus/kits.py", '        if not (kit / "site.toml").exists():  # the hospital edits it', "        if True:  # the hospital edits it"),),
        ("tests/cli/test_kits.py::test_reprovision_never_resets_a_sites_own_budget",),
    ),
    Mutant(
        "kits-budget-difference-unreported", "a re-provision names a site budget that differs from the project's",
        (Edit("fedbus/kits.py", "and float(own) != s.max_epsilon:", "and float(own) > s.max_epsilon:"),),
        ("tests/cli/test_kits.py::test_reprovision_never_resets_a_sites_own_budget",),
    ),
])

# ---------------------------------------------------------------------- issue 21: the round loop and its aggregators
MUTANTS.extend([
    Mutant(
        "task-config-unbounded", "a TaskConfig field outside its bounds (or non-finite) is refused, on the wire too",
        (Edit("protocol/messages.py", "            if not ok_type or not (math.isfinite(v) and lo <= v <= hi):\n",
              "            if not ok_type:\n"),),
        ("tests/protocol/test_codec.py::test_task_config_out_of_bounds_on_the_wire_is_malformed",
         "tests/site_worker/test_proximal.py::test_task_config_bounds_at_their_edges"),
    ),
    Mutant(
        "central-dp-public-sample", "under central DP the round's sites are a secret sample (configure_fit), not the public seed's",
        (Edit("coordinator/aggregators/central_dp.py",
              "        sites = sample_sites(list(available), count, seed=self.sampling_seed(), round=server_round, attempt=attempt)\n",
              "        sites = sample_sites(list(available), count, seed=self.seed, round=server_round, attempt=attempt)\n"),),
        ("tests/coordinator/test_server_opt.py::test_configure_fit_samples_the_round_and_central_dp_fixes_qn_secretly",),
    ),
    Mutant(
        "central-dp-qn-unset", "central DP's denominator qN is fixed by configure_fit before any reply, not the realised count",
        (Edit("coordinator/aggregators/central_dp.py", "        if attempt == 0:\n            self.expected_clients = len(sites)\n",
              ""),),
        ("tests/coordinator/test_server_opt.py::test_configure_fit_samples_the_round_and_central_dp_fixes_qn_secretly",),
    ),
])

# ---------------------------------------------------------------------- words (issue 20, classes 2, 6, 8)
# Nothing data-dependent in a site's refusals, reproducible noise never repeated on another
# release, notices rate-limited per signer, crash loops bounded, site check on the site's plan.
MUTANTS.extend([
    Mutant(
        "words-category-count-declined", "a value outside the experiment's category list is never an uncharged refusal (the counts oracle)",
        (Edit("site_worker/data.py",
              "                log.warning(\"categories_not_listed\", column=col, values=len(unknown),\n",
              "                raise DataError(col, f\"{len(unknown)} value(s) are not among the categories\")\n"
              "                log.warning(\"categories_not_listed\", column=col, values=len(unknown),\n"),),
        ("tests/site_worker/test_no_data_words.py::test_the_counts_oracle_is_silent_and_every_answer_is_charged",),
    ),
    Mutant(
        "words-refusal-quotes-a-count", "a refusal on the wire carries no count from the rows (to_numeric's count stays in the site's log)",
        (Edit("site_worker/data.py", '        raise DataError(column, "expected numbers but the column holds text; "\n',
              '        raise DataError(column, f"expected numbers but {bad} value(s) hold text; "\n'),),
        ("tests/site_worker/test_no_data_words.py::test_each_refusal_says_the_same_bytes_for_datasets_one_row_apart",),
    ),
    Mutant(
        "words-projected-epsilon-on-the-wire", "a budget refusal keeps the projection from this task's rows in the site's log",
        (Edit("site_worker/handlers.py", "            figures = {k: v for k, v in d.figures.items() if k in WIRE_FIGURES}\n",
              "            figures = dict(d.figures)\n"),),
        ("tests/site_worker/test_no_data_words.py::test_each_refusal_says_the_same_bytes_for_datasets_one_row_apart",),
    ),
    Mutant(
        "words-exception-text-on-the-wire", "an exception's text (which can quote the data) stays in the site's log",
        (Edit("site_worker/handlers.py",
              "                            detail=f\"{type(e).__name__}: the site failed on this task; its operator has the \"\n",
              "                            detail=f\"{type(e).__name__}: {e}; its operator has the \"\n"),),
        ("tests/site_worker/test_no_data_words.py::test_each_refusal_says_the_same_bytes_for_datasets_one_row_apart",),
    ),
    Mutant(
        "words-reproducible-noise-by-seed-only", "a repeated task seed never repeats reproducible noise on a different release",
        (Edit("site_worker/secure_rng.py",
              "        material = f\"fedbus-reproducible-dp\\0{int(site_seed)}\\0{int(task_seed)}\\0{purpose}\\0\".encode() + inputs\n",
              "        material = f\"fedbus-reproducible-dp\\0{int(site_seed)}\\0{int(task_seed)}\\0{purpose}\\0\".encode()\n"),),
        ("tests/site_worker/test_reproducible_noise.py",),
    ),
    Mutant(
        "words-untrusted-notice-per-run", "untrusted-task notices are limited per signer and overall, whatever run id a forger claims",
        (Edit("site_worker/untrusted.py", "            if not self._allow(str(kid)[:64]):\n",
              "            if not self._allow(claimed.run_id):\n"),
         Edit("site_worker/untrusted.py", "        if len(self._recent) >= self.burst:\n", "        if False:\n")),
        ("tests/site_worker/test_untrusted_notices.py",),
    ),
    Mutant(
        "words-crash-loop-unbounded", "a task that crashes the site is declined after its last allowed start",
        (Edit("site_worker/daemon.py", "        if started >= self.attempts.max_attempts:\n", "        if False:\n"),),
        ("tests/site_worker/test_crash_retry.py::test_a_crash_loop_ends_declined_and_its_reservation_released",),
        timeout_s=240.0,
    ),
    Mutant(
        "words-dead-reservation-charged-again", "a reservation of an attempt that died before its commit is replaced, not added to",
        (Edit("site_worker/ledger.py",
              "            rel[:] = [r for r in rel if not (r[\"id\"] == release_id and r[\"state\"] == \"reserved\")]\n", ""),),
        ("tests/site_worker/test_crash_retry.py::test_a_committed_release_stays_charged_when_its_task_comes_back",),
    ),
    Mutant(
        "words-failed-task-reservation-kept", "a task that fails in the handler releases what it reserved",
        (Edit("site_worker/handlers.py",
              "            self.release_reservations(env)  # it failed before its commit: nothing of it left the site\n", ""),),
        ("tests/site_worker/test_crash_retry.py::test_a_task_that_fails_in_the_handler_releases_its_reservation",),
    ),
    Mutant(
        "words-site-check-own-arithmetic", "site check's ε is the site's run plan (metrics, fine-tune and final releases included)",
        (Edit("fedbus/site_check.py",
              "    after = epsilon_of(merge([*history, *plan.entries()]), delta=plan.delta, accountant=plan.accountant)\n",
              "    after = epsilon_of(merge([*history, (plan.noise_multiplier, plan.sample_rate, plan.round_steps * plan.rounds)]),\n"
              "                       delta=plan.delta, accountant=plan.accountant)\n"),),
        ("tests/simulator/test_site_check_matches_ledger.py",),
        timeout_s=300.0,
    ),
    Mutant(
        "words-approval-not-enforced", "with require_approval a site declines every experiment hash its operator has not approved",
        (Edit("site_worker/handlers.py", "        if self.config.policy.require_approval:\n", "        if False:\n"),),
        ("tests/cli/test_site_approval.py::test_a_provisioned_kit_runs_only_what_its_operator_approved",),
    ),
    Mutant(
        "words-approval-hash-ignores-training", "the approved hash covers the training block (a changed DP request or epochs is another experiment)",
        (Edit("site_worker/approvals.py",
              '    doc = {"architecture": experiment.get("architecture"), "training": experiment.get("training"),\n',
              '    doc = {"architecture": experiment.get("architecture"),\n'),),
        ("tests/cli/test_site_approval.py::test_a_provisioned_kit_runs_only_what_its_operator_approved",),
    ),
])

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

# ---------------------------------------------------------------------- lead: no password in clear over AMQP
MUTANTS.append(Mutant(
    "amqp-password-in-clear", "a password in a plain amqp:// URL is refused beyond this machine",
    (Edit("protocol/transport/connector.py", "    check_no_password_in_clear(node)\n", ""),),
    ("tests/transport/test_tls.py::test_a_password_never_goes_in_clear_beyond_this_machine",),
))

# ---------------------------------------------------------------------- issue 26: every check at its edge
# Off-by-one (a strict comparison made inclusive or the reverse), removed and mis-keyed checks,
# each caught by a test that plays the value just inside and just outside the bound.
_EDGE = "tests/adversarial/test_coordinator_edges.py"
_CDP = "tests/adversarial/test_central_dp.py"
_CAPS = "tests/site_worker/test_policy_edges.py"
_SITE_PATHS = "tests/adversarial/test_site_path_edges.py"
_REPLAY = "tests/protocol/test_replay.py"
_CHUNKS = "tests/protocol/test_chunk_edges.py"
_PROJECT = "tests/cli/test_project_edges.py"
_DP = "site_worker/dp.py"
_DP_PLAN = "protocol/dp_plan.py"  # the plan checks moved here (issue 21)
_POLICY = "site_worker/policy.py"
MUTANTS.extend([
    # -- 1. the coordinator's checks on what sites send
    Mutant(
        "edge-coord-recipient-unchecked", "an update addressed to another party is refused (wrong_recipient)",
        (Edit("coordinator/validation.py", "    if env.recipient != recipient:\n", "    if False:\n"),),
        (f"{_EDGE}::test_recipient_and_clock_are_checked_on_a_signed_update_at_their_edges",),
    ),
    Mutant(
        "edge-coord-skew-exclusive", "a sent_at exactly max_skew_s ahead of the coordinator's clock is accepted",
        (Edit("coordinator/validation.py", "    if env.sent_at - now > max_skew_s:\n",
              "    if env.sent_at - now >= max_skew_s:\n"),),
        (f"{_EDGE}::test_check_envelope_skew_edge_and_recipient",),
    ),
    Mutant(
        "edge-coord-rows-not-pinned", "the announced row bound is pinned at first use in a run (a second hello cannot raise it)",
        (Edit(INBOX, "        if site in self._announced:\n            return self._announced[site]\n", ""),),
        (f"{_EDGE}::test_a_second_hello_mid_run_cannot_raise_the_pinned_row_bound",),
    ),
    Mutant(
        "edge-coord-num-examples-at-bound-refused", "num_examples equal to the announced rows is accepted",
        (Edit(INBOX, "        if p.num_examples > rows:\n", "        if p.num_examples >= rows:\n"),),
        (f"{_EDGE}::test_a_second_hello_mid_run_cannot_raise_the_pinned_row_bound",),
    ),
    Mutant(
        "edge-enroll-ignores-key-history", "enroll refuses a key another site held in its key history",
        (Edit("coordinator/state.py",
              '                "SELECT site_id FROM sites WHERE kid=? AND site_id<>? UNION "\n'
              '                "SELECT site_id FROM keys WHERE kid=? AND site_id<>?", (kid, site_id, kid, site_id),\n',
              '                "SELECT site_id FROM sites WHERE kid=? AND site_id<>?", (kid, site_id),\n'),),
        (f"{_EDGE}::test_enroll_refuses_a_key_another_site_held_in_its_history",),
    ),
    # -- 2. central DP in a real sampled run
    Mutant(
        "edge-central-dp-realised-denominator", "central DP divides by the qN fixed before the round, not by the replies",
        (Edit("coordinator/aggregators/central_dp.py",
              "        return float(self.expected_clients) if self.expected_clients else float(max(self._n, 1))\n",
              "        return float(max(self._n, 1))\n"),),
        (f"{_CDP}::test_a_sampled_run_with_a_silent_site_divides_by_the_qn_fixed_before_the_round_and_samples_in_secret",),
    ),
    Mutant(
        "edge-central-dp-sample-key-public", "central DP's sample is keyed by the coordinator's secret",
        (Edit("coordinator/aggregators/central_dp.py",
              '        key = hmac.new(self._secret, f"fedbus-central-dp-sampling:',
              '        key = hmac.new(b"fedbus", f"fedbus-central-dp-sampling:'),),
        (f"{_CDP}::test_a_sampled_run_with_a_silent_site_divides_by_the_qn_fixed_before_the_round_and_samples_in_secret",),
    ),
    # -- 3. each site cap on its own
    Mutant(
        "edge-site-sample-rate-inclusive", "a sample rate equal to max_sample_rate is allowed",
        (Edit(_DP_PLAN, "    if plan.sample_rate > policy.max_sample_rate:\n", "    if plan.sample_rate >= policy.max_sample_rate:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-sample-rate-unchecked", "a sample rate above max_sample_rate is declined",
        (Edit(_DP_PLAN, "    if plan.sample_rate > policy.max_sample_rate:\n", "    if False:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-steps-inclusive", "a task of exactly max_steps_per_task DP-SGD steps is allowed",
        (Edit(_DP_PLAN, "    if plan.steps > policy.max_steps_per_task:\n", "    if plan.steps >= policy.max_steps_per_task:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-steps-unchecked", "a task over max_steps_per_task is declined",
        (Edit(_DP_PLAN, "    if plan.steps > policy.max_steps_per_task:\n", "    if False:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-epochs-inclusive", "a task of exactly max_epochs local epochs is allowed",
        (Edit(_DP_PLAN, "    if epochs > policy.max_epochs:\n", "    if epochs >= policy.max_epochs:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-min-noise-inclusive", "a planned noise equal to min_noise_multiplier is allowed",
        (Edit(_DP_PLAN, "    if plan.noise_multiplier < policy.min_noise_multiplier:\n",
              "    if plan.noise_multiplier <= policy.min_noise_multiplier:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge", f"{_CAPS}::test_min_noise_applies_to_a_noise_the_site_derives_itself"),
    ),
    Mutant(
        "edge-site-delta-inclusive", "an experiment delta equal to the site's delta is allowed",
        (Edit(_DP_PLAN, "    if float(dp.delta) > site_delta:\n", "    if float(dp.delta) >= site_delta:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-delta-unchecked", "an experiment delta above the site's delta is declined",
        (Edit(_DP_PLAN, "    if float(dp.delta) > site_delta:\n", "    if False:\n"),),
        (f"{_CAPS}::test_each_dp_cap_alone_at_its_edge",),
    ),
    Mutant(
        "edge-site-train-memory-inclusive", "a training step of exactly max_train_memory_mb is allowed",
        (Edit(_DP, "    if mb > policy.max_train_memory_mb:\n", "    if mb >= policy.max_train_memory_mb:\n"),),
        (f"{_CAPS}::test_training_memory_cap_at_its_edge",),
    ),
    Mutant(
        "edge-site-eval-memory-inclusive", "an evaluation of exactly max_eval_memory_mb is allowed",
        (Edit(_DP, "    if mb > policy.max_eval_memory_mb:\n", "    if mb >= policy.max_eval_memory_mb:\n"),),
        (f"{_CAPS}::test_eval_memory_and_release_values_caps_at_their_edges",),
    ),
    Mutant(
        "edge-site-release-values-inclusive", "a DP release of exactly max_release_values values is allowed",
        (Edit(_DP, "release_values > policy.max_release_values:\n", "release_values >= policy.max_release_values:\n"),),
        (f"{_CAPS}::test_eval_memory_and_release_values_caps_at_their_edges",),
    ),
    Mutant(
        "edge-policy-max-parameters-inclusive", "a model of exactly max_parameters parameters is allowed",
        (Edit(_POLICY, "    if policy.max_parameters is not None and parameters > policy.max_parameters:\n",
              "    if policy.max_parameters is not None and parameters >= policy.max_parameters:\n"),),
        (f"{_CAPS}::test_max_parameters_at_its_edge",),
    ),
    Mutant(
        "edge-policy-total-epsilon-inclusive", "a run's total_epsilon equal to the site's max_epsilon is allowed",
        (Edit(_POLICY, "policy.max_epsilon is not None and total > policy.max_epsilon:\n",
              "policy.max_epsilon is not None and total >= policy.max_epsilon:\n"),),
        (f"{_CAPS}::test_max_epsilon_bounds_the_total_and_the_target_epsilon_at_their_edges",),
    ),
    Mutant(
        "edge-policy-target-epsilon-unchecked", "a target_epsilon above the site's max_epsilon is declined before any data is read",
        (Edit(_POLICY, "policy.max_epsilon is not None and dp.target_epsilon > policy.max_epsilon:\n",
              "policy.max_epsilon is not None and False:\n"),),
        (f"{_CAPS}::test_max_epsilon_bounds_the_total_and_the_target_epsilon_at_their_edges",),
    ),
    Mutant(
        "edge-policy-explicit-noise-inclusive", "an explicit noise equal to min_noise_multiplier passes the data-free check",
        (Edit(_POLICY, "    if noise_multiplier < policy.min_noise_multiplier:\n",
              "    if noise_multiplier <= policy.min_noise_multiplier:\n"),),
        (f"{_CAPS}::test_explicit_noise_below_the_minimum_is_refused_before_any_data_is_read",),
    ),
    Mutant(
        "edge-dp-metrics-loss-unclipped", "each row adds at most 1 to a DP release's scaled loss sum (the claimed sensitivity)",
        (Edit("site_worker/release.py", "clamp(min=0.0, max=clip) / clip", "clamp(min=0.0) / clip"),),
        (f"{_CAPS}::test_one_row_moves_the_release_vector_by_at_most_its_sensitivity_when_its_loss_is_clipped",),
    ),
    Mutant(
        "edge-flower-min-noise-unchecked", "a Flower client declaring less noise than min_noise_multiplier is declined",
        (Edit(HANDLERS, "(plan.noise_multiplier < policy.min_noise_multiplier, \"min_noise_multiplier\",",
              "(False, \"min_noise_multiplier\","),),
        (f"{_SITE_PATHS}::test_a_flower_clients_plan_is_held_to_every_cap_each_alone",),
    ),
    Mutant(
        "edge-flower-sample-rate-unchecked", "a Flower client declaring a sample rate over max_sample_rate is declined",
        (Edit(HANDLERS, "(plan.sample_rate > policy.max_sample_rate, \"max_sample_rate\",",
              "(False, \"max_sample_rate\","),),
        (f"{_SITE_PATHS}::test_a_flower_clients_plan_is_held_to_every_cap_each_alone",),
    ),
    Mutant(
        "edge-flower-steps-inclusive", "a Flower client declaring exactly max_steps_per_task steps trains",
        (Edit(HANDLERS, "(plan.steps > policy.max_steps_per_task, \"max_steps_per_task\",",
              "(plan.steps >= policy.max_steps_per_task, \"max_steps_per_task\","),),
        (f"{_SITE_PATHS}::test_a_flower_clients_plan_is_held_to_every_cap_each_alone",),
    ),
    Mutant(
        "edge-flower-epochs-unchecked", "a Flower client is never asked for more than max_epochs local epochs",
        (Edit(HANDLERS, "        if task.config.epochs is not None:  # the client is told to run them",
              "        if False:  # the client is told to run them"),),
        (f"{_SITE_PATHS}::test_a_flower_clients_plan_is_held_to_every_cap_each_alone",),
    ),
    Mutant(
        "edge-eval-train-split-handler", "the handler declines an evaluation of the training rows",
        (Edit(HANDLERS, "        if task.split not in (\"validation\", \"test\"):\n", "        if False:\n"),),
        (f"{_SITE_PATHS}::test_an_evaluation_of_the_training_rows_is_refused_on_the_wire_and_by_the_handler",),
    ),
    Mutant(
        "edge-eval-train-split-on-the-wire", "an EvalTask's split is validation or test at decode",
        (Edit("protocol/bounds.py", "\"split\": Text(16, choices=(\"validation\", \"test\"))", "\"split\": Text(16)"),),
        (f"{_SITE_PATHS}::test_an_evaluation_of_the_training_rows_is_refused_on_the_wire_and_by_the_handler",),
    ),
    # -- 4. bounds on both sides, each alone
    Mutant(
        "edge-replay-forgets-at-the-window-edge", "a seen id is remembered for the whole 2·max_skew_s window, its last instant included",
        (Edit("protocol/replay.py", "            if marked < horizon:\n", "            if marked <= horizon:\n"),),
        (f"{_REPLAY}::test_replay_window_both_sides_with_a_sender_clock_at_the_skew_edge",),
    ),
    Mutant(
        "edge-replay-window-one-skew", "the replay window is twice the allowed skew",
        (Edit("protocol/replay.py", "        return 2 * self.max_skew_s\n", "        return self.max_skew_s\n"),),
        (f"{_REPLAY}::test_replay_window_both_sides_with_a_sender_clock_at_the_skew_edge",),
    ),
    Mutant(
        "edge-replay-capacity-off-by-one", "the replay guard keeps exactly capacity ids",
        (Edit("protocol/replay.py", "            elif len(seen) > self.capacity:\n", "            elif len(seen) >= self.capacity:\n"),),
        (f"{_REPLAY}::test_capacity_is_a_bound_of_its_own_inside_the_window",),
    ),
    Mutant(
        "edge-replay-skew-exclusive", "a sent_at exactly max_skew_s away passes the site's skew check",
        (Edit("protocol/replay.py", "abs(offset) > self.max_skew_s", "abs(offset) >= self.max_skew_s"),),
        (f"{_REPLAY}::test_skew_boundary_is_inclusive",),
    ),
    Mutant(
        "edge-chunk-frame-limit-inclusive", "a transfer of exactly max_transfer_bytes is held",
        (Edit("protocol/chunking.py", "        if total > self.max_transfer_bytes:\n", "        if total >= self.max_transfer_bytes:\n"),),
        (f"{_CHUNKS}::test_frame_limit_alone_at_its_edge",),
    ),
    Mutant(
        "edge-chunk-user-bytes-unchecked", "one broker user reserves at most max_user_bytes",
        (Edit("protocol/chunking.py", "        if total > self.max_user_bytes - mine:\n", "        if False:\n"),),
        (f"{_CHUNKS}::test_per_user_bytes_alone_at_its_edge",),
    ),
    Mutant(
        "edge-chunk-global-bytes-inclusive", "transfers may reserve exactly max_bytes together",
        (Edit("protocol/chunking.py", "        if total > self.max_bytes - self._reserved:\n",
              "        if total >= self.max_bytes - self._reserved:\n"),),
        (f"{_CHUNKS}::test_global_bytes_alone_at_its_edge",),
    ),
    Mutant(
        "edge-chunk-user-transfers-unchecked", "one broker user has at most max_user_transfers transfers in progress",
        (Edit("protocol/chunking.py", "        if self._user_transfers.get(owner, 0) >= self.max_user_transfers:\n", "        if False:\n"),),
        (f"{_CHUNKS}::test_per_user_transfers_alone_at_its_edge",),
    ),
    Mutant(
        "edge-chunk-global-transfers-unchecked", "at most max_transfers transfers are in progress, whoever sends them",
        (Edit("protocol/chunking.py", "        if len(self._transfers) >= self.max_transfers:\n", "        if False:\n"),),
        (f"{_CHUNKS}::test_global_transfers_alone_at_its_edge",),
    ),
    Mutant(
        "edge-chunk-global-chunks-inclusive", "exactly max_chunks chunks may be in progress",
        (Edit("protocol/chunking.py", "        if self._chunks + count > self.max_chunks:\n",
              "        if self._chunks + count >= self.max_chunks:\n"),),
        (f"{_CHUNKS}::test_global_chunks_alone_at_its_edge",),
    ),
    Mutant(
        "edge-chunk-expires-at-the-timeout", "a transfer expires after timeout_s, not at it",
        (Edit("protocol/chunking.py", "now - t.started > self.timeout_s]", "now - t.started >= self.timeout_s]"),),
        (f"{_CHUNKS}::test_a_transfer_expires_after_its_timeout_not_at_it",),
    ),
    # -- 5. operator tooling
    Mutant(
        "edge-resume-drops-server-optimiser-state", "--resume restores FedAvgM's momentum and FedAdam's moments",
        (Edit(RUN, "        if last[\"agg_state_path\"]:\n", "        if False:\n"),),
        ("tests/coordinator/test_resume_server_opt.py",),
    ),
    Mutant(
        "edge-project-budget-zero-accepted", "a PROJECT.toml budget must be positive (0 is refused)",
        (Edit("fedbus/kits.py", "not isinstance(v, (int, float)) or v <= 0:\n", "not isinstance(v, (int, float)) or v < 0:\n"),),
        (f"{_PROJECT}::test_a_budget_must_be_positive_and_the_smallest_positive_is_accepted",),
    ),
    Mutant(
        "edge-project-coordinator-user-may-be-a-site", "the coordinator's broker user is no site's name",
        (Edit("fedbus/kits.py", "    if not is_name(user) or user in {s.id for s in sites}:\n", "    if not is_name(user):\n"),),
        (f"{_PROJECT}::test_the_coordinator_user_is_no_sites_name",),
    ),
    Mutant(
        "edge-dashboard-token-one-short", "a dashboard token has at least MIN_TOKEN_CHARS characters",
        (Edit("fedbus/dashboard/security.py", "    if len(token) < MIN_TOKEN_CHARS or", "    if len(token) < MIN_TOKEN_CHARS - 1 or"),),
        ("tests/dashboard/test_token_edges.py",),
    ),
])

# issue 24 (t24): DP figures read one consistent confusion matrix; honest run status.
_DPFIG = "tests/protocol/test_dp_figures.py"
MUTANTS.extend([
    Mutant(
        "dp-projection-not-clipped", "released cells are projected onto non-negative cells adding up to n",
        (Edit("protocol/dp_figures.py", "    return np.maximum(v - theta, 0.0)\n", "    return v - theta\n"),),
        (f"{_DPFIG}::test_projection_lands_on_non_negative_cells_adding_up_to_the_total",
         f"{_DPFIG}::test_every_release_reads_one_consistent_matrix_over_many_noise_draws"),
    ),
    Mutant(
        "dp-one-class-column-not-forced", "a predicted column consistent with 0 is set to 0 before the projection",
        (Edit("protocol/dp_figures.py", "    force_pos, force_neg = pos & ~neg, neg & ~pos\n",
              "    force_pos, force_neg = pos & False, neg & False\n"),),
        ("tests/site_worker/test_final_release.py::test_dp_release_estimates_a_one_class_model_from_the_noisy_counts",),
    ),
    Mutant(
        "dp-interval-noise-ignored", "the intervals cover the DP noise, not only the test-set size",
        (Edit("protocol/dp_figures.py", "    u = v + rng.standard_normal((draws, len(v))) * float(noise_sd)\n",
              "    u = v + rng.standard_normal((draws, len(v))) * 0.0\n"),),
        (f"{_DPFIG}::test_intervals_cover_the_true_value_in_about_95_percent_of_releases",),
    ),
])
MUTANTS.extend([
    Mutant(
        "run-gaps-called-completed", "a run where a sampled site declined or missed a round is completed_with_gaps",
        (Edit("coordinator/rounds/result.py", "    if status == COMPLETED and missed:\n", "    if False:\n"),),
        ("tests/coordinator/test_run_memory.py::test_a_declined_site_is_shown_with_its_reason",),
    ),
    Mutant(
        "run-gaps-miss-silent-site", "a sampled site that never answered is a gap, not only a decline",
        (Edit("coordinator/rounds/result.py", "            if key not in accepted:\n                out[key]",
              "            if key in said:\n                out[key]"),),
        ("tests/coordinator/test_run_status.py::test_each_missing_round_is_named_with_its_reason",),
    ),
])
MUTANTS.extend([
    Mutant(
        "validate-skips-aggregator-name", "config validate refuses an unknown federated.name (exit 2), not the run",
        (Edit("fedbus/experiment_check.py", "    if why is not None:  # a misspelt aggregator fails here, not when the run starts\n",
              "    if False:\n"),),
        ("tests/cli/test_bad_input.py::test_config_validate",),
    ),
    Mutant(
        "port-in-use-unnamed", "a port in use is one line naming --port / --serve-port, exit 2",
        (Edit("fedbus/dashboard/server.py", "    check_port(opts)\n", ""),),
        ("tests/cli/test_bad_input.py::test_a_port_in_use_names_its_option",),
    ),
])

# -- chaos: reproducible noise must not hang on a model's last bit (a fault-free rerun equals a faulted run)
_NOISE = "tests/site_worker/test_reproducible_noise.py"
MUTANTS.extend([
    Mutant(
        "chaos-noise-keyed-on-model-bits", "a seed's first release gets the seeds' noise: a model one ulp off keeps it",
        (Edit("site_worker/handlers.py", "        return lambda: self.noise_keys.extra_key(task.seed, digest)\n",
              "        return lambda: digest\n"),),
        (f"{_NOISE}::test_a_seeds_first_release_gets_the_seeds_noise_so_a_rerun_one_ulp_off_matches_and_a_second_release_does_not",),
    ),
    Mutant(
        "chaos-noise-keys-forget-the-first-release", "the seed's first release is recorded, so another release never shares its noise",
        (Edit("site_worker/noise_keys.py", "            known = first.get(seed)\n", "            known = None\n"),),
        (_NOISE,),
    ),
])

# ------------------------------------------------------------------ benches and fixed cost (issue 23, t23)
_FIXED = "tests/bench/test_fixed_cost.py"
_SMOKE = "tests/bench/test_smoke.py"
MUTANTS.extend([
    Mutant(
        "privacy-plan-imported-without-dp", "a coordinator run without site DP never imports Opacus (fixed cost)",
        (Edit("coordinator/rounds/result.py", "    if plan is None and ctx.experiment.training.dp is None:\n",
              "    if False:\n"),),
        (f"{_FIXED}::test_a_coordinator_run_without_site_dp_never_imports_opacus",),
    ),
    Mutant(
        "sklearn-at-site-start", "a site's warm-up and binary metrics never import scikit-learn (fixed cost)",
        (Edit("site_worker/daemon.py", "        import opacus  # noqa: F401\n",
              "        import opacus  # noqa: F401\n        import sklearn.metrics  # noqa: F401\n"),),
        (f"{_FIXED}::test_site_warm_up_and_binary_metrics_never_import_scikit_learn",),
    ),
    Mutant(
        "echo-sites-say-no-hello", "bench/scale.py's echo sites announce their rows, so the model sweep completes",
        (Edit("bench/_echo_sites.py", "        self._consumer = self.bus.consume(site_queue(self.site_id), self._on_task, prefetch=1)\n"
                                      "        self.say_hello()\n",
              "        self._consumer = self.bus.consume(site_queue(self.site_id), self._on_task, prefetch=1)\n"),),
        (f"{_SMOKE}::test_bench_smoke_mode_runs[scale]",), broker=True, timeout_s=900,
    ),
])

# ------------------------------------------------------------------ secure aggregation (issue 22): the site's rules
_SECAGG = "tests/adversarial/test_secagg_coordinator.py"
_SITE_SECAGG = "site_worker/secagg.py"
MUTANTS.extend([
    Mutant(
        "secagg-answers-a-buffer-of-one", "a site never answers an unmask request for fewer than min_contributors updates",
        (Edit(_SITE_SECAGG, "        if len(hospitals) < floor:\n", "        if False:\n"),),
        (f"{_SECAGG}::test_a_buffer_of_one_is_refused_and_min_contributors_is_answered_at_the_edge",),
    ),
    Mutant(
        "secagg-update-in-two-requests", "a site includes each update in at most one unmask request",
        (Edit(_SITE_SECAGG, "        if reused:\n", "        if False:\n"),),
        (f"{_SECAGG}::test_two_requests_differing_by_one_hospital_are_refused",),
    ),
    Mutant(
        "secagg-used-updates-not-durable", "the updates a site unmasked stay refused after a restart",
        (Edit(_SITE_SECAGG, "        st.used.extend([s, t] for s, t in wanted)\n", ""),),
        (f"{_SECAGG}::test_the_rule_survives_a_restart",),
    ),
    Mutant(
        "secagg-roster-signature-unchecked", "a site refuses a roster its coordinator did not sign",
        (Edit(_SITE_SECAGG, "            verify(self.coordinators, signed, roster, coordinator=self.coordinator)\n",
              "            pass\n"),),
        (f"{_SECAGG}::test_a_forged_roster_is_refused",),
    ),
    Mutant(
        "secagg-key-bindings-unchecked", "a site refuses a roster whose X25519 key is not signed by the site it names",
        (Edit(_SITE_SECAGG, "                verify_binding(self.peers, binding, site_id=site, run_id=roster.run_id)\n",
              "                pass\n"),),
        (f"{_SECAGG}::test_a_forged_roster_is_refused",),
    ),
    Mutant(
        "secagg-roster-may-change", "a site refuses a second, different roster for a run it committed to",
        (Edit(_SITE_SECAGG, "            if st.roster != roster.body().hex():\n", "            if False:\n"),),
        (f"{_SECAGG}::test_a_forged_roster_is_refused",),
    ),
    Mutant(
        "secagg-request-roster-unchecked", "a site refuses an unmask request naming a roster it did not commit to",
        (Edit(_SITE_SECAGG, "        if request.roster_digest != roster.digest():\n", "        if False:\n"),),
        (f"{_SECAGG}::test_a_forged_roster_is_refused",),
    ),
    Mutant(
        "secagg-request-signature-unchecked", "a site refuses an unmask request its coordinator did not sign",
        (Edit(_SITE_SECAGG, "            verify(self.coordinators, signed, request, coordinator=self.coordinator)\n",
              "            pass\n"),),
        (f"{_SECAGG}::test_a_forged_roster_is_refused",),
    ),
    Mutant(
        "secagg-threshold-not-enforced", "fewer than U aggregated shares decode nothing",
        (Edit("protocol/secagg/coding.py", "    if len(aggregated) < u:\n", "    if False:\n"),),
        ("tests/protocol/test_secagg_core.py::test_sum_of_masks_decodes_from_any_u_aggregated_shares_and_not_from_u_minus_1",),
    ),
    Mutant(
        "secagg-bit-budget-unchecked", "a quantisation whose N-site sum could overflow the field is refused",
        (Edit("protocol/secagg/field.py", "        if self.sites * self.max_level > HALF:\n", "        if False:\n"),),
        ("tests/protocol/test_secagg_core.py::test_bit_budget_refuses_the_first_configuration_that_would_overflow",),
    ),
])

# ------------------------------------------------------------------ secure aggregation: what it refuses to run, and the site's policy
_SA_CFG = "tests/cli/test_secagg_config.py"
_SA_POLICY = "tests/site_worker/test_secagg_policy.py"
MUTANTS.extend([
    Mutant(
        "secagg-allows-fedasync", "FedAsync under secure aggregation is refused at config validate, naming FedBuff",
        (Edit("protocol/secagg/rules.py", '    if name == "FedAsync":\n', '    if name == "FedAsync" and False:\n'),),
        (f"{_SA_CFG}::test_fedasync_is_refused_naming_fedbuff",),
    ),
    Mutant(
        "secagg-allows-robust-flower", "Flower strategies that need each update (Krum, median) are refused with the reason",
        (Edit("protocol/secagg/rules.py", "        if strategy in NEEDS_INDIVIDUAL_UPDATES:\n", "        if False:\n"),),
        (f"{_SA_CFG}::test_flower_strategies_needing_individual_updates_are_refused_with_the_reason",),
    ),
    Mutant(
        "secagg-runs-in-the-clear", "a run asking for secure aggregation is refused while the round loop cannot mask",
        (Edit("coordinator/secagg.py", "    if experiment.federated.secure_aggregation is not None:\n", "    if False:\n"),),
        (f"{_SA_CFG}::test_a_run_asking_for_secure_aggregation_is_never_run_in_the_clear",),
    ),
    Mutant(
        "secagg-required-policy-ignored", "a site whose policy requires secure aggregation declines a run without it",
        (Edit("site_worker/policy.py", '    if policy.secure_aggregation == "required" and secagg is None:\n',
              "    if False:\n"),),
        (f"{_SA_POLICY}::test_the_site_decides_whether_its_update_is_seen_in_the_clear",),
    ),
])
MUTANTS.extend([
    Mutant(
        "secagg-state-unlocked", "two daemons sharing a state dir check and record an unmask answer as one step",
        (Edit(_SITE_SECAGG, "                fcntl.flock(lf.fileno(), fcntl.LOCK_EX)\n", ""),),
        (f"{_SECAGG}::test_two_daemons_on_one_state_dir_cannot_both_answer_overlapping_requests",),
    ),
])
# ------------------------------------------------------------------ publish once, fetch by hash (issue 23, transfer)
_TRANSFER = "tests/coordinator/test_model_transfer.py"
MUTANTS.extend([
    Mutant(
        "model-published-per-site", "one publish per round: a version goes to the broker once, fanned out to every site",
        (Edit("coordinator/rounds/tasks.py", "        for (weights, ref), sites in versions.values():\n"
                                             "            self.models.send(weights, ref, sites)\n",
              "        for s in batch:\n"
              "            if s.model is not None:\n"
              "                self.models.send(*s.model, [s.record.site])\n"),),
        (f"{_TRANSFER}::test_a_run_publishes_each_version_once_whatever_the_number_of_sites",),
    ),
    Mutant(
        "model-hash-unchecked-before-use", "a site verifies the model against the signed sha256 before any use",
        (Edit("site_worker/model_cache.py", "        if got_sha != want:\n", "        if False:\n"),),
        (f"{_TRANSFER}::test_the_whole_blob_is_verified_against_the_signed_hash_before_use",
         f"{_TRANSFER}::test_a_site_trains_on_the_verified_model_refuses_a_wrong_hash_and_declines_a_gone_version"),
        marks="not broker",
    ),
])
# ------------------------------------------------------------------ sites that train bigger models (issue 23, sitefast)
_NOISE32 = "tests/site_worker/test_secure_noise.py"
MUTANTS.extend([
    Mutant(
        "secure-noise-sigma-off", "DP-SGD's float32 secure noise has exactly the requested sigma (KS test)",
        (Edit("site_worker/secure_rng.py", "            torch.mul(self._noise32(k), std / 2.0, out=out[i : i + k])\n",
              "            torch.mul(self._noise32(k), std / 1.96, out=out[i : i + k])\n"),),
        (f"{_NOISE32}::test_the_noise_is_gaussian_with_the_requested_sigma",),
    ),
    Mutant(
        "secure-noise-radius-24-bits", "the radius uniform keeps 63 bits, so the noise's tails are not cut at 5.9 sigma",
        (Edit("site_worker/secure_rng.py", "    return (words & _MASK63).to(torch.float32).add_(0.5).mul_(2.0**-63)\n",
              "    return ((words & _MASK63) >> 39).to(torch.float32).add_(0.5).mul_(2.0**-24)\n"),),
        (f"{_NOISE32}::test_the_radius_uniform_reaches_deep_tails",),
    ),
    Mutant(
        "secure-noise-chunk-repeats", "each chunk of DP-SGD noise is new keystream, never a repeat of the last",
        (Edit("site_worker/secure_rng.py", "        self._enc.update_into(memoryview(zeros)[:nbytes], buf)\n",
              "        buf[:nbytes] = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor().update(zeros[:nbytes])\n"),),
        (f"{_NOISE32}::test_chunks_continue_the_stream", f"{_NOISE32}::test_the_stream_is_keyed_by_its_secret"),
    ),
])

_GHOST = "tests/site_worker/test_ghost_clipping.py"
MUTANTS.extend([
    Mutant(
        "ghost-clipping-wrong-norm", "ghost clipping clips each row at the plan's max_grad_norm (the same sum as per-sample)",
        (Edit("site_worker/trainer.py", "                                                               max_grad_norm=plan.max_grad_norm,\n",
              "                                                               max_grad_norm=2 * plan.max_grad_norm,\n"),),
        (f"{_GHOST}::test_ghost_and_per_sample_clipping_give_the_same_step",),
    ),
    Mutant(
        "ghost-memory-bound-ignores-mode", "the training memory bound counts ghost clipping's largest layer, not every per-sample gradient",
        (Edit("site_worker/dp.py", "    return chain.ghost_values if dp and chain.clipping == \"ghost\" else None\n",
              "    return None\n"),),
        (f"{_GHOST}::test_the_memory_bound_counts_what_each_mode_holds",),
    ),
    Mutant(
        "residual-block-batch-norm", "ResidualBlock1d normalises each row alone (GroupNorm), never with the batch",
        (Edit("protocol/model.py", "        self.norm1 = nn.GroupNorm(num_groups, out_channels)\n",
              "        self.norm1 = nn.BatchNorm1d(out_channels, track_running_stats=False)\n"),),
        ("tests/site_worker/test_row_independence.py::test_one_row_never_moves_another_rows_output_or_clipped_gradient",),
    ),
])
# ------------------------------------------------------------------ results a clinician can trust (issue 24, clinician)
_LEAKS = "tests/cli/test_config_new_leaks.py"
MUTANTS.extend([
    Mutant(
        "leak-screen-keeps-durations", "config new leaves out follow-up / time-to-event durations (they leak the outcome)",
        (Edit("fedbus/leak_screen.py", "    if set(_tokens(name)) & _DURATION_TOKENS or any(p in norm for p in _DURATION_PHRASES):\n",
              "    if False:\n"),),
        (f"{_LEAKS}::test_a_follow_up_column_is_left_out_with_one_line_each_and_keep_overrides",),
    ),
    Mutant(
        "leak-screen-separation-off-by-edge", "a column with single-column AUC at the threshold is left out",
        (Edit("fedbus/leak_screen.py", "    if auc is None or auc < SEPARATION_AUC:\n",
              "    if auc is None or auc <= SEPARATION_AUC:\n"),),
        (f"{_LEAKS}::test_separation_at_its_edge",),
    ),
    Mutant(
        "config-new-mlp-for-small-sites", "config new writes logistic regression for sites below MLP_MIN_ROWS rows",
        (Edit("protocol/experiment_template.py", "    if rows < MLP_MIN_ROWS or epsilon < MLP_MIN_EPSILON:\n",
              "    if rows < MLP_MIN_ROWS - 1 or epsilon < MLP_MIN_EPSILON:\n"),),
        (f"{_LEAKS}::test_the_model_is_sized_to_rows_per_site_and_budget",),
    ),
])

MUTANTS.extend([
    Mutant(
        "secagg-threshold-half-accepted", "a site refuses a roster whose threshold U is at most half its sites (split-view requests)",
        (Edit(_SITE_SECAGG, "        if 2 * roster.threshold <= n:", "        if False:"),),
        (f"{_SECAGG}::test_split_view_requests_to_two_groups_of_sites_cannot_both_be_unmasked",),
    ),
])
# ------------------------------------------------------------------ the cohort before training (issue 25)
_STATS = "tests/site_worker/test_stats.py"
MUTANTS.extend([
    Mutant(
        "stats-not-charged-to-ledger", "a DP cohort release is charged to the site's ledger before it is computed",
        (Edit("site_worker/stats.py", "    if entries:\n        try:\n", "    if False:\n        try:\n"),),
        (f"{_STATS}::test_dp_release_is_one_gaussian_charged_to_the_ledger_with_secret_noise",),
    ),
    Mutant(
        "stats-numeric-sensitivity-understated", "a bounded numeric column's L2 sensitivity is √3 (a bin, the sum, the sum of squares)",
        (Edit("protocol/cohort.py", "        return 3.0 if self.numeric and self.bounds else 1.0\n",
              "        return 1.0\n"),),
        (f"{_STATS}::test_one_row_moves_the_vector_by_at_most_the_stated_sensitivity",),
    ),
    Mutant(
        "stats-values-not-clipped-to-public-bounds", "a value outside its column's public bounds is clipped before it is summed",
        (Edit("protocol/cohort.py", "                u = np.clip((x[~miss] - lo) / (hi - lo), 0.0, 1.0)\n",
              "                u = np.maximum((x[~miss] - lo) / (hi - lo), 0.0)\n"),),
        (f"{_STATS}::test_one_row_moves_the_vector_by_at_most_the_stated_sensitivity",),
    ),
])

_KITS = "tests/cli/test_kit_portable.py"
_RUN_EPS = "tests/dashboard/test_run_privacy.py"
MUTANTS.extend([
    Mutant(
        "kit-unit-runs-as-root", "a kit's systemd unit runs as the unprivileged user fedbus, never root",
        (Edit("fedbus/kit_unit.py", "User={SERVICE_USER}\n", "User=root\n"),),
        (f"{_KITS}::test_no_kit_file_names_a_path_of_the_provisioning_machine",),
    ),
    Mutant(
        "kit-data-path-absolute", "a kit's data path is relative to the kit, not the provisioner's absolute path",
        (Edit("fedbus/kits.py", "    return os.path.relpath(s.data, kit.resolve())\n", "    return s.data\n"),),
        (f"{_KITS}::test_no_kit_file_names_a_path_of_the_provisioning_machine",),
    ),
    Mutant(
        "site-check-skips-data-without-experiment", "site check opens the data file and checks the target without --experiment",
        (Edit("fedbus/site_check.py", "        out.extend(_check_data_file(name, src) for name, src in sorted(cfg.datasets.items()))\n",
              "        pass\n"),),
        (f"{_KITS}::test_site_check_always_opens_the_data_and_checks_the_target",),
    ),
    Mutant(
        "dashboard-no-plan-before-round-1", "a running DP run's page shows the plan before any round",
        (Edit("fedbus/dashboard/run_privacy.py", "    if not _dp(run.get(\"experiment\") or {}):\n        return None\n",
              "    if True:\n        return None\n"),),
        (f"{_RUN_EPS}::test_a_dp_run_shows_its_plan_before_round_1",),
    ),
    Mutant(
        "run-spent-counts-the-fine-tune-early", "this run's ε while it runs counts only the releases made so far",
        (Edit("coordinator/privacy_plan.py", "        p = dataclasses.replace(p, personalization_steps=0)\n", "        pass\n"),),
        (f"{_RUN_EPS}::test_this_runs_spend_grows_with_the_rounds_trained_up_to_the_plan",),
    ),
    Mutant(
        "export-last-round-test-missing", "the export's last round carries the final test figures as the dashboard's does",
        (Edit("coordinator/results.py", "    _final_as_last_round(figs, rounds, final or {}, test_every)\n", ""),),
        ("tests/dashboard/test_export_matches.py::test_the_export_matches_the_run_page",),
        timeout_s=900,
    ),
])
# ------------------------------------------------------------------ researcher's workbench (issue 25, t25)
_ROLES = "tests/dashboard/test_users_roles.py"
_REGISTRY = "tests/dashboard/test_model_registry.py"
MUTANTS.extend([
    Mutant(
        "viewer-can-act", "a viewer cannot act: every action needs a role allowed to do it (403 otherwise)",
        (Edit("fedbus/dashboard/users.py", "        return self.role in ALLOWED[action]\n", "        return True\n"),),
        (f"{_ROLES}::test_a_viewer_gets_403_on_every_action_even_read_write",),
    ),
    Mutant(
        "registry-signature-not-verified", "a registry entry's signature is verified: an edited entry fails the audit",
        (Edit("coordinator/approvals.py", "        trust.verify(kid, canonical(record), sig)\n", "        pass\n"),),
        (f"{_REGISTRY}::test_a_tampered_entry_fails_the_audit",),
    ),
])
# ------------------------------------------------------------------ secure aggregation wired into the round loop
_SECAGG_RUN = "tests/simulator/test_secure_aggregation.py"
MUTANTS.extend([
    Mutant(
        "secagg-site-sends-plain-update", "under secure aggregation a site publishes only the masked update, never its Update",
        (Edit("site_worker/daemon.py", "            self._reply(d, env, masked, tlog)\n", "            self._reply(d, env, reply, tlog)\n"),),
        (f"{_SECAGG_RUN}::test_no_frame_a_site_publishes_carries_an_update_or_a_training_metric",),
    ),
    Mutant(
        "secagg-relay-drops-shares", "the coordinator relays every sealed share to its recipient (else no U sites can answer)",
        (Edit("coordinator/rounds/secure.py", "            for recipient, sealed in shares:\n",
              "            for recipient, sealed in shares[:0]:\n"),),
        (f"{_SECAGG_RUN}::test_secure_fedavg_equals_the_plain_weighted_mean_within_the_quantisation_error",),
    ),
    Mutant(
        "secagg-coordinator-folds-plain-update", "a coordinator under secure aggregation refuses an unmasked Update",
        (Edit("coordinator/rounds/sync.py", "            if (self.secure is not None) != isinstance(p, MaskedUpdate):\n",
              "            if self.secure is None and isinstance(p, MaskedUpdate):\n"),),
        (f"{_SECAGG_RUN}::test_a_plain_update_in_a_secure_run_is_refused_and_not_stored",),
    ),
])
# ------------------------------------------------------------------ FedBuff under secure aggregation (s22)
_SECAGG_BUF = "tests/simulator/test_secure_fedbuff.py"
MUTANTS.extend([
    Mutant(
        "secagg-site-reuses-tag", "a site tags each masked update past every tag it used (a FedBuff site trains twice "
        "from one version; else it declines its second update as mask_reused)",
        (Edit("site_worker/secagg.py", "        return max([int(at_least)] + [t + 1 for t in st.masked_tags])\n",
              "        return int(at_least)\n"),),
        (f"{_SECAGG_BUF}::test_secure_fedbuff_unmasks_each_buffer_to_its_weighted_mean_and_waits_for_distinct_sites",),
    ),
    Mutant(
        "secagg-buffer-ignores-distinct-sites", "a FedBuff buffer under secure aggregation closes only with updates of "
        "min_contributors distinct sites",
        (Edit("coordinator/rounds/secure_buffer.py",
              "                and len(self._distinct()) >= self.secure.cfg.min_contributors)\n",
              "                and True)\n"),),
        (f"{_SECAGG_BUF}::test_secure_fedbuff_unmasks_each_buffer_to_its_weighted_mean_and_waits_for_distinct_sites",),
    ),
    Mutant(
        "secagg-fedbuff-staleness-allowed", "FedBuff under secure aggregation takes only the constant staleness",
        (Edit("protocol/secagg/rules.py", '        if kind != "constant":\n', "        if False:\n"),),
        (f"{_SA_CFG}::test_fedbuff_under_secure_aggregation_takes_only_the_constant_staleness",),
    ),
])
# ------------------------------------------------------------------ researcher's workbench, closing (issue 25, c25)
_REGISTRY_C25 = "tests/dashboard/test_model_registry.py"
MUTANTS.extend([
    Mutant(
        "dashboard-mark-valid-skips-mlflow", "a dashboard served with --mlflow registers a version marked valid in MLflow's registry too",
        (Edit("fedbus/dashboard/actions.py", "        mlflow = mlflow or self.mlflow\n", "        mlflow = mlflow\n"),),
        (f"{_REGISTRY_C25}::test_mark_valid_on_a_dashboard_served_with_mlflow_registers_there_too",),
    ),
])
_DESIGNER_C25 = "tests/dashboard/test_designer.py"
MUTANTS.extend([
    Mutant(
        "designer-plan-ignores-site-policy", "the designer plans each site's ε with the policy its hello announced, not the site defaults",
        (Edit("fedbus/dashboard/designer.py", "        out[\"privacy_plan\"] = plan(experiment, hellos) if hellos else None\n",
              "        out[\"privacy_plan\"] = plan(experiment, {s: {**h, \"policy\": {}} for s, h in hellos.items()}) if hellos else None\n"),),
        (f"{_DESIGNER_C25}::test_the_eps_plan_is_each_sites_own_from_its_announced_policy",),
    ),
    Mutant(
        "designer-template-keeps-leaking-columns", "a tabular template leaves out the columns that leak the outcome by name (follow-up time)",
        (Edit("fedbus/dashboard/designer.py", "        why = duration_reason(c) or identifier_reason(c, None)\n", "        why = None\n"),),
        (f"{_DESIGNER_C25}::test_tabular_templates_leave_out_the_columns_that_leak_the_outcome",),
    ),
])
# ------------------------------------------------------------------ site liveness from heartbeats (issue 24, c24)
_LIVE = "tests/coordinator/test_liveness.py"
MUTANTS.extend([
    Mutant(
        "liveness-five-minute-window", "a site is offline after three missed beats (at most 30 s), not 5 minutes",
        (Edit("coordinator/liveness.py", "    return min(MISSED * float(every_s), MAX_OFFLINE_AFTER_S)\n",
              "    return 300.0\n"),),
        (f"{_LIVE}::test_online_up_to_three_missed_beats_and_offline_just_after",),
    ),
    Mutant(
        "liveness-beat-at-receipt", "a beat counts from min(received, sent_at): a queued beat does not look fresh",
        (Edit("coordinator/liveness.py", "    return min(received_at, beat_sent_at)\n", "    return received_at\n"),),
        (f"{_LIVE}::test_a_beat_counts_from_its_earlier_clock_and_a_backlog_is_dropped",),
    ),
    Mutant(
        "liveness-beat-for-another-site", "a heartbeat counts only for the site whose key signed it",
        (Edit("coordinator/control.py",
              "    if not isinstance(beat, Heartbeat) or beat.site_id != opened.signer:\n",
              "    if not isinstance(beat, Heartbeat):\n"),
         Edit("coordinator/control.py", "liveness.record(store, opened.signer, beat,",
              "liveness.record(store, beat.site_id, beat,")),
        (f"{_LIVE}::test_the_coordinator_records_signed_beats_and_refuses_a_forged_one",
         "tests/dashboard/test_liveness_between_runs.py::"
         "test_a_forged_beat_is_dead_lettered_with_its_reason_and_counts_for_nobody[memory]"),
    ),
    Mutant(
        "liveness-site-never-beats", "the site daemon beats every alive_every_s after its hello",
        (Edit("site_worker/daemon.py", "        if self.config.alive_every_s > 0:\n", "        if False:\n"),),
        (f"{_LIVE}::test_the_site_daemon_beats_signed_every_interval_after_its_hello",),
    ),
])
# ------------------------------------------------------------------ no DP figure without its interval (issue 24, c24)
MUTANTS.extend([
    Mutant(
        "dashboard-bare-dp-mean-shown", "under DP metrics the run page shows no figure without its interval",
        (Edit("fedbus/dashboard/results.py",
              "        out.update({k: None for k in names if k in WITH_CI and k not in ci})\n", "        pass\n"),),
        ("tests/dashboard/test_no_bare_dp_figure.py::test_the_run_page_drops_a_dp_figure_that_has_no_interval",),
    ),
    Mutant(
        "final-union-keeps-noisy-means", "the coordinator's union under DP keeps no mean of noisy figures (no interval)",
        (Edit("coordinator/final.py",
              "        flat = {k: v for k, v in means.items() if k not in dp_figures.WITH_CI or k == \"majority_class_accuracy\"}\n",
              "        flat = {k: v for k, v in means.items() if k not in dp_figures.WITH_CI or k in (\"accuracy\", \"f1\", \"auc\")}\n"),),
        ("tests/dashboard/test_no_bare_dp_figure.py::test_a_mean_of_noisy_figures_is_not_shown_and_exact_means_are",),
    ),
    Mutant(
        "round-curves-without-intervals", "each site's per-round figure carries the interval it released (curves, API, export)",
        (Edit("fedbus/dashboard/views.py", "    if ci:\n        out[\"ci\"] = ci\n", "    if False:\n        out[\"ci\"] = ci\n"),),
        ("tests/dashboard/test_api.py::test_rounds_carry_test_per_site_when_the_run_asks_for_it",),
    ),
])
MUTANTS.extend([
    Mutant(
        "secagg-roster-refusal-unrecorded", "a site's refusal of a forged roster is recorded as its decline, naming "
        "the rule (not dropped as a stray message)",
        (Edit("coordinator/rounds/secure.py",
              '        if task is None or task.kind != "SecAggRoster" or task.site != msg.site:\n',
              "        if True:\n"),),
        ("tests/adversarial/test_secagg_fedbuff_coordinator.py::"
         "test_a_forged_roster_in_a_fedbuff_run_is_refused_by_every_site",),
    ),
])
# ------------------------------------------------------------------ union metrics from secure sums (s22)
_UNION = "tests/coordinator/test_secure_union_metrics.py"
MUTANTS.extend([
    Mutant(
        "secure-union-noise-not-shared", "a site adds only its share of the union's noise, σ·Δ/√K (K shares add to σ·Δ)",
        (Edit("protocol/secagg/union.py",
              "    return float(noise_multiplier) * float(sensitivity) / math.sqrt(int(min_contributors))\n",
              "    return float(noise_multiplier) * float(sensitivity)\n"),),
        (f"{_UNION}::test_each_share_of_the_noise_is_sigma_delta_over_sqrt_k_and_the_shares_add_to_sigma_delta",
         f"{_UNION}::test_the_union_from_a_secure_sum_carries_the_noise_once_and_is_sqrt_n_narrower"),
    ),
    Mutant(
        "secure-union-without-noise", "a site's contribution to union metrics carries its noise share before it is masked",
        (Edit("site_worker/secure_metrics.py", "    return layout, to_field(v + rng.standard_normal(len(v)) * sd), sd\n",
              "    return layout, to_field(v), sd\n"),),
        (f"{_UNION}::test_each_share_of_the_noise_is_sigma_delta_over_sqrt_k_and_the_shares_add_to_sigma_delta",),
    ),
])
MUTANTS.extend([
    Mutant(
        "cohort-rows-missing-count-as-share", "the cohort table's missing row is the released share with its interval, not the noisy count",
        (Edit("coordinator/cohort.py", "        out.append((f\"{name}: missing\", [_fmt(c.get(\"missing_share\"), pct=True) for c in cols]))\n",
              "        out.append((f\"{name}: missing\", [_fmt(c.get(\"missing\"), pct=True) for c in cols]))\n"),),
        ("tests/coordinator/test_model_card_cohort.py::test_the_card_prints_the_pooled_cohort_with_intervals",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-started-run-not-tracked", "a run a dashboard served with --mlflow starts is given that tracking URI",
        (Edit("fedbus/dashboard/actions.py", "        cmd += [\"--key\", str(key)] + ([\"--mlflow\", self.mlflow] if self.mlflow else [])\n",
              "        cmd += [\"--key\", str(key)]\n"),),
        ("tests/dashboard/test_start_stop.py::test_start_runs_only_experiments_in_the_state_directory",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-plan-missing-for-late-hello", "a site the coordinator planned before its hello gets the one planner's figure",
        (Edit("fedbus/dashboard/run_privacy.py", "    if result_privacy.get(\"plan\") and not unheard:\n",
              "    if result_privacy.get(\"plan\"):\n"),),
        ("tests/dashboard/test_run_privacy.py::test_a_site_planned_before_its_hello_gets_the_planners_figure_from_its_hello",),
    ),
])
# ------------------------------------------------------------------ issue 23: the coordinator's memory (c23)
_INBOX_MEMORY = "tests/coordinator/test_inbox_memory.py::test_waiting_updates_cost_no_memory_and_the_loop_reads_one_at_a_time"
MUTANTS.extend([
    Mutant(
        "coordinator-opens-updates-on-arrival", "updates waiting for the run loop are not opened (their bytes stay unread, "
        "costing no memory); the loop opens one at a time",
        (Edit("coordinator/inbox.py", "        self._queue.put(delivery)\n",
              "        open_delivery(delivery, self.trust)\n        self._queue.put(delivery)\n"),),
        (_INBOX_MEMORY,),
    ),
    Mutant(
        "spilled-transfer-hashed-through-its-map", "a spilled transfer is hashed as its chunks come, never through its map, "
        "so the map stays untouched (not resident) until the loop reads it",
        (Edit("protocol/chunking.py",
              "            return memoryview(whole)\n",
              "            _verify(tid, memoryview(whole), digest, total)\n            return memoryview(whole)\n"),),
        (_INBOX_MEMORY,),
    ),
])
# ------------------------------------------------------------------ an exact figure inside its interval (lead, 7 Dec)
MUTANTS.extend([
    Mutant(
        "exact-interval-misses-exact-auc", "every exact figure lies inside its 95 % interval (the exact AUC is unbinned, "
        "its interval comes from the binned histogram)",
        (Edit("site_worker/final_model.py",
              "            out[f\"{k}_lo\"], out[f\"{k}_hi\"] = min(out[f\"{k}_lo\"], val), max(out[f\"{k}_hi\"], val)\n",
              "            pass\n"),),
        ("tests/site_worker/test_final_release.py::test_every_exact_figure_lies_inside_its_interval_over_many_splits",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-site-dp-figure-without-interval", "a site figure released under DP without its interval is not shown "
        "(the page says '–', never a bare noisy number)",
        (Edit("fedbus/dashboard/results.py", "    dp = released_under_dp(fm)\n", "    dp = False\n"),
         Edit("fedbus/dashboard/results.py", "dp=dp or released_under_dp(pm)", "dp=dp")),
        ("tests/dashboard/test_no_bare_dp_figure.py::test_a_site_figure_released_under_dp_without_its_interval_is_not_shown",),
    ),
])
MUTANTS.extend([
    Mutant(
        "result-dp-figure-without-interval", "a figure released under DP without its interval is withheld where the "
        "result is made, so no CLI table, report or export shows it bare",
        (Edit("protocol/dp_figures.py", "        elif noisy and v is not None:\n", "        elif False:\n"),),
        ("tests/coordinator/test_no_bare_dp_figure_in_summary.py::"
         "test_block_withholds_a_noisy_figure_without_an_interval_and_keeps_an_exact_one",),
    ),
    Mutant(
        "result-dp-mean-of-noisy-figures", "under DP metrics the plain mean of the sites' personalised figures (no "
        "interval) is not in the result",
        (Edit("coordinator/final.py", "        noisy = any(pm.get(\"noise_sd\") for pm in personal.values())\n",
              "        noisy = False\n"),),
        ("tests/coordinator/test_no_bare_dp_figure_in_summary.py::"
         "test_the_summary_and_the_cli_table_never_show_a_bare_dp_figure",),
    ),
])
# ------------------------------------------------------------------ issue 22 item 4: record-level DP at pooled cost (ddp)
_POOLED_SIM = "tests/simulator/test_pooled_dp.py"
MUTANTS.extend([
    Mutant(
        "pooled-noise-share-for-m-plus-one", "each site adds Sk(mu/m, mu/m), so m honest shares sum to the pooled "
        "Sk(mu, mu): the noise of the secure sum has SD sqrt(2 mu)",
        (Edit("site_worker/pooled_dp.py", "    return rng.skellam(mu / assume_honest_sites, dim)\n",
              "    return rng.skellam(mu / (assume_honest_sites + 1), dim)\n"),),
        (f"{_POOLED_SIM}::test_the_noise_of_the_sum_has_the_pooled_sd",
         "tests/site_worker/test_pooled_dp.py::test_skellam_shares_of_m_sites_sum_to_the_pooled_variance"),
    ),
    Mutant(
        "pooled-rounding-per-batch", "each record's clipped gradient is rounded on its own, so one record moves the "
        "integer sum by at most Delta2 = s*C + sqrt(d) (the accountant's sensitivity)",
        (Edit("site_worker/pooled_dp.py",
              "    rows = torch.round(per.mul_(factor * scale)).to(torch.int64)  # per sample: the sensitivity's premise\n"
              "    return rows.sum(dim=0).numpy()\n",
              "    return torch.round(per.mul_(factor * scale).sum(dim=0)).to(torch.int64).numpy()\n"),),
        ("tests/site_worker/test_pooled_dp.py::test_the_batch_sum_rounds_each_record_separately",),
    ),
    Mutant(
        "pooled-honest-floor-off-by-one", "a site masks a pooled share only under a roster whose min_contributors is "
        "at least its assume_honest_sites (m = K just inside, m = K + 1 refused)",
        (Edit("site_worker/secagg.py", "        if roster.min_contributors < int(assume_honest_sites):\n",
              "        if roster.min_contributors < int(assume_honest_sites) - 1:\n"),),
        (f"{_POOLED_SIM}::test_a_site_assuming_more_honest_sites_than_the_roster_unmasks_refuses_to_contribute",),
    ),
    Mutant(
        "subsampled-rdp-q-too-small", "the Poisson-subsampled RDP bound is computed at the sampling rate q itself "
        "(never below Opacus' exact sampled-Gaussian RDP)",
        (Edit("protocol/secagg/skellam.py", "    lq, l1q = math.log(q), math.log1p(-q)\n",
              "    q = q / 2\n    lq, l1q = math.log(q), math.log1p(-q)\n"),),
        ("tests/protocol/test_skellam_accountant.py::test_the_subsampled_bound_on_the_gaussian_is_sound_and_within_a_stated_factor",),
    ),
])
_POOLED_BUS = "tests/simulator/test_pooled_dp_bus.py"
MUTANTS.extend([
    Mutant(
        "pooled-daemon-trains-locally", "a site's daemon answers a pooled-DP TrainTask with one masked pooled step "
        "charged to its ledger as planned (never with its local trainer)",
        (Edit("site_worker/daemon.py", "        if secure is not None and secure.get(\"dp\") == \"pooled\":", "        if False:"),),
        (f"{_POOLED_BUS}::test_a_pooled_run_over_the_memory_bus_charges_each_ledger_the_plan",),
    ),
    Mutant(
        "pooled-run-under-another-aggregator", "a pooled-DP run steps with FedAvg or FedBuff only (the coordinator's "
        "step is the SGD step on the pooled gradient; a server optimiser is not wired)",
        (Edit("coordinator/secagg.py",
              "    if sa is not None and sa.dp != \"off\" and name not in (\"FedAvg\", \"FedBuff\"):\n",
              "    if False:\n"),),
        (f"{_POOLED_BUS}::test_a_pooled_run_steps_with_fedavg_only",),
    ),
    Mutant(
        "pooled-policy-honest-floor-off-by-one", "a site declines a pooled run whose min_contributors is below its "
        "assume_honest_sites (m = K inside, m = K + 1 refused)",
        (Edit("site_worker/policy.py", "    if sa.min_contributors < policy.assume_honest_sites:\n",
              "    if sa.min_contributors < policy.assume_honest_sites - 1:\n"),),
        (f"{_POOLED_BUS}::test_a_sites_policy_refuses_what_it_cannot_honour",),
    ),
])
# ------------------------------------------------------------------ issue 23: coordinator memory at 10 M x 10 and 100 M x 3 (mem)
MUTANTS.extend([
    Mutant(
        "consumer-window-without-credit", "the AMQP consumer holds at most BACKLOG_CHUNKS chunk sizes its worker has "
        "not spilled (the broker gets credit, not the whole window of every transfer in flight)",
        (Edit("protocol/transport/consumer.py",
              "        return max(1, min(_MAX_PREFETCH, self.prefetch + self._extra, credit))\n",
              "        return max(1, min(_MAX_PREFETCH, self.prefetch + self._extra))\n"),),
        ("tests/transport/test_consumer_backlog.py::test_a_slow_worker_holds_at_most_the_credit_of_chunks",),
    ),
    Mutant(
        "checkpoint-loaded-whole-then-copied", "loading a checkpoint holds one model (each tensor read into its own "
        "array), not the whole file and a copy of it",
        (Edit("coordinator/checkpoints.py", "    arrays, meta = read_safetensors(path)\n",
              "    arrays, meta = read_safetensors(path)\n    from safetensors.numpy import load_file\n"
              "    arrays = load_file(str(path))\n"),),
        ("tests/coordinator/test_checkpoint_memory.py::test_loading_a_checkpoint_holds_one_model",),
    ),
])
MUTANTS.extend([
    Mutant(
        "cli-usage-error-box", "click's usage errors (a value out of range, an unknown option) are one line naming the "
        "option, exit 2",
        (Edit("fedbus/cli_common.py", "complete_var, standalone_mode=False, **extra)",
              "complete_var, standalone_mode=standalone_mode, **extra)"),),
        ("tests/cli/test_bad_input.py::test_usage_errors_are_one_line_naming_the_option",),
    ),
])
MUTANTS.extend([
    Mutant(
        "pooled-run-trained-locally-without-noise", "the site's local trainer declines a pooled-DP run (only the pooled "
        "step, with its Skellam share, may answer it)",
        (Edit("site_worker/handlers.py",
              "        if (sa := exp.federated.secure_aggregation) is not None and sa.dp != \"off\":  # never without its noise\n",
              "        if False:\n"),),
        (f"{_POOLED_BUS}::test_the_task_handler_never_trains_a_pooled_run_without_its_noise",),
    ),
])
MUTANTS.extend([
    Mutant(
        "cli-table-cuts-intervals", "the CLI result tables never cut a figure's interval short (a log gets the full "
        "width, a narrow terminal folds)",
        (Edit("simulator/table.py", "        con.width = max(con.width, 160)\n", "        pass\n"),
         Edit("simulator/table.py", 'sites.add_column(col, justify="right", overflow="fold")',
              'sites.add_column(col, justify="right")')),
        ("tests/coordinator/test_no_bare_dp_figure_in_summary.py::"
         "test_no_interval_is_cut_short_in_a_log_or_on_a_narrow_terminal",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-noisy-count-unmarked", "under DP metrics a site's test-row count (the released matrix's noisy total) is "
        "marked as noisy on the run page",
        (Edit("fedbus/dashboard/results.py", '        "n_test_noisy": dp,\n', '        "n_test_noisy": False,\n'),),
        ("tests/dashboard/test_no_bare_dp_figure.py::test_a_site_figure_released_under_dp_without_its_interval_is_not_shown",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-secure-run-unsaid", "a run under secure aggregation says so on its page while it runs (from its "
        "experiment), before its result exists",
        (Edit("fedbus/dashboard/results.py", "    if isinstance(sa, dict):\n        return {\"used\": True,",
              "    if False:\n        return {\"used\": True,"),),
        ("tests/dashboard/test_secure_run_page.py::test_a_running_secure_run_says_so_from_its_experiment",),
    ),
    Mutant(
        "dashboard-no-dp-run-reads-zero", "a run without DP reads 'no DP', not '0.00 · planned not planned' because its "
        "sites' lifetime ledgers exist",
        (Edit("fedbus/dashboard/static/dashboard.js",
              "const dp = spent.some((v) => v > 0) || planned.some((v) => v > 0) || trainsDp;",
              "const dp = spent.length || planned.length || lifetime.length;"),),
        ("tests/dashboard/test_secure_run_page.py::test_the_run_page_says_what_the_coordinator_saw",),
    ),
])
MUTANTS.extend([
    Mutant(
        "initial-weights-import-torch", "a coordinator makes the common models' initial weights without importing torch "
        "(issue 23: fixed cost)",
        (Edit("coordinator/initial_model.py", "    made = weights(chain, seed=seed)\n", "    made = None\n"),),
        ("tests/coordinator/test_initial_model.py::test_a_coordinator_makes_the_example_models_without_importing_torch",),
    ),
    Mutant(
        "initial-weights-not-torchs-bits", "the torch-free initial weights are torch's bit for bit (bounds rounded to "
        "float32 first, as torch does)",
        (Edit("protocol/initial_numpy.py", "        lo, hi = float(np.float32(low)), float(np.float32(high))\n",
              "        lo, hi = low, high\n"),),
        ("tests/protocol/test_initial_numpy.py::test_larger_layers_and_the_torch_only_types",),
    ),
])
MUTANTS.extend([
    Mutant(
        "patience-gives-up-one-early", "the asynchronous loops give up after max_round_retries silent deadlines in a "
        "row, not at them",
        (Edit("coordinator/rounds/patience.py", "        return self.misses > self.retries\n",
              "        return self.misses >= self.retries\n"),),
        ("tests/coordinator/test_patience.py::test_the_deadline_edge_and_the_retries_edge",),
    ),
    Mutant(
        "patience-deadline-edge", "the deadline itself has passed (a silent deadline), just before it the loop waits on",
        (Edit("coordinator/rounds/patience.py", "        if time.time() < self.deadline:\n",
              "        if time.time() <= self.deadline:\n"),),
        ("tests/coordinator/test_patience.py::test_the_deadline_edge_and_the_retries_edge",),
    ),
])
MUTANTS.extend([
    Mutant(
        "pooled-step-memory-unchecked", "a pooled step whose per-sample gradients would not fit the site's "
        "max_train_memory_mb is declined before anything is spent",
        (Edit("site_worker/pooled_task.py", "            except PolicyViolation as e:\n                raise _Decline(\"policy\", str(e)) from None\n",
              "            except PolicyViolation:\n                pass\n"),),
        (f"{_POOLED_BUS}::test_a_pooled_step_that_would_not_fit_the_sites_memory_is_declined_before_anything_is_spent",),
    ),
])
MUTANTS.extend([
    Mutant(
        "kit-needs-root", "a provisioned kit, copied and handed to an unprivileged user, runs as that user (its state "
        "in the kit, nothing under a root-only path)",
        (Edit("fedbus/kits.py", 'state_dir = "state"\nlog_level = "info"\n',
              'state_dir = "/root/fedbus-state"\nlog_level = "info"\n'),),
        ("tests/cli/test_kit_portable.py::test_a_copied_kit_runs_as_an_unprivileged_user",),
    ),
])
_UNION_RUN = "tests/simulator/test_secure_union_run.py"
MUTANTS.extend([
    Mutant(
        "union-share-is-the-whole-noise", "under secure aggregation each site adds only its share σ·Δ/√K of the "
        "union's noise, so the unmasked sum carries σ·Δ once (issue 22 item 5)",
        (Edit("protocol/secagg/union.py",
              "    return float(noise_multiplier) * float(sensitivity) / math.sqrt(int(min_contributors))\n",
              "    return float(noise_multiplier) * float(sensitivity)\n"),),
        (f"{_UNION_RUN}::test_the_union_figures_come_from_the_secure_sum_with_the_noise_once",),
    ),
    Mutant(
        "union-from-pooled-releases", "a secure run's union figures come from the unmasked sum of the union vectors, "
        "not from pooling the sites' own releases",
        (Edit(EVALUATION,
              "        out = final.summarise(ctx.experiment, results, config=config, aggregator=self.aggregator, union=figures)\n",
              "        out = final.summarise(ctx.experiment, results, config=config, aggregator=self.aggregator)\n"),),
        (f"{_UNION_RUN}::test_the_union_figures_come_from_the_secure_sum_with_the_noise_once",),
    ),
    Mutant(
        "union-release-not-charged", "a site charges its union release to its ledger beside its own final release, "
        "as the privacy plan counts it",
        (Edit(HANDLERS,
              "        entries = release_entries(policy) + (union_release_entries(policy) if union else [])\n",
              "        entries = release_entries(policy)\n"),),
        (f"{_UNION_RUN}::test_each_site_charged_its_own_release_and_the_union_release_as_planned",),
    ),
    Mutant(
        "union-release-not-planned", "the privacy plan counts the final test's union release of a secure run",
        (Edit("protocol/privacy_plan.py", "    final = tuple(one + union_entries(experiment, policy))\n",
              "    final = tuple(one)\n"),),
        ("tests/protocol/test_union_plan.py",),
    ),
    Mutant(
        "union-vector-sent-unmasked", "a site's union vector leaves it masked, never as its quantised values",
        (Edit("site_worker/secure_metrics.py",
              "    fields = {\"union_tag\": tag, \"union_masked\": ((\"masked\", F.to_bytes_array(out.masked)),),\n",
              "    plain = F.quantise(packed, F.QuantConfig(roster.clip, roster.scale, len(roster.sites)))\n"
              "    fields = {\"union_tag\": tag, \"union_masked\": ((\"masked\", F.to_bytes_array(plain)),),\n"),),
        (f"{_UNION_RUN}::test_no_frame_a_site_publishes_carries_an_unmasked_union_vector",),
    ),
    Mutant(
        "union-asks-below-k", "the coordinator asks to unmask a union only from at least min_contributors vectors "
        "(K inside; K - 1: pooled releases, saying why)",
        (Edit("coordinator/rounds/secure.py", "        if len(contributors) < self.cfg.min_contributors:\n",
              "        if len(contributors) < self.cfg.min_contributors - 1:\n"),),
        (f"{_UNION_RUN}::test_the_union_is_unmasked_only_from_at_least_k_vectors",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-withheld-final-falls-back-to-validation", "a run whose final test accuracy is withheld shows its "
        "final test figures (with intervals or withheld), never bare validation figures as its headline",
        (Edit("fedbus/dashboard/static/dashboard.js", "    const haveTest = finalTest, p = f.personalized;\n",
              "    const haveTest = test.accuracy !== null && test.accuracy !== undefined, p = f.personalized;\n"),),
        ("tests/dashboard/test_withheld_final_page.py::test_a_withheld_final_accuracy_leaves_no_bare_figure",),
    ),
    Mutant(
        "dashboard-runs-list-bare-figures", "the runs list shows each final figure with its interval or withheld, as "
        "the run page does",
        (Edit("fedbus/dashboard/views.py", '"final": {**results.figures(final, METRICS, dp=results.under_dp(final)),',
              '"final": {**{k: _num(final.get(k)) for k in METRICS},'),),
        ("tests/dashboard/test_withheld_final_page.py::test_a_withheld_final_accuracy_leaves_no_bare_figure",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-masked-updates-uncounted", "the run page's ε this run counts the rounds a site trained with masked "
        "updates (secure aggregation), not only plain ones",
        (Edit("fedbus/dashboard/views.py", 'UPDATE_KINDS = ("Update", "MaskedUpdate")', 'UPDATE_KINDS = ("Update",)'),),
        ("tests/dashboard/test_secure_run_page.py::test_the_run_page_says_what_the_coordinator_saw",),
    ),
    Mutant(
        "dashboard-union-source-unsaid", "a secure run's union test figures say they come from the secure sum",
        (Edit("fedbus/dashboard/results.py", '        "union_source": final.get("union_source"),\n', ''),),
        ("tests/dashboard/test_secure_run_page.py::test_the_run_page_says_what_the_coordinator_saw",),
    ),
])
MUTANTS.extend([
    Mutant(
        "capacity-requeue-before-room", "a transfer refused for reassembly capacity is requeued (all its chunks "
        "together) only once the reassembler has room for it, so it does not bounce ahead of the admitted "
        "transfer's chunks",
        (Edit("protocol/transport/backlog.py", " or not reasm.has_room(d.total, d.count, user=key[0], ahead=ahead):",
              ":"),),
        ("tests/transport/test_consumer_backlog.py::"
         "test_a_transfer_refused_for_capacity_waits_once_without_stalling_the_worker",),
    ),
])
# ------------------------------------------------------------------ one admission rule for the asynchronous loops
MUTANTS.extend([
    Mutant(
        "secagg-fedbuff-folds-plain-update", "a FedBuff run under secure aggregation refuses an unmasked Update "
        "(the asynchronous loops share one admission rule, coordinator/rounds/answers.py)",
        (Edit("coordinator/rounds/answers.py",
              "    if masked and (isinstance(p, Update) or not isinstance(p, MaskedUpdate)):\n",
              "    if False:\n"),),
        ("tests/simulator/test_secure_fedbuff.py::test_a_plain_update_in_a_secure_fedbuff_run_is_refused_and_not_stored",),
    ),
])
_LIVE = "tests/dashboard/test_liveness_between_runs.py"
MUTANTS.extend([
    Mutant(
        "liveness-monitor-records-nothing", "between runs the dashboard's liveness monitor records each verified "
        "heartbeat (it acked them and kept none: every site stayed offline)",
        (Edit("coordinator/liveness_monitor.py", "if record_beat(self.store, opened, received_at=time.time()):",
              'if type(opened.envelope.payload).__name__ == "Heartbeat":'),),
        (f"{_LIVE}::test_between_runs_a_beating_site_is_online_then_offline_and_its_hello_stays_for_the_run[memory]",),
    ),
    Mutant(
        "listening-ignores-the-monitor", "the sites page counts a ticking liveness monitor as listening, so between "
        "runs it says offline, not 'not monitored'",
        (Edit("fedbus/dashboard/data.py",
              'return any(fresh(m, now=now) for m in self._rows("SELECT name, seen_at, every_s FROM monitors"))',
              "return False"),),
        (f"{_LIVE}::test_a_monitor_is_believed_for_three_ticks_and_not_after_it_stops",),
    ),
    Mutant(
        "monitor-believed-forever", "a monitor's tick is believed for three ticks, not forever: a killed dashboard "
        "stops claiming 'monitored'",
        (Edit("coordinator/liveness.py",
              'return now - float(tick["seen_at"]) <= offline_after_s(float(tick["every_s"]))', "return True"),),
        (f"{_LIVE}::test_a_monitor_is_believed_for_three_ticks_and_not_after_it_stops",),
    ),
    Mutant(
        "monitor-ticks-unsubscribed", "the monitor ticks only while its consumer is subscribed (Consumer.live)",
        (Edit("coordinator/liveness_monitor.py", "if self.consumer is None or not self.consumer.live:",
              "if self.consumer is None:"),),
        (f"{_LIVE}::test_a_monitor_is_believed_for_three_ticks_and_not_after_it_stops",),
    ),
    Mutant(
        "liveness-queue-unbounded", "the liveness queue nobody may be watching keeps at most LIVENESS_MAX_LENGTH "
        "messages (drop-head)",
        (Edit("protocol/transport/layout.py", '"x-max-length": LIVENESS_MAX_LENGTH, ', ""),),
        (f"{_LIVE}::test_the_liveness_queue_is_bounded_and_drops_its_oldest",),
    ),
])
# ------------------------------------------------------------------ issue 22 item 4: user-level central DP under secure aggregation (cdp)
_CENTRAL = "tests/simulator/test_central_dp.py"
_CENTRAL_BUS = "tests/simulator/test_central_dp_bus.py"
MUTANTS.extend([
    Mutant(
        "central-clip-skipped", "a central-DP site clips its whole update to C before rounding: a huge update moves "
        "the unmasked sum by at most s*C (to the rounding), an update just inside C passes unchanged",
        (Edit("site_worker/central_dp.py", "    return d if norm <= clip or norm == 0.0 else d * (clip / norm)\n",
              "    return d\n"),),
        (f"{_CENTRAL}::test_a_huge_update_is_clipped_the_sum_moves_by_at_most_s_times_c",),
    ),
    Mutant(
        "central-share-not-divided-by-m", "each central-DP site adds Sk(mu/m, mu/m), so m honest shares sum to "
        "Sk(mu, mu): the unmasked sum's noise has variance 2 mu",
        (Edit("site_worker/central_dp.py", "        return ints + noise_share(self.mu, self.assume_honest_sites, ints.size, rng)\n",
              "        return ints + noise_share(self.mu, 1, ints.size, rng)\n"),),
        (f"{_CENTRAL}::test_the_noise_of_the_unmasked_sum_has_variance_2mu",),
    ),
    Mutant(
        "central-ledger-not-charged", "a central-DP site charges its ledger the run's planned epsilon (T sampled "
        "Skellam steps) before its first masked update leaves",
        (Edit("site_worker/central_task.py", "pooled=[share.entry(int(delta_vec.size), steps=1 if per_update else None)])",
              "pooled=[])"),),
        (f"{_CENTRAL_BUS}::test_a_central_run_charges_each_ledger_the_plan_and_learns_like_the_run_without_dp",),
    ),
    Mutant(
        "central-charged-every-round", "the run's central-DP charge is made once (on the site's first update of the "
        "run), so the ledger after the run equals the plan",
        (Edit("site_worker/central_task.py",
              "            first = per_update or not charged(handler, task.dataset, env.run_id)\n",
              "            first = True\n"),),
        (f"{_CENTRAL_BUS}::test_a_central_run_charges_each_ledger_the_plan_and_learns_like_the_run_without_dp",),
    ),
    Mutant(
        "central-daemon-masks-without-noise", "a site's daemon answers a central-DP TrainTask with the clipped, "
        "noised integer update (never the plain weighted vector)",
        (Edit("site_worker/daemon.py", "            if secure.get(\"dp\") == \"central\":", "            if False:"),),
        (f"{_CENTRAL_BUS}::test_a_central_run_charges_each_ledger_the_plan_and_learns_like_the_run_without_dp",),
    ),
    Mutant(
        "central-rounds-cap-off-by-one", "a site masks at most T central updates of a run (T-th inside, T+1-th "
        "refused): its ledger was charged T steps",
        (Edit("site_worker/central_dp.py", "    if masked_before >= rounds:\n", "    if masked_before > rounds:\n"),),
        (f"{_CENTRAL}::test_the_site_masks_at_most_t_updates_of_a_run",),
    ),
    Mutant(
        "central-denominator-realised", "the central round's denominator is the count the coordinator sampled from "
        "the roster, fixed before any reply (a dropout does not change it)",
        (Edit("coordinator/rounds/secure.py", "        self.planned = len(chosen)\n",
              "        self.planned = len([s for s in chosen if s in set(available)])\n"),),
        (f"{_CENTRAL}::test_the_coordinator_samples_the_roster_from_its_secret_and_fixes_the_denominator",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dp-sum-with-two-updates-of-one-site", "under the DP modes a site answers no request whose sum holds two "
        "updates of one site (its sensitivity there would double past what its ledger charged)",
        (Edit("site_worker/secagg.py", "        if st.pooled_floor and len(hospitals) != len(wanted):",
              "        if False:"),),
        (f"{_CENTRAL}::test_a_sum_holding_two_updates_of_one_site_is_refused_under_the_dp_modes",),
    ),
])
MUTANTS.extend([
    Mutant(
        "capacity-requeue-all-that-fit-alone", "transfers waiting for reassembly capacity are requeued only as "
        "many as fit together, counting those requeued and not yet back as admitted (else the one that lost "
        "is refused again and all its chunks are received a third time)",
        (Edit("protocol/transport/backlog.py", "    ahead = [(r.user, r.total, r.count) for r in returning.values()]\n",
              "    ahead: list[tuple[str, int, int]] = []\n"),
         Edit("protocol/transport/backlog.py", "        ahead.append((key[0], d.total, d.count))\n", "")),
        ("tests/transport/test_consumer_backlog.py::"
         "test_waiting_transfers_are_requeued_only_as_many_as_fit_together",),
    ),
    Mutant(
        "has-room-ignores-transfers-ahead", "a reassembler's room counts the transfers requeued ahead of the one "
        "asked about (bytes, chunks and transfers, per user and in all)",
        (Edit("protocol/chunking.py", "        for u, t, c in ahead:\n", "        for u, t, c in ():\n"),),
        ("tests/protocol/test_chunk_edges.py::test_room_counts_the_transfers_requeued_ahead_at_the_edge",),
    ),
])
MUTANTS.extend([
    Mutant(
        "union-noise-at-the-curves-sigma", "the final test's union release under secure aggregation is noised "
        "at the policy's union_noise_multiplier (what the ledger charges), not the per-round curves' σ_m",
        (Edit("site_worker/secure_metrics.py", "    sd = noise_share_sd(policy.union_noise_multiplier, sens, min_contributors)",
              "    sd = noise_share_sd(policy.metrics_noise_multiplier, sens, min_contributors)"),),
        ("tests/coordinator/test_secure_union_metrics.py::"
         "test_each_share_of_the_noise_is_sigma_delta_over_sqrt_k_and_the_shares_add_to_sigma_delta",),
    ),
    Mutant(
        "union-majority-from-the-sites-mean", "under secure aggregation the union's majority-class baseline comes "
        "from the secure sum's class counts, with its interval (not the mean of the sites' noisier releases)",
        (Edit("coordinator/final.py", '    flat = {k: v for k, v in union.items() if k != "n"}\n',
              '    flat = {k: v for k, v in union.items() if k != "n" and not k.startswith("majority_class_accuracy")}\n'),),
        ("tests/simulator/test_secure_union_run.py::"
         "test_the_union_interval_holds_the_exact_union_accuracy_and_is_narrower",),
    ),
    Mutant(
        "kit-drops-the-projects-test-fraction", "a project's test_fraction reaches every kit's policy",
        (Edit("fedbus/kits.py", "    if s.test_fraction is None:\n        return \"\"\n",
              "    if True:\n        return \"\"\n"),),
        ("tests/cli/test_kits.py::test_the_project_sets_the_kits_test_fraction_and_a_site_may_override_it",),
    ),
])
MUTANTS.extend([
    Mutant(
        "surplus-unmask-answer-rejected", "an unmask answer that comes after its sum was unmasked (U of N "
        "suffice) is the protocol working, recorded as such, never listed as a late or rejected message",
        (Edit("coordinator/rounds/secure.py",
              "        ctx.inbox.close_requests({t: s for t, s in asked.items() if s not in answers and s not in refused})\n",
              ""),),
        ("tests/dashboard/test_secure_run_page.py::test_the_run_page_says_what_the_coordinator_saw",),
    ),
    Mutant(
        "final-test-omits-the-ledger", "a site's test release says its ledger after it, so the run page's site "
        "lifetime ε includes the run's last releases (never below ε this run)",
        (Edit("site_worker/handlers.py", "            m[\"epsilon\"] = projected\n", "            pass\n"),),
        ("tests/dashboard/test_secure_run_page.py::test_the_run_page_says_what_the_coordinator_saw",),
    ),
])
MUTANTS.extend([
    Mutant(
        "auc-past-one", "a released AUC and its interval stay inside [0, 1] (float sums of a separated "
        "fractional histogram land one ulp past 1)",
        (Edit("protocol/dp_figures.py",
              "    return np.clip(_ratio((pos * (below + 0.5 * neg)).sum(-1), pos.sum(-1) * neg.sum(-1)), 0.0, 1.0)\n",
              "    return _ratio((pos * (below + 0.5 * neg)).sum(-1), pos.sum(-1) * neg.sum(-1))\n"),),
        ("tests/protocol/test_dp_figures.py::test_auc_and_its_interval_stay_in_0_1_on_separated_fractional_histograms",),
    ),
])
MUTANTS.extend([
    Mutant(
        "dashboard-baseline-mean-under-secure-sum", "under secure aggregation the run page's majority-class "
        "baseline is the union's, from the secure sum with its interval (not the mean of the sites' noisier ones)",
        (Edit("fedbus/dashboard/results.py",
              '    summed = final.get("union_source") == "secure_sum" and stored is not None  # the union\'s own class counts\n',
              "    summed = False\n"),),
        ("tests/dashboard/test_secure_run_page.py::test_the_run_page_says_what_the_coordinator_saw",),
    ),
])
# ------------------------------------------------------------------ DP and union metrics under FedBuff (s22)
MUTANTS.extend([
    Mutant(
        "fedbuff-final-without-union", "a FedBuff run under secure aggregation ends with the same final test as "
        "the sync loop: its union figures come from one unmasked secure sum, the noise added once",
        (Edit(RUN, "                weights, secure = buffered.run(initial.pop(), first_round, sites), buffered.secure\n",
              "                weights = buffered.run(initial.pop(), first_round, sites)\n"),),
        (f"{_UNION_RUN}::test_the_union_figures_come_from_the_secure_sum_with_the_noise_once",),
    ),
    Mutant(
        "fedbuff-union-not-planned", "the privacy plan (and so the roster's room and the site's ledger) counts the "
        "union release of a FedBuff run's final test",
        (Edit("protocol/secagg/union.py", "    return (sa is not None\n",
              "    return (sa is not None and fed.name != \"FedBuff\"\n"),),
        ("tests/protocol/test_union_plan.py",),
    ),
])
_CENTRAL_FEDBUFF = "tests/simulator/test_central_dp_fedbuff.py"
MUTANTS.extend([
    Mutant(
        "central-fedbuff-charged-subsampled", "under FedBuff no coordinator samples the sites: a central-DP site "
        "charges each masked update at q = 1, never the sync loop's amplified k/N",
        (Edit("protocol/secagg/rules.py", "    if fed.name == \"FedBuff\":\n        return 1.0\n", ""),),
        (f"{_CENTRAL_FEDBUFF}::test_a_target_epsilon_under_fedbuff_is_planned_at_q_1",),
    ),
    Mutant(
        "central-fedbuff-charged-once", "under FedBuff a central-DP site charges every masked update as it masks it "
        "(one un-subsampled step each), not only its first",
        (Edit("site_worker/central_task.py",
              "            first = per_update or not charged(handler, task.dataset, env.run_id)\n",
              "            first = not charged(handler, task.dataset, env.run_id)\n"),),
        (f"{_CENTRAL_FEDBUFF}::test_each_ledger_equals_the_plan_and_t_unsubsampled_steps",),
    ),
    Mutant(
        "central-fedbuff-charges-the-run-per-update", "under FedBuff each masked update is charged one step, so "
        "the ledger composes exactly the updates masked (at most T)",
        (Edit("site_worker/central_task.py", "steps=1 if per_update else None)", "steps=None)"),),
        (f"{_CENTRAL_FEDBUFF}::test_each_ledger_equals_the_plan_and_t_unsubsampled_steps",),
    ),
    Mutant(
        "central-fedbuff-rounds-cap-off-by-one", "a FedBuff site masks at most T central updates of a run and "
        "declines the (T+1)-th a coordinator asks for, naming the rule",
        (Edit("site_worker/central_dp.py", "    if masked_before >= rounds:\n", "    if masked_before > rounds:\n"),),
        (f"{_CENTRAL_FEDBUFF}::test_a_coordinator_asking_for_a_t_plus_first_update_is_refused",),
    ),
    Mutant(
        "central-fedbuff-denominator", "a central FedBuff buffer's sum is divided by s x buffer_size, public and "
        "fixed before any update arrives",
        (Edit("coordinator/rounds/secure_buffer.py", "            self.secure.planned = self.buffer_size  #",
              "            self.secure.planned = self.buffer_size + 1  #"),),
        (f"{_CENTRAL_FEDBUFF}::test_each_buffer_sums_one_noisy_update_per_site_and_divides_by_buffer_size",),
    ),
    Mutant(
        "central-fedbuff-planned-at-fraction-fit", "a target epsilon under FedBuff is planned over T un-subsampled "
        "updates (q = 1), not at fraction_fit",
        (Edit("protocol/secagg/rules.py",
              "        q = 1.0 if central_per_update(experiment) else experiment.federated.fraction_fit\n",
              "        q = experiment.federated.fraction_fit\n"),),
        (f"{_CENTRAL_FEDBUFF}::test_a_target_epsilon_under_fedbuff_is_planned_at_q_1",),
    ),
])
_POOLED_FEDBUFF = "tests/simulator/test_pooled_dp_fedbuff.py"
MUTANTS.extend([
    Mutant(
        "dp-fedbuff-retask-before-commit", "under the DP modes a FedBuff site whose update is in the open buffer is "
        "re-tasked only once that buffer commits (one update per site per buffer, T steps per site in a T-version "
        "run, each ledger the plan)",
        (Edit("coordinator/rounds/secure_buffer.py",
              "        (self.after_commit if self.one_per_site else self.retask).append(site)\n",
              "        self.retask.append(site)\n"),),
        (f"{_POOLED_FEDBUFF}::test_a_pooled_fedbuff_run_steps_on_each_buffers_sum_and_charges_each_ledger_the_plan",),
    ),
    Mutant(
        "dp-fedbuff-buffer-past-max-sites", "under the DP modes a FedBuff buffer_size above max_sites (a buffer that "
        "could never close with one update per site) is refused naming the key, max_sites itself just inside",
        (Edit("protocol/secagg/rules.py", "        if k > sa.max_sites:  #", "        if k > sa.max_sites + 1:  #"),),
        ("tests/simulator/test_pooled_dp.py::test_the_pooled_block_is_validated_with_one_line_errors",),
    ),
])
MUTANTS.extend([
    Mutant(
        "site-check-pooled-says-dp-off", "fedbus site check shows a pooled-DP run's epsilon (the planner's, equal to "
        "the ledger after the run), not \"DP is off\"",
        (Edit("fedbus/site_check.py", '    if spec.dp is None and sa is not None and sa.dp in ("pooled", "central"):\n',
              '    if spec.dp is None and sa is not None and sa.dp in ("central",):\n'),),
        (f"{_POOLED_FEDBUFF}::test_a_pooled_fedbuff_run_steps_on_each_buffers_sum_and_charges_each_ledger_the_plan",),
    ),
])
MUTANTS.extend([
    Mutant(
        "async-run-reads-as-gaps", "an asynchronous run (FedBuff, FedAsync) that merged every update ends "
        "\"completed\": a version's contributors are no gap, only declines are",
        (Edit("coordinator/run.py", "                              synchronous=self.agg.synchronous)\n",
              "                              synchronous=True)\n"),),
        ("tests/coordinator/test_run_memory.py::test_fedbuff_run_steps_every_k_updates",),
    ),
])
_FIELD_CORE = "tests/protocol/test_secagg_core.py"
MUTANTS.extend([
    Mutant(
        "field-reduce-one-fold", "the field's division-free reduction folds twice: one fold leaves values up to "
        "2**32 that are not field elements",
        (Edit("protocol/secagg/field.py", "    np.right_shift(x, 31, out=t)\n    np.bitwise_and(x, P, out=x)\n"
              "    x += t  # <= p + 1\n", "    pass  # <= p + 1\n"),),
        (f"{_FIELD_CORE}::test_reduce_equals_python_modulo_over_its_whole_domain_and_at_the_edges",),
    ),
    Mutant(
        "combine-limb-join", "the fast share encoder joins its two limb products with 2**31 = 1 mod p: a wrong limb "
        "mask gives wrong shares",
        (Edit("protocol/secagg/coding.py", "        high &= 0x7FFF\n", "        high &= 0xFFFF\n"),),
        (f"{_FIELD_CORE}::test_combine_equals_the_big_integer_product_up_to_and_past_its_float64_limit",),
    ),
    Mutant(
        "combine-float64-past-64-terms", "float64 products stay exact only up to 64 terms: past that the encoder "
        "falls back to integer products",
        (Edit("protocol/secagg/coding.py", "_EXACT_TERMS = 64  #", "_EXACT_TERMS = 65  #"),),
        (f"{_FIELD_CORE}::test_combine_equals_the_big_integer_product_up_to_and_past_its_float64_limit",),
    ),
])
MUTANTS.extend([
    Mutant(
        "frame-digest-binds-part-of-body", "a v2 frame's signature covers sha256 of the WHOLE body: a digest of a "
        "prefix would let the tail be swapped under a valid signature",
        (Edit("protocol/codec.py", "    return _SIGNED_PREFIX + hashlib.sha256(body).digest()\n",
              "    return _SIGNED_PREFIX + hashlib.sha256(body[:16]).digest()\n"),
         Edit("protocol/codec.py", "    identity = trust.verify(kid, _SIGNED_PREFIX + digest, sig)",
              "    identity = trust.verify(kid, _SIGNED_PREFIX + hashlib.sha256(body[:16]).digest(), sig)")),
        ("tests/protocol/test_codec.py::test_the_signature_covers_the_bodys_sha256_under_the_v2_prefix_and_nothing_else_verifies",),
    ),
])
# ------------------------------------------------------------------ issue 23: the 100 M round, faster (big, 8 Dec)
_RUNNING_HASH = "tests/protocol/test_chunking.py::test_the_running_hash_is_checked_before_a_body_is_handed_on_in_any_chunk_order"
MUTANTS.extend([
    Mutant(
        "running-hash-not-checked", "a reassembled body is handed on only once the sha256 hashed chunk by chunk as "
        "it came is the declared one",
        (Edit("protocol/chunking.py", "        _check_digest(tid, t.hasher.hexdigest(), digest)\n", ""),),
        (_RUNNING_HASH,),
    ),
    Mutant(
        "running-hash-skips-early-chunks", "a chunk that came before those ahead of it is hashed (read back from its "
        "buffer or spill file) once they are in, so any chunk order verifies",
        (Edit("protocol/chunking.py", "    while t.hashed in t.parts:\n", "    while False:\n"),),
        (_RUNNING_HASH,),
    ),
    Mutant(
        "reassembled-frame-sha256-not-passed", "a frame reassembled from chunks carries the sha256 its bus verified "
        "(the coordinator names it by that instead of hashing 400 MB again)",
        (Edit("protocol/transport/memory.py", "            d.frame_sha256 = self._reasm.last_sha256\n", ""),),
        ("tests/transport/test_conformance.py::test_chunked_frame_through_prefetch_one",),
    ),
])
_BODIES = "tests/coordinator/test_bodies.py"
MUTANTS.extend([
    Mutant(
        "commit-before-bodies-durable", "every update body stored beside the run loop is durable before the commit "
        "that records it",
        (Edit("coordinator/rounds/context.py",
              "        self.inbox.bodies.wait()  # every stored body durable before the rows that name them (bodies.py)\n",
              ""),),
        (f"{_BODIES}::test_the_round_commit_waits_for_every_stored_body_before_recording_them",),
    ),
    Mutant(
        "body-write-error-swallowed", "a stored body that cannot be written fails the wait before the commit, "
        "never silently",
        (Edit("coordinator/bodies.py", "        if errors:\n            raise errors[0]\n", ""),),
        (f"{_BODIES}::test_a_body_that_cannot_be_written_fails_the_wait_not_silently",),
    ),
    Mutant(
        "body-copied-without-fsync", "a body copied from its spill file is fsynced before it is renamed into place",
        (Edit("coordinator/bodies.py", "        os.fsync(fd)\n        os.close(fd)\n", "        os.close(fd)\n"),),
        (f"{_BODIES}::test_a_spilled_body_is_copied_from_its_file_and_durable_once_wait_returns",),
    ),
])
MUTANTS.extend([
    Mutant(
        "unmask-before-relays-published", "the shares relayed beside the round loop are all published before the "
        "unmask request goes out, so a site holds every share it is asked to sum",
        (Edit("coordinator/rounds/secure.py",
              "        self.relay.wait()  # every share relayed and confirmed before a site is asked for its sum\n", ""),),
        ("tests/coordinator/test_secagg_relay.py::test_in_a_run_every_share_is_published_before_the_unmask_request_even_when_relays_are_slow",),
    ),
])
MUTANTS.append(
    Mutant(
        "site-model-whole-hash-unchecked", "a site refuses a cached model whose whole blob (hashed beside the chunk "
        "checks) is not the signed task's sha256, before decoding it",
        (Edit("site_worker/model_cache.py", "        got_sha = whole.hexdigest()\n", "        got_sha = want\n"),),
        ("tests/coordinator/test_model_transfer.py",),
    ),
)
