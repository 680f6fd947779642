"""The layer whitelist and shape inference for declarative models, without torch.

An experiment's ``architecture.layers`` is data from the wire. This module decides
which layer types and which constructor arguments are allowed, fills the ones that
follow from the previous layer (``in_features``, ``in_channels``, ...) and walks the
per-sample shape through the chain, so a layer list that cannot run is refused with
the JSON path of the offending field *before* anything is built. ``protocol/model.py``
turns the resolved chain into ``torch.nn`` modules; ``protocol/config.py`` runs the
same check when an experiment is loaded.

Shapes here are per sample (no batch dimension): ``[features]`` for tabular input,
``[channels, length]`` for signals.

Over 500 lines on purpose: it is the model language itself, one table entry per layer type
(arguments, shape rule, row independence, memory figures); a second file would split the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.config_error import ConfigError

Shape = tuple[int, ...]

INPUT = "input"
OUTPUT = "output"
MARKERS = (INPUT, OUTPUT)

# Keys that MediNet exports put in every layer's params to display sizes; they are
# informational only and never passed to a constructor.
INFORMATIONAL_PARAMS = frozenset({"features"})

_REQUIRED = object()

# Bound on any size or index in a layer list: torch counts in int64, and nothing real is near.
MAX_SIZE = 2**31 - 1


@dataclass(frozen=True)
class _Param:
    kind: str  # "size" (int >= 1), "nonneg" (int >= 0), "int", "bool", "prob", "posfloat", "float", "padding", "shape"
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class ResolvedLayer:
    """One whitelisted layer with its complete constructor arguments and shapes."""

    index: int  # position in architecture.layers
    type: str  # canonical name ("Linear", "input", ...)
    name: str | None
    kwargs: dict[str, Any]  # exactly what the torch constructor receives (empty for markers)
    input_shape: Shape
    output_shape: Shape
    # Per-sample values the layer materialises besides its output: a padded copy of its
    # input, and for Conv1d the unfolded input per-sample gradients are computed from.
    scratch: int = 0
    # Per-sample values ghost clipping makes for this layer in its backward hook and drops
    # before the next layer's (``_ghost_scratch``): its norm's Gram matrices or its gradient.
    ghost_scratch: int = 0
    # Per-sample values besides input and output an inference pass holds at once (no autograd):
    # ``scratch`` for single layers; less for a block, whose parts are freed as it goes.
    eval_scratch: int = 0

    @property
    def is_marker(self) -> bool:
        return self.type in MARKERS

    @property
    def row_independent(self) -> bool:
        """Whether this layer's output for one row depends on that row alone (markers do)."""
        return self.is_marker or LAYER_TYPES[self.type].row_independent


@dataclass(frozen=True)
class ResolvedChain:
    layers: tuple[ResolvedLayer, ...]
    input_shape: Shape
    output_shape: Shape

    @property
    def modules(self) -> tuple[ResolvedLayer, ...]:
        """The layers that become torch modules (markers left out)."""
        return tuple(layer for layer in self.layers if not layer.is_marker)

    @property
    def row_mixing(self) -> tuple[ResolvedLayer, ...]:
        """The layers whose output for one row depends on other rows of the batch."""
        return tuple(layer for layer in self.layers if not layer.row_independent)

    @property
    def train_values(self) -> int:
        """Per-sample values one training step holds: the input, every layer's output and
        scratch (what autograd and Opacus keep for the backward pass), and as many again
        for their gradients. Times the batch and 4 bytes, the step's activation memory."""
        kept = math.prod(self.input_shape) + sum(math.prod(m.output_shape) + m.scratch for m in self.modules)
        return 2 * kept

    @property
    def clipping(self) -> str:
        """How DP-SGD clips this model's per-sample gradients: ``"ghost"`` (Opacus' memory-efficient
        clipping, ``GradSampleModuleFastGradientClipping``) when every layer is one it handles
        (``FAST_CLIPPING``), else ``"per_sample"`` (every parameter's per-sample gradient at once)."""
        return "ghost" if all(m.type in FAST_CLIPPING for m in self.modules) else "per_sample"

    @property
    def ghost_values(self) -> int:
        """Per-sample values ghost clipping adds to the activations: the largest one layer makes
        in its backward hook (``ResolvedLayer.ghost_scratch``), never all layers' at once."""
        return max((m.ghost_scratch for m in self.modules), default=0)

    @property
    def eval_values(self) -> int:
        """Per-sample peak of one inference pass (no autograd): one layer's input, scratch
        and output at a time."""
        return max(math.prod(m.input_shape) + m.eval_scratch + math.prod(m.output_shape) for m in self.modules)

    @property
    def output_values(self) -> int:
        return math.prod(self.output_shape)


# What to use instead of a layer that mixes rows (the experiment error and the site's decline say it).
ROW_MIXING_ADVICE = (
    "use GroupNorm or LayerNorm instead: they normalise each row with its own statistics"
)


def row_mixing_message(layer: ResolvedLayer) -> str:
    """Why a row-mixing layer is refused, and what to use instead (public: the type only)."""
    return (
        f"{layer.type} computes each row's output from the other rows of its batch (batch statistics), so one "
        f"patient would move every other row's clipped gradient and every released evaluation statistic, "
        f"which differential privacy cannot bound; {ROW_MIXING_ADVICE}"
    )


class _Ctx:
    """Path helper so every error names the exact JSON location."""

    def __init__(self, prefix: str, index: int) -> None:
        self.base = f"{prefix}[{index}]"

    def fail(self, suffix: str, message: str) -> ConfigError:
        return ConfigError(f"{self.base}{suffix}", message)

    def param(self, name: str) -> str:
        return f".params.{name}"


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------- params


def _coerce(ctx: _Ctx, name: str, spec: _Param, value: Any) -> Any:
    where = ctx.param(name)
    kind = spec.kind
    if kind in ("size", "nonneg", "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(where, f"must be an integer, got {value!r}")
        if kind == "size" and value < 1:
            raise ctx.fail(where, f"must be >= 1, got {value}")
        if abs(value) > MAX_SIZE:
            raise ctx.fail(where, f"must be at most {MAX_SIZE}, got {value}")
        if kind == "nonneg" and value < 0:
            raise ctx.fail(where, f"must be >= 0, got {value}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ctx.fail(where, f"must be true or false, got {value!r}")
        return value
    if kind in ("prob", "posfloat", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ctx.fail(where, f"must be a number, got {value!r}")
        value = float(value)
        if kind == "prob" and not 0.0 <= value < 1.0:
            raise ctx.fail(where, f"must be in [0, 1), got {value}")
        if kind == "posfloat" and value <= 0.0:
            raise ctx.fail(where, f"must be > 0, got {value}")
        return value
    if kind == "padding":
        if value in ("same", "valid"):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SIZE:
            raise ctx.fail(where, f'must be an integer >= 0, "same" or "valid", got {value!r}')
        return value
    if kind == "shape":
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (
            not isinstance(items, list)
            or not items
            or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE for v in items)
        ):
            raise ctx.fail(where, f"must be an integer >= 1 or a list of them, got {value!r}")
        return list(items)
    raise AssertionError(kind)  # pragma: no cover - whitelist table bug


# --------------------------------------------------------------------------- shapes


def _need_signal(ctx: _Ctx, layer_type: str, shape: Shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ctx.fail(
            "",
            f"{layer_type} needs a [channels, length] input but the previous output is {_fmt(shape)}; "
            'declare the input marker with "channels" and "length"',
        )
    return shape[0], shape[1]


def _match(ctx: _Ctx, kw: dict, key: str, actual: int, what: str) -> None:
    """Fill ``kw[key]`` from the chain, or check the declared value against it."""
    if key not in kw:
        kw[key] = actual
    elif kw[key] != actual:
        suffix = f" {what}" if what else ""
        raise ctx.fail(ctx.param(key), f"must equal the previous layer's output{suffix} ({actual})")


def _linear(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    if not shape:
        raise ctx.fail("", "Linear needs an input with at least one dimension")
    if "in_features" in kw and kw["in_features"] != shape[-1] and len(shape) > 1:
        raise ctx.fail(
            ctx.param("in_features"),
            f"must equal the last dimension of the previous output {_fmt(shape)} ({shape[-1]}); "
            "add a Flatten layer before it to use all values",
        )
    _match(ctx, kw, "in_features", shape[-1], "")
    return (*shape[:-1], kw["out_features"])


def _same(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    return shape


def _conv1d(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    channels, length = _need_signal(ctx, "Conv1d", shape)
    _match(ctx, kw, "in_channels", channels, "channels")
    groups = kw["groups"]
    for key in ("in_channels", "out_channels"):
        if kw[key] % groups:
            raise ctx.fail(ctx.param("groups"), f"must divide {key} ({kw[key]}), got {groups}")
    k, s, d, p = kw["kernel_size"], kw["stride"], kw["dilation"], kw["padding"]
    if p == "same":
        if s != 1:
            raise ctx.fail(ctx.param("padding"), '"same" padding needs stride 1')
        out_len = length
    else:
        pad = 0 if p == "valid" else p
        out_len = (length + 2 * pad - d * (k - 1) - 1) // s + 1
    if out_len < 1:
        raise ctx.fail(
            ctx.param("kernel_size"),
            f"the kernel (size {k}, dilation {d}) is longer than the padded input length {length}",
        )
    return (kw["out_channels"], out_len)


def _residual1d(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    """Two same-padded convolutions (the first strided) with GroupNorm, plus a shortcut (a 1 x 1
    strided convolution when the channels or the length change): see ``protocol.model``."""
    channels, length = _need_signal(ctx, "ResidualBlock1d", shape)
    _match(ctx, kw, "in_channels", channels, "channels")
    if kw["kernel_size"] % 2 == 0:
        raise ctx.fail(ctx.param("kernel_size"), f"must be odd (the block pads k // 2 each side), got {kw['kernel_size']}")
    if kw["out_channels"] % kw["num_groups"]:
        raise ctx.fail(ctx.param("num_groups"),
                       f"must divide out_channels ({kw['out_channels']}), got {kw['num_groups']}")
    return (kw["out_channels"], (length - 1) // kw["stride"] + 1)


def _pool_len(ctx: _Ctx, length: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    if p > k // 2:
        raise ctx.fail(ctx.param("padding"), f"must be at most half the kernel size ({k // 2}), got {p}")
    # torch's pooling_output_shape: floor division, plus (stride - 1) in ceil mode.
    span = length + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * s >= length + p:
        out -= 1
    if out < 1:
        raise ctx.fail(ctx.param("kernel_size"), f"the window ({k}) is longer than the padded input length {length}")
    return out


def _maxpool1d(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    channels, length = _need_signal(ctx, "MaxPool1d", shape)
    if kw["stride"] is None:
        kw["stride"] = kw["kernel_size"]
    out = _pool_len(ctx, length, kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"], kw["ceil_mode"])
    return (channels, out)


def _avgpool1d(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    channels, length = _need_signal(ctx, "AvgPool1d", shape)
    if kw["stride"] is None:
        kw["stride"] = kw["kernel_size"]
    out = _pool_len(ctx, length, kw["kernel_size"], kw["stride"], kw["padding"], 1, kw["ceil_mode"])
    return (channels, out)


def _adaptive_avgpool1d(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    channels, _ = _need_signal(ctx, "AdaptiveAvgPool1d", shape)
    return (channels, kw["output_size"])


def _flatten(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    # start_dim/end_dim count the batch dimension, as in torch.nn.Flatten.
    ndim = len(shape) + 1
    start, end = kw["start_dim"], kw["end_dim"]
    start_n = start + ndim if start < 0 else start
    end_n = end + ndim if end < 0 else end
    if not 0 <= start_n < ndim:
        raise ctx.fail(ctx.param("start_dim"), f"is out of range for an input {_fmt(shape)} plus the batch dimension")
    if not 0 <= end_n < ndim:
        raise ctx.fail(ctx.param("end_dim"), f"is out of range for an input {_fmt(shape)} plus the batch dimension")
    if start_n == 0:
        raise ctx.fail(ctx.param("start_dim"), "must be >= 1: the batch dimension cannot be flattened")
    if end_n < start_n:
        raise ctx.fail(ctx.param("end_dim"), "must not come before start_dim")
    full = (None, *shape)
    merged = math.prod(full[start_n : end_n + 1])  # type: ignore[arg-type]
    return (*shape[: start_n - 1], merged, *shape[end_n:])


def _batchnorm1d(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    if len(shape) not in (1, 2):
        raise ctx.fail("", f"BatchNorm1d needs a [features] or [channels, length] input, got {_fmt(shape)}")
    _match(ctx, kw, "num_features", shape[0], "features/channels")
    return shape


def _groupnorm(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    if not shape:
        raise ctx.fail("", "GroupNorm needs an input with a channel dimension")
    _match(ctx, kw, "num_channels", shape[0], "features/channels")
    if kw["num_channels"] % kw["num_groups"]:
        raise ctx.fail(
            ctx.param("num_groups"), f"must divide num_channels ({kw['num_channels']}), got {kw['num_groups']}"
        )
    return shape


def _layernorm(ctx: _Ctx, kw: dict, shape: Shape) -> Shape:
    if "normalized_shape" not in kw:
        kw["normalized_shape"] = [shape[-1]] if shape else []
    normalized = tuple(kw["normalized_shape"])
    if len(normalized) > len(shape) or shape[len(shape) - len(normalized) :] != normalized:
        raise ctx.fail(
            ctx.param("normalized_shape"),
            f"must equal the trailing dimensions of the previous output {_fmt(shape)}, got {list(normalized)}",
        )
    return shape


def _scratch(ltype: str, kw: Mapping[str, Any], shape: Shape, out: Shape) -> int:
    """Per-sample values a layer allocates besides its output (``ResolvedLayer.scratch``)."""
    if ltype == "Conv1d":
        channels, length = shape
        k, d, p = kw["kernel_size"], kw["dilation"], kw["padding"]
        pad = 0 if p == "valid" else d * (k - 1) if p == "same" else 2 * p
        return channels * (length + pad) + channels * k * out[1]  # padded input + Opacus' unfold
    if ltype in ("MaxPool1d", "AvgPool1d"):
        channels, length = shape
        return channels * (length + 2 * kw["padding"])
    if ltype == "ResidualBlock1d":
        (c_in, length), (c_out, out_len), k = shape, out, kw["kernel_size"]
        pad = k - 1
        convs = c_in * (length + pad) + c_in * k * out_len + c_out * (out_len + pad) + c_out * k * out_len
        shortcut = c_in * out_len + c_out * out_len  # the 1 x 1 conv's unfolded input and output
        return convs + shortcut + 7 * c_out * out_len  # conv, norm, ReLU, dropout, conv, norm, sum
    return 0


def _eval_scratch(ltype: str, kw: Mapping[str, Any], shape: Shape, out: Shape, scratch: int) -> int:
    """``ResolvedLayer.eval_scratch``: a ResidualBlock1d holds one padded input, one convolution's
    unfolded input and three intermediate outputs at a time in inference; others their scratch."""
    if ltype != "ResidualBlock1d":
        return scratch
    (c_in, length), (c_out, out_len), k = shape, out, kw["kernel_size"]
    return max(c_in * (length + k - 1), c_out * (out_len + k - 1)) + max(c_in, c_out) * k * out_len + 3 * c_out * out_len


def _ghost_scratch(ltype: str, kw: Mapping[str, Any], shape: Shape) -> int:
    """Per-sample values ghost clipping makes for one layer (``ResolvedLayer.ghost_scratch``).

    Opacus 1.6 computes a Linear's per-sample gradient norm from its input and output gradient
    alone (ghost norm): O(1) a row for a [features] input, two T x T Gram matrices for a
    [T, features] one. Other layers with weights get their per-sample gradient made in their
    backward hook and reduced to a norm at once (fast gradient clipping): their own parameter
    count a row. Then one ordinary backward pass with the clipping factors."""
    if ltype == "Linear":
        t = math.prod(shape[:-1])
        return 0 if len(shape) == 1 else 2 * t * t
    return _parameters(ltype, kw, shape)


def parameter_count(chain: ResolvedChain) -> int:
    """Trainable parameters of a resolved model, without torch (``protocol.model.summarize``'s count)."""
    return sum(_parameters(layer.type, layer.kwargs, layer.input_shape) for layer in chain.layers)


def _parameters(ltype: str, kw: Mapping[str, Any], shape: Shape) -> int:
    """A layer's trainable parameter count from its arguments (what torch would allocate)."""
    if ltype == "Conv1d":
        return kw["out_channels"] * (kw["in_channels"] // kw["groups"]) * kw["kernel_size"] + (
            kw["out_channels"] if kw["bias"] else 0)
    if ltype == "Linear":
        return kw["out_features"] * kw["in_features"] + (kw["out_features"] if kw["bias"] else 0)
    if ltype == "GroupNorm":
        return 2 * kw["num_channels"] if kw["affine"] else 0
    if ltype == "LayerNorm":
        n = math.prod(kw["normalized_shape"])
        return (n + (n if kw["bias"] else 0)) if kw["elementwise_affine"] else 0
    if ltype == "BatchNorm1d":
        return 2 * kw["num_features"] if kw["affine"] else 0
    if ltype == "ResidualBlock1d":
        c_in, c_out, k = kw["in_channels"], kw["out_channels"], kw["kernel_size"]
        shortcut = c_in * c_out + c_out if (c_in != c_out or kw["stride"] != 1) else 0
        return (c_in * c_out * k + c_out) + (c_out * c_out * k + c_out) + 4 * c_out + shortcut
    return 0


@dataclass(frozen=True, kw_only=True)
class _LayerType:
    params: Mapping[str, _Param]
    infer: Callable[[_Ctx, dict, Shape], Shape]
    # Whether the layer's output for one row depends on that row alone, in training and in
    # evaluation. DP-SGD bounds one row's effect by clipping *its own* gradient: a layer that
    # mixes rows (batch statistics) lets one patient move every other row's clipped gradient
    # and every released evaluation count. No default, so a new layer type must say.
    row_independent: bool
    # Params filled from the chain when absent (declared optional in `params`).
    inferred: frozenset[str] = frozenset()


_NO_PARAMS: Mapping[str, _Param] = {}

LAYER_TYPES: dict[str, _LayerType] = {
    "Linear": _LayerType(
        params={"in_features": _Param("size", None), "out_features": _Param("size"), "bias": _Param("bool", True)},
        infer=_linear,
        row_independent=True,
        inferred=frozenset({"in_features"}),
    ),
    "ReLU": _LayerType(params=_NO_PARAMS, infer=_same, row_independent=True),
    "LeakyReLU": _LayerType(params={"negative_slope": _Param("float", 0.01)}, infer=_same, row_independent=True),
    "Sigmoid": _LayerType(params=_NO_PARAMS, infer=_same, row_independent=True),
    "Tanh": _LayerType(params=_NO_PARAMS, infer=_same, row_independent=True),
    # Each row's mask is drawn on its own (the draws do not depend on any row's values).
    "Dropout": _LayerType(params={"p": _Param("prob", 0.5)}, infer=_same, row_independent=True),
    "Conv1d": _LayerType(
        params={
            "in_channels": _Param("size", None),
            "out_channels": _Param("size"),
            "kernel_size": _Param("size"),
            "stride": _Param("size", 1),
            "padding": _Param("padding", 0),
            "dilation": _Param("size", 1),
            "groups": _Param("size", 1),
            "bias": _Param("bool", True),
        },
        infer=_conv1d,
        row_independent=True,
        inferred=frozenset({"in_channels"}),
    ),
    "MaxPool1d": _LayerType(
        params={
            "kernel_size": _Param("size"),
            "stride": _Param("size", None),
            "padding": _Param("nonneg", 0),
            "dilation": _Param("size", 1),
            "ceil_mode": _Param("bool", False),
        },
        infer=_maxpool1d,
        row_independent=True,
    ),
    "AvgPool1d": _LayerType(
        params={
            "kernel_size": _Param("size"),
            "stride": _Param("size", None),
            "padding": _Param("nonneg", 0),
            "ceil_mode": _Param("bool", False),
            "count_include_pad": _Param("bool", True),
        },
        infer=_avgpool1d,
        row_independent=True,
    ),
    "AdaptiveAvgPool1d": _LayerType(
        params={"output_size": _Param("size")}, infer=_adaptive_avgpool1d, row_independent=True
    ),
    "Flatten": _LayerType(
        params={"start_dim": _Param("int", 1), "end_dim": _Param("int", -1)}, infer=_flatten, row_independent=True
    ),
    # Normalises with the batch's mean and variance in training, and in evaluation too without
    # running statistics (which are themselves un-noised statistics of private rows): one row
    # moves every other row's output. Kept in the language so an export that uses it gets an
    # error that says what to use instead, never "unknown type".
    "BatchNorm1d": _LayerType(
        params={
            "num_features": _Param("size", None),
            "eps": _Param("posfloat", 1e-5),
            "momentum": _Param("prob", 0.1),
            "affine": _Param("bool", True),
            "track_running_stats": _Param("bool", True),
        },
        infer=_batchnorm1d,
        row_independent=False,
        inferred=frozenset({"num_features"}),
    ),
    # A residual block (DiagnoseNET, Rajpurkar et al. 2017) with GroupNorm, not BatchNorm: each
    # row's output is its own convolutions, per-row norms and shortcut.
    "ResidualBlock1d": _LayerType(
        params={
            "in_channels": _Param("size", None),
            "out_channels": _Param("size"),
            "kernel_size": _Param("size"),
            "stride": _Param("size", 1),
            "num_groups": _Param("size", 1),
            "dropout": _Param("prob", 0.0),
        },
        infer=_residual1d,
        row_independent=True,
        inferred=frozenset({"in_channels"}),
    ),
    # Per-row statistics over channel groups / trailing dimensions: row-independent.
    "GroupNorm": _LayerType(
        params={
            "num_groups": _Param("size"),
            "num_channels": _Param("size", None),
            "eps": _Param("posfloat", 1e-5),
            "affine": _Param("bool", True),
        },
        infer=_groupnorm,
        row_independent=True,
        inferred=frozenset({"num_channels"}),
    ),
    "LayerNorm": _LayerType(
        params={
            "normalized_shape": _Param("shape", None),
            "eps": _Param("posfloat", 1e-5),
            "elementwise_affine": _Param("bool", True),
            "bias": _Param("bool", True),
        },
        infer=_layernorm,
        row_independent=True,
        inferred=frozenset({"normalized_shape"}),
    ),
}

# Layer types that own trainable parameters: a model needs at least one of them.
TRAINABLE = frozenset({"Linear", "Conv1d", "ResidualBlock1d"})

# Layer types Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``) handles: a norm
# sampler (Linear) or a per-sample gradient sampler (the others with weights), or no weights at
# all. A model with any other layer falls back to per-sample gradients (``ResolvedChain.clipping``);
# ``tests/protocol/test_layer_types.py`` checks this set against Opacus' own tables.
FAST_CLIPPING = frozenset(set(LAYER_TYPES) - {"BatchNorm1d"})

_CANONICAL = {name.lower(): name for name in (*LAYER_TYPES, *MARKERS)}
ALLOWED_TYPES: tuple[str, ...] = (*MARKERS, *LAYER_TYPES)


def canonical_type(name: str) -> str | None:
    """The whitelisted spelling of a layer type (case-insensitive), or None."""
    return _CANONICAL.get(name.strip().lower()) if isinstance(name, str) else None


def unknown_type_message(name: Any) -> str:
    return f"{name!r} is not an allowed layer type; allowed: {', '.join(ALLOWED_TYPES)}"


# --------------------------------------------------------------------------- resolve


def _fields(layer: Any) -> tuple[Any, Any, Any]:
    if isinstance(layer, Mapping):
        return layer.get("type"), layer.get("name"), layer.get("params", {})
    return getattr(layer, "type", None), getattr(layer, "name", None), getattr(layer, "params", {})


def _input_shape(ctx: _Ctx, params: Mapping[str, Any]) -> Shape:
    def size(key: str) -> int:
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise ctx.fail(ctx.param(key), f"must be an integer in [1, {MAX_SIZE}], got {value!r}")
        return value

    if "channels" in params or "length" in params:
        for key in ("channels", "length"):
            if key not in params:
                raise ctx.fail(ctx.param(key), 'is required for a signal input (with "channels")')
        return (size("channels"), size("length"))
    if "features" in params:
        return (size("features"),)
    raise ctx.fail(".params", 'the input marker needs "features" (tabular) or "channels" and "length" (signal)')


def _first_shape(layers: Sequence[Any], prefix: str) -> Shape:
    """Input shape when there is no input marker: a first Linear with in_features."""
    ltype, _, params = _fields(layers[0])
    if canonical_type(ltype) == "Linear" and isinstance(params, Mapping) and "in_features" in params:
        value = params["in_features"]
        if not isinstance(value, bool) and isinstance(value, int) and value >= 1:
            return (value,)
    raise ConfigError(
        f"{prefix}[0]",
        'start the layer list with an input marker ({"type": "input", "params": {"features": N}} '
        'or {"channels": C, "length": L}) so the input shape is known',
    )


def resolve_layers(layers: Sequence[Any], *, prefix: str = "architecture.layers") -> ResolvedChain:
    """Check a layer list against the whitelist and walk its shapes.

    ``layers`` holds ``LayerSpec`` objects or plain dicts with ``type``, ``name`` and
    ``params``. Returns every layer with its full constructor arguments; raises
    ``ConfigError`` naming the JSON path (``architecture.layers[2].params.in_features``).
    """
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)) or not layers:
        raise ConfigError(prefix, "must be a non-empty list of layers")
    n = len(layers)
    first_type = canonical_type(_fields(layers[0])[0])
    shape = None if first_type == INPUT else _first_shape(layers, prefix)
    input_shape: Shape | None = shape
    resolved: list[ResolvedLayer] = []
    for i, layer in enumerate(layers):
        ctx = _Ctx(prefix, i)
        raw_type, name, params = _fields(layer)
        ltype = canonical_type(raw_type)
        if ltype is None:
            raise ctx.fail(".type", unknown_type_message(raw_type))
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise ctx.fail(".params", f"must be an object, got {type(params).__name__}")
        if ltype == INPUT:
            if i != 0:
                raise ctx.fail(".type", "the input marker must be the first layer")
            shape = input_shape = _input_shape(ctx, params)
            resolved.append(ResolvedLayer(i, ltype, name, {}, shape, shape))
            continue
        assert shape is not None
        if ltype == OUTPUT:
            if i != n - 1:
                raise ctx.fail(".type", "the output marker must be the last layer")
            if "features" in params:
                declared = params["features"]
                if len(shape) != 1:
                    raise ctx.fail(
                        ".params.features",
                        f"the model's output is {_fmt(shape)}; add Flatten and Linear layers so it is [{declared}]",
                    )
                if declared != shape[0]:
                    raise ctx.fail(".params.features", f"must equal the previous layer's output ({shape[0]})")
            resolved.append(ResolvedLayer(i, ltype, name, {}, shape, shape))
            continue
        spec = LAYER_TYPES[ltype]
        unknown = sorted(set(params) - set(spec.params) - INFORMATIONAL_PARAMS)
        if unknown:
            allowed = ", ".join(spec.params) or "none"
            raise ctx.fail(ctx.param(unknown[0]), f"is not a parameter of {ltype} (allowed: {allowed})")
        kwargs: dict[str, Any] = {}
        for key, pspec in spec.params.items():
            if key in params and not (params[key] is None and pspec.default is None):
                kwargs[key] = _coerce(ctx, key, pspec, params[key])
            elif pspec.default is _REQUIRED:
                raise ctx.fail(ctx.param(key), f"is required for {ltype}")
            elif key not in spec.inferred:
                kwargs[key] = pspec.default
        out = spec.infer(ctx, kwargs, shape)
        scratch = _scratch(ltype, kwargs, shape, out)
        resolved.append(ResolvedLayer(i, ltype, name, kwargs, shape, out, scratch, _ghost_scratch(ltype, kwargs, shape),
                                      _eval_scratch(ltype, kwargs, shape, out, scratch)))
        shape = out
    assert input_shape is not None and shape is not None
    if not any(layer.type in TRAINABLE for layer in resolved):
        raise ConfigError(prefix, f"has no trainable layer; add at least one of {', '.join(sorted(TRAINABLE))}")
    return ResolvedChain(tuple(resolved), input_shape, shape)
