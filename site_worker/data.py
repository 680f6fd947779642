"""Local data: read the site's files and turn them into the tensors the experiment expects.

Every site must produce the same features in the same order from differently shaped
local files, so the *experiment* decides the feature list and the category lists; the
site only contributes values and local statistics (median imputation, standardisation
fitted on its own training split). Problems raise ``DataError`` naming the column;
details never contain data values, because they travel back to the coordinator.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import structlog

from protocol.messages import DatasetInfo
from site_worker.config import DatasetSource
from site_worker.readers import Loaded, by_format
from site_worker.splits import Split, SplitKey, assign, row_hashes, unit_values

if TYPE_CHECKING:
    import torch

    from protocol.config import DatasetSpec

log = structlog.get_logger(__name__)
_THOUSANDS = re.compile(r"^\s*[-+]?\d{1,3}(,\d{3})+(\.\d+)?\s*$")


class DataError(ValueError):
    """The local data cannot serve this task; ``column`` names what is wrong.

    The message travels to the coordinator in ``Declined(data)``, so it holds public
    parameters only (column names, the experiment's settings); counts and values from
    the rows go in ``private``, which the site writes to its own log and never sends.
    """

    def __init__(self, column: str, message: str, *, private: dict[str, Any] | None = None) -> None:
        super().__init__(f"column {column!r}: {message}")
        self.column = column
        self.message = message
        self.private = dict(private or {})


@dataclass(frozen=True)
class PreparedData:
    """Train/validation/test tensors. The test split is the site's fixed one (``splits``):
    never trained on, the same rows for every task and experiment on this file."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    features: tuple[str, ...]
    task: str  # "binary" | "multiclass" | "regression"
    num_classes: int
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    rows: int = 0  # usable rows of the dataset (train + validation + test)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of "train", "validation" or "test"; raises DataError when test is empty."""
        if name == "train":
            return self.x_train, self.y_train
        if name == "validation":
            return self.x_val, self.y_val
        if name == "test":
            return fixed_test_split(self)
        raise DataError("split", f"{name!r} is not train, validation or test")


def fixed_test_split(data: PreparedData) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's fixed test split of ``data`` (rows never trained on), for evaluation and
    personalisation reports. Raises ``DataError`` when the site holds no test rows."""
    if data.x_test is None or data.y_test is None or len(data.x_test) == 0:
        raise DataError("split", "this site holds no test rows for the dataset (policy.test_fraction is 0 "
                                 "or the dataset is too small)")
    return data.x_test, data.y_test


# --------------------------------------------------------------------------- reading

_CACHE_SIZE = 16
_cache: dict[tuple[str, float, int], pd.DataFrame] = {}
_cache_lock = threading.Lock()


def read_table(source: DatasetSource) -> pd.DataFrame:
    """Read a CSV or Parquet file (cached by path and mtime: rounds re-use the frame)."""
    return _read_table_keyed(source)[1]


def _read_table_keyed(source: DatasetSource) -> tuple[tuple[str, float, int], pd.DataFrame]:
    """The frame and the file version it was read from (path, mtime, size)."""
    p = Path(source.path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(source.target, f"dataset file {p.name} is missing") from None
    key = (str(p), st.st_mtime, st.st_size)
    with _cache_lock:
        df = _cache.get(key)
    if df is None:
        try:
            if source.format == "parquet":
                df = pd.read_parquet(p)
            else:
                df = pd.read_csv(p, sep=source.csv_separator, low_memory=False)
        except Exception as e:  # noqa: BLE001 - any reader failure is a data problem, said clearly
            raise DataError(source.target, f"cannot read {p.name} as {source.format}: {type(e).__name__}") from None
        df.columns = [str(c).strip() for c in df.columns]
        with _cache_lock:
            # Bounded: a daemon serves a few datasets; the in-process simulator a few sites.
            while len(_cache) >= _CACHE_SIZE:
                _cache.pop(next(iter(_cache)))
            _cache[key] = df
    return key, df


def to_numeric(series: pd.Series, column: str) -> pd.Series:
    """Parse a numeric column, accepting thousands separators ("265,000")."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype(float)
    if pd.api.types.is_numeric_dtype(series):
        return series.astype(float)
    s = series.astype("string")
    s = s.where(~s.str.match(_THOUSANDS).fillna(False), s.str.replace(",", "", regex=False))
    out = pd.to_numeric(s.str.strip(), errors="coerce")
    bad = int((out.isna() & series.notna() & (s.str.strip() != "")).sum())
    if bad:
        raise DataError(column, "expected numbers but the column holds text; "
                                "declare it categorical in the experiment or fix the file",
                        private={"not_numeric": bad})
    return out.astype(float)


def announced_rows(source: DatasetSource) -> int:
    """The row count SiteHello announces for ``source`` (public; cheap: the cached frame or a
    memory-mapped header), from the reader of its format (``site_worker.readers``)."""
    return by_format(source.format).rows(source)


def catalogue(source: DatasetSource) -> DatasetInfo:
    """Metadata for SiteHello: names, row count, column types, target. Never values."""
    return by_format(source.format).catalogue(source)


def table_rows(source: DatasetSource) -> int:
    """Rows of a tabular file (the cached frame)."""
    return int(len(read_table(source)))


def table_catalogue(source: DatasetSource) -> DatasetInfo:
    """A tabular file's catalogue entry: each column numeric or categorical (as declared, else as parsed)."""
    df = read_table(source)
    types: dict[str, str] = {}
    for col in df.columns:
        if col == source.target:
            continue
        declared = source.columns.get(col)
        if declared:
            types[col] = declared
            continue
        try:
            to_numeric(df[col], col)
            types[col] = "numeric"
        except DataError:
            types[col] = "categorical"
    return DatasetInfo(name=source.name, rows=table_rows(source), columns=tuple(df.columns),
                       feature_types=types, target=source.target)


# ------------------------------------------------------------------------ preparing

def prepare(source: DatasetSource, spec: DatasetSpec, *, input_shape: tuple[int, ...] | None,
            key: SplitKey | None = None, seed: int | None = None) -> PreparedData:
    """Build train/validation/test tensors for an experiment's ``dataset`` block.

    ``key`` is the site's split secret (``SplitKey.load_or_create``); offline callers
    without one pass ``seed`` and get a public, seed-derived split instead. ``spec`` is
    ``Experiment.dataset`` (target, task, num_classes, features, categorical, exclude,
    validation_fraction, kind). ``input_shape`` is the model's input shape without the
    batch axis; the features must fill it exactly.
    """
    if key is None:
        if seed is None:
            raise ValueError("prepare needs the site's split key (or a seed for an offline, public split)")
        key = SplitKey.from_seed(seed)
    task = getattr(spec, "task", "binary") or "binary"
    num_classes = int(getattr(spec, "num_classes", 2) or 2)
    val_frac = float(getattr(spec, "validation_fraction", 0.2))
    loaded = by_format(source.format).load(source, spec, key=key, task=task, num_classes=num_classes,
                                           input_shape=input_shape, validation_fraction=val_frac)
    y, split, features = loaded.y, loaded.split, loaded.features
    x_tr, x_va, x_te = loaded.x_train, loaded.x_val, loaded.x_test
    import torch  # here, not at import: loading site.toml and checking the broker come first

    y_dtype = torch.long if task == "multiclass" else torch.float32
    y_t = torch.as_tensor(y, dtype=y_dtype)
    if task != "multiclass":
        y_t = y_t.reshape(-1, 1)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    return PreparedData(
        x_train=tensor(x_tr), y_train=y_t[torch.as_tensor(split.train)],
        x_val=tensor(x_va), y_val=y_t[torch.as_tensor(split.validation)],
        features=features, task=task, num_classes=num_classes,
        x_test=tensor(x_te), y_test=y_t[torch.as_tensor(split.test)], rows=int(len(y)),
    )


def load_table(source: DatasetSource, spec: DatasetSpec, *, key: SplitKey, task: str, num_classes: int,
               input_shape: tuple[int, ...] | None, validation_fraction: float) -> Loaded:
    """A tabular file's rows for a task: parsed, split by the site's key, features encoded with
    statistics of the training rows only (``tabular_features``)."""
    target = source.target
    asked = getattr(spec, "target", None)
    if asked is not None and asked != target:
        raise DataError("target", f"the experiment's dataset.target is {asked!r} but this site's dataset "
                                  f"{source.name!r} has target {target!r}; make them agree (or leave "
                                  "dataset.target out of the experiment)")
    table = _parsed_table(source, spec, task=task, num_classes=num_classes)
    y = table.y
    split = split_rows(key, source.name, _table_hashes(table), validation_fraction)
    n_va = len(split.validation)
    x_tr, x_rest, features = tabular_features(table, source, spec, target, split.train,
                                              np.concatenate([split.validation, split.test]))
    x_va, x_te = x_rest[:n_va], x_rest[n_va:]
    if input_shape is not None and int(np.prod(input_shape)) != x_tr.shape[1]:
        raise DataError("features", f"the dataset yields {x_tr.shape[1]} features, the model expects "
                                    f"{int(np.prod(input_shape))}; list dataset.features/categorical in the experiment")
    if input_shape is not None and len(input_shape) > 1:
        x_tr = x_tr.reshape((len(x_tr), *input_shape))
        x_va = x_va.reshape((len(x_va), *input_shape))
        x_te = x_te.reshape((len(x_te), *input_shape))
    return Loaded(y=y, x_train=x_tr, x_val=x_va, x_test=x_te, split=split, features=features)


def split_rows(key: SplitKey, dataset: str, hashes: np.ndarray, validation_fraction: float) -> Split:
    usable = int(hashes.shape[0])
    if usable < 2:  # the count goes to the site's log only (private), never into the reason
        raise DataError("rows", "fewer than 2 usable rows", private={"usable_rows": usable})
    u = unit_values(key, dataset, hashes)
    split = assign(u, test_fraction=key.test_fraction, validation_fraction=validation_fraction)
    if len(split.train) == 0:
        raise DataError("rows", "the usable rows leave none to train on after the test and validation splits",
                        private={"usable_rows": len(hashes)})
    return split


def _table_hashes(table: "_Table") -> np.ndarray:
    """Row-content hashes of the table's rows (cached with the table: one pass per file version)."""
    if table.hashes is None:
        table.hashes = row_hashes(table.df)
    return table.hashes


def target_rule(spec: DatasetSpec) -> Any:
    """The experiment's rule turning a numeric target into 0/1 (``dataset.positive_if``, e.g. ``">0"``)."""
    return getattr(spec, "positive_if", None)


_TRANSFORM = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([-+]?\d+(\.\d+)?)\s*$")


def _apply_transform(values: pd.Series, transform: Any, column: str) -> pd.Series:
    """Apply a declarative threshold like ``"> 0"`` or ``{"op": ">", "value": 0}`` (never code)."""
    if isinstance(transform, dict):
        op, value = transform.get("op"), transform.get("value")
        text = f"{op} {value}"
    else:
        text = str(transform)
    m = _TRANSFORM.match(text)
    if not m:
        raise DataError(column, f"dataset.positive_if {text!r} is not '<op> <number>' with op in > >= < <= == !=")
    op, v = m.group(1), float(m.group(2))
    nums = to_numeric(values, column)
    res = {">": nums > v, ">=": nums >= v, "<": nums < v, "<=": nums <= v, "==": nums == v, "!=": nums != v}[op]
    return res.astype(float).where(nums.notna())


def encode_labels(series: pd.Series, column: str, task: str, num_classes: int, transform: Any) -> np.ndarray:
    if transform is not None:
        series = _apply_transform(series, transform, column)
    if task == "regression":
        return to_numeric(series, column).to_numpy(dtype=np.float64)
    if series.dtype == bool:
        series = series.astype(float)
    nums = to_numeric(series, column) if not pd.api.types.is_numeric_dtype(series) else series.astype(float)
    arr = nums.to_numpy(dtype=np.float64)
    present = arr[~np.isnan(arr)]
    top = 1 if task == "binary" else num_classes - 1
    if present.size and (np.any(present != np.round(present)) or present.min() < 0 or present.max() > top):
        raise DataError(column, f"{task} target must hold class indices 0..{top}; "
                                "set dataset.positive_if in the experiment (e.g. '> 0') or fix the file")
    return arr


def _category_key(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    return str(v).strip()


@dataclass
class _Table:
    """A file's usable rows parsed for one experiment ``dataset`` block: labels now, feature
    columns on first use. Everything here is fixed by (file, spec); the per-task split,
    imputation and standardisation are fitted on the training rows in ``tabular_features``."""

    df: pd.DataFrame  # rows with a usable label
    y: np.ndarray
    columns: list[tuple[str, np.ndarray, tuple[str, ...]]] | None = None  # ("cat"|"num", values, names)
    hashes: np.ndarray | None = None  # row-content hashes for the site's keyed split


_tables: dict[tuple[Any, ...], _Table] = {}


def _spec_key(spec: DatasetSpec, task: str, num_classes: int) -> str:
    fields = {k: getattr(spec, k, None) for k in ("features", "categorical", "exclude", "positive_if", "missing_values")}
    return json.dumps([task, num_classes, fields], sort_keys=True, default=str)


def _parsed_table(source: DatasetSource, spec: DatasetSpec, *, task: str, num_classes: int) -> _Table:
    """Labels (and later the feature columns) of ``source`` for ``spec``, parsed once per file
    version: a daemon gets the same (file, experiment) every round with only the seed changing."""
    version, df = _read_table_keyed(source)
    key = (*version, source.target, tuple(sorted(source.columns.items())),
           _spec_key(spec, task, num_classes))
    with _cache_lock:
        table = _tables.get(key)
    if table is not None:
        return table
    target = source.target
    if target not in df.columns:
        raise DataError(target, "target column is missing from the dataset")
    y_all = encode_labels(df[target], target, task, num_classes, target_rule(spec))
    keep = ~np.isnan(y_all)
    table = _Table(df=df.loc[keep].reset_index(drop=True), y=y_all[keep])
    with _cache_lock:
        while len(_tables) >= _CACHE_SIZE:
            _tables.pop(next(iter(_tables)))
        _tables[key] = table
    return table


def _feature_columns(table: _Table, source: DatasetSource, spec: DatasetSpec,
                     target: str) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    """One-hot blocks and raw numeric values of the experiment's features (split-independent)."""
    if table.columns is not None:
        return table.columns
    df = table.df
    categorical: dict[str, list[Any]] = dict(getattr(spec, "categorical", None) or {})
    exclude = set(getattr(spec, "exclude", None) or ())
    missing: dict[str, list[float]] = dict(getattr(spec, "missing_values", None) or {})
    wanted = getattr(spec, "features", None)
    if wanted is None:
        wanted = [c for c in df.columns if c != target and c not in exclude]
    columns: list[tuple[str, np.ndarray, tuple[str, ...]]] = []
    for col in wanted:
        if col not in df.columns:
            raise DataError(col, "feature column is missing from the dataset")
        series = df[col]
        if col in categorical:
            cats = [_category_key(c) for c in categorical[col]]
            keys = series.map(_category_key)
            unknown = sorted({k for k in keys if k is not None and k not in cats})
            if unknown:
                # Encoded as all zeros ("not listed") and said in the site's log only. Refusing would
                # answer, uncharged, whether any patient holds a value outside a list the coordinator
                # chose (a membership and value oracle: issue 20, class 2); `site check` shows it.
                log.warning("categories_not_listed", column=col, values=len(unknown),
                            rows=int(keys.isin(unknown).sum()))
            block = np.stack([(keys == c).to_numpy(dtype=np.float32) for c in cats], axis=1) if cats else \
                np.zeros((len(df), 0), np.float32)
            block.flags.writeable = False  # shared by every task on this file
            columns.append(("cat", block, tuple(f"{col}={c}" for c in cats)))
            continue
        if source.columns.get(col) == "categorical":
            raise DataError(col, "the site declares it categorical but the experiment uses it as numeric; "
                                 "add it to dataset.categorical in the experiment")
        if by_format(source.format).kind == "tabular" and col in read_table(source).columns:
            # Decided on the whole file, as the SiteHello's feature_types announces the column:
            # the refusal repeats a public bit and says nothing about the rows this task uses.
            to_numeric(read_table(source)[col], col)
        vals = to_numeric(series, col).to_numpy(dtype=np.float64)
        if col in missing:  # the dataset's own "not measured" codes read as empty cells
            vals = np.where(np.isin(vals, missing[col]), np.nan, vals)
        vals.flags.writeable = False
        columns.append(("num", vals, (col,)))
    table.columns = columns  # a benign race: two threads would compute the same list
    return columns


def tabular_features(table: _Table | pd.DataFrame, source: DatasetSource, spec: DatasetSpec, target: str,
                      train_idx: np.ndarray, val_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Feature matrix for this task's split: median imputation and standardisation fitted on
    the training rows only, or the experiment's fixed ``scaling`` (its centre imputes a missing
    value). A bare DataFrame (the simulator's held-out test) is parsed uncached."""
    if isinstance(table, pd.DataFrame):
        table = _Table(df=table, y=np.empty(0))
    fixed: dict[str, tuple[float, float]] = dict(getattr(spec, "scaling", None) or {})
    blocks: list[np.ndarray] = []
    names: list[str] = []
    n = len(table.df)
    for kind, values, cols in _feature_columns(table, source, spec, target):
        names.extend(cols)
        if kind == "cat":
            blocks.append(values)
            continue
        if cols[0] in fixed:
            center, scale = fixed[cols[0]]
            vals = (np.where(np.isnan(values), center, values) - center) / scale
            blocks.append(vals.astype(np.float32)[:, None])
            continue
        train = values[train_idx]
        med = np.nanmedian(train) if np.any(~np.isnan(train)) else 0.0
        vals = np.where(np.isnan(values), med, values)
        mean, std = vals[train_idx].mean(), vals[train_idx].std()
        vals = (vals - mean) / (std if std > 1e-12 else 1.0)
        blocks.append(vals.astype(np.float32)[:, None])
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), np.float32)
    return x[train_idx], x[val_idx], tuple(names)
