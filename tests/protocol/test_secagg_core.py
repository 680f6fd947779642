"""Secure aggregation's pure core (issue 22): field, masks, MDS shares, keys, signed statements."""

from __future__ import annotations

import random

import numpy as np
import pytest

from protocol.config_error import ConfigError
from protocol.errors import BadSignature
from protocol.secagg import field as F
from protocol.secagg.coding import Coding, NotEnoughShares, decode_sum, mask_and_shares
from protocol.secagg.keys import AgreementKey, ShareRefused, open_share, seal_share, verify_binding
from protocol.secagg.masks import field_stream, new_mask_key
from protocol.secagg.statements import Roster, UnmaskRequest, sign, verify
from protocol.signing import Signer, TrustStore


# ------------------------------------------------------------------ field and bit budget
def test_bit_budget_refuses_the_first_configuration_that_would_overflow():
    clip, sites = 1.0, 10
    edge = F.max_scale(clip, sites)
    cfg = F.QuantConfig(clip, edge, sites)  # just inside: accepted
    assert sites * cfg.max_level <= F.HALF
    assert cfg.bits_of_sum <= 30
    with pytest.raises(ConfigError) as e:
        F.QuantConfig(clip, edge + 1.0, sites)  # one level per unit more: the sum could wrap
    assert e.value.path == "federated.secure_aggregation.scale" and "overflow" in str(e.value)
    with pytest.raises(ConfigError):
        F.QuantConfig(clip, edge, sites + 1)  # the same scale for one site more


def test_a_sum_at_the_budget_edge_lifts_back_exactly():
    clip, sites = 1.0, 10
    cfg = F.QuantConfig(clip, F.max_scale(clip, sites), sites)
    for sign_ in (1.0, -1.0):
        q = [F.quantise(np.full(3, sign_ * clip), cfg) for _ in range(sites)]
        total = q[0]
        for x in q[1:]:
            total = F.add(total, x)
        assert np.all(F.lift(total) == sign_ * sites * cfg.max_level)


def test_quantised_sum_is_within_the_stated_error():
    rng = np.random.default_rng(1)
    cfg = F.QuantConfig(clip=2.0, scale=2.0**20, sites=7)
    xs = [rng.uniform(-2, 2, 50) for _ in range(7)]
    total = np.zeros(50, dtype=np.int64)
    for x in xs:
        total = F.add(total, F.quantise(x, cfg))
    err = np.abs(F.dequantise(total, cfg) - np.sum(xs, axis=0))
    assert err.max() <= cfg.error_bound() and err.max() > 0


def test_wire_bytes_round_trip_and_refuse_out_of_field_values():
    v = np.array([0, 1, F.P - 1])
    assert np.array_equal(F.from_bytes(F.to_bytes(v), 3), v)
    with pytest.raises(ValueError):
        F.from_bytes(np.array([F.P], dtype="<u4").tobytes())
    with pytest.raises(ValueError):
        F.from_bytes(F.to_bytes(v), 4)


# ------------------------------------------------------------------ masks
def test_mask_stream_is_keyed_uniform_and_in_the_field():
    k = new_mask_key()
    a, b = field_stream(k, 20000), field_stream(k, 20000)
    assert np.array_equal(a, b)  # a function of the key only
    assert not np.array_equal(a, field_stream(new_mask_key(), 20000))
    assert a.min() >= 0 and a.max() < F.P
    assert abs(a.mean() / F.P - 0.5) < 0.02  # 20000 uniforms: sd of the mean ~0.002
    with pytest.raises(ValueError):
        field_stream(bytes(16), 4)  # 128-bit keys refused


# ------------------------------------------------------------------ MDS shares
@pytest.mark.parametrize("n,u,t", [(3, 2, 1), (5, 3, 1), (10, 7, 3), (4, 4, 0)])
def test_sum_of_masks_decodes_from_any_u_aggregated_shares_and_not_from_u_minus_1(n, u, t):
    rnd = random.Random(n * 100 + u)
    coding = Coding(sites=n, threshold=u, privacy=t, length=11)
    masks, shares = {}, {}
    for i in range(n):
        masks[i], shares[i] = mask_and_shares(new_mask_key(), coding)
    for _ in range(4):
        contributors = rnd.sample(range(n), rnd.randint(1, n))
        survivors = rnd.sample(range(n), u)  # exactly U answer
        agg = {j: np.sum([shares[i][j] for i in contributors], axis=0) % F.P for j in survivors}
        want = np.sum([masks[i] for i in contributors], axis=0) % F.P
        assert np.array_equal(decode_sum(agg, coding), want)
        agg.pop(survivors[0])  # U - 1: refused, nothing decoded
        with pytest.raises(NotEnoughShares, match="threshold"):
            decode_sum(agg, coding)


def test_t_shares_of_one_mask_are_independent_of_the_mask():
    # T-privacy: with the T noise pieces uniform, any T shares are uniform whatever the mask.
    # Check the linear-algebra fact it rests on: the noise rows on any T columns are invertible.
    from itertools import combinations

    from protocol.secagg.coding import _inverse

    n, u, t = 6, 4, 2
    for cols in combinations(range(n), t):
        _inverse([[pow(j + 1, k, F.P) for k in range(u - t, u)] for j in cols])  # raises if singular


def test_coding_parameters_are_checked():
    for bad in [(3, 4, 0), (3, 2, 2), (3, 0, 0)]:
        with pytest.raises(ValueError):
            Coding(*bad, length=5)


# ------------------------------------------------------------------ keys and encrypted shares
def _pair():
    sa, sb = Signer.generate(), Signer.generate()
    trust = TrustStore()
    trust.add("site-a", sa.public_pem())
    trust.add("site-b", sb.public_pem())
    ka, kb = AgreementKey(), AgreementKey()
    return sa, sb, trust, ka, kb


def test_x25519_keys_are_bound_to_the_sites_identity():
    sa, sb, trust, ka, _ = _pair()
    binding = ka.bind(sa, "site-a", "run-1")
    verify_binding(trust, binding, site_id="site-a", run_id="run-1")
    forged = kb_binding = AgreementKey().bind(sb, "site-a", "run-1")  # site-b signs a key for site-a
    with pytest.raises(BadSignature, match="signed by 'site-b'"):
        verify_binding(trust, forged, site_id="site-a", run_id="run-1")
    with pytest.raises(BadSignature):
        verify_binding(trust, binding, site_id="site-a", run_id="run-2")  # replayed into another run
    swapped = type(binding)(**{**binding.__dict__, "public": kb_binding.public})
    with pytest.raises(BadSignature):
        verify_binding(trust, swapped, site_id="site-a", run_id="run-1")  # key swapped under the signature


def test_shares_open_only_for_their_run_tag_sender_and_recipient():
    sa, sb, _, ka, kb = _pair()
    ba, bb = ka.bind(sa, "site-a", "r"), kb.bind(sb, "site-b", "r")
    key_ab, key_ba = ka.pair_key("site-a", bb), kb.pair_key("site-b", ba)
    assert key_ab == key_ba
    sealed = seal_share(key_ab, b"share-bytes", run_id="r", tag=3, sender="site-a", recipient="site-b")
    assert open_share(key_ba, sealed, run_id="r", tag=3, sender="site-a", recipient="site-b") == b"share-bytes"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for blob, kw in [
        (tampered, {}),
        (sealed, {"recipient": "site-c"}),
        (sealed, {"tag": 4}),
        (sealed, {"run_id": "r2"}),
        (sealed, {"sender": "site-b", "recipient": "site-a"}),
    ]:
        args = {"run_id": "r", "tag": 3, "sender": "site-a", "recipient": "site-b", **kw}
        with pytest.raises(ShareRefused):
            open_share(key_ba, blob, **args)


# ------------------------------------------------------------------ signed statements
def test_statements_verify_only_under_the_coordinators_key():
    coord, other = Signer.generate(), Signer.generate()
    trust = TrustStore()
    trust.add("coordinator", coord.public_pem())
    trust.add("site-a", other.public_pem())
    roster = Roster("r", ("site-a",), (), 2, 2, 1, 1.0, 1024.0, 5)
    verify(trust, sign(coord, roster), roster, coordinator="coordinator")
    with pytest.raises(BadSignature):
        verify(trust, sign(other, roster), roster, coordinator="coordinator")
    req = UnmaskRequest("r", roster.digest(), "q1", (("site-a", 1),))
    s = sign(coord, req)
    with pytest.raises(BadSignature):
        verify(trust, s, UnmaskRequest("r", roster.digest(), "q1", (("site-a", 2),)), coordinator="coordinator")


# ------------------------------------------------------------------ fast field arithmetic, at its edges
def test_reduce_equals_python_modulo_over_its_whole_domain_and_at_the_edges():
    rng = np.random.default_rng(7)
    edges = [0, 1, F.P - 1, F.P, F.P + 1, 2 * F.P, 2 * F.P + 1, (1 << 32) - 1, 1 << 32, (1 << 62) - 1,
             (1 << 62), (1 << 63) - 1]
    for top in (1 << 31, 1 << 40, 1 << 62, (1 << 63) - 1):
        x = np.concatenate([np.array(edges, dtype=np.int64), rng.integers(0, top, 50_000, dtype=np.int64)])
        want = [int(v) % F.P for v in x]
        assert F.reduce(x.copy()).tolist() == want


def test_add_sub_and_quantise_wrap_exactly_at_p():
    a = np.array([0, 0, 1, F.P - 1, F.P - 1, F.P - 2, 5], dtype=np.int64)
    b = np.array([0, F.P - 1, F.P - 1, 1, F.P - 1, 1, 7], dtype=np.int64)
    assert F.add(a, b).tolist() == [(int(x) + int(y)) % F.P for x, y in zip(a, b)]
    assert F.sub(a, b).tolist() == [(int(x) - int(y)) % F.P for x, y in zip(a, b)]
    out = a.copy()
    assert F.add(out, b, out=out) is out and out.tolist() == F.add(a, b).tolist()
    cfg = F.QuantConfig(1.0, 65536.0, 4)
    v = np.array([-2.0, -1.0, -1 / 65536, -0.4 / 65536, 0.0, 0.6 / 65536, 1.0, 2.0])
    assert F.quantise(v, cfg).tolist() == [int(round(max(-1.0, min(1.0, x)) * 65536)) % F.P for x in v]


@pytest.mark.parametrize("terms", [1, 7, 64, 65])
def test_combine_equals_the_big_integer_product_up_to_and_past_its_float64_limit(terms):
    from protocol.secagg.coding import combine

    rng = np.random.default_rng(terms)
    rows = rng.integers(0, F.P, (terms, 9_000), dtype=np.int64)
    rows[:, :2] = F.P - 1  # the largest element in every limb
    rows[:, 2] = F.P - 2  # odd limbs: an odd sum past 2**53 is where float64 would round
    coeffs = [[F.P - 1] * terms, [F.P - 2] * terms] + [[int(c) for c in rng.integers(0, F.P, terms)] for _ in range(3)]
    got = combine(coeffs, rows)
    cols = list(range(0, 9_000, 251)) + [0, 1, 2, 4095, 4096, 8999]  # block edges included
    for i, row in enumerate(coeffs):
        assert [int(got[i, j]) for j in cols] == [sum(c * int(rows[k, j]) for k, c in enumerate(row)) % F.P
                                                  for j in cols]
