"""Central DP against the people who know the experiment: its noise is secret and sized right.

* The effective noise multiplier (noise std over one site's largest possible influence)
  is the configured z even when one site claims 10^6 examples and the others 1 (with
  example-weighted FedAvg inside it was 0.33).
* The noise cannot be rebuilt from the experiment (its seed is public to every site);
  only the secret in the coordinator's state directory reproduces it, so --resume is exact.
* ε is Opacus' RDP accountant over the rounds run (computed here independently).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from coordinator.aggregators import Contribution, build_aggregator
from coordinator.aggregators.central_dp import CentralDP
from coordinator.checkpoints import load_tensors
from coordinator.state import StateStore
from tests.adversarial.malicious_site import Federation, experiment, initial_weights


def _agg(secret: bytes, z: float = 1.0, clip: float = 1.0, d: int = 200_000):
    ref = (("w", np.zeros(d, dtype=np.float32)),)
    agg = build_aggregator("FedAvg", parameters={}, initial=ref, seed=3,
                           central_dp={"clip_norm": clip, "noise_multiplier": z, "secret": secret})
    agg.expected_clients = 3
    return agg, ref


def _round(agg, ref, deltas: list[np.ndarray], counts: list[int]) -> np.ndarray:
    agg.begin_round(1, ref)
    for i, (d, n) in enumerate(zip(deltas, counts)):
        agg.add(Contribution(f"site-{i}", (("w", (ref[0][1] + d).astype(np.float32)),), n))
    return dict(agg.finish_round())["w"].astype(np.float64)


def test_effective_noise_multiplier_is_z_whatever_the_counts():
    z, clip, d = 1.0, 1.0, 200_000
    counts = [10**6, 1, 1]
    zero = [np.zeros(d)] * 3
    secret = uuid.uuid4().bytes * 2
    agg, ref = _agg(secret, z, clip, d)
    noise_only = _round(agg, ref, zero, counts)
    # The site with 10^6 examples moves as far as clipping lets it (‖Δ‖ = C); same secret and
    # round -> same noise, so the difference is exactly that site's influence on the model.
    push = np.full(d, clip / np.sqrt(d))
    agg2, _ = _agg(secret, z, clip, d)
    pushed = _round(agg2, ref, [push, zero[1], zero[2]], counts)
    sensitivity = float(np.linalg.norm(pushed - noise_only))
    assert sensitivity == pytest.approx(clip / 3, rel=1e-4)  # C / qN, not C·10^6/(10^6+2)
    effective_z = float(np.std(noise_only)) / sensitivity
    assert effective_z == pytest.approx(z, rel=0.02)  # was 0.33 with example-weighted FedAvg


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.broker)])
def bus_url(request):
    return f"memory://cdp-{uuid.uuid4().hex[:8]}" if request.param == "memory" else request.getfixturevalue("amqp_url")


# The toy model's hidden width in the central runs. The statistical checks on round 1's noise (its
# std, its correlation with the old seed-derived noise) need enough coordinates: with the toy
# experiment's 11 parameters a correct run failed them ~3 times in 10,000 (|r| > 0.9 with 9
# degrees of freedom: p = 1.6e-4; sample std < 0.3: p = 1.6e-4); 3-64-1 has 321.
HIDDEN = 64


def _widen(exp: dict, hidden: int) -> None:
    """The toy 3-2-1 MLP of ``experiment()`` with ``hidden`` units instead of 2."""
    layers = exp["architecture"]["layers"]
    assert [layer["type"] for layer in layers] == ["input", "Linear", "ReLU", "Linear", "output"]
    layers[1]["params"]["out_features"] = hidden
    layers[3]["params"]["in_features"] = hidden


def _central_run(bus_url: str, state_dir, z: float = 1.0):
    fed = Federation(bus_url, state_dir)
    try:
        fed.add_site(0.01, 10)
        fed.add_site(0.03, 30)
        fed.start_sites()
        exp = experiment(rounds=2, parameters={"min_fit_clients": 2, "min_available_clients": 2},
                         central_dp={"clip_norm": 1.0, "noise_multiplier": z})
        _widen(exp, HIDDEN)
        result = fed.coordinator(exp).run()
        assert result.ok, result.reason
        return fed, exp, result
    finally:
        fed.close()


def test_central_noise_is_secret_reproducible_by_its_holder_only_and_epsilon_is_rdp(bus_url, tmp_path):
    from opacus.accountants import RDPAccountant

    fed, exp, result = _central_run(bus_url, tmp_path / "a")
    store = StateStore(fed.state_dir)
    secret_file = fed.state_dir / "secrets" / "central_dp.key"
    secret = secret_file.read_bytes()
    assert len(secret) == 32 and (secret_file.stat().st_mode & 0o777) == 0o600
    assert secret.hex() not in str(exp) and secret.hex() not in str(store.run(result.run_id)["experiment"])

    # Round 1's noise, recovered from its checkpoint: equal weights, so the clean mean delta is
    # (0.01 + 0.03) / 2 = 0.02 on every element; the noise on the sum is (model − init − 0.02) · qN.
    init = initial_weights(exp)
    r1 = store.rounds(result.run_id)[0]
    ck = load_tensors(store.dir / r1["checkpoint_path"], sha256=r1["checkpoint_sha256"])
    noise = [(np.asarray(w, np.float64) - np.asarray(i, np.float64) - 0.02) * 2 for (_, w), (_, i) in zip(ck, init)]
    flat = np.concatenate([n.ravel() for n in noise])
    assert 0.3 < np.std(flat) < 3  # zC = 1: really noised

    # Everyone knows the experiment's seed; the old construction from it predicts nothing.
    rng = np.random.default_rng([int(exp["training"]["seed"]), 1, 0xD9])
    guess = np.concatenate([rng.normal(0.0, 1.0, size=n.shape).ravel() for n in noise])
    assert not np.allclose(flat, guess, atol=0.1)
    assert abs(np.corrcoef(flat, guess)[0, 1]) < 0.9
    # The secret's holder (a resumed coordinator) reproduces it exactly.
    holder = CentralDP(build_aggregator("FedAvg", parameters={}, initial=init), clip_norm=1.0, noise_multiplier=1.0,
                       secret=secret, context=result.run_id).rng(1)
    rebuilt = np.concatenate([holder.normal(0.0, 1.0, size=n.shape).ravel() for n in noise])
    np.testing.assert_allclose(flat, rebuilt, atol=2e-5)

    # ε: two rounds, every available site sampled (q = 1), z = 1, δ = 1e-5; Opacus' RDP accountant.
    acc = RDPAccountant()
    acc.history = [(1.0, 1.0, 2)]
    central = result.to_json()["privacy"]["central"]
    assert central["accountant"] == "rdp" and central["delta"] == 1e-5 and central["sample_rates"] == [1.0, 1.0]
    assert central["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert store.run(result.run_id)["result"]["privacy"]["central"]["epsilon"] == central["epsilon"]


def test_same_experiment_same_seed_different_coordinators_give_different_noise(tmp_path):
    url = f"memory://cdp-{uuid.uuid4().hex[:8]}"
    _, _, a = _central_run(url, tmp_path / "a")
    _, _, b = _central_run(f"memory://cdp-{uuid.uuid4().hex[:8]}", tmp_path / "b")
    wa = np.concatenate([np.ravel(w) for _, w in a.weights])
    wb = np.concatenate([np.ravel(w) for _, w in b.weights])
    assert not np.allclose(wa, wb, atol=1e-3)


def test_central_epsilon_is_in_the_report_and_the_terminal_table(tmp_path):
    import io

    from rich.console import Console

    from simulator.report import write_report
    from simulator.table import print_results

    doc = {"run_id": "r", "aggregator": "FedAvg+central_dp", "sites": ["a"], "rounds": [], "final": {}, "epsilon": {},
           "privacy": {"central": {"epsilon": 4.25, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.1,
                                   "clip_norm": 1.0, "rounds": 3}}}
    paths = write_report(doc, tmp_path)
    page = next(p for p in paths.values() if str(p).endswith(".html")).read_text()
    assert "central DP</b>: ε = 4.25 at δ = 1e-05 (rdp accountant" in page
    out = io.StringIO()
    print_results(doc, console=Console(file=out, width=200))
    assert "central DP: ε = 4.250 at δ = 1e-05 (rdp accountant, z = 1.1, 3 rounds)" in out.getvalue()


def test_a_sampled_run_with_a_silent_site_divides_by_the_qn_fixed_before_the_round_and_samples_in_secret(tmp_path):
    """Central DP in a real run with fraction_fit < 1 and a sampled site that never answers.

    Four sites, fraction_fit 0.75: configure_fit samples three *from the coordinator's secret*
    (here planted in its state directory, so the test knows it) and fixes qN = 3 before any
    reply. One of the three is silent: the round closes at its deadline with two updates, and
    the noised sum is still divided by 3 (the realised 2 would give the silent site's absence
    away and break the C/qN sensitivity). The public seed's sample is a different three."""
    import hashlib
    import hmac

    from coordinator.aggregators.central_dp import SECRET_BYTES
    from coordinator.sampling import sample_sites
    from protocol.messages import TrainTask

    fed = Federation(f"memory://cdp-{uuid.uuid4().hex[:8]}", tmp_path / "state")
    try:
        for i in range(4):
            fed.add_site(0.01 * (i + 1), 10)
        ids = sorted(s.site_id for s in fed.sites)
        run_id = f"cdp-sampled-{uuid.uuid4().hex[:6]}"
        exp = experiment(rounds=1, parameters={"min_fit_clients": 2, "min_available_clients": 2, "fraction_fit": 0.75},
                         central_dp={"clip_norm": 1.0, "noise_multiplier": 1.0})
        exp["federated"]["round_timeout_s"] = 3.0
        public = sample_sites(ids, 3, seed=int(exp["training"]["seed"]), round=1)
        init = initial_weights(exp)
        for b in range(1, 256):  # a secret whose sample is not the public seed's (a test choice, fixed)
            secret = bytes([b]) * SECRET_BYTES
            # the documented derivation, by hand: HMAC-SHA256(secret, purpose ‖ run id) seeds the sample
            key = hmac.new(secret, f"fedbus-central-dp-sampling:{run_id}".encode(), hashlib.sha256).digest()
            chosen = sample_sites(ids, 3, seed=int.from_bytes(key[:4], "little") & 0x7FFFFFFF, round=1)
            if chosen != public:
                break
        holder = CentralDP(build_aggregator("FedAvg", parameters={}, initial=init), clip_norm=1.0,
                           noise_multiplier=1.0, secret=secret, context=run_id)
        (fed.state_dir / "secrets").mkdir(parents=True)
        (fed.state_dir / "secrets" / "central_dp.key").write_bytes(secret)
        by_id = {s.site_id: s for s in fed.sites}
        silent = by_id[chosen[0]]
        silent.silent = True
        fed.start_sites()
        result = fed.coordinator(exp, run_id=run_id).run()
        assert result.ok, result.reason

        trained = sorted(s.site_id for s in fed.sites if any(isinstance(t.payload, TrainTask) for t in s.tasks))
        assert trained == chosen != public
        answered = [by_id[sid] for sid in chosen if sid != silent.site_id]
        # By hand: the two clipped deltas (each ‖Δ‖ < C: unclipped) summed, the secret's noise
        # (zC = 1) added, divided by qN = 3; the noise is rebuilt by the secret's holder.
        rng = holder.rng(1)
        for (name, w), (_, r) in zip(result.weights, init):
            r64 = np.asarray(r, np.float64)
            s = sum((np.asarray(r) + np.float32(site.offset)).astype(np.float32).astype(np.float64) - r64
                    for site in answered)
            want = r64 + (s + rng.normal(0.0, 1.0, size=r64.shape)) / 3
            np.testing.assert_allclose(np.asarray(w, np.float64), want, atol=1e-5, err_msg=name)
        central = result.to_json()["privacy"]["central"]
        assert central["sample_rates"] == [0.75]  # q = sampled / available, fixed before the round
        store = StateStore(fed.state_dir)
        assert sorted(store.rounds(result.run_id)[0]["sampled"]) == chosen
    finally:
        fed.close()
