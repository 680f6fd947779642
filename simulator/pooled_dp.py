"""Record-level DP at pooled cost, end to end in memory (no bus): the production pieces wired by hand.

Each site (``site_worker.pooled_dp.PooledStep``) reserves one pooled step in its own
``PrivacyLedger``, takes its Poisson batch from its secret stream, sums its per-sample rounded
clipped gradients plus its Skellam share, and masks that integer vector with
``SiteSecAgg.mask_integers``; the sealed shares are relayed to the other roster sites; the
coordinator (``coordinator.secagg``) adds the masked vectors, asks every roster site to unmask
exactly that set (a site masks only under min_contributors >= its m, and answers for no fewer), decodes the integer sum from U
answers, divides by the scale and the expected pooled batch (announced rows) and takes an SGD
step. It never holds one site's vector, nor an un-noised sum. The bench and the tests drive it;
the wire loop (``coordinator/rounds/secure.py``) does not run this mode yet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from coordinator.secagg import CoordinatorSecAgg, MaskedSum, expected_batch, pooled_gradient
from protocol.secagg import skellam
from protocol.secagg.coding import NotEnoughShares
from protocol.signing import Signer, TrustStore
from site_worker.ledger import PrivacyLedger
from site_worker.pooled_dp import PooledStep
from site_worker.secagg import SecAggRefused, SiteSecAgg
from site_worker.secure_rng import SecureRandom

RUN = "run-pooled-dp"
DATASET = "data"  # each site's one dataset in its ledger


class RoundFailed(RuntimeError):
    """A pooled round that unmasked nothing; ``reasons`` maps each refusing site to its rule."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(f"{s}: {r}" for s, r in sorted(reasons.items())))


@dataclass
class PooledSite:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    honest: int  # its policy's assume_honest_sites
    secagg: SiteSecAgg
    ledger: PrivacyLedger
    rng: SecureRandom = field(default_factory=SecureRandom.secret)


@dataclass
class PooledFederation:
    """N sites and a coordinator running pooled-DP rounds in memory."""

    model: torch.nn.Module
    loss: str
    sites: dict[str, PooledSite]
    coordinator: CoordinatorSecAgg
    clip: float
    scale: float
    mu: float
    sample_rate: float
    max_batch: int
    learning_rate: float
    delta: float
    max_epsilon: float | None = None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # the last round's integer vectors (tests)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step_for(self, site: PooledSite) -> PooledStep:
        return PooledStep(self.clip, self.scale, self.mu, self.sample_rate, self.max_batch, site.honest)

    def bound(self, site: PooledSite) -> int:
        """The stated per-site magnitude: max_batch rows of round(s*C) plus 10 SDs of its share."""
        return skellam.field_bound(sites=1, max_batch=self.max_batch, clip=self.clip, scale=self.scale,
                                   mu=self.mu, honest=site.honest)

    def round(self, tag: int, contributors: list[str] | None = None) -> np.ndarray:
        """One pooled step; returns the unmasked integer sum. Raises ``RoundFailed`` (nothing
        unmasked) when a site refuses to mask or too few answer."""
        names = sorted(self.sites) if contributors is None else sorted(contributors)
        masked = self.coordinator.new_sum()
        refused: dict[str, str] = {}
        self.vectors = {}
        for name in names:
            site = self.sites[name]
            step = self.step_for(site)
            site.ledger.reserve(DATASET, release_id=f"{RUN}-{tag}-{name}", kind="train",
                                entries=[], delta=self.delta, accountant=skellam.ACCOUNTANT,
                                max_epsilon=self.max_epsilon, run_id=RUN, pooled=[step.entry(self.dim)])
            local = copy.deepcopy(self.model)
            ints = step.contribution(local, self.loss, site.x, site.y, site.rng)
            try:
                out = site.secagg.mask_integers(RUN, tag, ints, assume_honest_sites=site.honest, bound=self.bound(site))
            except SecAggRefused as e:
                site.ledger.cancel(DATASET, f"{RUN}-{tag}-{name}")
                refused[name] = str(e)
                continue
            site.ledger.commit(DATASET, f"{RUN}-{tag}-{name}")
            for recipient, sealed in out.sealed.items():
                self.sites[recipient].secagg.receive_share(RUN, name, tag, sealed)
            masked.add(name, tag, out.masked)
            self.vectors[name] = ints
        if refused:
            raise RoundFailed(refused)
        total = self.unmask(masked)
        batch = expected_batch({n: len(s.x) for n, s in self.sites.items()}, [s for s, _ in masked.contributors],
                               self.sample_rate)
        grad = torch.from_numpy(pooled_gradient(total, scale=self.scale, batch=batch))
        with torch.no_grad():
            i = 0
            for p in self.model.parameters():
                if p.requires_grad:
                    k = p.numel()
                    p.add_(grad[i:i + k].reshape(p.shape).to(p.dtype), alpha=-self.learning_rate)
                    i += k
        return total

    def unmask(self, masked: MaskedSum) -> np.ndarray:
        req, signed = self.coordinator.request(masked)
        answers: dict[str, bytes] = {}
        refused: dict[str, str] = {}
        for name, site in sorted(self.sites.items()):
            try:
                answers[name] = site.secagg.answer(req, signed)
            except SecAggRefused as e:
                refused[name] = str(e)
        if len(answers) < self.coordinator.roster.threshold:
            raise RoundFailed(refused or {"coordinator": "too few answers"})
        try:
            return self.coordinator.unmask_integers(masked, dict(list(answers.items())[: self.coordinator.roster.threshold]))
        except NotEnoughShares as e:
            raise RoundFailed({"coordinator": str(e)}) from None


def federation(root: Path, data: dict[str, tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module, *,
               loss: str, clip: float, scale: float, mu: float, sample_rate: float, max_batch: int,
               learning_rate: float, honest: int | dict[str, int], min_contributors: int = 2,
               threshold: int | None = None, privacy: int = 1, delta: float = 1e-5,
               max_epsilon: float | None = None) -> PooledFederation:
    """Keys, roster and sites for a pooled-DP run; ``honest`` is each site's assume_honest_sites."""
    coord = Signer.generate()
    coordinators, peers = TrustStore(), TrustStore()
    coordinators.add("coordinator", coord.public_pem())
    names = sorted(data)
    signers = {s: Signer.generate() for s in names}
    for s in names:
        peers.add(s, signers[s].public_pem())
    secaggs = {s: SiteSecAgg(root / s, s, signers[s], coordinators, peers) for s in names}
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = len(names)
    u = threshold if threshold is not None else n // 2 + 1
    c = CoordinatorSecAgg.build(coord, RUN, [secaggs[s].key_binding(RUN) for s in names],
                                min_contributors=min_contributors, threshold=u, privacy=min(privacy, u - 1),
                                clip=clip, scale=scale, length=dim)
    sites = {}
    for s in names:
        secaggs[s].commit_roster(c.roster, c.signed_roster)
        m = honest[s] if isinstance(honest, dict) else honest
        sites[s] = PooledSite(s, data[s][0], data[s][1], m, secaggs[s], PrivacyLedger(root / s))
    return PooledFederation(model, loss, sites, c, clip, scale, mu, sample_rate, max_batch, learning_rate, delta,
                            max_epsilon)


__all__ = ["PooledFederation", "PooledSite", "RoundFailed", "federation"]
