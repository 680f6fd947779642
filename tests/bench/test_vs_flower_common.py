"""The vs-Flower benchmark's shared job and figures: preprocessing, FedAvg, metrics, JSON shape.

No Flower, fedbus or broker run here: those are what bench/vs_flower.py measures.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import _vs_flower_common as common  # noqa: E402

SPEC = common.JobSpec(rounds=2, local_epochs=1)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return common.load_frame()


@pytest.fixture(scope="module")
def sites(frame) -> dict[str, common.SiteData]:
    return {h: common.load_site(h, spec=SPEC, frame=frame) for h in common.HOSPITALS}


def _rows(**columns) -> pd.DataFrame:
    base = {f: [np.nan] * len(next(iter(columns.values()))) for f in common.FEATURES}
    base.update(columns)
    return pd.DataFrame(base)


def test_one_hot_follows_the_fixed_category_order_and_missing_is_all_zero():
    df = _rows(sex=["Male", "Female", np.nan], fbs=[True, False, np.nan], cp=["typical angina", "x", "asymptomatic"])
    stats = common.local_stats(df)
    x = common.encode(df, medians=stats[0], means=stats[1], stds=stats[2])
    assert x.shape == (3, common.N_FEATURES) == (3, 25)
    offset = 1  # age first
    sex = x[:, offset:offset + 2]
    assert sex.tolist() == [[0, 1], [1, 0], [0, 0]]  # ("Female", "Male")
    cp = x[:, offset + 2:offset + 6]
    assert cp.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]  # unknown "x" -> zeros
    fbs_start = offset + 2 + 4 + 2  # + trestbps, chol
    assert x[:, fbs_start:fbs_start + 2].tolist() == [[0, 1], [1, 0], [0, 0]]  # booleans read as "True"/"False"


def test_numeric_imputed_with_local_train_median_then_standardised_with_local_stats():
    train = _rows(sex=["Male"] * 4, age=[40.0, 50.0, np.nan, 70.0], chol=[np.nan] * 4)
    med, mean, std = common.local_stats(train)
    assert med["age"] == 50.0
    assert mean["age"] == pytest.approx(np.mean([40, 50, 50, 70]))
    assert med["chol"] == 0.0 and std["chol"] == 1.0  # all missing at this hospital: zeros, not NaN
    x = common.encode(train, medians=med, means=mean, stds=std)
    assert not np.isnan(x).any()
    assert x[:, 0].mean() == pytest.approx(0.0, abs=1e-6)
    assert x[:, 0].std() == pytest.approx(1.0, abs=1e-5)
    test = _rows(sex=["Male"], age=[np.nan])
    assert common.encode(test, medians=med, means=mean, stds=std)[0, 0] == pytest.approx((50 - mean["age"]) / std["age"])


def test_hospital_splits_are_stratified_disjoint_and_reproducible(frame, sites):
    for hospital in common.HOSPITALS:
        train, test = common.split_hospital(frame, hospital, spec=SPEC)
        assert set(train["id"]).isdisjoint(test["id"])
        assert len(train) + len(test) == int((frame["dataset"] == hospital).sum())
        rate = (frame.loc[frame["dataset"] == hospital, "num"] > 0).mean()
        assert abs((test["num"] > 0).mean() - rate) < 0.05
        again, _ = common.split_hospital(frame, hospital, spec=SPEC)
        assert again["id"].tolist() == train["id"].tolist()
    x, y = common.union_test(sites)
    assert x.shape == (sum(len(s.y_test) for s in sites.values()), 25)
    assert set(np.unique(y)) == {0.0, 1.0}


def test_unknown_hospital_is_named(frame):
    with pytest.raises(ValueError, match="Atlantis"):
        common.split_hospital(frame, "Atlantis", spec=SPEC)


def test_features_and_categories_match_the_fedbus_experiment():
    raw = json.loads((REPO / "examples" / "heart_disease.json").read_text())
    assert tuple(raw["dataset"]["features"]) == common.FEATURES
    assert {k: tuple(v) for k, v in raw["dataset"]["categorical"].items()} == common.CATEGORIES
    assert raw["training"]["optimizer"]["learning_rate"] == SPEC.learning_rate
    assert raw["training"]["batch_size"] == SPEC.batch_size
    assert raw["dataset"]["validation_fraction"] == SPEC.validation_fraction


def test_fit_indices_hold_out_a_stratified_share_redrawn_per_seed():
    y = np.array([0] * 30 + [1] * 20, dtype=np.float32)
    a = common.fit_indices(y, fraction=0.2, seed=1)
    assert len(a) == 40
    assert y[a].sum() == 16  # 20 % of each class held out
    assert np.array_equal(a, common.fit_indices(y, fraction=0.2, seed=1))
    assert not np.array_equal(a, common.fit_indices(y, fraction=0.2, seed=2))
    assert len(common.fit_indices(y, fraction=0.0, seed=1)) == 50


def test_fedavg_weights_by_examples_and_rejects_empty_input():
    a = [np.array([0.0, 0.0], np.float32), np.array([1.0], np.float32)]
    b = [np.array([4.0, 8.0], np.float32), np.array([5.0], np.float32)]
    avg = common.fedavg([(a, 3), (b, 1)])
    assert avg[0].tolist() == [1.0, 2.0] and avg[1].tolist() == [2.0]
    assert avg[0].dtype == np.float32
    with pytest.raises(ValueError, match="at least one"):
        common.fedavg([])
    with pytest.raises(ValueError, match="0 examples"):
        common.fedavg([(a, 0)])


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; restore the setting for other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_local_training_is_seeded_and_moves_the_weights(sites, one_thread):
    w0 = common.initial_weights(spec=SPEC)
    assert [w.shape for w in w0] == [(64, 25), (64,), (32, 64), (32,), (1, 32), (1,)]
    site = sites["Switzerland"]
    w1, n, train_s = common.train_local(w0, site, spec=SPEC, round_=1)
    w1b, _, _ = common.train_local(w0, site, spec=SPEC, round_=1)
    w2, _, _ = common.train_local(w0, site, spec=SPEC, round_=2)
    assert n == len(site.y_train) - round(len(site.y_train) * SPEC.validation_fraction)
    assert train_s > 0
    assert all(np.array_equal(p, q) for p, q in zip(w1, w1b))
    assert not all(np.array_equal(p, q) for p, q in zip(w1, w0))
    assert not all(np.array_equal(p, q) for p, q in zip(w1, w2))


def test_evaluate_reports_accuracy_and_auc():
    spec = common.JobSpec()
    model = common.build_model(spec=spec, n_features=2)
    weights = [np.zeros_like(w) for w in common.get_weights(model)]
    weights[-2][0, 0] = 1.0  # output = h2[0]; make h2[0] = relu(h1[0]) = relu(x0)
    weights[2][0, 0] = 1.0
    weights[0][0, 0] = 1.0
    weights[-1][0] = -0.5
    x = np.array([[0.0, 0], [1.0, 0], [2.0, 0], [0.2, 0]], np.float32)
    y = np.array([0, 1, 1, 1], np.float32)
    m = common.evaluate(weights, x, y, spec=spec)
    assert m["accuracy"] == pytest.approx(0.75)  # logits -0.5, 0.5, 1.5, -0.3
    assert m["auc"] == pytest.approx(1.0)


def _fake(wall, rounds, train, acc, rss=100.0, wire=None):
    return common.RunRecord(wall_s=wall, round_s=rounds, slowest_train_s=train, accuracy=acc, auc=0.9,
                            peak_rss_mb=rss, wire_bytes=wire)


def test_summary_takes_medians_over_rounds_then_repeats():
    runs = [_fake(10.0, [1.0, 2.0, 3.0], [0.5, 0.5, 0.5], 0.80, wire=300),
            _fake(30.0, [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], 0.82, wire=600),
            _fake(20.0, [4.0, 4.0, 4.0], [3.9, 3.9, 3.8], 0.81, wire=900)]
    s = common.summarize(runs)
    assert s["wall_s"] == 20.0
    assert s["round_s"] == 2.0  # medians per run: 2, 2, 4
    assert s["overhead_s"] == pytest.approx(1.0)  # per run (median over rounds): 1.5, 1.0, 0.1
    assert s["wire_bytes_per_round"] == 200.0
    assert s["repeats"] == 3 and len(s["runs"]) == 3


def test_report_has_the_documented_shape_ratios_and_verdicts():
    fedbus = common.summarize([_fake(5.0, [0.3] * 3, [0.28] * 3, 0.805, rss=120, wire=3000)])
    flower = common.summarize([_fake(100.0, [6.0] * 3, [0.3] * 3, 0.80, rss=400, wire=6000)])
    doc = common.report({"fedbus": fedbus, "flower": flower, "flower_simulation": None, "floor": fedbus})
    for system in ("fedbus", "flower", "floor"):
        assert set(common.SYSTEM_KEYS) <= set(doc[system])
    assert doc["flower_simulation"] is None
    assert doc["ratio_wall"] == pytest.approx(0.05)
    assert doc["ratio_peak_rss"] == pytest.approx(0.3)
    assert doc["ratio_wire"] == pytest.approx(0.5)
    assert doc["targets"]["met"] == {"wall": True, "overhead": True, "accuracy": True}
    json.dumps(doc)  # serialisable as printed by --json
    slow = common.summarize([_fake(50.0, [3.0] * 3, [0.3] * 3, 0.75)])
    missed = common.report({"fedbus": slow, "flower": flower})["targets"]["met"]
    assert missed == {"wall": False, "overhead": False, "accuracy": False}
    assert common.report({"flower": flower})["targets"]["met"]["wall"] is None


def test_run_config_round_trips_through_the_flower_app_config(monkeypatch):
    spec = common.JobSpec(rounds=7, seed=3)
    assert common.JobSpec(**common.spec_overrides(common.spec_run_config(spec))) == spec
    monkeypatch.setenv("VSFLOWER_RUN_CONFIG", json.dumps({"num-server-rounds": 4, "out-dir": "/x"}))
    merged = common.app_run_config({"num-server-rounds": 9, "out-dir": ""})
    assert merged == {"num-server-rounds": 9, "out-dir": "/x"}


def test_flower_app_is_written_with_components_and_the_job_module(tmp_path):
    import vs_flower

    app = vs_flower.write_flower_app(tmp_path / "app")
    cfg = tomllib.loads((app / "pyproject.toml").read_text())
    components = cfg["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "vsflower_app.server_app:app", "clientapp": "vsflower_app.client_app:app"}
    assert (app / "vsflower_app" / "common.py").read_text() == (REPO / "bench" / "_vs_flower_common.py").read_text()
    assert set(cfg["tool"]["flwr"]["app"]["config"]) >= set(common.RUN_CONFIG_KEYS) | {"out-dir"}


def test_counting_proxy_relays_and_counts_both_directions():
    import _vs_flower_procs as procs

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo_twice() -> None:
        conn, _ = server.accept()
        with conn:
            data = conn.recv(1024)
            conn.sendall(data * 2)

    t = threading.Thread(target=echo_twice, daemon=True)
    t.start()
    proxy = procs.CountingProxy(port, classify=lambda _p: "site").start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.sendall(b"hello")
            got = b""
            while len(got) < 10:
                chunk = c.recv(1024)
                if not chunk:
                    break
                got += chunk
        assert got == b"hellohello"
        t.join(timeout=5)
        procs.wait_until(lambda: proxy.total() == 15, timeout_s=5, what="proxy counts", interval_s=0.01)
        assert proxy.counts == {"site.up": 5, "site.down": 10}
        assert proxy.total("hub") == 0
    finally:
        proxy.close()
        server.close()


def test_fedbus_overhead_is_split_between_site_side_and_hub_side(tmp_path):
    import _vs_flower_fedbus as fedbus_side

    def line(event: str, rnd: int, at: str, kind: str = "TrainTask") -> str:
        return json.dumps({"event": event, "type": kind, "round": rnd, "timestamp": f"2026-01-01T00:00:{at}Z"})

    (tmp_path / "a.log").write_text("\n".join([
        "not json", line("task_received", 1, "00.000"), line("reply_sent", 1, "01.000"),
        line("task_received", 2, "02.000"), line("reply_sent", 2, "02.500"),
        line("task_received", 3, "03.000", kind="EvalTask"), line("reply_sent", 3, "09.000", kind="EvalTask"),
    ]))
    (tmp_path / "b.log").write_text("\n".join([
        line("task_received", 1, "00.100"), line("reply_sent", 1, "01.600"),
    ]))
    tasks = fedbus_side.site_task_times(tmp_path, ["a", "b"])
    assert tasks == pytest.approx({1: 1.5, 2: 0.5})  # slowest site per round; eval tasks ignored
    split = fedbus_side.overhead_split([2.0, 0.7], [1.2, 0.4], tasks)
    assert split["overhead_site_side_s"] == pytest.approx(np.median([0.3, 0.1]))
    assert split["overhead_hub_side_s"] == pytest.approx(np.median([0.5, 0.2]))


def test_fedbus_experiment_keeps_the_example_and_sets_the_job():
    import _vs_flower_fedbus as fedbus_side

    assert fedbus_side.check_alignment() == []
    raw = fedbus_side.experiment(common.JobSpec(rounds=3))
    assert raw["training"]["rounds"] == 3 and raw["training"]["epochs"] == 5
    assert raw["training"]["optimizer"]["differential_privacy"] == {"enabled": False}
    params = raw["federated"]["parameters"]
    assert params["min_fit_clients"] == params["min_available_clients"] == 4
    assert params["fraction_eval"] == 0.0
