"""The site's secure-aggregation handlers over real envelopes: each refusal is a Declined whose
reason is ``secure_aggregation`` and whose detail starts with the rule (site_worker/secagg.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.secagg import CoordinatorSecAgg
from protocol.codec import new_envelope
from protocol.messages import Declined, SecAggAnswer, SecAggJoin, SecAggKey, SecAggRoster, SecAggUnmask
from protocol.secagg.keys import KeyBinding
from protocol.secagg.statements import UnmaskRequest, sign
from protocol.signing import Signer
from site_worker.config import SiteConfig
from site_worker.secagg_handlers import SecAggSite

RUN = "run-h"


def _site(tmp: Path, name: str, signer: Signer, coord: Signer, peers: Path | None) -> SecAggSite:
    cfg = SiteConfig(site_id=name, federation="f", broker_url="memory://", key_path=tmp / "unused.key",
                     coordinator_pub=tmp / "coordinator.pub", state_dir=tmp / name, datasets={}, peers_dir=peers)
    return SecAggSite(cfg, signer, coord.public_pem())


def _env(payload, site: str):
    return new_envelope(payload, federation="f", run_id=RUN, round=1, sender="coordinator", recipient=site)


def _federation(tmp_path: Path):
    coord = Signer.generate()
    peers = tmp_path / "peers"
    peers.mkdir()
    signers = {s: Signer.generate() for s in ("site-a", "site-b", "site-c")}
    for s, sg in signers.items():
        (peers / f"{s}.pub").write_bytes(sg.public_pem())
    sites = {s: _site(tmp_path, s, signers[s], coord, peers) for s in signers}
    keys = {}
    for s, site in sites.items():
        k = site.handle(_env(SecAggJoin(deadline=0.0), s))
        assert isinstance(k, SecAggKey)
        keys[s] = KeyBinding(s, RUN, k.public, k.kid, k.sig)
    return coord, sites, keys


def test_a_roster_the_coordinator_did_not_sign_is_declined_naming_the_rule(tmp_path):
    coord, sites, keys = _federation(tmp_path)
    forged = CoordinatorSecAgg.build(Signer.generate(), RUN, list(keys.values()), min_contributors=2, threshold=2,
                                     privacy=1, clip=1.0, scale=2.0**16, length=4)
    s = forged.signed_roster
    out = sites["site-a"].handle(_env(SecAggRoster(body=s.body, kid=s.kid, sig=s.sig), "site-a"))
    assert isinstance(out, Declined) and out.reason == "secure_aggregation" and out.detail.startswith("roster_signature")
    honest = CoordinatorSecAgg.build(coord, RUN, list(keys.values()), min_contributors=2, threshold=2, privacy=1,
                                     clip=1.0, scale=2.0**16, length=4)
    s = honest.signed_roster
    assert sites["site-a"].handle(_env(SecAggRoster(body=s.body, kid=s.kid, sig=s.sig), "site-a")) is None


def test_an_unmask_request_for_one_update_is_declined_and_k_updates_are_answered(tmp_path):
    coord, sites, keys = _federation(tmp_path)
    agg = CoordinatorSecAgg.build(coord, RUN, list(keys.values()), min_contributors=2, threshold=2, privacy=1,
                                  clip=1.0, scale=2.0**16, length=4)
    s = agg.signed_roster
    for name, site in sites.items():
        assert site.handle(_env(SecAggRoster(body=s.body, kid=s.kid, sig=s.sig), name)) is None
    for name in ("site-a", "site-b"):
        out = sites[name].state.mask(RUN, 1, np.zeros(4))
        for r, sealed in out.sealed.items():
            sites[r].state.receive_share(RUN, name, 1, sealed)
    one = UnmaskRequest(RUN, agg.roster.digest(), "one", (("site-a", 1),))
    sg = sign(coord, one)
    out = sites["site-c"].handle(_env(SecAggUnmask(body=sg.body, kid=sg.kid, sig=sg.sig, deadline=0.0), "site-c"))
    assert isinstance(out, Declined) and out.detail.startswith("min_contributors"), out
    two = UnmaskRequest(RUN, agg.roster.digest(), "two", (("site-a", 1), ("site-b", 1)))
    sg = sign(coord, two)
    out = sites["site-c"].handle(_env(SecAggUnmask(body=sg.body, kid=sg.kid, sig=sg.sig, deadline=0.0), "site-c"))
    assert isinstance(out, SecAggAnswer) and out.request_id == "two" and out.share[0][1].dtype == np.dtype("<u4")


def test_a_site_without_peer_keys_declines_to_join(tmp_path):
    coord = Signer.generate()
    site = _site(tmp_path, "site-a", Signer.generate(), coord, None)
    out = site.handle(_env(SecAggJoin(deadline=0.0), "site-a"))
    assert isinstance(out, Declined) and out.detail.startswith("not_enabled") and "peers_dir" in out.detail


def test_the_one_buffer_weighted_delta_equals_the_chain_it_replaced():
    """``weighted_delta`` writes ``[w * (trained - task)..., w, 0...]`` into one buffer; bit for bit what
    ``room_for_union(weighted_vector(flat(trained) - flat(task), ...), length)`` gave, at, above and
    below the roster's length (too short a roster: the vector stays longer, and masking refuses it)."""
    from site_worker.secagg import weighted_vector
    from site_worker.secagg_handlers import flat, room_for_union, weighted_delta

    rng = np.random.default_rng(3)
    trained = (("w", rng.normal(size=(3, 4)).astype(np.float32)), ("b", rng.normal(size=5).astype(np.float32)))
    task = (("w", rng.normal(size=(3, 4)).astype(np.float32)), ("b", rng.normal(size=5).astype(np.float32)))
    for rows, cap in ((37, 100), (500, 100)):
        chain = weighted_vector(flat(trained) - flat(task), rows, cap)
        for length in (chain.size - 1, chain.size, chain.size + 12):
            want = room_for_union(chain, length)
            got = weighted_delta(trained, task, rows, cap, length)
            assert got.dtype == np.float64 and np.array_equal(got, want)
