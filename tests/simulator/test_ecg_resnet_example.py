"""``examples/ecg_resnet.json`` (issue 23): a 1-D residual CNN of 1-10 M parameters that a
site can train under DP with its default memory bounds, ghost-clipped. One DP-SGD step on a
few synthetic windows here; the simulator and RabbitMQ figures are in bench/README.md."""

from __future__ import annotations

from pathlib import Path

import torch

from protocol.config import load_experiment
from protocol.dp_plan import DPPlan
from protocol.model import build_model, summarize
from protocol.policy import SitePolicy
from protocol.train_spec import TrainSpec
from simulator.ecg_synthetic import generate
from site_worker.data import PreparedData
from site_worker.dp import check_eval_memory, check_memory, step_ghost_values
from site_worker.trainer import train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ecg_resnet.json"


def test_the_example_is_a_residual_cnn_a_default_site_accepts_under_dp() -> None:
    exp = load_experiment(EXAMPLE)
    params = summarize(exp.architecture.layers).parameters
    assert 1_000_000 <= params <= 10_000_000
    assert sum(m.type == "ResidualBlock1d" for m in exp.chain.modules) >= 6
    assert exp.chain.clipping == "ghost" and exp.dataset.kind == "signal"
    assert "SYNTHETIC" in exp.basic_info.description  # labelled as such: no real ECG rows ship
    policy = SitePolicy()  # the defaults: no parameter cap, 2 GiB a training step and an evaluation
    n_train = 600  # 3000 generated windows over 3 sites, less validation and test
    check_memory(policy, params, activations=exp.chain.train_values, batch_size=exp.training.batch_size,
                 n_train=n_train, sample_rate=exp.training.batch_size / n_train,
                 ghost_values=step_ghost_values(exp.chain, dp=True))
    check_eval_memory(policy, exp.chain, rows=1000, release_values=5)


def test_one_dp_step_of_the_example_trains_with_ghost_clipping() -> None:
    exp = load_experiment(EXAMPLE)
    model = build_model(exp.architecture.layers, seed=0)
    x, y = generate(n=24, seed=1)
    data = PreparedData(x_train=torch.from_numpy(x[:16]), y_train=torch.from_numpy(y[:16]),
                        x_val=torch.from_numpy(x[16:]), y_val=torch.from_numpy(y[16:]), features=("ecg",),
                        task="multiclass", num_classes=2)
    spec = TrainSpec.from_experiment(exp, seed=1)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.5, steps=1, max_grad_norm=1.0, delta=1e-5, accountant="rdp")
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    res = train(model, data, spec, plan=plan, measure=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert res.metrics["steps"] == 1 and res.epsilon is not None and res.epsilon > 0
    assert torch.isfinite(after).all() and not torch.equal(after, before)
