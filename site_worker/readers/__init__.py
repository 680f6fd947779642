"""Dataset readers, one module per ``dataset.kind``, found by name in this package.

A reader turns a site's local files of one kind into what every other part needs: the row
count a hello announces, the catalogue entry (names and types, never values), the arrays a
task trains on (``site_worker.data.prepare`` does the rest: split, tensors) and, for the
simulator's held-out test files, the test rows encoded as the training file was. Each module
here defines ``READER`` (a ``Reader``); a new kind is one module plus its tests, and the
experiment schema's ``dataset.kind`` values and input marker rule (``protocol.config``). Modules are imported
from this package's own directory only, never by a name from the wire or a config file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from protocol.config import DatasetSpec
    from protocol.messages import DatasetInfo
    from site_worker.config import DatasetSource
    from site_worker.splits import SplitKey


@dataclass(frozen=True)
class Loaded:
    """One dataset's usable rows for a task: encoded labels, the three splits' inputs, feature names."""

    y: np.ndarray
    x_train: np.ndarray
    x_val: np.ndarray
    x_test: np.ndarray
    split: Any  # site_worker.splits.Split
    features: tuple[str, ...]


class Reader(Protocol):
    kind: str  # the experiment's dataset.kind this reader serves
    formats: tuple[str, ...]  # site.toml ``format`` values it reads
    suffixes: dict[str, str]  # file suffix -> format, when site.toml leaves ``format`` out
    labels_file: bool  # its files keep the labels apart (site.toml ``labels_path``; ``target`` optional)

    def rows(self, source: DatasetSource) -> int:
        """The public row count a hello announces (cheap)."""
        ...

    def catalogue(self, source: DatasetSource) -> DatasetInfo:
        """Names, row count and column types for the hello; never values."""
        ...

    def load(self, source: DatasetSource, spec: DatasetSpec, *, key: SplitKey, task: str, num_classes: int,
             input_shape: tuple[int, ...] | None, validation_fraction: float) -> Loaded:
        """The task's rows, split by the site's key and encoded as the model expects."""
        ...

    def holdout(self, train: DatasetSource, test: DatasetSource, spec: DatasetSpec, *, task: str, num_classes: int,
                rule: Any, input_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(test inputs, test labels, training labels): ``test`` encoded with ``train``'s statistics."""
        ...

    def site_toml(self, path: Path) -> dict[str, str]:
        """The site.toml keys, beyond ``path`` and ``target``, of a dataset table for the file ``path``."""
        ...


DEFAULT_KIND = "tabular"
_READERS: dict[str, Reader] | None = None


def readers() -> dict[str, Reader]:
    """Every reader of this package, by kind (imported once, in name order)."""
    global _READERS
    if _READERS is None:
        found: dict[str, Reader] = {}
        for mod in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])):
            reader: Reader = importlib.import_module(f"{__name__}.{mod}").READER
            assert reader.kind not in found, f"two readers for dataset.kind {reader.kind!r}"
            found[reader.kind] = reader
        # the default kind first (its formats lead every list a message shows)
        _READERS = dict(sorted(found.items(), key=lambda kv: kv[0] != DEFAULT_KIND))
    return _READERS


def by_kind(kind: str) -> Reader:
    return readers()[kind]


def by_format(fmt: str) -> Reader:
    """The reader of a site.toml ``format`` (validated when site.toml was read)."""
    for reader in readers().values():
        if fmt in reader.formats:
            return reader
    raise KeyError(fmt)


def formats() -> tuple[str, ...]:
    """Every site.toml ``format`` some reader reads, in reader order."""
    return tuple(f for r in readers().values() for f in r.formats)


def infer_format(path: Path) -> str | None:
    """The format a file's suffix names, or None."""
    suffix = path.suffix.lower()
    for reader in readers().values():
        if suffix in reader.suffixes:
            return reader.suffixes[suffix]
    return None


__all__ = ["Loaded", "Reader", "by_format", "by_kind", "formats", "infer_format", "readers"]
