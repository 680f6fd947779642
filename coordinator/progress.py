"""Round progress on stderr (round x/N, replies, ETA) with rich; a no-op when disabled."""

from __future__ import annotations

from typing import Any


class RoundProgress:
    """One bar over the rounds; its description carries the open round's replies."""

    def __init__(self, total: int, *, enabled: bool = True, start: int = 0) -> None:
        self.total = total
        self.enabled = enabled
        self.start = start
        self._progress: Any = None
        self._task: Any = None
        self._round = start

    def __enter__(self) -> "RoundProgress":
        import sys
        import time

        self._plain = self.enabled and not sys.stderr.isatty()  # a log file, systemd: one line per round
        self._t0 = time.monotonic()
        if self.enabled and not self._plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.start)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def begin(self, rnd: int, *, expected: int) -> None:
        self._round = rnd
        self._describe(f"round {rnd}: 0/{expected} replies")

    def replies(self, got: int, expected: int) -> None:
        self._describe(f"round {self._round}: {got}/{expected} replies")

    def note(self, text: str) -> None:
        self._describe(f"round {self._round}: {text}")

    def done(self, rnd: int, *, loss: float | None, accuracy: float | None) -> None:
        if getattr(self, "_plain", False):
            import sys
            import time

            now = time.monotonic()
            metrics = "".join(f", {k} {v:.4f}" for k, v in (("loss", loss), ("accuracy", accuracy)) if v is not None)
            sys.stderr.write(f"round {rnd}/{self.total} done{metrics} ({now - self._t0:.1f} s)\n")
            sys.stderr.flush()
            self._t0 = now
        if self._progress is not None:
            parts = [f"round {rnd} done"]
            if loss is not None:
                parts.append(f"loss {loss:.4f}")
            if accuracy is not None:
                parts.append(f"acc {accuracy:.3f}")
            self._progress.update(self._task, completed=rnd, description=", ".join(parts))


def announce(lines: list[str]) -> None:
    """Show a block of text to the operator before the rounds (the run's privacy plan): stderr,
    the terminal's channel for what is not the run's output; the structured log has it too."""
    import sys

    print("\n".join(lines), file=sys.stderr, flush=True)
