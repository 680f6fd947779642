"""A malicious coordinator against FedBuff under secure aggregation, in the real async loop (issue 22).

The production coordinator is turned hostile at one point each (a buffer closed at one update,
a second request that differs from an answered one by one hospital, a roster carrying its own
X25519 key for a site) and real site workers answer. Each attack must fail with every site
naming the rule it refused by, and no hostile sum may ever be unmasked.
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.rounds.secure import SecureSync
from coordinator.rounds.secure_buffer import SecureBufferRounds
from coordinator.secagg import CoordinatorSecAgg, MaskedSum
from protocol.secagg.keys import AgreementKey
from protocol.signing import Signer
from simulator.run import SimulationFailed, simulate
from tests.simulator.test_secure_fedbuff import _experiment

SITES = ["site-1", "site-2", "site-3"]


def _unmasked(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, int]]]:
    """The contributor sets the coordinator managed to unmask."""
    done: list[list[tuple[str, int]]] = []
    unmask = SecureSync.unmask

    def record(sec: SecureSync, rnd: int, weights: Any, total: Any, held: Any, **kw: Any) -> Any:
        out = unmask(sec, rnd, weights, total, held, **kw)
        done.append(sorted(total.contributors))
        return out

    monkeypatch.setattr(SecureSync, "unmask", record)
    return done


def _failed(exp: dict[str, Any], rounds: int) -> tuple[str, dict[str, Any]]:
    with pytest.raises(SimulationFailed) as e:
        simulate(exp, sites=3, rounds=rounds, progress=False)
    assert e.value.document is not None, str(e.value)
    return str(e.value), e.value.document


def _refusals(doc: dict[str, Any], rule: str) -> set[str]:
    """Sites whose decline names ``rule`` (the site's own words: reason secure_aggregation, detail rule: ...)."""
    return {d["site"] for d in doc["declined"] if d["reason"].startswith(f"secure_aggregation: {rule}:")}


def test_a_fedbuff_buffer_of_one_is_refused_by_every_site(monkeypatch):
    done = _unmasked(monkeypatch)
    # hostile: close the buffer at one update (min_contributors - 1 = 1 site)
    monkeypatch.setattr(SecureBufferRounds, "_full", lambda self: len(self._contributors()) >= 1)
    exp = _experiment(3, buffer_size=2, min_contributors=2, threshold=2, timeout=10.0)
    reason, doc = _failed(exp, rounds=2)
    assert "could not unmask the sum of 1 update(s)" in reason and "min_contributors" in reason, reason
    assert _refusals(doc, "min_contributors") == set(SITES), doc["declined"]
    assert done == []  # nothing unmasked


def test_two_fedbuff_requests_differing_by_one_hospital_are_refused(monkeypatch):
    """After the sum of A, B, C is unmasked, a request for A and B alone (their sum is known to be the
    first minus C) is refused by every site: each update is in at most one request."""
    done = _unmasked(monkeypatch)
    request = CoordinatorSecAgg.request
    first: list[tuple[str, int]] = []

    def hostile(self: CoordinatorSecAgg, masked: MaskedSum) -> Any:
        if first:  # the second buffer: ask again for the first buffer's updates but one hospital
            dropped = first[-1][0]
            masked = MaskedSum(masked.total, [c for c in first if c[0] != dropped])
        req, signed = request(self, masked)
        first[:] = first or list(req.contributors)
        return req, signed

    monkeypatch.setattr(CoordinatorSecAgg, "request", hostile)
    # hostile too: it closes a buffer only once all three hospitals are in it (a fast site may send
    # twice first), so the first minus one hospital still holds min_contributors sites and the
    # only rule left to refuse it is the reuse of updates
    monkeypatch.setattr(SecureBufferRounds, "_full", lambda self: len(self._distinct()) >= 3)
    exp = _experiment(3, buffer_size=3, min_contributors=2, threshold=2, timeout=10.0)
    reason, doc = _failed(exp, rounds=2)
    assert len(done) == 1 and len({s for s, _ in done[0]}) == 3, done  # the honest first buffer only
    assert "update_reused" in reason, reason
    assert _refusals(doc, "update_reused") == set(SITES), doc["declined"]


def test_a_forged_roster_in_a_fedbuff_run_is_refused_by_every_site(monkeypatch):
    """The coordinator puts its own X25519 key in the roster for site-2 (to open the shares sent to
    it): the binding is not signed by site-2's identity key, so every site refuses the roster."""
    done = _unmasked(monkeypatch)
    build = CoordinatorSecAgg.build.__func__  # type: ignore[attr-defined]

    def forged(cls: type, signer: Signer, run_id: str, bindings: list, **kw: Any) -> CoordinatorSecAgg:
        mitm = AgreementKey().bind(signer, "site-2", run_id)  # signed by the coordinator, not by site-2
        return build(cls, signer, run_id, [mitm if b.site_id == "site-2" else b for b in bindings], **kw)

    monkeypatch.setattr(CoordinatorSecAgg, "build", classmethod(forged))
    exp = _experiment(3, buffer_size=2, min_contributors=2, threshold=2, timeout=3.0)
    exp["federated"]["max_round_retries"] = 0
    reason, doc = _failed(exp, rounds=1)
    assert _refusals(doc, "roster_signature") == set(SITES), doc["declined"]
    assert done == [] and "buffer holds 0 masked update(s)" in reason, reason
