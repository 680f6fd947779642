"""torch's seeded initialisation of a layer chain, bit for bit, without importing torch.

Every site starts from ``build_model(layers, seed=seed)`` (``protocol.model``). Importing torch
to make those weights cost a coordinator about 1–2.5 s of its start-up, most of its fixed cost
per run (issue 23), and 250 MB it needs for nothing else. The weights of the common layers are
simple to make exactly as torch makes them:

- torch's CPU generator is MT19937, seeded like numpy's legacy ``RandomState(seed)``
  (``init_genrand`` with the seed's low 32 bits), and ``uniform_(a, b)`` on float32 takes one
  32-bit draw per value, in row-major order: ``x = (draw & (2**24 - 1)) * 2**-24``, then
  ``x * (b - a) + a`` in double with ``a`` and ``b`` first rounded to float32, rounded to float32;
- ``Linear`` and ``Conv1d`` draw their weight with ``kaiming_uniform_(a=sqrt(5))`` and then
  their bias from ``±1/sqrt(fan_in)``, in construction order; a ``ResidualBlock1d`` is conv1,
  norm1, conv2, norm2 and its shortcut in that order; norms are ones and zeros (no draw).

A chain with any other parametrised type (``BatchNorm1d``, with its int64 counter) is left to
torch: ``weights`` returns None. ``tests/protocol/test_initial_numpy.py`` checks equality with
torch bit for bit over every layer type and random chains, so a torch upgrade that changes its
generator fails there, not in a run.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.layers import ResolvedChain, ResolvedLayer
from protocol.messages import Tensors

_BLOCK = 1 << 20  # values drawn per block (24 MB of scratch)
# Types without parameters: nothing to draw, nothing in the state dict.
_STATELESS = frozenset({"ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Dropout", "MaxPool1d", "AvgPool1d",
                        "AdaptiveAvgPool1d", "Flatten"})


class _TorchCPUUniform:
    """The float32 ``uniform_`` of torch's CPU generator after ``torch.manual_seed(seed)``."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.RandomState(seed & 0xFFFFFFFF)._bit_generator  # MT19937, init_genrand

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
        """Filled in blocks, so a 100 M-value layer costs its float32 output and one block of scratch."""
        out = np.empty(math.prod(shape), dtype=np.float32)
        lo, hi = float(np.float32(low)), float(np.float32(high))
        for start in range(0, out.size, _BLOCK):
            draws = self._bits.random_raw(min(_BLOCK, out.size - start))
            x = (draws & 0xFFFFFF).astype(np.float64) * 2.0 ** -24
            out[start:start + draws.size] = x * (hi - lo) + lo
        return out.reshape(shape)


def _kaiming(rng: _TorchCPUUniform, shape: tuple[int, ...]) -> np.ndarray:
    """``nn.init.kaiming_uniform_(w, a=math.sqrt(5))`` with torch's own arithmetic (fan_in mode)."""
    fan_in = shape[1] * math.prod(shape[2:])
    a = math.sqrt(5)
    gain = math.sqrt(2.0 / (1 + a ** 2))
    bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    return rng.uniform(shape, -bound, bound)


def _affine(rng: _TorchCPUUniform, name: str, weight: tuple[int, ...], bias: bool) -> Tensors:
    w = _kaiming(rng, weight)
    out: list[tuple[str, np.ndarray]] = [(f"{name}.weight", w)]
    if bias:
        fan_in = weight[1] * math.prod(weight[2:])
        b = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        out.append((f"{name}.bias", rng.uniform((weight[0],), -b, b)))
    return tuple(out)


def _conv(rng: _TorchCPUUniform, name: str, cin: int, cout: int, k: int, *, groups: int = 1,
          bias: bool = True) -> Tensors:
    return _affine(rng, name, (cout, cin // groups, k), bias)


def _norm(name: str, shape: tuple[int, ...], *, weight: bool, bias: bool) -> Tensors:
    out = []
    if weight:
        out.append((f"{name}.weight", np.ones(shape, dtype=np.float32)))
    if bias:
        out.append((f"{name}.bias", np.zeros(shape, dtype=np.float32)))
    return tuple(out)


def _layer(rng: _TorchCPUUniform, layer: ResolvedLayer) -> Tensors | None:
    kw, name = layer.kwargs, str(layer.index)
    if layer.type in _STATELESS:
        return ()
    if layer.type == "Linear":
        return _affine(rng, name, (int(kw["out_features"]), int(kw["in_features"])), bool(kw.get("bias", True)))
    if layer.type == "Conv1d":
        return _conv(rng, name, int(kw["in_channels"]), int(kw["out_channels"]), int(kw["kernel_size"]),
                     groups=int(kw.get("groups", 1)), bias=bool(kw.get("bias", True)))
    if layer.type == "GroupNorm":
        affine = bool(kw.get("affine", True))
        return _norm(name, (int(kw["num_channels"]),), weight=affine, bias=affine)
    if layer.type == "LayerNorm":
        shape = kw["normalized_shape"]
        dims = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
        affine = bool(kw.get("elementwise_affine", True))
        return _norm(name, dims, weight=affine, bias=affine and bool(kw.get("bias", True)))
    if layer.type == "ResidualBlock1d":
        cin, cout, k = int(kw["in_channels"]), int(kw["out_channels"]), int(kw["kernel_size"])
        stride = int(kw.get("stride", 1))
        parts = [*_conv(rng, f"{name}.conv1", cin, cout, k),
                 *_norm(f"{name}.norm1", (cout,), weight=True, bias=True),
                 *_conv(rng, f"{name}.conv2", cout, cout, k),
                 *_norm(f"{name}.norm2", (cout,), weight=True, bias=True)]
        if cin != cout or stride != 1:
            parts += _conv(rng, f"{name}.shortcut", cin, cout, 1)
        return tuple(parts)
    return None  # a type torch must make (BatchNorm1d's buffers, or a type added later)


def weights(chain: ResolvedChain, *, seed: int) -> Tensors | None:
    """``to_tensors(build_model(layers, seed=seed))`` for ``chain`` (``resolve_layers(layers)``),
    or None when a layer's type is not one this module makes: build it with torch then."""
    rng = _TorchCPUUniform(seed)
    out: list[tuple[str, np.ndarray]] = []
    for layer in chain.modules:
        made = _layer(rng, layer)
        if made is None:
            return None
        out.extend(made)
    return tuple(out)


__all__ = ["weights"]
