"""The coordinator's side of secure aggregation: roster, unmask requests, and the unmasking.

It sums masked field vectors as they arrive (it never sees one unmasked), signs one roster
per run and one unmask request per closed round or buffer, and subtracts the mask sum that
U sites' aggregated shares decode to. With fewer than U answers it raises
``NotEnoughShares`` and reveals nothing: it holds only the masked sum.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from protocol.config import Experiment
from protocol.config_error import ConfigError
from protocol.secagg import field as F
from protocol.secagg.coding import Coding, decode_sum
from protocol.secagg.keys import KeyBinding
from protocol.secagg.rules import SYNC_AGGREGATORS
from protocol.secagg.statements import Roster, Signed, UnmaskRequest, sign
from protocol.signing import Signer


def refuse_until_wired(experiment: Experiment) -> None:
    """Never run "secure" rounds in the clear: only the loops that mask may run under secure aggregation
    (the sync loop, ``coordinator/rounds/secure.py``; FedBuff's buffers, ``coordinator/rounds/secure_buffer.py``)."""
    sa = experiment.federated.secure_aggregation
    name = experiment.federated.name
    if sa is not None and sa.dp != "off" and name not in ("FedAvg", "FedBuff"):
        # pooled: the coordinator's own step is the SGD step on the pooled gradient (rounds/secure.py);
        # central: the noisy mean update is applied as FedAvg applies a mean; under FedBuff either is
        # the buffer's step times server_lr (rounds/secure_buffer.py; server optimisers: not wired yet)
        why = ("steps the model with the experiment's learning rate" if sa.dp == "pooled" else
               "applies the noisy mean update as FedAvg or FedBuff does")
        raise ConfigError("federated.secure_aggregation.dp", f"{sa.dp!r} {why}; run it under FedAvg or FedBuff, "
                          f"not {name!r}")
    if experiment.federated.secure_aggregation is not None:
        if experiment.federated.name in SYNC_AGGREGATORS + ("FedBuff",):
            return
        raise ConfigError("federated.secure_aggregation", f"this coordinator masks updates only in synchronous rounds "
                          f"({', '.join(SYNC_AGGREGATORS)}) and FedBuff's buffers, not under "
                          f"{experiment.federated.name!r}: use one of them or remove the key")


@dataclass
class MaskedSum:
    """A running sum of masked field vectors and who is in it."""

    total: np.ndarray
    contributors: list[tuple[str, int]]

    def add(self, site: str, tag: int, masked: np.ndarray) -> None:
        if (site, tag) in self.contributors:
            return  # a redelivered update is counted once
        F.add(self.total, masked, out=self.total)
        self.contributors.append((site, tag))


def expected_batch(rows: Mapping[str, int], contributors: Iterable[str], sample_rate: float) -> float:
    """Pooled DP's expected batch, sum of q * n_i over the sites in the sum, from the rows each
    ANNOUNCED in its hello (public): dividing by it keeps the step unbiased without learning a
    site's actual (private) Poisson batch size."""
    sites = sorted(set(contributors))
    missing = [s for s in sites if s not in rows]
    if missing:
        raise ValueError(f"no announced row count for {', '.join(missing)}")
    total = sample_rate * sum(int(rows[s]) for s in sites)
    if total <= 0:
        raise ValueError("the expected pooled batch is empty: no announced rows among the contributors")
    return total


def pooled_gradient(total: np.ndarray, *, scale: float, batch: float) -> np.ndarray:
    """The noisy mean gradient from the unmasked integer sum (``sum_i round(s g_i) + Sk(mu, mu)``):
    divided by the scale and the expected pooled batch; the coordinator adds no noise of its own."""
    return np.asarray(total, dtype=np.float64) / (float(scale) * float(batch))


def central_mean(total: np.ndarray, *, scale: float, sampled: int) -> np.ndarray:
    """The central mode's noisy mean update from the unmasked integer sum (``sum_i round(s clip(d_i)) +
    Sk(mu, mu)``): over the scale and the number of sites SAMPLED for the round, fixed before any reply
    (uniform public weights; never the realised count, so a dropout cannot change one site's weight
    and the divisor depends on no private data). The coordinator adds no noise."""
    if sampled < 1:
        raise ValueError("the central mode's round sampled no site")
    return np.asarray(total, dtype=np.float64) / (float(scale) * float(sampled))


def weighted_mean(total: np.ndarray) -> np.ndarray:
    """FedAvg's step from the unmasked ``[sum w_i delta_i..., sum w_i]`` (``site_worker.secagg.weighted_vector``)."""
    if total[-1] <= 0:
        raise ValueError("the unmasked sum of weights is not positive: no update in the sum")
    return total[:-1] / total[-1]


class CoordinatorSecAgg:
    """One run's roster and its unmasking."""

    def __init__(self, signer: Signer, roster: Roster) -> None:
        self.signer = signer
        self.roster = roster
        self.signed_roster: Signed = sign(signer, roster)
        self.coding = Coding(len(roster.sites), roster.threshold, roster.privacy, roster.length)
        self.quant = F.QuantConfig(roster.clip, roster.scale, len(roster.sites))

    @classmethod
    def build(cls, signer: Signer, run_id: str, bindings: list[KeyBinding], *, min_contributors: int,
              threshold: int, privacy: int, clip: float, scale: float, length: int) -> CoordinatorSecAgg:
        ordered = sorted(bindings, key=lambda b: b.site_id)
        # float(): the roster's bytes pack clip and scale as floats on both sides (an int 1024 here
        # would make the coordinator's digest differ from the one every site recomputes)
        roster = Roster(run_id, tuple(b.site_id for b in ordered), tuple(ordered), int(min_contributors),
                        int(threshold), int(privacy), float(clip), float(scale), int(length))
        return cls(signer, roster)

    def new_sum(self) -> MaskedSum:
        return MaskedSum(np.zeros(self.roster.length, dtype=np.int64), [])

    def request(self, masked: MaskedSum) -> tuple[UnmaskRequest, Signed]:
        req = UnmaskRequest(self.roster.run_id, self.roster.digest(), uuid.uuid4().hex,
                            tuple(sorted(masked.contributors)))
        return req, sign(self.signer, req)

    def unmask_integers(self, masked: MaskedSum, answers: dict[str, bytes]) -> np.ndarray:
        """The signed integer sum (pooled DP: the noisy batch sums, never one of them) from U answers."""
        shares = {self.roster.index(site): F.from_bytes(data, self.coding.piece) for site, data in answers.items()}
        return F.lift(F.sub(masked.total, decode_sum(shares, self.coding)))

    def unmask(self, masked: MaskedSum, answers: dict[str, bytes]) -> np.ndarray:
        """The float sum of the contributors' clipped updates from U sites' answers."""
        shares = {self.roster.index(site): F.from_bytes(data, self.coding.piece) for site, data in answers.items()}
        mask_sum = decode_sum(shares, self.coding)
        return F.dequantise(F.sub(masked.total, mask_sum), self.quant)
