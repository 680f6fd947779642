"""Declarative layer list -> ``torch.nn.Sequential``, its summary, and weights <-> ``Tensors``.

The model a site trains comes from the wire, so it is built only from the whitelist
in ``protocol.layers`` with only the constructor arguments that whitelist names: no
code, no arbitrary kwargs. Module names are the layer's index in
``architecture.layers`` (``"1.weight"`` is the weight of ``architecture.layers[1]``),
so a state-dict key points back at the JSON that declared it.

Weights travel as ``Tensors`` (``protocol.messages``): ``(name, ndarray)`` pairs in
module order, names = state-dict keys, floating tensors as float32.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from protocol.config_error import ConfigError
from protocol.layers import ResolvedChain, resolve_layers
from protocol.messages import Tensors

__all__ = ["ModelSummary", "build_model", "load_tensors", "summarize", "to_tensors"]

class ResidualBlock1d(nn.Module):
    """Conv1d(k, stride) -> GroupNorm -> ReLU -> Dropout -> Conv1d(k) -> GroupNorm, plus the input
    (through a 1 x 1 strided Conv1d when the channels or the length change), then ReLU: the
    residual block of DiagnoseNET's and Rajpurkar et al.'s ECG networks, with GroupNorm (per
    row) where they use BatchNorm (per batch, which DP-SGD cannot bound). Children are plain
    torch layers, so Opacus computes (or ghost-clips) their per-sample gradients as usual."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 num_groups: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=pad)
        self.norm1 = nn.GroupNorm(num_groups, out_channels)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, padding=pad)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.shortcut: nn.Module = (nn.Conv1d(in_channels, out_channels, 1, stride=stride)
                                    if in_channels != out_channels or stride != 1 else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.norm1(self.conv1(x))))
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(x))


_MODULES: dict[str, Callable[..., nn.Module]] = {
    "Linear": nn.Linear,
    "ReLU": nn.ReLU,
    "LeakyReLU": nn.LeakyReLU,
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "Dropout": nn.Dropout,
    "Conv1d": nn.Conv1d,
    "MaxPool1d": nn.MaxPool1d,
    "AvgPool1d": nn.AvgPool1d,
    "AdaptiveAvgPool1d": nn.AdaptiveAvgPool1d,
    "Flatten": nn.Flatten,
    "BatchNorm1d": nn.BatchNorm1d,
    "GroupNorm": nn.GroupNorm,
    "LayerNorm": nn.LayerNorm,
    "ResidualBlock1d": ResidualBlock1d,
}


def _instantiate(chain: ResolvedChain, prefix: str) -> nn.Sequential:
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for layer in chain.modules:
        try:
            modules[str(layer.index)] = _MODULES[layer.type](**layer.kwargs)
        except (RuntimeError, MemoryError) as exc:  # sizes past what torch can allocate or even count
            raise ConfigError(f"{prefix}[{layer.index}]", f"{layer.type} is too large to build: {exc}") from None
    return nn.Sequential(modules)


_PREFIX = "architecture.layers"


def build_model(layers: Sequence[Any], *, seed: int | None = None) -> nn.Sequential:
    """Build the model of ``architecture.layers`` (``LayerSpec`` objects or dicts).

    Raises ``ConfigError`` naming the JSON path when a type is not whitelisted or the
    shapes do not fit. With ``seed`` the initial weights are reproducible and the
    caller's global torch RNG is left untouched.
    """
    chain = resolve_layers(layers)
    if seed is None:
        return _instantiate(chain, _PREFIX)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _instantiate(chain, _PREFIX)


@dataclass(frozen=True)
class ModelSummary:
    """What ``fedbus config validate`` shows: per-layer output shapes and sizes."""

    layers: list[dict[str, Any]]  # {index, name, type, output_shape, parameters}
    parameters: int
    input_shape: list[int]
    output_shape: list[int]
    trainable: int = field(default=0)
    # State-dict names of the model's buffers (state that is not a trainable weight, e.g.
    # BatchNorm's running statistics): "2.running_mean" belongs to architecture.layers[2].
    buffers: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "trainable": self.trainable,
            "input_shape": self.input_shape,
            "output_shape": self.output_shape,
            "layers": self.layers,
        }


def summarize(layers: Sequence[Any]) -> ModelSummary:
    """Shapes and parameter counts without allocating the weights (built on "meta").

    Cheap even for a huge declared model, so a site can check its parameter budget
    before building anything.
    """
    chain = resolve_layers(layers)
    with torch.device("meta"):
        model = _instantiate(chain, _PREFIX)
    modules = dict(model.named_children())
    rows = []
    for layer in chain.layers:
        module = modules.get(str(layer.index))
        count = sum(p.numel() for p in module.parameters()) if module is not None else 0
        rows.append(
            {
                "index": layer.index,
                "name": layer.name,
                "type": layer.type,
                "output_shape": list(layer.output_shape),
                "parameters": count,
            }
        )
    return ModelSummary(
        layers=rows,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        input_shape=list(chain.input_shape),
        output_shape=list(chain.output_shape),
        buffers=tuple(name for name, _ in model.named_buffers()),
    )


def _wire_dtype(tensor: torch.Tensor) -> np.dtype:
    if tensor.is_floating_point():
        return np.dtype(np.float32)
    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def to_tensors(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> Tensors:
    """A module's state dict as ``Tensors``: float32 copies (training goes on in place)."""
    if isinstance(module_or_state_dict, nn.Module):
        state = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    out = []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to(device="cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        out.append((name, np.array(tensor.numpy(), order="C", copy=True)))
    return tuple(out)


def load_tensors(
    module: nn.Module,
    tensors: Tensors | Sequence[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    strict: bool = True,
) -> None:
    """Copy ``tensors`` into ``module``; everything is checked before anything is copied.

    Raises ``ValueError`` listing missing/unexpected names (when ``strict``), or the
    first array whose shape or dtype does not fit, so a bad update changes nothing.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    state = module.state_dict()
    given: dict[str, np.ndarray] = {}
    for entry in items:
        name, array = entry
        if name in given:
            raise ValueError(f"weights do not fit the model: {name!r} appears twice")
        if not isinstance(array, np.ndarray):
            raise ValueError(f"weights do not fit the model: {name!r} is a {type(array).__name__}, not an array")
        given[name] = array
    missing = [name for name in state if name not in given]
    unexpected = [name for name in given if name not in state]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        raise ValueError(f"weights do not fit the model: {'; '.join(parts)}")
    new: dict[str, torch.Tensor] = {}
    for name, array in given.items():
        if name not in state:
            continue
        target = state[name]
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"weights do not fit the model: {name!r} has shape {list(array.shape)}, expected {list(target.shape)}"
            )
        expected = _wire_dtype(target)
        if array.dtype != expected:
            raise ValueError(f"weights do not fit the model: {name!r} has dtype {array.dtype}, expected {expected}")
        with warnings.catch_warnings():
            # Zero-copy decoded arrays are read-only; load_state_dict copies at once.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            new[name] = torch.from_numpy(array)
    module.load_state_dict(new, strict=False)
