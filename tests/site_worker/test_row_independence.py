"""Every layer type of the model language, with hypothesis: does one row move any other?

DP-SGD bounds one patient's effect by clipping that patient's own gradient; a DP metrics
release assumes one row moves one count. Both hold only if each row's output, and its
per-sample gradient, depends on that row alone. The registry ``protocol.layers.LAYER_TYPES``
makes every layer type declare ``row_independent``; these tests check the declaration
against torch for every registered type (a type added later is picked up from the
registry, and fails loudly here if no small chain can host it), and check that the site
refuses every type declared row-mixing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule

from protocol.config import load_experiment
from protocol.config_error import ConfigError
from protocol.layers import LAYER_TYPES, resolve_layers
from protocol.model import build_model
from site_worker.config import SitePolicy
from site_worker.handlers import _fix_for_dp
from site_worker.policy import PolicyViolation, check_policy

from tests.site_worker.support import experiment_dict

ROWS = 5
CLIP = 1.0
# Inputs a layer may sit on: tabular [features] and signal [channels, length].
HOSTS = ({"features": 4}, {"channels": 4, "length": 8})

INDEPENDENT = sorted(t for t, spec in LAYER_TYPES.items() if spec.row_independent)
MIXING = sorted(t for t, spec in LAYER_TYPES.items() if not spec.row_independent)


def _value(draw: st.DrawFn, kind: str) -> Any:
    """A small value of a whitelisted parameter kind (protocol.layers._Param.kind)."""
    if kind == "size":
        return draw(st.integers(1, 4))
    if kind in ("nonneg", "padding"):
        return draw(st.integers(0, 2) | st.sampled_from(["same", "valid"])) if kind == "padding" else draw(
            st.integers(0, 2))
    if kind == "int":
        return draw(st.integers(-2, 2))
    if kind == "bool":
        return draw(st.booleans())
    if kind == "prob":
        return draw(st.sampled_from([0.0, 0.3, 0.6]))
    if kind in ("posfloat", "float"):
        return draw(st.sampled_from([1e-5, 0.1, 0.5]))
    if kind == "shape":
        return draw(st.sampled_from([4, [4], [8]]))
    raise AssertionError(f"no strategy for parameter kind {kind!r}: add one here")


@st.composite
def chains(draw: st.DrawFn, layer_type: str) -> list[dict[str, Any]]:
    """input -> Linear (trainable, so every layer sees a gradient) -> the layer -> Flatten ->
    Linear(1): the smallest chain that trains and ends in one output per row."""
    spec = LAYER_TYPES[layer_type]
    params: dict[str, Any] = {}
    for name, p in spec.params.items():
        if name in spec.inferred:
            continue  # filled from the chain
        if p.required or draw(st.booleans()):
            params[name] = _value(draw, p.kind)
    host = draw(st.sampled_from(HOSTS))
    first = ({"type": "Linear", "params": {"out_features": 4}} if "features" in host
             else {"type": "Conv1d", "params": {"out_channels": 4, "kernel_size": 1}})
    layers = [{"type": "input", "params": dict(host)}, first, {"type": layer_type, "params": params},
              {"type": "Flatten"}, {"type": "Linear", "params": {"out_features": 1}}]
    try:
        resolve_layers(layers)
    except ConfigError:
        assume(False)
    return layers


def _experiment(layers: list[dict[str, Any]], *, dp: bool) -> dict[str, Any]:
    """An experiment document around ``layers`` (a tabular or a signal dataset to fit the input)."""
    doc = experiment_dict(**{"architecture.layers": layers, "training.optimizer.differential_privacy":
                             {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "enabled": dp}})
    if "features" in layers[0]["params"]:
        doc["dataset"]["features"] = doc["dataset"]["features"][: layers[0]["params"]["features"]]
    else:
        doc["dataset"] = {"name": "ecg", "target": "label", "kind": "signal", "task": "binary"}
    return doc


def _rows(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((ROWS, *shape), generator=g)
    changed = x.clone()
    j = seed % ROWS
    changed[j] = torch.randn(shape, generator=g) * 3.0 + 1.0  # one patient, anything at all
    return x, changed, j


def _forward(model: torch.nn.Module, x: torch.Tensor, *, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(0)  # the same dropout draws for both batches: only the data differ
    with torch.no_grad():
        return model(x)


def _clipped_per_sample(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each row's clipped gradient as DP-SGD computes it (Opacus' per-sample gradients of the
    batched forward pass, each row clipped to CLIP)."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.train()
    torch.manual_seed(0)
    out = gsm(x)
    loss = (out.reshape(len(x), -1) * torch.linspace(-1.0, 1.0, out.reshape(len(x), -1).shape[1])).sum()
    loss.backward()
    grads = torch.cat([p.grad_sample.reshape(len(x), -1) for p in gsm.parameters() if p.requires_grad], dim=1)
    norms = grads.norm(dim=1, keepdim=True)
    clipped = grads * (CLIP / (norms + 1e-6)).clamp(max=1.0)
    gsm._close()
    return clipped.detach()


def _others_unchanged(a: torch.Tensor, b: torch.Tensor, j: int) -> bool:
    keep = [i for i in range(ROWS) if i != j]
    return torch.equal(a[keep], b[keep])


def test_the_registry_has_both_kinds_and_every_type_declares_it():
    assert "BatchNorm1d" in MIXING and "GroupNorm" in INDEPENDENT and "LayerNorm" in INDEPENDENT
    for name, spec in LAYER_TYPES.items():
        assert isinstance(spec.row_independent, bool), name


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("layer_type", INDEPENDENT)
def test_one_row_never_moves_another_rows_output_or_clipped_gradient(layer_type):
    @settings(max_examples=6, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(layers=chains(layer_type), seed=st.integers(0, 2**16))
    def check(layers, seed):
        chain = resolve_layers(layers)
        x, changed, j = _rows(seed, chain.input_shape)
        model = build_model(layers, seed=seed)
        for train in (True, False):
            assert _others_unchanged(_forward(model, x, train=train), _forward(model, changed, train=train), j), (
                f"{layer_type} ({'train' if train else 'eval'} mode): changing row {j} moved another row's output")
        try:
            _fix_for_dp(build_model(layers, seed=seed))
        except PolicyViolation:
            return  # the site does not train this variant under DP (e.g. a LayerNorm Opacus cannot clip)
        a = _clipped_per_sample(build_model(layers, seed=seed), x)
        b = _clipped_per_sample(build_model(layers, seed=seed), changed)
        assert _others_unchanged(a, b, j), f"{layer_type}: changing row {j} moved another row's clipped gradient"

    check()


@pytest.mark.parametrize("layer_type", MIXING)
def test_a_row_mixing_type_does_mix_rows_and_every_site_declines_it(layer_type):
    """The declaration is not vacuous (torch shows one row moving the others in training), and
    the site refuses the layer in every variant hypothesis draws, naming its type and index."""

    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(layers=chains(layer_type), seed=st.integers(0, 2**16), dp=st.booleans(),
           metrics=st.sampled_from(["dp", "exact"]))
    def check(layers, seed, dp, metrics):
        chain = resolve_layers(layers)
        x, changed, j = _rows(seed, chain.input_shape)
        model = build_model(layers, seed=seed)
        assert not _others_unchanged(_forward(model, x, train=True), _forward(model, changed, train=True), j)
        doc = _experiment(layers, dp=dp)
        if dp:  # a DP experiment with it is not even valid, and the error says what to use instead
            with pytest.raises(ConfigError, match=r"^architecture\.layers\[2\]\.type: .*GroupNorm or LayerNorm"):
                load_experiment(doc)
            doc["training"]["optimizer"]["differential_privacy"]["enabled"] = False
        exp = load_experiment(doc)
        with pytest.raises(PolicyViolation, match=rf"^row_independent: layer architecture\.layers\[2\] of type "
                                                  rf"'{layer_type}': .*GroupNorm or LayerNorm"):
            check_policy(SitePolicy(allow_no_dp=True, metrics=metrics), exp, parameters=1)

    check()
