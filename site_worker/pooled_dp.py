"""The site's side of the record-level pooled-cost mode (``federated.secure_aggregation.dp = "pooled"``).

Each round the site takes ONE DP-SGD step on its Poisson batch, but adds only its share of the
noise: per-sample gradients (Opacus ``GradSampleModule``), each clipped to C in L2, scaled by s
and rounded *per sample* to integers (so one record moves the integer sum by at most
Delta2 = s*C + sqrt(d) in L2: the sensitivity the accountant uses), summed in int64, plus
Sk(mu/m, mu/m) per coordinate from the secret stream. m = ``assume_honest_sites`` is the
site's own policy: it trusts at least m contributors of every unmasked sum to add their share,
so the sum carries Sk(mu, mu), the noise of pooled DP-SGD, once for the federation.

The site refuses (``PooledRefused``, rule ``min_contributors``) whenever a sum could hold fewer
than m shares: its effective floor is max(committed min_contributors, m), at the roster and at
every unmask request (``site_worker/secagg.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protocol.secagg import skellam
from site_worker.metrics import make_loss, prepare_target
from site_worker.secure_rng import SecureRandom


# Memory of one per-sample gradient value in the pooled step, in float32 units: Opacus' float32
# grad_sample, its float64 copy (scaled in place) and the rounded int64 rows (4 + 8 + 8 bytes).
MEMORY_FACTOR = 5


class PooledRefused(Exception):
    """A pooled step the site will not take; ``rule`` names the rule."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {detail}")


def effective_floor(min_contributors: int, assume_honest_sites: int) -> int:
    """The fewest distinct sites whose sum this site unmasks: a sum of fewer than m honest
    shares would carry less than the pooled noise its ledger charged for."""
    return max(int(min_contributors), int(assume_honest_sites))


def check_contributors(contributors: int, *, min_contributors: int, assume_honest_sites: int) -> None:
    """Refuse a sum of fewer distinct sites than the effective floor."""
    floor = effective_floor(min_contributors, assume_honest_sites)
    if contributors < floor:
        raise PooledRefused("min_contributors", f"a sum of {contributors} site(s) holds fewer than this site's "
                                                f"assume_honest_sites/min_contributors floor {floor} noise shares")


def integer_gradient_sum(model: torch.nn.Module, loss_name: str, x: torch.Tensor, y: torch.Tensor, *,
                         clip: float, scale: float) -> np.ndarray:
    """sum_i round(s * clip_C(g_i)) over the batch's rows, int64, flattened in parameter order.

    Rounding each row's vector (not the sum) is what bounds one record's effect on the integer
    sum by Delta2; an empty batch gives zeros (a Poisson batch may be empty)."""
    from opacus import GradSampleModule

    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    if len(x) == 0:
        return np.zeros(dim, dtype=np.int64)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        for p in params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
        loss_fn = make_loss(loss_name)
        loss_fn.reduction = "sum"  # type: ignore[assignment]
        out = gsm(x)
        loss_fn(out, prepare_target(y, out, loss_name)).backward()
        per = torch.cat([p.grad_sample.reshape(len(x), -1) for p in params], dim=1).double()  # type: ignore[attr-defined]
    finally:
        gsm._close()
        for p in params:
            p.grad = None
            if hasattr(p, "grad_sample"):
                del p.grad_sample
    factor = torch.clamp(clip / (per.norm(dim=1, keepdim=True) + 1e-12), max=1.0)
    rows = torch.round(per.mul_(factor * scale)).to(torch.int64)  # per sample: the sensitivity's premise
    return rows.sum(dim=0).numpy()


def noise_share(mu: float, assume_honest_sites: int, dim: int, rng: SecureRandom) -> np.ndarray:
    """This site's share Sk(mu/m, mu/m) per coordinate: m honest shares sum to Sk(mu, mu)."""
    if assume_honest_sites < 1:
        raise PooledRefused("assume_honest_sites", f"must be >= 1, got {assume_honest_sites}")
    return rng.skellam(mu / assume_honest_sites, dim)


@dataclass(frozen=True)
class PooledStep:
    """What one pooled step needs: the run's public settings and the site's m."""

    clip: float
    scale: float
    mu: float  # the pooled noise: the secure sum of m shares is Sk(mu, mu)
    sample_rate: float
    max_batch: int  # public cap on a Poisson batch (the field's bit budget assumes it)
    assume_honest_sites: int

    def contribution(self, model: torch.nn.Module, loss_name: str, x: torch.Tensor, y: torch.Tensor,
                     rng: SecureRandom) -> np.ndarray:
        """The integer vector this site masks: its Poisson batch's rounded clipped sum plus its noise share."""
        idx = rng.bernoulli_indices(len(x), self.sample_rate)
        # The field holds max_batch rows per site: keep at most that many (a Poisson batch exceeds
        # the cap set from poisson_batch_bound with probability below ~1e-9 per step).
        idx = idx[: self.max_batch]
        total = integer_gradient_sum(model, loss_name, x[idx], y[idx], clip=self.clip, scale=self.scale)
        return total + noise_share(self.mu, self.assume_honest_sites, total.size, rng)

    def entry(self, dim: int, steps: int = 1) -> skellam.SkellamEntry:
        """The ledger entry of ``steps`` such steps on a model of ``dim`` parameters."""
        l1, l2 = skellam.sensitivities(self.clip, self.scale, dim)
        return skellam.SkellamEntry(self.mu, l1, l2, self.sample_rate, steps)


__all__ = ["MEMORY_FACTOR", "PooledRefused", "PooledStep", "check_contributors", "effective_floor", "integer_gradient_sum",
           "noise_share"]
