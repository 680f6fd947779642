"""A new experiment from a dataset's metadata (what ``fedbus config new`` writes).

DP-SGD at every site inside a whole-run budget (``total_epsilon`` per site, clip 1.0, δ 1e-5),
Adam, FedAvg. The model is sized to the rows per site and that budget (``size_model``): small
sites get logistic regression, full-batch (the heart-failure finding, bench/README.md: at ~80
training rows per site and ε 8 the 64-32-1 MLP predicts the majority class on every site,
logistic regression beats the majority baseline), larger sites the 64-32 MLP. The input width
is the one-hot width of the features, so the document validates as written; a person then edits it.
"""

from __future__ import annotations

from typing import Any


def _linear(i: int, o: int) -> dict[str, Any]:
    return {"name": "Linear", "type": "Linear", "params": {"in_features": i, "out_features": o, "bias": True}}


MLP_MIN_ROWS = 2000  # rows per site below which DP noise drowns a 64-32 MLP's gradients
MLP_MIN_EPSILON = 1.0  # whole-run ε per site below which even large sites get the linear model
DEFAULT_EPSILON = 8.0  # whole-run ε per site the written experiment plans
LOGISTIC_STEPS = 30  # full-batch DP-SGD steps over a run (examples/heart_failure.json: 15 rounds x 2 epochs)


def size_model(rows: int | None, epsilon: float) -> tuple[str, str]:
    """("logistic" | "mlp", why) for ``rows`` per site (None: unknown) under a whole-run ε per site."""
    if rows is None:
        return "logistic", ("rows per site unknown: logistic regression, full-batch, the model that "
                            "holds up under DP at small sites; widen it only if sites hold thousands of rows")
    if rows < MLP_MIN_ROWS or epsilon < MLP_MIN_EPSILON:
        return "logistic", (f"~{rows} rows per site under a whole-run ε {epsilon:g}: logistic regression, "
                            f"full-batch DP-SGD (sample rate 1, ~{LOGISTIC_STEPS} steps over the run), Adam lr 0.05; below {MLP_MIN_ROWS} rows per site "
                            f"or ε {MLP_MIN_EPSILON:g} the DP noise drowns a 64-32 MLP's gradients (on the "
                            "heart-failure records at ~80 training rows per site and ε 8 it predicts the "
                            "majority class on every site)")
    return "mlp", (f"~{rows} rows per site under a whole-run ε {epsilon:g}: a 64-32 MLP, batches of 32, "
                   "Adam lr 0.001 (enough rows per site for DP-SGD to train its hidden layers)")


def new_experiment(
    *, name: str, dataset: str, target: str, features: list[str], categorical: dict[str, list[str]],
    task: str, num_classes: int, positive_if: str | None = None, exclude: list[str] | None = None,
    rows: int | None = None, rounds: int = 10, rows_per_site: int | None = None,
    epsilon: float = DEFAULT_EPSILON, left_out: str = "",
) -> dict[str, Any]:
    """The experiment document (validate it with ``protocol.config.load_experiment``).

    ``rows_per_site`` sizes the model (default ``rows``); ``left_out`` goes into the description."""
    width = sum(len(categorical.get(f, ())) or 1 for f in features)
    out = num_classes if task == "multiclass" else 1
    loss = {"binary": "bce_with_logits", "multiclass": "cross_entropy", "regression": "mse"}[task]
    sized = rows_per_site if rows_per_site is not None else rows
    kind, why = size_model(sized, epsilon)
    hidden: list[dict[str, Any]] = [_linear(width, out)] if kind == "logistic" else [
        _linear(width, 64), {"name": "ReLU", "type": "ReLU", "params": {}},
        _linear(64, 32), {"name": "ReLU", "type": "ReLU", "params": {}},
        _linear(32, out)]
    layers = [{"name": "Input Layer", "type": "input", "params": {"features": width}}, *hidden,
              {"name": "Output Layer", "type": "output", "params": {"features": out}}]
    # Logistic: ~LOGISTIC_STEPS full-batch steps over the run, however few the rounds (the tuned example's 30).
    lr, epochs, batch = (0.05, max(2, -(-LOGISTIC_STEPS // rounds)), 256) if kind == "logistic" else (0.001, 5, 32)
    if kind == "logistic" and sized is not None:
        batch = max(batch, sized)  # full batch: sample rate 1 at every site of this size
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
        "basic_info": {"name": name, "description": f"{target} from {len(features)} columns of {dataset}. "
                                                    f"Model: {why}. {left_out}"
                                                    "(Written by fedbus config new: review before running.)"},
        "architecture": {"layers": layers},
        "training": {
            "optimizer": {"type": "adam", "learning_rate": lr, "weight_decay": 0,
                          "differential_privacy": {"total_epsilon": epsilon, "max_grad_norm": 1.0, "delta": 1e-5}},
            "loss_function": loss, "epochs": epochs, "batch_size": batch, "rounds": rounds, "seed": 42,
        },
        "dataset": ds,
        "federated": {"name": "FedAvg", "parameters": {"fraction_fit": 1.0, "fraction_eval": 1.0, "min_fit_clients": 1,
                                                       "min_eval_clients": 1, "min_available_clients": 1}},
    }
