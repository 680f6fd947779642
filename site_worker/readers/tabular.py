"""``dataset.kind = "tabular"``: a CSV or Parquet file, one row per patient; the experiment picks
the features and their encoding (``site_worker.data``: parsing, imputation and scaling fitted on
the site's training rows only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protocol.config import DatasetSpec
from protocol.messages import DatasetInfo
from site_worker import data
from site_worker.config import DatasetSource
from site_worker.readers import Loaded
from site_worker.splits import SplitKey


class TabularReader:
    kind = "tabular"
    formats = ("csv", "parquet")
    suffixes = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}
    labels_file = False

    def rows(self, source: DatasetSource) -> int:
        return data.table_rows(source)

    def catalogue(self, source: DatasetSource) -> DatasetInfo:
        return data.table_catalogue(source)

    def load(self, source: DatasetSource, spec: DatasetSpec, *, key: SplitKey, task: str, num_classes: int,
             input_shape: tuple[int, ...] | None, validation_fraction: float) -> Loaded:
        return data.load_table(source, spec, key=key, task=task, num_classes=num_classes, input_shape=input_shape,
                               validation_fraction=validation_fraction)

    def holdout(self, train: DatasetSource, test: DatasetSource, spec: DatasetSpec, *, task: str, num_classes: int,
                rule: Any, input_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        df_tr = data.read_table(train).copy()
        df_te = pd.read_csv(test.path, low_memory=False) if test.format == "csv" else pd.read_parquet(test.path)
        both = pd.concat([df_tr, df_te], ignore_index=True)
        y_all = data.encode_labels(both[train.target], train.target, task, num_classes, rule)
        keep = ~np.isnan(y_all)
        is_test = np.zeros(len(both), dtype=bool)
        is_test[len(df_tr):] = True
        both, y_all, is_test = both.loc[keep].reset_index(drop=True), y_all[keep], is_test[keep]
        tr_idx, te_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        _, x, _ = data.tabular_features(both, train, spec, train.target, tr_idx, te_idx)
        if input_shape is not None and len(input_shape) > 1:
            x = x.reshape((len(x), *input_shape))
        return x, y_all[te_idx], y_all[tr_idx]

    def site_toml(self, path: Path) -> dict[str, str]:
        return {}  # the format follows from the suffix


READER = TabularReader()
