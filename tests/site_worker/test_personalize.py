"""Personal layers: which tensors stay at the site, kept between rounds, fine-tuned alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from protocol.config import load_experiment
from protocol.messages import TaskConfig
from protocol.personal import personal_names
from site_worker.data import PreparedData
from site_worker.personalize import HeadStore, fine_tune, personal_layers

ROOT = Path(__file__).resolve().parents[2]


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def test_personal_names_are_the_last_modules():
    names = list(_mlp().state_dict())
    assert personal_names(names, 1) == ["2.weight", "2.bias"]
    assert personal_names(names, 2) == names
    assert personal_names(names, 0) == []


def test_head_store_keeps_and_restores_only_the_head(tmp_path):
    store = HeadStore(tmp_path)
    mine = _mlp()
    with torch.no_grad():
        mine[2].weight.fill_(7.0)
    store.keep(mine, "run/../x", "hf", 1)
    assert all(len(p.stem) == 32 for p in (tmp_path / "personal").iterdir())  # hashed names only
    fresh = _mlp()
    body_before = fresh[0].weight.clone()
    assert store.apply(fresh, "run/../x", "hf", 1)
    assert torch.all(fresh[2].weight == 7.0) and torch.equal(fresh[0].weight, body_before)
    assert not store.apply(_mlp(), "another-run", "hf", 1)  # nothing kept for that run
    wide = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert not store.apply(wide, "run/../x", "hf", 1)  # shapes differ: left alone


def test_personal_layers_come_from_the_task_config():
    """The site keeps the layers the task's config names, whatever the aggregator is called."""
    assert personal_layers(TaskConfig(personal_layers=2)) == 2 and personal_layers(TaskConfig()) == 0
    # the FedPer example's aggregator asks for its one personal layer through the config
    from coordinator.aggregators import get_aggregator
    from protocol.model import build_model, to_tensors

    exp = load_experiment(ROOT / "examples" / "heart_disease_fedper.json")
    initial = to_tensors(build_model(exp.architecture.layers, seed=0))
    agg = get_aggregator(exp.federated.name, parameters=dict(exp.federated.parameters), initial=initial)
    assert personal_layers(agg.task_config(1)) == 1


def test_last_layer_fine_tune_leaves_the_body_alone():
    doc = json.loads((ROOT / "examples" / "heart_disease_fedper.json").read_text())
    doc["training"]["personalization"] = {"mode": "last_layer", "epochs": 2, "select": "last"}
    exp = load_experiment(doc)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(25, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.randn(40, 25)
    y = (x[:, :1] > 0).float()
    data = PreparedData(x_train=x, y_train=y, x_val=x[:5], y_val=y[:5], features=("x",), task="binary", num_classes=2)
    body, head = model[0].weight.clone(), model[2].weight.clone()
    fine_tune(model, data, exp, seed=0)
    assert torch.equal(model[0].weight, body) and not torch.equal(model[2].weight, head)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again afterwards


def _personal_exp(**personalization):
    doc = json.loads((ROOT / "examples" / "heart_disease_fedper.json").read_text())
    doc["training"]["personalization"] = {"mode": "full", "select": "validation"} | personalization
    doc["training"]["optimizer"]["learning_rate"] = 0.05
    return load_experiment(doc)


def _linear_data(val_agrees: bool) -> PreparedData:
    """Train rows labelled by x0 > 0; validation rows by the same rule or by its opposite."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 25, generator=gen)
    xv = torch.randn(32, 25, generator=gen)
    y = (x[:, :1] > 0).float()
    yv = (xv[:, :1] > 0).float() if val_agrees else (xv[:, :1] <= 0).float()
    return PreparedData(x_train=x, y_train=y, x_val=xv, y_val=yv, features=("x",), task="binary", num_classes=2)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(25, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _val_loss(model, data) -> float:
    from site_worker.metrics import evaluate

    return evaluate(model, data.x_val, data.y_val, loss_name="bce_with_logits", task="binary")["loss"]


def test_selection_keeps_the_model_as_received_when_fine_tuning_hurts_on_validation():
    data = _linear_data(val_agrees=False)
    model, start = _model(), _model()
    result = fine_tune(model, data, _personal_exp(epochs=4), seed=0)
    assert result.kept_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    # "last" keeps the fine-tuned model, which is worse on those validation rows
    last = _model()
    assert fine_tune(last, data, _personal_exp(epochs=4, select="last"), seed=0).kept_epoch == 4
    assert _val_loss(last, data) > _val_loss(start, data)


def test_selection_keeps_a_fine_tuned_checkpoint_no_worse_on_validation_than_any_epoch():
    data = _linear_data(val_agrees=True)
    model = _model()
    result = fine_tune(model, data, _personal_exp(epochs=4), seed=0)
    assert result.kept_epoch is not None and result.kept_epoch > 0
    kept = _val_loss(model, data)
    for epochs in range(0, 5):  # the same seeded run stopped after each epoch
        other = _model()
        if epochs:
            fine_tune(other, data, _personal_exp(epochs=epochs, select="last"), seed=0)
        assert kept <= _val_loss(other, data) + 1e-9


def test_without_validation_rows_the_last_epoch_is_kept():
    d = _linear_data(val_agrees=False)
    data = PreparedData(x_train=d.x_train, y_train=d.y_train, x_val=d.x_val[:0], y_val=d.y_val[:0], features=("x",),
                        task="binary", num_classes=2)
    assert fine_tune(_model(), data, _personal_exp(epochs=3), seed=0).kept_epoch == 3


def test_proximal_fine_tune_stays_closer_to_the_global_model():
    data = _linear_data(val_agrees=True)

    def distance(mu: float) -> float:
        model, start = _model(), _model()
        fine_tune(model, data, _personal_exp(epochs=3, select="last", proximal_mu=mu), seed=0)
        return sum(float((a - b).detach().pow(2).sum()) for a, b in zip(model.parameters(), start.parameters()))

    assert distance(10.0) < 0.5 * distance(0.0)


def test_personalization_select_is_checked():
    import pytest

    with pytest.raises(Exception, match="select"):
        _personal_exp(epochs=2, select="test")


def test_bias_fine_tune_moves_only_the_output_bias():
    data = _linear_data(val_agrees=True)
    model, start = _model(), _model()
    fine_tune(model, data, _personal_exp(epochs=2, select="last", **{"mode": "bias"}), seed=0)
    changed = {n for (n, a), b in zip(model.state_dict().items(), start.state_dict().values()) if not torch.equal(a, b)}
    assert changed == {"2.bias"}
