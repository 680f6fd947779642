"""Fixed, site-secret train / validation / test splits.

Which rows a site trains on, validates on and tests on is the site's secret and never
changes from task to task. If the split followed the coordinator's seed (as it once did),
a curious coordinator could vary it round after round and difference the metrics of
overlapping row sets, and "test" rows would have been trained on in other rounds.

Every row gets a number ``u`` in [0, 1) from a keyed pseudo-random function of its
*content*: a 64-bit hash of the row's canonical values (pandas' ``hash_pandas_object``
over float64 numbers and strings, columns in name order), encrypted with AES-256 under a
per-dataset key derived from a 256-bit site secret kept in ``state_dir/split.key``
(created once, mode 0600). Content rather than row position, so that appending rows to
the file, or reordering it, leaves every existing row where it was; identical rows land
together, so a duplicated record cannot sit in train and in test at once. Changing a
row's values or the file's columns redraws that row (or all rows).

``u < test_fraction`` is the test split; the next ``validation_fraction`` of the rest is
validation; everything else trains. Validation is disjoint from test for every
validation fraction an experiment asks for.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.durable import write_atomic

SECRET_FILE = "split.key"
SECRET_BYTES = 32


@dataclass(frozen=True)
class SplitKey:
    """The secret behind a site's splits, and the share of rows held out for test."""

    secret: bytes
    test_fraction: float = 0.2
    public: bool = False  # True: derived from a known seed (research baselines only)

    @classmethod
    def load_or_create(cls, state_dir: Path, *, test_fraction: float) -> "SplitKey":
        """The site's split secret, drawn once from the OS and persisted (survives restarts)."""
        path = Path(state_dir) / SECRET_FILE
        if not path.exists():
            # Create-if-absent atomically: two daemons sharing a state dir agree on one secret.
            tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
            write_atomic(tmp, os.urandom(SECRET_BYTES), mode=0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"{path} is not a {SECRET_BYTES}-byte split secret; restore it from backup "
                             "(deleting it redraws every split, so test rows may have been trained on)")
        return cls(secret=secret, test_fraction=test_fraction)

    @classmethod
    def from_seed(cls, seed: int, *, test_fraction: float = 0.2) -> "SplitKey":
        """A key anyone knowing ``seed`` can rebuild: for offline baselines, never for a site."""
        return cls(secret=hashlib.sha256(f"fedbus-public-split\0{int(seed)}".encode()).digest(),
                   test_fraction=test_fraction, public=True)

    def dataset_key(self, dataset: str) -> bytes:
        return hashlib.sha256(b"fedbus-split\0" + self.secret + b"\0" + dataset.encode("utf-8")).digest()


def row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's values, independent of dtype drift (5 and 5.0 hash alike)."""
    canon = {}
    for col in sorted(frame.columns, key=str):
        s = frame[col]
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            canon[str(col)] = s.astype(np.float64)
        else:
            canon[str(col)] = s.astype("string").fillna("\0NA")
    return pd.util.hash_pandas_object(pd.DataFrame(canon), index=False).to_numpy(dtype=np.uint64)


def array_row_hashes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row hashes for signal arrays (sample axis first) with their labels."""
    flat = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    frame = pd.DataFrame(flat)
    frame["__label__"] = np.asarray(y, dtype=np.float64)
    frame.columns = [str(c) for c in frame.columns]
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def unit_values(key: SplitKey, dataset: str, hashes: np.ndarray) -> np.ndarray:
    """Keyed PRF of each row hash -> float in [0, 1): AES-256 over one block per row."""
    blocks = np.zeros((len(hashes), 2), dtype="<u8")
    blocks[:, 0] = hashes
    enc = Cipher(algorithms.AES(key.dataset_key(dataset)), modes.ECB()).encryptor()
    out = np.frombuffer(enc.update(blocks.tobytes()) + enc.finalize(), dtype="<u8").reshape(-1, 2)[:, 0]
    return (out >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def assign(u: np.ndarray, *, test_fraction: float, validation_fraction: float) -> Split:
    """Row indices by their unit value; validation disjoint from test for any fraction."""
    test = u < test_fraction
    rest = ~test
    if validation_fraction <= 0:
        idx = np.flatnonzero(rest)
        return Split(train=idx, validation=idx, test=np.flatnonzero(test))
    cut = test_fraction + validation_fraction * (1.0 - test_fraction)
    val = rest & (u < cut)
    train = rest & ~val
    return Split(train=np.flatnonzero(train), validation=np.flatnonzero(val), test=np.flatnonzero(test))
