"""A secure-aggregation federation in functions (no bus): N sites, one coordinator, shares
relayed by hand. The adversarial tests play the coordinator with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.secagg import CoordinatorSecAgg, MaskedSum
from protocol.signing import Signer, TrustStore
from site_worker.secagg import SiteSecAgg

RUN = "run-secagg"


@dataclass
class Federation:
    coord_signer: Signer
    coordinators: TrustStore
    peers: TrustStore
    sites: dict[str, SiteSecAgg]
    coordinator: CoordinatorSecAgg
    updates: dict[str, np.ndarray] = field(default_factory=dict)

    def restart(self, site: str, root: Path) -> None:
        old = self.sites[site]
        self.sites[site] = SiteSecAgg(root / site, site, old.signer, self.coordinators, self.peers)

    def upload(self, tag: int, values: dict[str, np.ndarray], masked: MaskedSum) -> None:
        """Each site masks its update; shares go to every other site; the coordinator sums."""
        for site, v in values.items():
            out = self.sites[site].mask(RUN, tag, v)
            for recipient, sealed in out.sealed.items():
                self.sites[recipient].receive_share(RUN, site, tag, sealed)
            masked.add(site, tag, out.masked)
            self.updates[f"{site}#{tag}"] = v


def federation(root: Path, n: int, *, threshold: int, privacy: int = 1, min_contributors: int = 2,
               length: int = 6, clip: float = 1.0, scale: float = 2.0**16) -> Federation:
    coord = Signer.generate()
    coordinators, peers = TrustStore(), TrustStore()
    coordinators.add("coordinator", coord.public_pem())
    names = [f"site-{i}" for i in range(n)]
    signers = {s: Signer.generate() for s in names}
    for s in names:
        peers.add(s, signers[s].public_pem())
    sites = {s: SiteSecAgg(root / s, s, signers[s], coordinators, peers) for s in names}
    bindings = [sites[s].key_binding(RUN) for s in names]
    c = CoordinatorSecAgg.build(coord, RUN, bindings, min_contributors=min_contributors, threshold=threshold,
                                privacy=privacy, clip=clip, scale=scale, length=length)
    for s in names:
        sites[s].commit_roster(c.roster, c.signed_roster)
    return Federation(coord, coordinators, peers, sites, c)
