"""The site's fixed splits: secret, persisted, disjoint, stable when the file grows."""

from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd

from protocol.config import load_experiment
from site_worker.config import DatasetSource
from site_worker.data import fixed_test_split, prepare
from site_worker.splits import SECRET_FILE, SplitKey

from tests.site_worker.support import HEART_FAILURE, heart_failure_csv


def _row_keys(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.round(x, 4)}


def test_split_key_is_drawn_once_persisted_private_and_survives_restarts(tmp_path):
    a = SplitKey.load_or_create(tmp_path, test_fraction=0.2)
    b = SplitKey.load_or_create(tmp_path, test_fraction=0.2)  # a restarted daemon
    assert a.secret == b.secret and len(a.secret) == 32 and not a.public
    assert stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode) == 0o600
    other = SplitKey.load_or_create(tmp_path / "other", test_fraction=0.2)
    assert other.secret != a.secret


def test_test_split_is_fixed_disjoint_and_independent_of_seed_and_validation_fraction(tmp_path):
    src = DatasetSource(name="hf", path=heart_failure_csv(tmp_path / "hf.csv"), target="DEATH_EVENT")
    exp = load_experiment(HEART_FAILURE)
    key = SplitKey.load_or_create(tmp_path / "state", test_fraction=0.2)
    d = prepare(src, exp.dataset, key=key, input_shape=(12,))
    raw = pd.read_csv(src.path)
    # Identify rows by their raw "time" + "age" + "platelets" values: test rows never appear in train.
    idx = {}
    for name, (x, _y) in {"train": (d.x_train, d.y_train), "val": (d.x_val, d.y_val),
                          "test": fixed_test_split(d)}.items():
        idx[name] = _row_keys(x.numpy())
    assert not idx["test"] & idx["train"] and not idx["test"] & idx["val"] and not idx["train"] & idx["val"]
    spec_other = exp.dataset.model_copy(update={"validation_fraction": 0.4})
    e = prepare(src, spec_other, key=key, input_shape=(12,))
    assert len(e.x_val) > len(d.x_val) and len(e.x_test) == len(d.x_test)
    assert np.array_equal(e.y_test.numpy(), d.y_test.numpy())
    assert len(raw) == d.rows


def test_appending_rows_keeps_every_existing_row_in_its_split(tmp_path):
    path = heart_failure_csv(tmp_path / "hf.csv", rows=200)
    src = DatasetSource(name="hf", path=path, target="DEATH_EVENT")
    exp = load_experiment(HEART_FAILURE)
    key = SplitKey.load_or_create(tmp_path / "state", test_fraction=0.2)
    small = prepare(src, exp.dataset, key=key, input_shape=(12,))
    full = pd.read_csv(heart_failure_csv(tmp_path / "all.csv"))
    full.iloc[::-1].to_csv(path, index=False)  # appended *and* reordered
    big = prepare(src, exp.dataset, key=key, input_shape=(12,))
    assert big.rows == 299
    # Standardisation changes with the training rows, so compare raw labels by position of
    # the test rows' content: the keyed hash of each row decides, not its position.
    from site_worker.splits import row_hashes, unit_values

    u_small = unit_values(key, "hf", row_hashes(pd.read_csv(tmp_path / "all.csv").iloc[:200]))
    u_big = unit_values(key, "hf", row_hashes(full.iloc[:200]))
    assert np.array_equal(u_small, u_big)
    assert len(big.x_test) >= len(small.x_test)
    other_key = SplitKey.load_or_create(tmp_path / "elsewhere", test_fraction=0.2)
    assert not np.array_equal(unit_values(other_key, "hf", row_hashes(full.iloc[:200])), u_big)
