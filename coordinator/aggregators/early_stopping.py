"""Early stopping on the aggregated validation loss (patience, min_delta)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class EarlyStopping:
    """Stop after ``patience`` rounds without the loss improving by more than ``min_delta``."""

    patience: int = 3
    min_delta: float = 0.0
    best: float = math.inf
    bad_rounds: int = 0
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.patience < 1 or self.min_delta < 0:
            raise ValueError(
                f"federated.early_stopping: patience must be >= 1 and min_delta >= 0, got {self.patience}, {self.min_delta}"
            )

    def update(self, loss: float | None) -> bool:
        """Record one round's loss; True when the run should stop. A missing loss counts as no improvement."""
        self.history.append(math.nan if loss is None else float(loss))
        if loss is not None and math.isfinite(loss) and loss < self.best - self.min_delta:
            self.best = float(loss)
            self.bad_rounds = 0
        else:
            self.bad_rounds += 1
        return self.bad_rounds >= self.patience
