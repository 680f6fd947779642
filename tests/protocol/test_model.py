"""Model builder: whitelist only, shape inference equals torch, seeded init, Tensors round trip."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.config import ConfigError, load_experiment
from protocol.layers import resolve_layers
from protocol.model import build_model, load_tensors, summarize, to_tensors

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "protocol" / "fixtures" / "medinet_export.json"  # byte copy of ../shared/fixtures
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))



def _block(i: int, o: int, stride: int, k: int = 9) -> int:
    """ResidualBlock1d by hand: two convolutions with biases, two GroupNorms, a 1 x 1 shortcut
    when the channels or the length change."""
    return i * o * k + o + o * o * k + o + 4 * o + (i * o + o if i != o or stride != 1 else 0)


# By hand (weights + biases), see tests/protocol/test_config.py for the derivation.
EXPECTED_PARAMETERS = {
    "medinet_export.json": 52 * 64 + 64 + 64 * 1 + 1,  # 3457
    "heart_failure.json": 11 + 1,  # logistic regression
    "heart_disease_dp.json": 25 + 1,  # logistic regression
    "heart_disease_fedper.json": 25 * 16 + 16 + 16 + 1,  # 433
    "heart_disease.json": 25 * 64 + 64 + 64 * 32 + 32 + 32 + 1,  # 3777
    "ecg_cnn.json": 1 * 16 * 5 + 16 + 16 * 90 * 128 + 128 + 128 * 2 + 2,  # 184802
    "ecg_resnet.json": 1 * 32 * 15 + 32 + 2 * 32 + _block(32, 32, 1) + _block(32, 64, 2) + _block(64, 64, 1)
    + _block(64, 128, 2) + _block(128, 128, 1) + _block(128, 192, 2) + 192 * 2 + 2,  # 1256322
}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_shapes(model: torch.nn.Sequential, input_shape, batch: int = 3) -> dict[str, tuple[int, ...]]:
    """Per-module output shapes (without the batch dim) from a real forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
        for name, module in model.named_children()
    ]
    model.eval()
    with torch.no_grad():
        model(torch.randn(batch, *input_shape))
    for hook in hooks:
        hook.remove()
    return shapes


def _assert_inferred_equals_torch(layers) -> None:
    chain = resolve_layers(layers)
    model = build_model(layers, seed=0)
    actual = _forward_shapes(model, chain.input_shape)
    inferred = {str(layer.index): layer.output_shape for layer in chain.modules}
    assert actual == inferred


# ------------------------------------------------------------------ fixture and examples


def test_medinet_fixture_builds_3457_parameters():
    exp = load_experiment(FIXTURE)
    model = build_model(exp.architecture.layers, seed=42)
    assert _n_params(model) == 3457
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear"]
    assert list(model.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert model(torch.zeros(5, 52)).shape == (5, 1)
    summary = summarize(exp.architecture.layers)
    assert summary.parameters == 3457 and summary.input_shape == [52] and summary.output_shape == [1]
    assert [(r["type"], r["output_shape"], r["parameters"]) for r in summary.layers] == [
        ("input", [52], 0),
        ("Linear", [64], 52 * 64 + 64),
        ("ReLU", [64], 0),
        ("Linear", [1], 65),
        ("output", [1], 0),
    ]


@pytest.mark.parametrize("path", [FIXTURE, *EXAMPLES], ids=lambda p: p.name)
def test_examples_build_with_the_expected_size_and_shapes(path):
    exp = load_experiment(path)
    model = build_model(exp.architecture.layers, seed=1)
    assert _n_params(model) == EXPECTED_PARAMETERS[path.name]
    assert summarize(exp.architecture.layers).parameters == EXPECTED_PARAMETERS[path.name]
    _assert_inferred_equals_torch(exp.architecture.layers)
    out = model(torch.randn(4, *exp.input_shape))
    assert tuple(out.shape) == (4, *exp.output_shape)


def test_builder_accepts_plain_dicts():
    layers = json.loads(FIXTURE.read_text())["architecture"]["layers"]
    assert _n_params(build_model(layers)) == 3457


# ------------------------------------------------------------------ every whitelisted layer


WHITELIST_CHAINS = {
    "signal": [
        {"type": "input", "params": {"channels": 2, "length": 50}},
        {"type": "Conv1d", "params": {"out_channels": 8, "kernel_size": 3, "padding": "same"}},
        {"type": "BatchNorm1d"},
        {"type": "LeakyReLU", "params": {"negative_slope": 0.2}},
        {"type": "Conv1d", "params": {"in_channels": 8, "out_channels": 8, "kernel_size": 5, "stride": 2,
                                      "dilation": 2, "groups": 4, "padding": 1}},
        {"type": "GroupNorm", "params": {"num_groups": 2}},
        {"type": "Tanh"},
        {"type": "MaxPool1d", "params": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}},
        {"type": "AvgPool1d", "params": {"kernel_size": 2, "ceil_mode": True, "count_include_pad": False}},
        {"type": "LayerNorm", "params": {"normalized_shape": [6]}},
        {"type": "AdaptiveAvgPool1d", "params": {"output_size": 4}},
        {"type": "Flatten"},
        {"type": "Dropout", "params": {"p": 0.1}},
        {"type": "Linear", "params": {"out_features": 3}},
        {"type": "Sigmoid"},
        {"type": "output", "params": {"features": 3}},
    ],
    "flatten_partial": [
        {"type": "input", "params": {"channels": 3, "length": 10}},
        {"type": "Conv1d", "params": {"out_channels": 4, "kernel_size": 1}},
        {"type": "Linear", "params": {"in_features": 10, "out_features": 5}},  # acts on the last dim
        {"type": "Flatten", "params": {"start_dim": 1, "end_dim": 2}},
        {"type": "LayerNorm"},
        {"type": "Linear", "params": {"out_features": 1}},
    ],
    "tabular_norms": [
        {"type": "input", "params": {"features": 10}},
        {"type": "Linear", "params": {"in_features": 10, "out_features": 16}},
        {"type": "ReLU"},
        {"type": "BatchNorm1d", "params": {"num_features": 16, "momentum": 0.2}},
        {"type": "GroupNorm", "params": {"num_groups": 4, "num_channels": 16}},
        {"type": "LayerNorm", "params": {"normalized_shape": 16, "elementwise_affine": False}},
        {"type": "Linear", "params": {"out_features": 1, "bias": False}},
    ],
    "residual": [
        {"type": "input", "params": {"channels": 2, "length": 33}},
        {"type": "ResidualBlock1d", "params": {"out_channels": 4, "kernel_size": 5, "stride": 2, "num_groups": 2,
                                               "dropout": 0.1}},
        {"type": "ResidualBlock1d", "params": {"out_channels": 4, "kernel_size": 3}},  # identity shortcut
        {"type": "Flatten"},
        {"type": "Linear", "params": {"out_features": 2}},
    ],
    "no_input_marker": [
        {"type": "Linear", "params": {"in_features": 7, "out_features": 2}},
    ],
}


@pytest.mark.parametrize("name", list(WHITELIST_CHAINS))
def test_inferred_shapes_equal_a_real_forward_pass(name):
    _assert_inferred_equals_torch(WHITELIST_CHAINS[name])


def test_all_whitelisted_types_are_exercised():
    from protocol.layers import LAYER_TYPES

    used = {layer["type"] for chain in WHITELIST_CHAINS.values() for layer in chain}
    assert set(LAYER_TYPES) <= used


def test_only_whitelisted_kwargs_reach_the_constructors():
    model = build_model(WHITELIST_CHAINS["signal"], seed=0)
    conv = model[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (2, 8, (3,), "same")
    assert model[2].negative_slope == 0.2
    assert not model[2].inplace  # never in-place: Opacus hooks need the inputs
    norm = model[1]
    assert norm.num_features == 8 and norm.training


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(1, 40),
    kernel=st.integers(1, 9),
    stride=st.integers(1, 4),
    padding=st.integers(0, 4),
    dilation=st.integers(1, 3),
    pool=st.sampled_from(["MaxPool1d", "AvgPool1d"]),
    pool_kernel=st.integers(1, 5),
    pool_stride=st.one_of(st.none(), st.integers(1, 3)),
    pool_padding=st.integers(0, 2),
    ceil_mode=st.booleans(),
)
def test_conv_and_pool_shapes_agree_with_torch(
    length, kernel, stride, padding, dilation, pool, pool_kernel, pool_stride, pool_padding, ceil_mode
):
    """Either the chain is refused up front, or torch runs it with exactly the inferred shapes."""
    pool_params = {"kernel_size": pool_kernel, "padding": pool_padding, "ceil_mode": ceil_mode}
    if pool_stride is not None:
        pool_params["stride"] = pool_stride
    layers = [
        {"type": "input", "params": {"channels": 2, "length": length}},
        {"type": "Conv1d", "params": {"out_channels": 3, "kernel_size": kernel, "stride": stride,
                                      "padding": padding, "dilation": dilation}},
        {"type": pool, "params": pool_params},
        {"type": "Flatten"},
        {"type": "Linear", "params": {"out_features": 1}},
    ]
    try:
        chain = resolve_layers(layers)
    except ConfigError as exc:
        assert exc.path.startswith("architecture.layers[")
        # torch must refuse it too (or produce an empty output)
        conv = torch.nn.Conv1d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation)
        cls = getattr(torch.nn, pool)
        pooling = cls(pool_kernel, stride=pool_stride, padding=pool_padding, ceil_mode=ceil_mode)
        try:
            out = pooling(conv(torch.randn(1, 2, length)))
        except RuntimeError:
            return
        assert out.numel() == 0
        return
    _assert_inferred_equals_torch(layers)
    assert chain.output_shape == (1,)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("bad_type", ["Lambda", "Module", "torch.nn.Linear", "__import__", "Conv2d", "LSTM", "", 3])
def test_non_whitelisted_types_are_refused_with_a_path(bad_type):
    layers = [{"type": "input", "params": {"features": 4}}, {"type": bad_type, "params": {}},
              {"type": "Linear", "params": {"out_features": 1}}]
    with pytest.raises(ConfigError) as info:
        build_model(layers)
    assert info.value.path == "architecture.layers[1].type"
    assert "not an allowed layer type" in info.value.message


@pytest.mark.parametrize(
    ("layer", "path", "message"),
    [
        ({"type": "Linear", "params": {"out_features": 2, "device": "cuda"}}, ".params.device", "not a parameter"),
        ({"type": "Linear", "params": {"out_features": "2"}}, ".params.out_features", "integer"),
        ({"type": "Linear", "params": {}}, ".params.out_features", "is required"),
        ({"type": "Linear", "params": {"out_features": 2, "bias": "yes"}}, ".params.bias", "true or false"),
        ({"type": "Linear", "params": {"in_features": 5, "out_features": 2}}, ".params.in_features",
         "must equal the previous layer's output (4)"),
        ({"type": "Dropout", "params": {"p": 1.5}}, ".params.p", "[0, 1)"),
        ({"type": "ReLU", "params": {"inplace": True}}, ".params.inplace", "not a parameter of ReLU"),
        ({"type": "Conv1d", "params": {"out_channels": 2, "kernel_size": 3}}, "", "[channels, length]"),
        ({"type": "MaxPool1d", "params": {"kernel_size": 2}}, "", "[channels, length]"),
        ({"type": "BatchNorm1d", "params": {"num_features": 3}}, ".params.num_features", "(4)"),
        ({"type": "GroupNorm", "params": {"num_groups": 3}}, ".params.num_groups", "must divide"),
        ({"type": "LayerNorm", "params": {"normalized_shape": [5]}}, ".params.normalized_shape", "trailing"),
        ({"type": "Flatten", "params": {"start_dim": 0}}, ".params.start_dim", "batch dimension"),
        ({"type": "input", "params": {"features": 4}}, ".type", "must be the first layer"),
    ],
)
def test_bad_layers_are_refused_with_a_path(layer, path, message):
    layers = [{"type": "input", "params": {"features": 4}}, layer, {"type": "Linear", "params": {"out_features": 1}}]
    with pytest.raises(ConfigError) as info:
        build_model(layers)
    assert info.value.path == f"architecture.layers[1]{path}", str(info.value)
    assert message in info.value.message


def test_conv_chain_errors():
    base = [{"type": "input", "params": {"channels": 1, "length": 185}}]
    with pytest.raises(ConfigError, match=r"layers\[1\]\.params\.in_channels: must equal the previous layer's output channels \(1\)"):
        build_model([*base, {"type": "Conv1d", "params": {"in_channels": 2, "out_channels": 4, "kernel_size": 3}}])
    with pytest.raises(ConfigError, match=r"layers\[1\]\.params\.kernel_size"):
        build_model([*base, {"type": "Conv1d", "params": {"out_channels": 4, "kernel_size": 186}}])
    with pytest.raises(ConfigError, match=r"layers\[2\]\.params\.in_features: .*\[16, 181\].* Flatten"):
        build_model([*base, {"type": "Conv1d", "params": {"out_channels": 16, "kernel_size": 5}},
                     {"type": "Linear", "params": {"in_features": 2896, "out_features": 2}}])
    with pytest.raises(ConfigError, match=r"layers\[2\]\.params\.features: the model's output is \[16, 181\]"):
        build_model([*base, {"type": "Conv1d", "params": {"out_channels": 16, "kernel_size": 5}},
                     {"type": "output", "params": {"features": 2}}])


def test_structural_errors():
    with pytest.raises(ConfigError, match=r"^architecture\.layers: must be a non-empty list"):
        build_model([])
    with pytest.raises(ConfigError, match=r"^architecture\.layers\[0\]: start the layer list with an input marker"):
        build_model([{"type": "ReLU"}, {"type": "Linear", "params": {"in_features": 3, "out_features": 1}}])
    with pytest.raises(ConfigError, match=r"^architecture\.layers: has no trainable layer"):
        build_model([{"type": "input", "params": {"features": 3}}, {"type": "ReLU"}])
    with pytest.raises(ConfigError, match=r"^architecture\.layers\[1\]\.type: the output marker must be the last"):
        build_model([{"type": "input", "params": {"features": 3}}, {"type": "output", "params": {"features": 3}},
                     {"type": "Linear", "params": {"out_features": 1}}])
    with pytest.raises(ConfigError, match=r"^architecture\.layers\[0\]\.params\.length: is required"):
        build_model([{"type": "input", "params": {"channels": 3}}, {"type": "Linear", "params": {"out_features": 1}}])
    with pytest.raises(ConfigError, match=r"^architecture\.layers\[0\]\.params: the input marker needs"):
        build_model([{"type": "input", "params": {}}, {"type": "Linear", "params": {"out_features": 1}}])


# ------------------------------------------------------------------ seeds and summary


def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone():
    layers = load_experiment(ROOT / "examples" / "ecg_cnn.json").architecture.layers
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = to_tensors(build_model(layers, seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    b = to_tensors(build_model(layers, seed=7))
    c = to_tensors(build_model(layers, seed=8))
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c, strict=True))


def test_summary_of_a_huge_model_allocates_nothing():
    layers = [{"type": "input", "params": {"features": 200_000}},
              {"type": "Linear", "params": {"out_features": 200_000}}]  # 40 billion parameters
    summary = summarize(layers)
    assert summary.parameters == 200_000 * 200_000 + 200_000
    assert summary.to_dict()["layers"][1]["output_shape"] == [200_000]


# ------------------------------------------------------------------ Tensors


def _fixture_model(seed: int) -> torch.nn.Sequential:
    return build_model(load_experiment(FIXTURE).architecture.layers, seed=seed)


def test_to_tensors_load_tensors_round_trip():
    source, target = _fixture_model(1), _fixture_model(2)
    tensors = to_tensors(source)
    assert [name for name, _ in tensors] == list(source.state_dict())
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for _, a in tensors)
    load_tensors(target, tensors)
    for (name, x), (_, y) in zip(to_tensors(target), tensors, strict=True):
        assert np.array_equal(x, y), name
    x = torch.randn(6, 52)
    assert torch.equal(source(x), target(x))


def test_to_tensors_copies_so_later_training_does_not_change_them():
    model = _fixture_model(1)
    tensors = to_tensors(model)
    kept = tensors[0][1].copy()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert np.array_equal(tensors[0][1], kept)


def test_to_tensors_takes_a_state_dict_and_converts_to_float32():
    model = _fixture_model(1).double()
    tensors = to_tensors(model.state_dict())
    assert all(a.dtype == np.float32 for _, a in tensors)


def test_load_tensors_accepts_read_only_zero_copy_arrays_without_warnings():
    source, target = _fixture_model(1), _fixture_model(2)
    frozen = []
    for name, array in to_tensors(source):
        view = np.frombuffer(array.tobytes(), dtype=np.float32).reshape(array.shape)
        assert not view.flags.writeable
        frozen.append((name, view))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tensors(target, tuple(frozen))
    assert np.array_equal(target[0].weight.detach().numpy(), frozen[0][1])


def test_integer_buffers_keep_their_dtype():
    layers = [{"type": "input", "params": {"features": 3}}, {"type": "Linear", "params": {"out_features": 4}},
              {"type": "BatchNorm1d"}]
    model = build_model(layers, seed=0)
    tensors = dict(to_tensors(model))
    assert tensors["2.num_batches_tracked"].dtype == np.int64
    assert tensors["2.running_mean"].dtype == np.float32
    load_tensors(build_model(layers, seed=1), tuple(tensors.items()))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t[:-1], r"missing \['3.bias'\]"),
        (lambda t: (*t, ("9.weight", np.zeros(1, np.float32))), r"unexpected \['9.weight'\]"),
        (lambda t: ((t[0][0], t[0][1][:, :51].copy()), *t[1:]), r"'1.weight' has shape \[64, 51\], expected \[64, 52\]"),
        (lambda t: ((t[0][0], t[0][1].astype(np.float64)), *t[1:]), r"'1.weight' has dtype float64, expected float32"),
        (lambda t: (*t, t[0]), r"'1.weight' appears twice"),
        (lambda t: ((t[0][0], t[0][1].tolist()), *t[1:]), r"'1.weight' is a list, not an array"),
    ],
)
def test_load_tensors_refuses_what_does_not_fit_and_changes_nothing(mutate, message):
    target = _fixture_model(2)
    before = to_tensors(target)
    bad = mutate(to_tensors(_fixture_model(1)))
    with pytest.raises(ValueError, match=message):
        load_tensors(target, bad)
    for (_, x), (_, y) in zip(to_tensors(target), before, strict=True):
        assert np.array_equal(x, y)


def test_non_strict_load_takes_the_matching_names():
    target = _fixture_model(2)
    source = dict(to_tensors(_fixture_model(1)))
    load_tensors(target, {"3.bias": source["3.bias"], "extra": np.zeros(2, np.float32)}, strict=False)
    assert np.array_equal(target[2].bias.detach().numpy(), source["3.bias"])
    assert not np.array_equal(target[0].weight.detach().numpy(), source["1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_trainable_with_opacus(path):
    """Every example model passes Opacus's validator (no BatchNorm etc.), so sites can train it with DP."""
    validators = pytest.importorskip("opacus.validators")
    model = build_model(load_experiment(path).architecture.layers, seed=0)
    assert validators.ModuleValidator.validate(model, strict=False) == []


def test_sizes_past_what_torch_can_count_are_config_errors():
    huge = [{"type": "input", "params": {"features": 2**31 - 1}}, {"type": "Linear", "params": {"out_features": 2**31 - 1}}]
    with pytest.raises(ConfigError, match=r"^architecture\.layers\[1\]: Linear is too large to build"):
        summarize(huge)
    with pytest.raises(ConfigError, match=r"^architecture\.layers\[1\]\.params\.out_features: must be at most"):
        summarize([huge[0], {"type": "Linear", "params": {"out_features": 2**40}}])


def test_null_optional_params_take_the_default():
    layers = [{"type": "input", "params": {"channels": 1, "length": 10}},
              {"type": "MaxPool1d", "params": {"kernel_size": 2, "stride": None}},
              {"type": "Flatten"}, {"type": "Linear", "params": {"in_features": None, "out_features": 1}}]
    chain = resolve_layers(layers)
    assert chain.layers[1].kwargs["stride"] == 2 and chain.layers[3].kwargs["in_features"] == 5
    _assert_inferred_equals_torch(layers)
