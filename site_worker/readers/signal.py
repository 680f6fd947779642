"""``dataset.kind = "signal"``: an ``.npy`` pair (inputs with a sample axis first, labels apart),
memory-mapped and never unpickled; the model's input marker gives ``[channels, length]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protocol.config import DatasetSpec
from protocol.messages import DatasetInfo
from site_worker.config import DatasetSource
from site_worker.data import DataError, encode_labels, split_rows, target_rule
from site_worker.readers import Loaded
from site_worker.splits import SplitKey, array_row_hashes


def read_signals(source: DatasetSource) -> tuple[np.ndarray, np.ndarray]:
    """Load an ``.npy`` X/y pair (memory-mapped, never pickled)."""
    try:
        x = np.load(source.path, mmap_mode="r", allow_pickle=False)
        y = np.load(source.labels_path, allow_pickle=False)  # type: ignore[arg-type]  # required for npy
    except (OSError, ValueError) as e:
        raise DataError("signal", f"cannot read the .npy pair: {type(e).__name__}") from None
    if x.ndim < 2:
        raise DataError("signal", f"X must have a sample axis and at least one more, got {x.ndim} dimension(s)")
    if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise DataError(source.target, "labels must be a 1-D array")
    if len(x) != len(y):
        raise DataError(source.target, "the signal and label files hold different numbers of rows",
                        private={"signals": len(x), "labels": len(y)})
    return x, y.reshape(-1)


class SignalReader:
    kind = "signal"
    formats = ("npy",)
    suffixes = {".npy": "npy"}
    labels_file = True

    def rows(self, source: DatasetSource) -> int:
        return int(np.load(source.path, mmap_mode="r", allow_pickle=False).shape[0])

    def catalogue(self, source: DatasetSource) -> DatasetInfo:
        return DatasetInfo(name=source.name, rows=self.rows(source), columns=("signal", source.target),
                           feature_types={"signal": "signal"}, target=source.target)

    def load(self, source: DatasetSource, spec: DatasetSpec, *, key: SplitKey, task: str, num_classes: int,
             input_shape: tuple[int, ...] | None, validation_fraction: float) -> Loaded:
        x, y_raw = read_signals(source)
        y = encode_labels(pd.Series(y_raw), source.target, task, num_classes, target_rule(spec))
        x = np.asarray(x, dtype=np.float32)
        if input_shape is not None:
            want = int(np.prod(input_shape))
            have = int(np.prod(x.shape[1:]))
            if want != have:
                raise DataError("signal", f"signals have shape {list(x.shape[1:])}, the model expects {list(input_shape)}")
            x = x.reshape((len(x), *input_shape))
        keep = ~np.isnan(y)
        x, y = x[keep], y[keep]
        split = split_rows(key, source.name, array_row_hashes(x, y), validation_fraction)
        return Loaded(y=y, x_train=x[split.train], x_val=x[split.validation], x_test=x[split.test], split=split,
                      features=("signal",))

    def holdout(self, train: DatasetSource, test: DatasetSource, spec: DatasetSpec, *, task: str, num_classes: int,
                rule: Any, input_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y_raw = read_signals(test)
        y = encode_labels(pd.Series(y_raw), test.target, task, num_classes, rule)
        _, y_tr_raw = read_signals(train)
        y_train = encode_labels(pd.Series(y_tr_raw), train.target, task, num_classes, rule)
        x = np.asarray(x, dtype=np.float32)
        if input_shape is not None:
            x = x.reshape((len(x), *input_shape))
        return x, y, y_train

    def site_toml(self, path: Path) -> dict[str, str]:
        """``path`` is the ``_X.npy`` file; its labels are the ``_y.npy`` beside it."""
        return {"format": "npy", "labels_path": str(path.with_name(path.name[: -len("_X.npy")] + "_y.npy"))}


READER = SignalReader()
