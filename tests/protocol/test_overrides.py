"""Overrides go through one function (protocol.config.apply_overrides): the experiment's
with_overrides, the simulator's --rounds/--seed and a task's TaskConfig (TrainSpec)."""

from __future__ import annotations

import pytest

from protocol.config import OVERRIDES, apply_overrides, load_experiment
from protocol.messages import TaskConfig
from protocol.train_spec import TrainSpec
from tests.site_worker.support import experiment_dict


def test_each_override_lands_where_the_table_says_and_none_keeps_the_value():
    doc = {"training": {"epochs": 2, "optimizer": {"learning_rate": 0.1}}}
    out = apply_overrides(doc, {"epochs": 5, "learning_rate": None, "weight_decay": 0.01, "aggregator": "FedProx"})
    assert out is doc
    assert doc == {"training": {"epochs": 5, "optimizer": {"learning_rate": 0.1, "weight_decay": 0.01}},
                   "federated": {"name": "FedProx"}}
    assert set(OVERRIDES) >= set(TaskConfig().overrides()) | {"epochs", "learning_rate", "batch_size", "weight_decay"}


def test_an_unknown_override_is_a_programming_error_and_a_non_table_block_is_left_for_validation():
    with pytest.raises(KeyError):
        apply_overrides({}, {"lr": 0.1})
    doc = {"training": ["not", "a", "table"]}
    assert apply_overrides(doc, {"rounds": 3}) == {"training": ["not", "a", "table"]}


def test_a_task_config_overrides_the_spec_and_leaves_the_rest():
    exp = load_experiment(experiment_dict())
    base = TrainSpec.from_experiment(exp, seed=1)
    cfg = TaskConfig(epochs=base.epochs + 1, learning_rate=0.5, batch_size=7, weight_decay=0.25)
    spec = TrainSpec.from_experiment(exp, seed=1, overrides=cfg.overrides())
    assert (spec.epochs, spec.lr, spec.batch_size, spec.weight_decay) == (base.epochs + 1, 0.5, 7, 0.25)
    assert (spec.loss, spec.optimizer, spec.momentum, spec.dp) == (base.loss, base.optimizer, base.momentum, base.dp)
    assert TrainSpec.from_experiment(exp, seed=1, overrides=TaskConfig().overrides()) == base
    assert exp.with_overrides(rounds=4, learning_rate=0.5).training.rounds == 4
