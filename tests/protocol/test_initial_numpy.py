"""The coordinator's torch-free initial weights are torch's, bit for bit (protocol/initial_numpy.py):
over every layer type of the model language (hypothesis chains, as the row-independence property
builds them), every example experiment, several seeds and larger layers. A type the module does
not make returns None, and the coordinator builds that model with torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.initial_numpy import weights
from protocol.layers import LAYER_TYPES, resolve_layers
from protocol.model import build_model, to_tensors
from tests.site_worker.test_row_independence import chains

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))
MADE_BY_TORCH_ONLY = {"BatchNorm1d"}  # running statistics and an int64 counter: torch builds it


def _same(layers: list, seed: int) -> None:
    ours = weights(resolve_layers(layers), seed=seed)
    theirs = to_tensors(build_model(layers, seed=seed))
    assert ours is not None
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, a), (_, b) in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, name
        assert np.array_equal(a, b), (name, float(np.abs(a - b).max()))


@pytest.mark.parametrize("layer_type", sorted(set(LAYER_TYPES) - MADE_BY_TORCH_ONLY))
def test_every_layer_type_is_initialised_as_torch_does_bit_for_bit(layer_type: str) -> None:
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(layers=chains(layer_type), seed=st.integers(0, 2**32 + 10))
    def check(layers: list, seed: int) -> None:
        _same(layers, seed)

    check()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_model_is_initialised_as_torch_does(path: Path) -> None:
    layers = json.loads(path.read_text())["architecture"]["layers"]
    for seed in (0, 42, 2**31 + 7):
        _same(layers, seed)


def test_larger_layers_and_the_torch_only_types() -> None:
    # 1.1 M weights: past one block of draws (protocol.initial_numpy._BLOCK), the stream goes on unbroken
    _same([{"type": "input", "params": {"features": 1100}}, {"type": "Linear", "params": {"out_features": 1000}},
           {"type": "ReLU"}, {"type": "Linear", "params": {"out_features": 7, "bias": False}}], seed=3)
    bn = [{"type": "input", "params": {"features": 4}}, {"type": "Linear", "params": {"out_features": 4}},
          {"type": "BatchNorm1d"}, {"type": "Linear", "params": {"out_features": 1}}]
    assert weights(resolve_layers(bn), seed=0) is None
