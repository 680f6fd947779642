"""Union metrics from secure sums (issue 22, item 5), in functions: each site masks its statistics
vector with only its share of the noise; the coordinator unmasks the sum of all sites and reads
figures whose noise was added once for the union. Its 95 % intervals must be at least √N
narrower than each site's own release, as the noise arithmetic predicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protocol import dp_figures
from protocol.policy import SitePolicy
from protocol.secagg.union import COUNT_CAP, from_field, union_figures, union_noise_sd
from site_worker.release import release_metrics, release_size, statistics
from site_worker.secure_metrics import union_contribution
from tests.adversarial.secagg_federation import federation

ROWS = [60, 59, 25, 40]  # the test splits of the four heart-disease hospitals, about
SIGMA, SIGMA_U, CLIP = 5.0, 2.0, 5.0  # each site's own release; the union's (its own policy knob)
POLICY = SitePolicy(metrics="dp", metrics_noise_multiplier=SIGMA, union_noise_multiplier=SIGMA_U, metrics_loss_clip=CLIP)
KW = dict(loss_name="bce_with_logits", task="classification")


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = ((x @ torch.tensor([1.5, -1.0, 0.5]) + 0.7 * torch.randn(n, generator=g)) > 0).float().reshape(-1, 1)
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.2, -0.8, 0.3]]))
        m.bias.zero_()
    return m


def _width(m: dict[str, float]) -> float:
    return m["accuracy_hi"] - m["accuracy_lo"]


def test_the_union_from_a_secure_sum_carries_the_noise_once_and_is_sqrt_n_narrower(tmp_path):
    n, model = len(ROWS), _model()
    data = [_data(i, r) for i, r in enumerate(ROWS)]
    length = release_size(task="classification", loss_name="bce_with_logits", outputs=1)
    fed = federation(tmp_path, n, threshold=3, privacy=1, min_contributors=n, length=length)
    masked = fed.coordinator.new_sum()
    own, exact, sds, values = [], np.zeros(length), [], {}
    for i, (x, y) in enumerate(data):
        own.append(release_metrics(model, x, y, policy=POLICY, rng=np.random.default_rng(100 + i), **KW))
        layout, v, sd = union_contribution(model, x, y, policy=POLICY, rng=np.random.default_rng(i),
                                           min_contributors=n, **KW)
        values[f"site-{i}"] = v
        exact += statistics(model, x, y, clip=CLIP, **KW)[1]
        sds.append(sd)
    fed.upload(1, values, masked)
    req, signed = fed.coordinator.request(masked)
    answers = {s: fed.sites[s].answer(req, signed) for s in ["site-0", "site-2", "site-3"]}  # site-1 dropped
    summed = from_field(fed.coordinator.unmask(masked, answers))
    # the unmasked sum is the sum of the noisy contributions, within the field's quantisation error
    quant = n * COUNT_CAP / (2 * fed.coordinator.roster.scale)
    assert np.abs(summed - sum(from_field(v) for v in values.values())).max() <= quant
    sens = math.sqrt(3.0)
    total_sd = union_noise_sd(sds)
    assert total_sd == pytest.approx(SIGMA_U * sens)  # the noise once: σ_u·Δ, not √N·σ_u·Δ
    union = union_figures(layout, summed, noise_sd=total_sd, clip=CLIP, rows=sum(ROWS))
    assert abs(union["n"] - exact[:4].sum()) <= 3 * total_sd
    for site, m in zip(ROWS, own):  # each site's own release is noised with σ·Δ on its rows alone
        assert _width(m) >= math.sqrt(n) * _width(union), (site, _width(m), _width(union))
    pooled = dp_figures.union(own)  # pooling the per-site releases carries the noise N times
    assert pooled is not None and _width(union) < _width(pooled)


def test_each_share_of_the_noise_is_sigma_delta_over_sqrt_k_and_the_shares_add_to_sigma_delta(monkeypatch):
    """400 unions of 4 sites: the noise of the sum has SD σ_u·Δ (within 5 %), each share σ_u·Δ/2."""
    import site_worker.secure_metrics as sm

    n, model = len(ROWS), _model()
    data = [_data(i, r) for i, r in enumerate(ROWS)]
    stats = {id(x): statistics(model, x, y, clip=CLIP, **KW) for x, y in data}
    monkeypatch.setattr(sm, "statistics", lambda model, x, y, **kw: stats[id(x)])  # the model's pass, once
    exact = [stats[id(x)][1] for x, _ in data]
    draws = []
    for rep in range(400):
        total = sum(from_field(union_contribution(model, x, y, policy=POLICY, min_contributors=n, **KW,
                                                  rng=np.random.default_rng([rep, i]))[1]) - e
                    for i, ((x, y), e) in enumerate(zip(data, exact)))
        draws.append(total)
    noise = np.asarray(draws)[:, 1:-1]  # cells and histogram (the first cell and loss may be clipped at 0: not here)
    assert noise.std() == pytest.approx(SIGMA_U * math.sqrt(3.0), rel=0.05)
    assert abs(noise.mean()) < 0.1 * SIGMA_U * math.sqrt(3.0)


def test_a_site_whose_metrics_are_not_dp_does_not_contribute():
    x, y = _data(0, 20)
    with pytest.raises(ValueError, match="metrics policy must be dp"):
        union_contribution(_model(), x, y, policy=SitePolicy(metrics="exact"), rng=np.random.default_rng(0),
                           min_contributors=2, **KW)
