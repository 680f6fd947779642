"""The proximal term (FedProx's), checked against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from protocol.messages import TaskConfig
from site_worker.data import PreparedData
from site_worker.proximal import add_proximal_term, hooks_for, proximal_mu
from protocol.dp_plan import DPPlan
from protocol.train_spec import DPSpec, TrainSpec
from site_worker.trainer import train


def _one_weight_model(w: float) -> torch.nn.Module:
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    return m


def test_one_step_matches_hand_computation() -> None:
    # Global weight 1.0; the local weight has moved to 3.0. Loss (w·x - y)² at x=1, y=0: grad 2w = 6.
    # FedProx step: w - lr·(grad + mu·(w - w_global)) = 3 - 0.1·(6 + 0.5·2) = 2.3 (plain SGD: 2.4).
    model = _one_weight_model(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    add_proximal_term(opt, model, mu=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    loss = (model(torch.ones(1, 1)) - 0.0).pow(2).sum()
    loss.backward()
    opt.step()
    assert model.weight.item() == pytest.approx(2.3, abs=1e-6)


def test_mu_comes_from_the_task_config_only() -> None:
    """The site reads TaskConfig.proximal_mu; it never looks at the aggregator's name."""
    assert proximal_mu(TaskConfig()) == 0.0
    assert proximal_mu(TaskConfig(proximal_mu=0.7)) == 0.7
    assert hooks_for(TaskConfig(), _one_weight_model(0.0)) == []
    assert len(hooks_for(TaskConfig(proximal_mu=0.2), _one_weight_model(0.0))) == 1


def test_task_config_bounds_at_their_edges() -> None:
    assert TaskConfig(proximal_mu=1e4).proximal_mu == 1e4 and TaskConfig(proximal_mu=0).proximal_mu == 0.0
    for bad in (-1e-9, 1.0001e4, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match="proximal_mu"):
            TaskConfig(proximal_mu=bad)  # type: ignore[arg-type]
    assert TaskConfig(personal_layers=256).personal_layers == 256
    for bad in (-1, 257, 1.0, True):
        with pytest.raises(ValueError, match="personal_layers"):
            TaskConfig(personal_layers=bad)  # type: ignore[arg-type]
    assert TaskConfig(epochs=1).epochs == 1 and TaskConfig(epochs=100_000).epochs == 100_000
    for bad in (0, 100_001, 2.0):
        with pytest.raises(ValueError, match="epochs"):
            TaskConfig(epochs=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learning_rate"):
        TaskConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        TaskConfig(batch_size=0)
    with pytest.raises(ValueError, match="weight_decay"):
        TaskConfig(weight_decay=-0.1)
    assert TaskConfig(epochs=3, learning_rate=0.5).overrides() == {"epochs": 3, "learning_rate": 0.5}


def _data() -> PreparedData:
    x = torch.tensor([[1.0], [2.0]])
    y = torch.tensor([[1.0], [0.0]])
    return PreparedData(x_train=x, y_train=y, x_val=x, y_val=y, features=("x",), task="regression", num_classes=2)


def _spec(dp: DPSpec | None) -> TrainSpec:
    return TrainSpec(loss="mse", optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.0, epochs=2, batch_size=2,
                     seed=0, dp=dp)


def _hand_two_steps(w: float, mu: float) -> float:
    # Mean over rows of (w·x - y)²: grad = mean(2·x·(w·x - y)) = ((w - 1) + 4w) = 5w - 1.
    w_global = w
    for _ in range(2):
        w = w - 0.1 * ((5 * w - 1) + mu * (w - w_global))
    return w


@pytest.mark.parametrize("with_dp", [False, True])
def test_trainer_applies_the_term_once_per_step(with_dp: bool) -> None:
    """Two full-batch steps from w=1: step 1 has no pull (w = w_global), step 2 does. With DP
    (no noise, a clip far above the gradients) the term is added once, after privatising."""
    dp = DPSpec(noise_multiplier=0.0, max_grad_norm=1e6, target_epsilon=None, delta=1e-5) if with_dp else None
    plan = DPPlan(noise_multiplier=0.0, sample_rate=1.0, steps=2, max_grad_norm=1e6, delta=1e-5,
                  accountant="rdp") if with_dp else None
    results = {}
    for mu in (0.0, 2.0):
        model = _one_weight_model(1.0)
        hooks = [lambda opt, m=model, mu=mu: add_proximal_term(opt, m, mu)] if mu else []
        train(model, _data(), _spec(dp), plan=plan, hooks=hooks)
        results[mu] = model.weight.item()
    assert results[0.0] == pytest.approx(_hand_two_steps(1.0, 0.0), abs=1e-5)
    assert results[2.0] == pytest.approx(_hand_two_steps(1.0, 2.0), abs=1e-5)
    assert results[2.0] != pytest.approx(results[0.0], abs=1e-3)
