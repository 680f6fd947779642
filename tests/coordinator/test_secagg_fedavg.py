"""FedAvg from a secure sum (issue 22, "Correctness" and "Dropouts", in functions: no bus).

The masked weighted average equals the plain one within the stated quantisation error, at 3
and 10 sites; up to N - U contributors may drop after uploading; one more and the round
fails with the reason and the coordinator decodes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.secagg import weighted_mean
from protocol.secagg.coding import NotEnoughShares
from site_worker.secagg import weighted_vector
from tests.adversarial.secagg_federation import federation

MAX_WEIGHT = 1000
D = 8  # parameters


def _round(fed, rng, dropped):
    names = sorted(fed.sites)
    deltas = {s: rng.normal(0, 0.05, D) for s in names}
    rows = {s: int(rng.integers(10, MAX_WEIGHT)) for s in names}
    masked = fed.coordinator.new_sum()
    fed.upload(1, {s: weighted_vector(deltas[s], rows[s], MAX_WEIGHT) for s in names}, masked)
    req, signed = fed.coordinator.request(masked)
    answers = {s: fed.sites[s].answer(req, signed) for s in names if s not in dropped}  # dropped sites are gone
    plain = sum(rows[s] * deltas[s] for s in names) / sum(rows.values())
    return masked, answers, plain


def _bound(fed, n, plain):
    # numerator and denominator each within n / (2 scale) (QuantConfig.error_bound); the weights sum to >= n * 10/1000
    e = fed.coordinator.quant.error_bound(n)
    b = n * 10 / MAX_WEIGHT
    return (e + np.abs(plain) * e) / (b - e)


@pytest.mark.parametrize("n,u", [(3, 2), (10, 7)])
def test_secure_fedavg_equals_plain_fedavg_within_the_stated_error(tmp_path, n, u):
    fed = federation(tmp_path, n, threshold=u, privacy=1, length=D + 1, clip=1.0, scale=2.0**20)
    masked, answers, plain = _round(fed, np.random.default_rng(n), dropped=())
    got = weighted_mean(fed.coordinator.unmask(masked, answers))
    assert np.all(np.abs(got - plain) <= _bound(fed, n, plain))
    assert np.abs(got - plain).max() > 0  # quantised, not the plain vector by accident


def test_up_to_n_minus_u_contributors_may_drop_after_uploading_and_one_more_fails_the_round(tmp_path):
    n, u = 10, 7
    fed = federation(tmp_path, n, threshold=u, privacy=2, length=D + 1, clip=1.0, scale=2.0**20)
    names = sorted(fed.sites)
    masked, answers, plain = _round(fed, np.random.default_rng(7), dropped=names[:n - u])  # 3 killed after upload
    got = weighted_mean(fed.coordinator.unmask(masked, answers))
    assert np.all(np.abs(got - plain) <= _bound(fed, n, plain))  # the dropped sites' updates still count
    assert len(masked.contributors) == n
    fewer = dict(list(answers.items())[: u - 1])  # 4 dropped: U - 1 answers
    with pytest.raises(NotEnoughShares, match=r"more than N - U = 3 sites dropped"):
        fed.coordinator.unmask(masked, fewer)


def test_fedbuff_buffers_unmask_each_update_once_whatever_round_it_came_from(tmp_path):
    """FedBuff: each site's k-th update is tagged k; a buffer closes at K = 3 updates from any
    mix of sites and tags; each buffer unmasks to its own sum, and no update is in two buffers."""
    fed = federation(tmp_path, 4, threshold=3, privacy=1, min_contributors=3, length=D + 1, scale=2.0**20)
    rng = np.random.default_rng(3)
    arrivals = [("site-0", 1), ("site-1", 1), ("site-2", 1), ("site-0", 2), ("site-3", 1), ("site-1", 2)]
    sums = []
    buffer, values = fed.coordinator.new_sum(), []
    for site, tag in arrivals:
        v = weighted_vector(rng.normal(0, 0.05, D), int(rng.integers(10, MAX_WEIGHT)), MAX_WEIGHT)
        fed.upload(tag, {site: v}, buffer)
        values.append(v)
        if len(buffer.contributors) == 3:
            req, signed = fed.coordinator.request(buffer)
            answers = {s: fed.sites[s].answer(req, signed) for s in ["site-1", "site-2", "site-3"]}  # site-0 gone
            sums.append((fed.coordinator.unmask(buffer, answers), np.sum(values, axis=0), req))
            buffer, values = fed.coordinator.new_sum(), []
    assert len(sums) == 2
    for got, want, _ in sums:
        assert np.abs(got - want).max() <= fed.coordinator.quant.error_bound(3)
    # a third "buffer" re-using two of the first buffer's updates and one of the second's is refused
    from protocol.secagg.statements import UnmaskRequest, sign
    from site_worker.secagg import SecAggRefused

    first, second = sums[0][2].contributors, sums[1][2].contributors
    replay = UnmaskRequest(fed.coordinator.roster.run_id, fed.coordinator.roster.digest(), "replay",
                           (*first[:2], second[2]))
    with pytest.raises(SecAggRefused) as e:
        fed.sites["site-2"].answer(replay, sign(fed.coord_signer, replay))
    assert e.value.rule == "update_reused"
