"""Partitions: sizes, measurable label skew, exact natural splits, held-out test rows kept apart."""

import numpy as np
import pytest

from simulator.partitions import PartitionError, label_skew, make_partition, parse_spec, site_slug


def _labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < 0.4).astype(np.int64)


def _all_rows(p) -> np.ndarray:
    return np.concatenate([np.concatenate([p.train[s], p.test[s]]) for s in p.sites])


def test_iid_covers_every_row_once_with_equal_sizes():
    y = _labels()
    p = make_partition(y, "iid", sites=4, seed=1)
    rows = _all_rows(p)
    assert sorted(rows.tolist()) == list(range(len(y)))
    sizes = [len(p.train[s]) + len(p.test[s]) for s in p.sites]
    assert max(sizes) - min(sizes) <= 1
    assert p.sites == ("site-1", "site-2", "site-3", "site-4")


def test_test_split_is_disjoint_stratified_and_about_the_fraction():
    y = _labels()
    p = make_partition(y, "iid", sites=2, seed=3, test_fraction=0.25)
    for s in p.sites:
        assert not set(p.train[s]) & set(p.test[s])
        frac = len(p.test[s]) / (len(p.train[s]) + len(p.test[s]))
        assert 0.22 < frac < 0.28
        assert set(np.unique(y[p.test[s]])) == {0, 1}


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = np.repeat([0, 1, 2], 400)
    strong = label_skew(make_partition(y, "dirichlet:0.1", sites=5, seed=2), y)
    weak = label_skew(make_partition(y, "dirichlet:100", sites=5, seed=2), y)
    iid = label_skew(make_partition(y, "iid", sites=5, seed=2), y)
    assert strong > 0.3
    assert weak < 0.1 and iid < 0.1
    assert strong > 3 * weak


def test_quantity_gives_the_requested_sizes():
    y = _labels(2000)
    p = make_partition(y, "quantity:500,800,600", seed=0)
    assert [len(p.train[s]) + len(p.test[s]) for s in p.sites] == [500, 800, 600]
    assert len(set(_all_rows(p).tolist())) == 1900


def test_natural_split_is_exact_per_value():
    groups = np.array(["Cleveland"] * 30 + ["VA Long Beach"] * 20 + ["Hungary"] * 25)
    y = np.tile([0, 1], 75)[:75]
    p = make_partition(y, "natural:dataset", groups=groups, seed=0)
    assert p.sites == ("cleveland", "hungary", "va-long-beach")
    assert p.groups == {"cleveland": "Cleveland", "hungary": "Hungary", "va-long-beach": "VA Long Beach"}
    for s, value in p.groups.items():
        rows = np.concatenate([p.train[s], p.test[s]])
        assert sorted(rows.tolist()) == np.flatnonzero(groups == value).tolist()


def test_same_seed_same_partition_other_seed_differs():
    y = _labels()
    a, b = make_partition(y, "dirichlet:0.5", sites=3, seed=9), make_partition(y, "dirichlet:0.5", sites=3, seed=9)
    c = make_partition(y, "dirichlet:0.5", sites=3, seed=10)
    assert all(np.array_equal(a.train[s], b.train[s]) for s in a.sites)
    assert any(not np.array_equal(a.train[s], c.train[s]) for s in a.sites)


@pytest.mark.parametrize(
    "spec, kwargs, words",
    [
        ("dirichlet:x", {}, "ALPHA must be a number"),
        ("dirichlet:0", {}, "ALPHA must be > 0"),
        ("quantity:5,a", {}, "integers"),
        ("random", {}, "use iid"),
        ("quantity:100,100", {"sites": 3}, "gives 2 sites"),
        ("iid", {"sites": 200}, "need at least"),
        ("quantity:900,900", {}, "asks for 1800 rows"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(spec, kwargs, words):
    with pytest.raises(PartitionError, match=words):
        make_partition(_labels(1000), spec, **kwargs)


def test_natural_refuses_a_mismatching_site_count():
    groups = np.array(["a"] * 20 + ["b"] * 20)
    with pytest.raises(PartitionError, match="drop --sites or set it to 2"):
        make_partition(np.zeros(40, dtype=int), "natural:g", groups=groups, sites=3)


def test_parse_and_slug():
    assert str(parse_spec("dirichlet:0.5")) == "dirichlet:0.5"
    assert str(parse_spec("natural:dataset")) == "natural:dataset"
    assert site_slug("VA Long Beach") == "va-long-beach"
