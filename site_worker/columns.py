"""What a local table offers a model: column types, categories, encoded width.

Shared by ``fedbus config new`` (an experiment from a file), ``fedbus simulate --dataset``
(fill in a MediNet export's features from the file) and ``fedbus site check`` (does this
file serve that experiment). Reads the file here, on the machine that holds it; only the
resulting metadata (names, types, category labels, counts) is ever written out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from site_worker.config import DatasetSource
from site_worker.data import DataError, _category_key, read_table, to_numeric

MAX_CATEGORIES = 50  # a text column with more distinct values is an identifier, not a feature
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_key(name: str) -> str:
    """A dataset name usable as a site.toml key and a queue-safe id ("Hearth Atack Risk " -> "Hearth_Atack_Risk")."""
    key = _SAFE.sub("_", name.strip()).strip("_.-")
    return key[:128] or "dataset"


@dataclass(frozen=True)
class ColumnPlan:
    """How a table's columns become model inputs (metadata only)."""

    target: str
    rows: int
    features: list[str]
    categorical: dict[str, list[str]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # column -> why it was left out
    target_values: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        """The one-hot encoded width (the model's input size)."""
        return sum(len(self.categorical.get(f, ())) or 1 for f in self.features)


def read_file(path: Path, *, target: str) -> pd.DataFrame:
    """A CSV/Parquet file as the site reads it; ``DataError`` naming the target if unreadable."""
    fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
    return read_table(DatasetSource(name=path.stem, path=path, target=target, format=fmt))


def plan_columns(df: pd.DataFrame, *, target: str, exclude: tuple[str, ...] = ()) -> ColumnPlan:
    """Features in file order: numeric columns as one input each, text/bool columns one-hot
    with their sorted categories; identifiers (too many distinct labels) and empty columns left out."""
    if target not in df.columns:
        raise DataError(target, f"target column is missing from the file (columns: {', '.join(map(str, df.columns))})")
    features: list[str] = []
    categorical: dict[str, list[str]] = {}
    excluded: dict[str, str] = {c: "excluded by the experiment" for c in exclude if c in df.columns}
    for col in df.columns:
        if col == target or col in excluded:
            continue
        series = df[col]
        if series.notna().sum() == 0:
            excluded[col] = "every value is missing"
            continue
        try:
            if pd.api.types.is_bool_dtype(series):
                raise DataError(col, "bool")
            to_numeric(series, col)
            features.append(col)
            continue
        except DataError:
            pass
        cats = sorted({k for k in series.map(_category_key) if k is not None})
        if len(cats) > MAX_CATEGORIES:
            excluded[col] = f"{len(cats)} distinct text values: an identifier, not a feature"
            continue
        features.append(col)
        categorical[col] = cats
    values = sorted({k for k in df[target].map(_category_key) if k is not None})
    return ColumnPlan(target=target, rows=int(len(df)), features=features, categorical=categorical,
                      excluded=excluded, target_values=values[: MAX_CATEGORIES + 1])


def task_of(values: list[str]) -> tuple[str, int]:
    """(task, num_classes) a target's distinct values suggest."""
    if len(values) == 2:
        return "binary", 2
    if 2 < len(values) <= 20 and all(_is_int(v) for v in values):
        return "multiclass", len(values)
    return "regression", 1


def _is_int(v: Any) -> bool:
    try:
        return float(v).is_integer()
    except (TypeError, ValueError):
        return False
