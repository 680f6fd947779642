"""A new experiment from a dataset's metadata (what ``fedbus config new`` writes).

The seed's heart-failure design: MLP 64→32→1 (or →classes), Adam, FedAvg, DP-SGD at
every site with noise 1.0, clip 1.0, δ 1e-5. The input width is the one-hot width of
the features, so the document validates as written; a person then edits it.
"""

from __future__ import annotations

from typing import Any


def _linear(i: int, o: int) -> dict[str, Any]:
    return {"name": "Linear", "type": "Linear", "params": {"in_features": i, "out_features": o, "bias": True}}


def new_experiment(
    *, name: str, dataset: str, target: str, features: list[str], categorical: dict[str, list[str]],
    task: str, num_classes: int, positive_if: str | None = None, exclude: list[str] | None = None,
    rows: int | None = None, rounds: int = 10,
) -> dict[str, Any]:
    """The experiment document (validate it with ``protocol.config.load_experiment``)."""
    width = sum(len(categorical.get(f, ())) or 1 for f in features)
    out = num_classes if task == "multiclass" else 1
    loss = {"binary": "bce_with_logits", "multiclass": "cross_entropy", "regression": "mse"}[task]
    layers = [
        {"name": "Input Layer", "type": "input", "params": {"features": width}},
        _linear(width, 64), {"name": "ReLU", "type": "ReLU", "params": {}},
        _linear(64, 32), {"name": "ReLU", "type": "ReLU", "params": {}},
        _linear(32, out),
        {"name": "Output Layer", "type": "output", "params": {"features": out}},
    ]
    ds: dict[str, Any] = {"name": dataset, "target": target, "task": task, "kind": "tabular", "features": features}
    if task == "multiclass":
        ds["num_classes"] = num_classes
    if categorical:
        ds["categorical"] = categorical
    if exclude:
        ds["exclude"] = exclude
    if positive_if:
        ds["positive_if"] = positive_if
    ds["validation_fraction"] = 0.2
    ds["selected_datasets"] = [{
        "dataset_name": dataset,
        "features_info": {"input_features": width,
                          "feature_types": {"numeric": len(features) - len(categorical), "categorical": len(categorical)}},
        **({"num_rows": rows} if rows is not None else {}),
    }]
    return {
        "basic_info": {"name": name, "description": f"{target} from {len(features)} columns of {dataset} "
                                                    "(written by fedbus config new: review before running)"},
        "architecture": {"layers": layers},
        "training": {
            "optimizer": {"type": "adam", "learning_rate": 0.001, "weight_decay": 0,
                          "differential_privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}},
            "loss_function": loss, "epochs": 5, "batch_size": 32, "rounds": rounds, "seed": 42,
        },
        "dataset": ds,
        "federated": {"name": "FedAvg", "parameters": {"fraction_fit": 1.0, "fraction_eval": 1.0, "min_fit_clients": 1,
                                                       "min_eval_clients": 1, "min_available_clients": 1}},
    }
