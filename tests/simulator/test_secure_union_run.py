"""Union metrics from secure sums in a real run (issue 22 item 5): four simulated hospitals under
secure aggregation with DP metrics. Each site's final test answer adds its masked union vector
(its share σ·Δ/√K of the noise); the coordinator unmasks only the sum, and the result's union
figures come from it, with the noise once for the union: SD σ·Δ, where pooling the sites' own
releases carries √N·σ·Δ. The run records what each side computed and every frame a site publishes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.rounds.secure as secure_mod
import site_worker.secure_metrics as sm
from coordinator.rounds.secure import SecureSync
from protocol import dp_figures
from protocol.codec import decode_envelope, decode_frame
from protocol.config import load_experiment
from protocol.dp_plan import release_entries, union_release_entries
from protocol.policy import SitePolicy
from protocol.privacy_plan import metrics_entries, union_entries
from protocol.secagg import field as F
from protocol.secagg.union import COUNT_CAP, from_field, pack
from protocol.transport.memory import MemoryBus
from protocol.transport.topology import UPDATES
from simulator.run import simulate
from site_worker.ledger import PrivacyLedger

HEART_DISEASE = Path(__file__).resolve().parents[2] / "examples" / "heart_disease.json"
N, SIGMA, DELTA_SENS = 4, SitePolicy().union_noise_multiplier, math.sqrt(3.0)  # the union release's σ_u; binary: Δ = √3


def _experiment(aggregator: str = "FedAvg") -> dict[str, Any]:
    exp = json.loads(HEART_DISEASE.read_text())
    exp["training"]["rounds"] = 2
    exp["federated"]["parameters"].update(min_fit_clients=N, min_available_clients=N, fraction_eval=0.0)
    if aggregator == "FedBuff":  # a buffer of K = N updates of N distinct sites per version
        exp["federated"]["name"] = "FedBuff"
        exp["federated"]["parameters"]["buffer_size"] = N
    exp["federated"]["secure_aggregation"] = {"min_contributors": N, "threshold": N // 2 + 1}
    exp["federated"]["round_timeout_s"] = 30.0
    return exp


@pytest.fixture(scope="module", params=["FedAvg", "FedBuff"])
def run(request: pytest.FixtureRequest) -> dict[str, Any]:
    rec: dict[str, Any] = {"exact": [], "shares": [], "frames": [], "reserved": [], "figures": [], "results": [],
                           "experiment": _experiment(request.param)}
    statistics, contribution, figures = sm.statistics, sm.union_contribution, secure_mod.union_figures
    union, publish, reserve = SecureSync.union, MemoryBus.publish, PrivacyLedger.reserve

    def rec_statistics(*a: Any, **kw: Any) -> Any:
        out = statistics(*a, **kw)
        rec["exact"].append(np.asarray(out[1], dtype=np.float64).copy())
        return out

    def rec_contribution(*a: Any, **kw: Any) -> Any:
        out = contribution(*a, **kw)
        rec["shares"].append((out[1].copy(), out[2]))
        return out

    def rec_figures(layout: str, summed: np.ndarray, **kw: Any) -> Any:
        out = figures(layout, summed, **kw)
        rec["figures"].append((layout, np.asarray(summed).copy(), kw, out))
        return out

    def rec_union(sec: SecureSync, rnd: int, total: Any, results: Any, held: Any) -> Any:
        rec["results"].append({s: dict(m) for s, m in results.items()})
        return union(sec, rnd, total, results, held)

    def rec_publish(bus: MemoryBus, exchange: str, routing_key: str, body: bytes, **kw: Any) -> Any:
        if exchange == UPDATES:
            rec["frames"].append(bytes(body))
        return publish(bus, exchange, routing_key, body, **kw)

    def rec_reserve(ledger: PrivacyLedger, dataset: str, **kw: Any) -> Any:
        rec["reserved"].append((kw["kind"], list(kw["entries"])))
        return reserve(ledger, dataset, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sm, "statistics", rec_statistics)
        mp.setattr(sm, "union_contribution", rec_contribution)
        mp.setattr(secure_mod, "union_figures", rec_figures)
        mp.setattr(SecureSync, "union", rec_union)
        mp.setattr(MemoryBus, "publish", rec_publish)
        mp.setattr(PrivacyLedger, "reserve", rec_reserve)
        rec["doc"] = simulate(rec["experiment"], sites=N, rounds=2, seed=3, progress=False, site_metrics="dp",
                              reproducible_dp=True)
    return rec


def test_the_union_figures_come_from_the_secure_sum_with_the_noise_once(run):
    doc = run["doc"]
    final = doc["final"]
    assert len(doc["rounds"]) == 2 and doc["rejected"] == [] and doc["declined"] == []
    assert final["union_source"] == "secure_sum" and doc["privacy"]["secure_aggregation"]["union_source"] == "secure_sum"
    assert "only the unmasked sum" in doc["privacy"]["secure_aggregation"]["metrics_saw"]
    assert len(run["shares"]) == N and len(run["figures"]) == 1
    layout, counts, kw, _ = run["figures"][0]
    assert layout == "binary"
    # each site added SD σ_u·Δ/√K, K = N: the sum carries σ_u·Δ once
    assert all(sd == pytest.approx(SIGMA * DELTA_SENS / math.sqrt(N)) for _, sd in run["shares"])
    assert kw["noise_sd"] == pytest.approx(SIGMA * DELTA_SENS) and final["noise_sd"] == pytest.approx(kw["noise_sd"])
    per_site = run["results"][0]
    pooled_sd = math.sqrt(sum(m["noise_sd"] ** 2 for m in per_site.values()))
    # pooling the sites' own releases (σ_m each) carries √N·σ_m·Δ: the sum's noise is at least √N times less
    assert pooled_sd == pytest.approx(math.sqrt(N) * SitePolicy().metrics_noise_multiplier * DELTA_SENS)
    assert kw["noise_sd"] * math.sqrt(N) <= pooled_sd
    # the unmasked sum is the sum of the sites' noisy union vectors, within the field's quantisation
    sa = doc["privacy"]["secure_aggregation"]
    quant = N * COUNT_CAP / (2 * sa["scale"] * sa["clip"])
    assert np.abs(counts - from_field(sum(v for v, _ in run["shares"]))).max() <= quant
    # and it is not the pooled per-site releases (their own, separately noised cells)
    cells = sum(np.asarray([m[c] for c in dp_figures.CELLS]) for m in per_site.values())
    assert np.abs(counts[:4] - cells).max() > quant


def test_the_union_interval_holds_the_exact_union_accuracy_and_is_narrower(run):
    final, exact = run["doc"]["final"], sum(run["exact"])
    counts, sd = run["figures"][0][1], run["figures"][0][2]["noise_sd"]
    assert np.abs(counts - exact).max() <= 6 * sd  # noise of SD σ·Δ on every count, no more
    truth = dp_figures.confusion_figures(exact[:4], 0.0)["accuracy"]
    lo, hi = final["ci"]["accuracy"]
    tn, fp, fn, tp = (float(c) for c in run["figures"][0][1][:4])
    # the majority-class baseline comes from the same sum's class counts, with its interval (the
    # sites' own releases carry √N times the noise)
    assert final["majority_class_accuracy"] == pytest.approx(max(tn + fp, fn + tp) / (tn + fp + fn + tp), abs=0.02)
    if run["experiment"]["federated"]["name"] == "FedAvg":
        # a 95 % interval misses one time in twenty: checked on the sync run, deterministic at its seed
        # (FedBuff's final model, and so its noise, depends on the order the sites' updates arrive in)
        assert lo <= truth <= hi, (lo, truth, hi)
        m_lo, m_hi = final["ci"]["majority_class_accuracy"]
        assert m_lo <= dp_figures.confusion_figures(exact[:4], 0.0)["majority_class_accuracy"] <= m_hi
    width = hi - lo
    pooled = dp_figures.union(list(run["results"][0].values()))
    assert pooled is not None and width < pooled["accuracy_hi"] - pooled["accuracy_lo"]
    site_widths = [m["accuracy_hi"] - m["accuracy_lo"] for m in run["results"][0].values()]
    # the Must-show: at least √N narrower than every site's own release (here 2.3-3.0x at N = 4;
    # the noise alone would give more, the rows' sampling uncertainty in the interval gives less)
    assert width * math.sqrt(N) <= min(site_widths), (width, site_widths)


def test_each_site_charged_its_own_release_and_the_union_release_as_planned(run):
    policy = SitePolicy(metrics="dp")
    exp = load_experiment(run["experiment"])
    final = [entries for kind, entries in run["reserved"] if kind == "eval"]
    assert len(final) == N and len(run["reserved"]) == N  # the masked updates release nothing of their own
    planned = metrics_entries(policy) + union_entries(exp, policy)
    assert len(planned) == 2
    for entries in final:
        assert [tuple(e) for e in entries] == [tuple(e) for e in planned]
        assert [tuple(e) for e in entries] == [tuple(e) for e in release_entries(policy) + union_release_entries(policy)]


def test_no_frame_a_site_publishes_carries_an_unmasked_union_vector(run):
    plain = [v for v, _ in run["shares"]]
    sa = run["doc"]["privacy"]["secure_aggregation"]
    unions = 0
    for frame in run["frames"]:
        env = decode_envelope(decode_frame(frame)[2])
        if env.type != "EvalResult":
            continue
        p = env.payload
        released = np.asarray([v for v in p.metrics.values()], dtype=np.float64)
        for v in plain:  # no noisy union count travels as a number
            assert not np.isin(from_field(v), released).any()
        if p.union_masked:
            unions += 1
            masked = p.union_masked[0][1]
            assert masked.dtype == np.uint32 and all(a.dtype == np.uint8 for _, a in p.union_shares)
            for v in plain:
                q = F.quantise(pack(v, masked.size, sa["clip"]), F.QuantConfig(sa["clip"], sa["scale"], N))
                assert (q != masked.astype(np.int64)).mean() > 0.9  # masked: never the quantised vector
    assert unions == N


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["FedAvg", "FedBuff"])
def test_on_rabbitmq_the_union_figures_come_from_the_secure_sum(amqp_url, aggregator):
    """The same run with the sites as processes on RabbitMQ: the union from the secure sum, its noise
    σ·Δ once, each site's own release beside it, and nothing refused or declined."""
    import uuid

    doc = simulate(_experiment(aggregator), sites=N, rounds=2, seed=3, progress=False, site_metrics="dp", broker=amqp_url,
                   site_suffix=f"-{uuid.uuid4().hex[:6]}")
    final = doc["final"]
    assert final["union_source"] == "secure_sum" and doc["rejected"] == [] and doc["declined"] == []
    assert final["noise_sd"] == pytest.approx(SIGMA * DELTA_SENS)
    lo, hi = final["ci"]["accuracy"]
    widths = [m["ci"]["accuracy"][1] - m["ci"]["accuracy"][0] for m in final["per_site"].values()]
    assert len(widths) == N and (hi - lo) < min(widths)


@pytest.mark.parametrize(("k", "secure"), [(3, True), (4, False)])
def test_the_union_is_unmasked_only_from_at_least_k_vectors(monkeypatch, k, secure):
    """site-4 declines its final test (it cannot mask a union vector): three vectors are a secure sum
    when K = 3 (just inside) and are never unmasked when K = 4 (just outside): the union is then
    pooled from the sites' own releases, and the result says why."""
    from site_worker.secagg import SecAggRefused

    check = sm.check_union

    def site_4_cannot(secagg: Any, env: Any) -> None:
        if secagg is not None and secagg.config.site_id == "site-4":
            raise SecAggRefused("roster_missing", "site-4 lost its secure-aggregation state")
        check(secagg, env)

    unmasked: list[int] = []
    union = SecureSync.union

    def count(sec: SecureSync, rnd: int, total: Any, results: Any, held: Any) -> Any:
        out = union(sec, rnd, total, results, held)
        unmasked.append(int(out[0] is not None))
        return out

    monkeypatch.setattr(sm, "check_union", site_4_cannot)
    monkeypatch.setattr(SecureSync, "union", count)
    exp = _experiment()
    exp["federated"]["secure_aggregation"]["min_contributors"] = k
    doc = simulate(exp, sites=N, rounds=1, seed=3, progress=False, site_metrics="dp")
    final = doc["final"]
    assert sorted(final["per_site"]) == ["site-1", "site-2", "site-3"] and unmasked == [int(secure)]
    if secure:
        assert final["union_source"] == "secure_sum"
        assert final["noise_sd"] == pytest.approx(SIGMA * DELTA_SENS * math.sqrt(3 / k))  # K' = 3 shares of σΔ/√K
    else:
        assert final["union_source"].startswith("per_site_releases (3 union vector(s), fewer than min_contributors 4")
        assert "noise_sd" not in final and "accuracy" in final["ci"]  # pooled from the three releases' cells
    assert [d["site"] for d in doc["declined"]] == ["site-4"]
