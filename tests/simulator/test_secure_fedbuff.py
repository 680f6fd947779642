"""FedBuff under secure aggregation in the real async loop (issue 22): buffers of masked updates.

The sites' plain updates are recorded in the site process (in memory), keyed by the tag each
masked update carries; the coordinator's unmasked mean of each buffer must equal the weighted
mean of exactly the updates that buffer's unmask request named, within the stated quantisation
error; no update may be in two buffers, and a buffer closes only with updates of
``min_contributors`` distinct sites, however many updates a fast site has sent.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.rounds.secure import SecureSync
from protocol.secagg.field import QuantConfig
from simulator.run import simulate
from site_worker.secagg_handlers import SecAggSite, flat

HEART_FAILURE = Path(__file__).resolve().parents[2] / "examples" / "heart_failure.json"
CAP = 1000  # the default weight_cap


def _experiment(n: int, *, buffer_size: int, min_contributors: int, threshold: int,
                timeout: float = 60.0) -> dict[str, Any]:
    exp = json.loads(HEART_FAILURE.read_text())
    exp["training"]["optimizer"].pop("differential_privacy")  # fast and deterministic; DP is the site's own
    exp["federated"]["name"] = "FedBuff"
    exp["federated"]["parameters"].update(min_fit_clients=n, min_available_clients=n, fraction_eval=0.0,
                                          buffer_size=buffer_size)
    exp["federated"]["secure_aggregation"] = {"min_contributors": min_contributors, "threshold": threshold}
    exp["federated"]["round_timeout_s"] = timeout
    return exp


class Recorder:
    """Each site's plain update by (site, tag) before masking; each buffer's unmasking."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.plain: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, int]] = {}
        self.buffers: list[tuple[list[tuple[str, int]], np.ndarray, np.ndarray]] = []
        masked, unmask = SecAggSite.masked, SecureSync.unmask

        def record_masked(site: SecAggSite, env: Any, global_weights: Any, update: Any, cap: int) -> Any:
            out = masked(site, env, global_weights, update, cap)
            if type(out).__name__ == "MaskedUpdate":
                self.plain[(site.config.site_id, out.tag)] = (flat(global_weights), flat(update.weights),
                                                              update.num_examples)
            return out

        def record_unmask(sec: SecureSync, rnd: int, weights: Any, total: Any, held: Any, **kw: Any) -> Any:
            out = unmask(sec, rnd, weights, total, held, **kw)
            self.buffers.append((sorted(total.contributors), flat(weights), flat(out.weights)))
            return out

        monkeypatch.setattr(SecAggSite, "masked", record_masked)
        monkeypatch.setattr(SecureSync, "unmask", record_unmask)


def _check_buffers(rec: Recorder, *, n: int, buffer_size: int, min_contributors: int) -> None:
    quant = QuantConfig(1.0, 65536.0, n)
    seen: set[tuple[str, int]] = set()
    for contributors, glob, mean in rec.buffers:
        assert len(contributors) >= buffer_size and len({s for s, _ in contributors}) >= min_contributors
        assert not seen & set(contributors), "an update was unmasked in two buffers"
        seen |= set(contributors)
        ups = [rec.plain[c] for c in contributors]
        w = [min(k, CAP) / CAP for _, _, k in ups]
        den = sum(w)
        expected = sum(wi * (new - base) for wi, (base, new, _) in zip(w, ups)) / den
        e = quant.error_bound(len(contributors))
        bound = e * (1 + np.abs(expected)) / (den - e)
        err = np.abs((mean - glob) - expected)
        assert (err <= bound + 1e-12).all(), (contributors, float(err.max()), float(bound.min()))
        assert err.max() > 0  # quantised for real, not a plain mean in disguise


def test_secure_fedbuff_unmasks_each_buffer_to_its_weighted_mean_and_waits_for_distinct_sites(monkeypatch):
    """site-3 is a straggler: sites 1 and 2 upload again and again, but a buffer of 3 updates from
    2 hospitals does not close (min_contributors=3 distinct sites); every update is in one buffer."""
    rec = Recorder(monkeypatch)
    exp = _experiment(3, buffer_size=3, min_contributors=3, threshold=2, timeout=20.0)
    doc = simulate(exp, sites=3, rounds=2, progress=False, faults="straggler:site-3:1.0")
    assert len(doc["rounds"]) == 2 and doc["rejected"] == []
    assert len(rec.buffers) == 2
    _check_buffers(rec, n=3, buffer_size=3, min_contributors=3)
    # the rule was exercised: a buffer held more updates than buffer_size while it waited for site-3
    assert max(len(c) for c, _, _ in rec.buffers) > 3, [c for c, _, _ in rec.buffers]
    for row, (contributors, _, _) in zip(doc["rounds"], rec.buffers):
        seen = row["secure_aggregation"]
        assert seen["buffer"] == [f"{s}#{t}" for s, t in contributors] and len(seen["answered"]) >= 2


def test_secure_fedbuff_with_a_site_silent_after_uploading_still_unmasks(monkeypatch):
    """N - U = 1: site-3 uploads but never answers an unmask request; every buffer still unmasks."""
    rec = Recorder(monkeypatch)
    handle = SecAggSite.handle
    monkeypatch.setattr(SecAggSite, "handle", lambda site, env: None if (
        site.config.site_id == "site-3" and env.type == "SecAggUnmask") else handle(site, env))
    exp = _experiment(3, buffer_size=2, min_contributors=2, threshold=2)
    doc = simulate(exp, sites=3, rounds=3, progress=False)
    assert len(doc["rounds"]) == 3 and doc["rejected"] == []
    _check_buffers(rec, n=3, buffer_size=2, min_contributors=2)
    seen = doc["privacy"]["secure_aggregation"]  # the result says the run used it and what was seen
    assert seen["used"] is True and seen["sums_unmasked"] == 3 and seen["fewest_contributors"] >= 2
    assert "sum of each buffer" in seen["coordinator_saw"]
    assert any(s == "site-3" for c, _, _ in rec.buffers for s, _ in c)  # its updates counted
    assert all("site-3" not in r["secure_aggregation"]["answered"] for r in doc["rounds"])


def test_a_plain_update_in_a_secure_fedbuff_run_is_refused_and_not_stored(monkeypatch):
    """site-3 sends its updates in the clear: each is refused (secure_aggregation), none is buffered,
    and the buffers close on the two masking sites alone."""
    rec = Recorder(monkeypatch)
    masked = SecAggSite.masked

    def plain_from_site_3(site: SecAggSite, env: Any, global_weights: Any, update: Any, cap: int) -> Any:
        return update if site.config.site_id == "site-3" else masked(site, env, global_weights, update, cap)

    monkeypatch.setattr(SecAggSite, "masked", plain_from_site_3)
    exp = _experiment(3, buffer_size=2, min_contributors=2, threshold=2, timeout=20.0)
    doc = simulate(exp, sites=3, rounds=2, progress=False)
    assert len(doc["rounds"]) == 2
    refused = [r for r in doc["rejected"] if r["site"] == "site-3"]
    assert refused and all("secure_aggregation" in r["reason"] for r in refused), doc["rejected"]
    assert all(s != "site-3" for c, _, _ in rec.buffers for s, _ in c), rec.buffers


@pytest.mark.broker
@pytest.mark.slow
def test_secure_fedbuff_on_rabbitmq_unmasks_exactly_each_buffers_weights(monkeypatch, amqp_url):
    """One site process per site on RabbitMQ: each version's unmasked weight sum is the sum of the
    masked weights of exactly the updates its buffer named (each site's rows, from the same split
    run in memory, where the test can read them), and no update is in two buffers."""
    suffix = f"-{uuid.uuid4().hex[:6]}"
    exp = _experiment(3, buffer_size=2, min_contributors=2, threshold=2)
    kwargs: dict[str, Any] = dict(sites=3, rounds=3, seed=5, site_suffix=suffix, progress=False)
    rec = Recorder(monkeypatch)
    simulate(exp, **kwargs)  # the same seed and site ids split the same rows
    weight = {s: min(k, CAP) / CAP for (s, _), (_, _, k) in rec.plain.items()}
    doc = simulate(exp, broker=amqp_url, **kwargs)
    assert len(doc["rounds"]) == 3 and doc["rejected"] == [], doc["rejected"]
    seen: set[str] = set()
    quant = QuantConfig(1.0, 65536.0, 3)
    for r in doc["rounds"]:
        sa = r["secure_aggregation"]
        buf = sa["buffer"]
        sites = [b.rsplit("#", 1)[0] for b in buf]
        assert len(buf) >= 2 and len(set(sites)) >= 2 and not seen & set(buf)
        seen |= set(buf)
        assert sa["contributors"] == len(buf) and len(sa["answered"]) >= 2
        assert abs(sa["weight_sum"] - sum(weight[s] for s in sites)) <= quant.error_bound(len(buf))
    assert np.isfinite(doc["holdout"]["loss"])
