"""Secure aggregation in the real round loop (issue 22): production coordinator and site workers.

The sites' plain updates are recorded in the site process (in memory, where the test can see
them) just before they are masked; the coordinator's unmasked mean of each round must equal
their weighted mean within the stated quantisation error, while nothing a site publishes
carries an unmasked update or a per-site training metric.
"""

from __future__ import annotations

import json
import shutil
import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from coordinator.rounds.secure import SecureSync
from protocol.codec import decode_envelope, decode_frame
from protocol.secagg.field import QuantConfig
from protocol.transport.memory import MemoryBus
from protocol.transport.topology import UPDATES
from simulator.run import SimulationFailed, simulate
from site_worker.secagg_handlers import SecAggSite, flat
from tests.conftest import rabbitmqctl, rabbitmqctl_available

HEART_FAILURE = Path(__file__).resolve().parents[2] / "examples" / "heart_failure.json"
TRAINING_METRIC_KEYS = ("train_s", "samples_per_s", "steps", "before_", "after_", "n_val")


def _experiment(n: int, threshold: int, timeout: float = 60.0) -> dict[str, Any]:
    exp = json.loads(HEART_FAILURE.read_text())
    exp["training"]["optimizer"].pop("differential_privacy")  # fast and deterministic; DP is the site's own
    exp["federated"]["parameters"].update(min_fit_clients=n, min_available_clients=n, fraction_eval=0.0)
    exp["federated"]["secure_aggregation"] = {"min_contributors": 2, "threshold": threshold}
    exp["federated"]["round_timeout_s"] = timeout
    return exp


class Recorder:
    """The sites' plain updates (before masking) and the coordinator's unmasked means, per round."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.plain: dict[int, dict[str, tuple[np.ndarray, np.ndarray, int]]] = {}
        self.means: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        masked, unmask = SecAggSite.masked, SecureSync.unmask

        def record_masked(site: SecAggSite, env: Any, global_weights: Any, update: Any, cap: int) -> Any:
            self.plain.setdefault(env.round, {})[site.config.site_id] = (
                flat(global_weights), flat(update.weights), update.num_examples)
            return masked(site, env, global_weights, update, cap)

        def record_unmask(sec: SecureSync, rnd: int, weights: Any, total: Any, held: Any) -> Any:
            out = unmask(sec, rnd, weights, total, held)
            self.means[rnd] = (flat(weights), flat(out.weights))
            return out

        monkeypatch.setattr(SecAggSite, "masked", record_masked)
        monkeypatch.setattr(SecureSync, "unmask", record_unmask)


def _check_rounds(rec: Recorder, exp: dict[str, Any], n: int, rounds: int = 2) -> None:
    sa = exp["federated"]["secure_aggregation"]
    cap = 1000  # the default weight_cap
    quant = QuantConfig(1.0, 65536.0, n)
    assert sorted(rec.means) == list(range(1, rounds + 1))
    for rnd, (glob, mean) in rec.means.items():
        sites = rec.plain[rnd]
        assert len(sites) == n
        w = {s: min(k, cap) / cap for s, (_, _, k) in sites.items()}
        deltas = {s: new - g for s, (g, new, _) in sites.items()}
        assert all(np.array_equal(g, glob) for g, _, _ in sites.values())  # every site trained from the same model
        assert max(np.abs(w[s] * deltas[s]).max() for s in sites) < sa.get("clip", 1.0)  # nothing clipped
        den = sum(w.values())
        expected = sum(w[s] * deltas[s] for s in sites) / den
        e = quant.error_bound(n)  # per coordinate of a sum of n values
        bound = e * (1 + np.abs(expected)) / (den - e)  # the ratio of two sums, each off by at most e
        err = np.abs((mean - glob) - expected)
        assert (err <= bound + 1e-12).all(), (rnd, float(err.max()), float(bound.min()))
        assert err.max() > 0 or e == 0  # quantised for real, not a plain average in disguise


@pytest.mark.parametrize("n", [3, 10])
def test_secure_fedavg_equals_the_plain_weighted_mean_within_the_quantisation_error(monkeypatch, n):
    rec = Recorder(monkeypatch)
    exp = _experiment(n, threshold=n // 2 + 1)
    doc = simulate(exp, sites=n, rounds=2, progress=False)
    assert [r["replies"] for r in doc["rounds"]] == [n, n] and doc["rejected"] == []
    _check_rounds(rec, exp, n)


def _silent_after_upload(monkeypatch: pytest.MonkeyPatch, dropped: set[str]) -> None:
    """These sites upload their masked update, then never answer an unmask request (dropped)."""
    handle = SecAggSite.handle

    def maybe_silent(site: SecAggSite, env: Any) -> Any:
        if site.config.site_id in dropped and env.type == "SecAggUnmask":
            return None
        return handle(site, env)

    monkeypatch.setattr(SecAggSite, "handle", maybe_silent)


def test_a_site_dropped_after_uploading_still_counts(monkeypatch):
    rec = Recorder(monkeypatch)
    _silent_after_upload(monkeypatch, {"site-3"})  # N - U = 1 dropout
    exp = _experiment(3, threshold=2)
    doc = simulate(exp, sites=3, rounds=2, progress=False)
    assert [r["replies"] for r in doc["rounds"]] == [3, 3]
    _check_rounds(rec, exp, 3)  # site-3's update is in both sums


def test_more_than_n_minus_u_dropouts_fail_the_round_and_reveal_no_sum(monkeypatch):
    rec = Recorder(monkeypatch)
    _silent_after_upload(monkeypatch, {"site-2", "site-3"})  # N - U + 1 = 2 dropouts
    with pytest.raises(SimulationFailed) as e:
        simulate(_experiment(3, threshold=2, timeout=4.0), sites=3, rounds=2, progress=False)
    msg = str(e.value)
    assert "round 1: secure aggregation could not unmask" in msg and "more than N - U = 1 sites dropped" in msg, msg
    assert "answered: site-1" in msg
    assert rec.means == {}  # nothing was unmasked
    assert set(rec.plain[1]) == {"site-1", "site-2", "site-3"}  # all three had uploaded


def test_no_frame_a_site_publishes_carries_an_update_or_a_training_metric(monkeypatch):
    frames: list[bytes] = []
    publish = MemoryBus.publish

    def record(bus: MemoryBus, exchange: str, routing_key: str, body: bytes, **kw: Any) -> None:
        if exchange == UPDATES:
            frames.append(bytes(body))
        return publish(bus, exchange, routing_key, body, **kw)

    monkeypatch.setattr(MemoryBus, "publish", record)
    rec = Recorder(monkeypatch)
    exp = _experiment(3, threshold=2, timeout=15.0)
    exp["federated"]["max_round_retries"] = 0
    simulate(exp, sites=3, rounds=2, progress=False)
    kinds: dict[str, int] = {}
    plain = {(rnd, s): new for rnd, sites in rec.plain.items() for s, (_, new, _) in sites.items()}
    for frame in frames:
        env = decode_envelope(decode_frame(frame)[2])
        kinds[env.type] = kinds.get(env.type, 0) + 1
        assert env.type not in ("Update", "StatsResult"), env.type
        p = env.payload
        if env.type == "MaskedUpdate":
            arrays = [a for _, a in p.masked] + [a for _, a in p.shares]
            assert all(a.dtype in (np.uint32, np.uint8) for a in arrays)  # no float on the wire
            new = plain[(env.round, env.sender)]
            assert not np.isin(np.float32(new), arrays[0].view(np.float32)).any()
        if env.type == "EvalResult":  # the site's own release of the global model's metrics: no training figure
            assert not any(k.startswith(TRAINING_METRIC_KEYS) for k in p.metrics), p.metrics
    assert kinds["MaskedUpdate"] == 6 and kinds["SecAggKey"] == 3 and kinds["SecAggAnswer"] >= 4


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize(("n", "rounds"), [(3, 2), (10, 1)])
def test_secure_fedavg_on_rabbitmq_equals_the_in_memory_run(amqp_url, n, rounds):
    # Masks cancel exactly in the field: the same seed and site ids give the same model on both buses
    # (the sites are processes there), and the in-memory run equals the plain weighted mean within
    # the quantisation error (above): 3 and 10 sites, in memory and on RabbitMQ.
    suffix = f"-{uuid.uuid4().hex[:6]}"
    exp = _experiment(n, threshold=n // 2 + 1)
    kwargs: dict[str, Any] = dict(sites=n, rounds=rounds, seed=5, site_suffix=suffix, progress=False)
    mem = simulate(exp, **kwargs)
    # on RabbitMQ each site process logs in as its own least-privilege broker user, as deployed
    amqp = simulate(exp, broker=amqp_url, broker_users=(n == 3), keep_work=(n == 3), **kwargs)
    if n == 3:
        admin = unquote(urlsplit(amqp_url).username or "")
        for site in amqp["sites"]:
            cfg = tomllib.loads((Path(amqp["work_dir"]) / "sites" / site / "site.toml").read_text())
            assert unquote(urlsplit(cfg["broker_url"]).username or "") == site != admin
        if rabbitmqctl_available():
            assert not [s for s in amqp["sites"] if s in rabbitmqctl("list_users", "-q")]  # deleted after
        shutil.rmtree(amqp["work_dir"], ignore_errors=True)
    assert [r["replies"] for r in amqp["rounds"]] == [n] * rounds and amqp["rejected"] == []
    assert [r["secure_aggregation"]["contributors"] for r in amqp["rounds"]] == [n] * rounds
    for key in ("loss", "accuracy"):
        assert amqp["holdout"][key] == pytest.approx(mem["holdout"][key], rel=1e-6, abs=1e-9), key


def test_a_plain_update_in_a_secure_run_is_refused_and_not_stored(monkeypatch):
    """A site (buggy or hostile to its own privacy) that sends its Update in the clear is not aggregated."""
    masked = SecAggSite.masked

    def plain_from_site_3(site: SecAggSite, env: Any, global_weights: Any, update: Any, cap: int) -> Any:
        return update if site.config.site_id == "site-3" else masked(site, env, global_weights, update, cap)

    monkeypatch.setattr(SecAggSite, "masked", plain_from_site_3)
    exp = _experiment(3, threshold=2, timeout=6.0)
    exp["federated"]["parameters"]["min_fit_clients"] = 2
    exp["federated"]["max_round_retries"] = 0
    doc = simulate(exp, sites=3, rounds=1, progress=False)
    assert [r["replies"] for r in doc["rounds"]] == [2]
    refused = [r for r in doc["rejected"] if r["site"] == "site-3"]
    assert refused and all("secure_aggregation" in r["reason"] for r in refused), doc["rejected"]
    assert doc["rounds"][0]["secure_aggregation"]["contributors"] == 2


@pytest.mark.broker
@pytest.mark.slow
def test_a_site_killed_after_uploading_still_counts_on_rabbitmq(amqp_url):
    """kill -9 of a site process right after its masked update left: the round completes with the
    sum of all three (the same model as in memory, where the same site stops after its upload)."""
    suffix = f"-{uuid.uuid4().hex[:6]}"
    exp = _experiment(3, threshold=2, timeout=20.0)
    kwargs: dict[str, Any] = dict(sites=3, rounds=1, seed=5, site_suffix=suffix, progress=False,
                                  faults=f"crash-after-upload:site-3{suffix}@1")
    mem = simulate(exp, **kwargs)
    amqp = simulate(exp, broker=amqp_url, **kwargs)
    for doc in (mem, amqp):
        assert [r["replies"] for r in doc["rounds"]] == [3]
        seen = doc["rounds"][0]["secure_aggregation"]
        assert seen["contributors"] == 3 and f"site-3{suffix}" not in seen["answered"]
        assert [(e["kind"], e["site"]) for e in doc["faults"]["events"]] == [("crash-after-upload", f"site-3{suffix}")]
    for key in ("loss", "accuracy"):
        assert amqp["holdout"][key] == pytest.approx(mem["holdout"][key], rel=1e-6, abs=1e-9), key
