"""Staleness functions s(τ) of FedAsync (Xie et al., 2019), τ = version − base_round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["constant", "polynomial", "hinge"]


@dataclass(frozen=True)
class Staleness:
    """``constant``: 1; ``polynomial``: (1+τ)^-a; ``hinge``: 1 if τ ≤ b else 1/(a(τ−b)+1)."""

    kind: Kind = "constant"
    a: float = 0.5
    b: float = 4.0

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau} (an update based on a future model version?)")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + tau) ** (-self.a))
        if tau <= self.b:
            return 1.0
        return 1.0 / (self.a * (tau - self.b) + 1.0)

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> "Staleness":
        """From ``staleness`` (a name or ``{"function", "a", "b"}``) plus ``staleness_a``/``staleness_b``."""
        spec = parameters.get("staleness", "constant")
        if isinstance(spec, dict):
            kind, a, b = spec.get("function", spec.get("type", "constant")), spec.get("a"), spec.get("b")
        else:
            kind, a, b = spec, None, None
        a = parameters.get("staleness_a", a)
        b = parameters.get("staleness_b", b)
        if kind not in ("constant", "polynomial", "hinge"):
            raise ValueError(
                f"federated.parameters.staleness: unknown function {kind!r}; use constant, polynomial or hinge"
            )
        defaults = {"polynomial": (0.5, 0.0), "hinge": (10.0, 4.0), "constant": (0.0, 0.0)}[kind]
        a = float(defaults[0] if a is None else a)
        b = float(defaults[1] if b is None else b)
        if a < 0 or b < 0:
            raise ValueError(f"federated.parameters.staleness: a and b must be >= 0, got a={a}, b={b}")
        return cls(kind=kind, a=a, b=b)
