"""Ghost clipping (issue 23): the same clipped gradient sum as per-sample clipping, the same
accounting, and a memory bound that counts what each mode holds."""

from __future__ import annotations

import pytest
import torch

from protocol.dp_plan import DPPlan
from protocol.layers import FAST_CLIPPING, LAYER_TYPES, resolve_layers
from protocol.model import build_model, summarize
from protocol.train_spec import DPSpec, TrainSpec
from site_worker.data import PreparedData
from site_worker.dp import step_ghost_values, train_memory_mb
from site_worker.trainer import ghost_clippable, train

from tests.protocol.test_model import WHITELIST_CHAINS

SIGNAL = [
    {"type": "input", "params": {"channels": 2, "length": 16}},
    {"type": "Conv1d", "params": {"out_channels": 4, "kernel_size": 3, "padding": 1}},
    {"type": "GroupNorm", "params": {"num_groups": 2}},
    {"type": "ReLU"},
    {"type": "Linear", "params": {"out_features": 5}},  # on [channels, length]: the T x T ghost norm
    {"type": "Flatten"},
    {"type": "LayerNorm"},
    {"type": "Linear", "params": {"out_features": 1}},
]


def _data(n: int = 24) -> PreparedData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 16, generator=g) * 3.0
    y = (x[:, 0].mean(dim=1, keepdim=True) > 0).float()
    return PreparedData(x_train=x, y_train=y, x_val=x[:4], y_val=y[:4], features=("ecg",), task="binary",
                        num_classes=2)


def _after_one_step(clipping: str, *, clip: float) -> tuple[torch.Tensor, list]:
    model = build_model(SIGNAL, seed=3)
    data = _data()
    spec = TrainSpec(loss="bce_with_logits", optimizer="sgd", lr=1.0, weight_decay=0.0, momentum=0.0, epochs=1,
                     batch_size=len(data.x_train), seed=1,
                     dp=DPSpec(noise_multiplier=0.0, max_grad_norm=clip, target_epsilon=None, delta=1e-5))
    # Sample rate 1: Poisson keeps every row; noise 0: what is left is the clipped sum / batch.
    plan = DPPlan(noise_multiplier=0.0, sample_rate=1.0, steps=1, max_grad_norm=clip, delta=1e-5, accountant="rdp")
    res = train(model, data, spec, plan=plan, measure=False, clipping=clipping)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), res.history


@pytest.mark.parametrize("clip", [0.05, 1e6])  # every row clipped; none clipped
def test_ghost_and_per_sample_clipping_give_the_same_step(clip: float) -> None:
    start = torch.cat([p.detach().flatten() for p in build_model(SIGNAL, seed=3).parameters()])
    ghost, ghost_history = _after_one_step("ghost", clip=clip)
    per_sample, history = _after_one_step("per_sample", clip=clip)
    assert not torch.allclose(ghost, start)  # the step did something
    torch.testing.assert_close(ghost, per_sample, rtol=1e-4, atol=1e-6)
    assert ghost_history == history == [(0.0, 1.0, 1)]  # the same accountant entry
    if clip < 1:
        assert (ghost - start).norm() <= clip * 1.0001  # lr 1, the mean of rows each clipped to clip


def test_every_whitelisted_layer_type_is_classified_as_opacus_handles_it() -> None:
    """``protocol.layers.FAST_CLIPPING`` (no torch) says what Opacus' own tables say, for every
    layer type, and the per-layer parameter counts behind ``ghost_values`` are torch's."""
    seen = set()
    for layers in WHITELIST_CHAINS.values():
        chain = resolve_layers(layers)
        summary = summarize(layers)
        model = build_model(layers, seed=0)
        children = dict(model.named_children())
        for layer, row in zip(chain.layers, summary.layers):
            if layer.is_marker:
                continue
            seen.add(layer.type)
            single = torch.nn.Sequential(children[str(layer.index)])
            assert (layer.type in FAST_CLIPPING) == ghost_clippable(single), layer.type
            if layer.type != "Linear":
                assert layer.ghost_scratch == row["parameters"], layer.type
    assert seen == set(LAYER_TYPES)


def test_the_memory_bound_counts_what_each_mode_holds() -> None:
    chain = resolve_layers(SIGNAL)
    params = summarize(SIGNAL).parameters
    assert chain.clipping == "ghost"
    # The largest per-sample value one layer makes: Linear on [4, 16] has two 4 x 4 Gram matrices;
    # the Conv1d's gradient is 4 x 2 x 3 + 4 = 28, LayerNorm's 2 x 20 = 40.
    assert chain.ghost_values == 40
    assert step_ghost_values(chain, dp=True) == 40 and step_ghost_values(chain, dp=False) is None
    kw = dict(activations=chain.train_values, batch_size=8, n_train=100, sample_rate=None)
    per_sample = train_memory_mb(params, **kw)
    ghost = train_memory_mb(params, ghost_values=chain.ghost_values, **kw)
    assert per_sample - ghost == pytest.approx(8 * (params - 40) * 4 / 2**20)
    mixed = resolve_layers(WHITELIST_CHAINS["tabular_norms"])  # BatchNorm1d: no ghost clipping
    assert mixed.clipping == "per_sample" and step_ghost_values(mixed, dp=True) is None


def test_an_empty_poisson_batch_under_ghost_clipping_is_a_noise_only_step() -> None:
    model = build_model(SIGNAL, seed=3)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    spec = TrainSpec(loss="bce_with_logits", optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.0, epochs=1,
                     batch_size=1, seed=1, dp=DPSpec(noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=None,
                                                     delta=1e-5))
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1e-12, steps=2, max_grad_norm=1.0, delta=1e-5, accountant="rdp")
    res = train(model, _data(), spec, plan=plan, measure=False, clipping="ghost")
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert res.metrics["steps"] == 2 and torch.isfinite(after).all() and not torch.equal(after, before)
