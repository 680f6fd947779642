"""Which release each task seed was first used on, on disk: the part of reproducible DP's
noise key that stops a repeated seed from repeating noise on a different release (issue 20,
class 6) without making the noise hang on the last bit of a model.

Keying every stream on a digest of the release's inputs (model bytes included) made the
noise follow float rounding: a coordinator's weighted-mean sum is exact only to ~1 ulp in the
order the updates arrive, so a fault-free rerun (or a resumed round) sent a model one ulp
off and got entirely different noise, 0.04 on every weight, instead of the same model
(``tests/chaos``). So the first release a seed is used on gets the noise of the seed
alone, as any run with that seed would; an identical release (a redelivery, a resumed
round, a crash retry) gets it again, which says nothing new; any *other* release with a
seed already used is keyed with its digest too, so it never shares noise with the first.

The record is written durably before the key is handed out (before any noise exists), so
a crash cannot forget a first use that a release came from. A line torn by a crash was
never handed out, and is ignored. Losing the state directory loses this record the way it
loses the privacy ledger (the threat model keeps the state directory, as the budget must).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from protocol.durable import fsync_dir

FILE = "noise_keys.log"


class NoiseKeys:
    """``state_dir/noise_keys.log``: one line ``SEED DIGEST_HEX`` per task seed's first release."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE
        self._lock = threading.Lock()
        self._first: dict[int, str] | None = None

    def _load(self) -> dict[int, str]:
        if self._first is None:
            first: dict[int, str] = {}
            try:
                text = self.path.read_text(encoding="ascii", errors="replace")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2 and len(parts[1]) == 64:
                    try:
                        first.setdefault(int(parts[0]), parts[1])
                    except ValueError:
                        continue  # torn or foreign: never handed out
            self._first = first
        return self._first

    def extra_key(self, task_seed: int, digest: bytes) -> bytes:
        """What the noise key holds beside (dp_seed, task seed, purpose): nothing on the seed's
        first release and on an identical one, ``digest`` on any other release."""
        seed, hexed = int(task_seed), digest.hex()
        with self._lock:
            first = self._load()
            known = first.get(seed)
            if known is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                new = not self.path.exists()
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, f"{seed} {hexed}\n".encode("ascii"))
                    os.fsync(fd)  # durable before any noise from this key exists
                finally:
                    os.close(fd)
                if new:
                    fsync_dir(self.path.parent)
                first[seed] = hexed
                return b""
            return b"" if known == hexed else digest


__all__ = ["NoiseKeys"]
