"""The simulator's two ways to fail: bad input (exit 2) and a failed run (exit 1)."""

from __future__ import annotations

from typing import Any


class SimulationInputError(ValueError):
    """Bad input to the simulator (exit 2); the message names what to fix."""


class SimulationFailed(RuntimeError):
    """The federated run itself failed (exit 1); the message says why. ``document`` is the
    run's result document when there is one (``--json`` prints it, with its status)."""

    def __init__(self, message: str, document: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.document = document
