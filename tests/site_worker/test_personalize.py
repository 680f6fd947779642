"""Personal layers: which tensors stay at the site, kept between rounds, fine-tuned alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from protocol.config import load_experiment
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


def test_personal_layers_from_task_or_fedper():
    exp = load_experiment(ROOT / "examples" / "heart_disease_fedper.json")
    assert personal_layers(exp) == 1 and personal_layers(exp, {"personal_layers": 2}) == 2
    assert personal_layers(load_experiment(ROOT / "examples" / "heart_disease.json")) == 0


def test_last_layer_fine_tune_leaves_the_body_alone():
    doc = json.loads((ROOT / "examples" / "heart_disease_fedper.json").read_text())
    doc["training"]["personalization"] = {"mode": "last_layer", "epochs": 2}
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
