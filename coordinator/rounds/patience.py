"""How long the asynchronous loops wait for a silent federation, and when they give up.

One rule for FedAsync, FedBuff and FedBuff under secure aggregation: wait until the deadline;
when it passes with nothing heard, re-send the tasks and wait again; after
``max_round_retries`` silent deadlines in a row, fail the run. Anything heard starts afresh.
"""

from __future__ import annotations

import time


class Patience:
    """The current deadline and the silent deadlines in a row."""

    def __init__(self, timeout_s: float, retries: int) -> None:
        self.timeout_s = timeout_s
        self.retries = retries
        self.misses = 0
        self.deadline = time.time() + timeout_s

    def restart(self) -> None:
        """A fresh deadline (a new version was sent), the silent count kept."""
        self.deadline = time.time() + self.timeout_s

    def heard(self) -> None:
        """A message arrived: a fresh deadline and no silence in a row."""
        self.misses = 0
        self.restart()

    def silent(self) -> bool:
        """The inbox returned nothing: True when the deadline has passed (one more silent deadline,
        and a fresh one), False while it has not (wait on)."""
        if time.time() < self.deadline:
            return False
        self.misses += 1
        self.restart()
        return True

    @property
    def exhausted(self) -> bool:
        """More silent deadlines in a row than the retries allow: give up."""
        return self.misses > self.retries
