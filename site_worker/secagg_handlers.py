"""The site's secure-aggregation messages: join, roster, relayed shares, unmask (issue 22).

The daemon hands every ``SecAgg*`` task here, and every ``Update`` of a run under
``federated.secure_aggregation`` before it leaves: the update becomes a ``MaskedUpdate``
(the field vector ``[w*delta..., w]`` masked, its shares sealed for the other roster sites)
and nothing else of it, no training metric, no row count, leaves the site. Every rule is
``site_worker/secagg.py``'s; a refusal is a ``Declined(reason="secure_aggregation")`` whose
detail starts with the rule's name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog

from protocol.errors import ProtocolError
from protocol.messages import (Declined, Envelope, MaskedUpdate, SecAggAnswer, SecAggJoin, SecAggKey, SecAggRoster,
                               SecAggShare, SecAggUnmask, Tensors, Update)
from protocol.secagg import field as F
from protocol.secagg.statements import Roster, Signed, UnmaskRequest
from protocol.signing import Signer, TrustStore
from site_worker.config import SiteConfig
from site_worker.secagg import SecAggRefused, SiteSecAgg, update_weight

log = structlog.get_logger(__name__)

SECAGG_TASKS = (SecAggJoin, SecAggRoster, SecAggShare, SecAggUnmask)
COORDINATOR = "coordinator"


def wants_secagg(experiment: dict[str, Any]) -> dict[str, Any] | None:
    """The run's ``federated.secure_aggregation`` block (validated by the handler), or None."""
    fed = experiment.get("federated") if isinstance(experiment, dict) else None
    sa = fed.get("secure_aggregation") if isinstance(fed, dict) else None
    return sa if isinstance(sa, dict) else None


def load_peers(config: SiteConfig) -> TrustStore:
    """The federation's site keys from ``peers_dir`` (NAME.pub each; listed here, never named by the wire)."""
    peers = TrustStore()
    if config.peers_dir is None:
        return peers
    for pub in sorted(config.peers_dir.glob("*.pub")):
        if pub.stem == COORDINATOR:
            continue
        peers.add(pub.stem, pub.read_bytes())
    return peers


def room_for_union(values: np.ndarray, length: int) -> np.ndarray:
    """An update zero-padded to the roster's length, which may leave room past it for the final
    test's union vector (``protocol.secagg.union.roster_length``); the mask covers the zeros too."""
    if values.size >= length:
        return values  # equal, or too long: SiteSecAgg.mask refuses it (roster_mismatch)
    return np.concatenate([values, np.zeros(length - values.size, dtype=values.dtype)])


def weighted_delta(trained: Tensors, task: Tensors, num_examples: int, max_weight: int, length: int) -> np.ndarray:
    """``room_for_union(weighted_vector(flat(trained) - flat(task), ...), length)`` written into one
    float64 buffer: at 10 M parameters the chain of concatenations made six 80 MB copies per round."""
    size = sum(int(np.asarray(a).size) for _, a in trained)
    out = np.zeros(max(length, size + 1), dtype=np.float64)
    w = update_weight(num_examples, max_weight)
    at = 0
    for (_, a), (_, b) in zip(trained, task, strict=True):
        n = int(np.asarray(a).size)
        seg = out[at:at + n]
        np.subtract(np.asarray(a).ravel(), np.asarray(b).ravel(), out=seg, dtype=np.float64)
        seg *= w
        at += n
    out[at] = w
    return out


def flat(tensors: Tensors) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for _, a in tensors]) if tensors else np.zeros(0)


class SecAggSite:
    """One site's secure-aggregation endpoint: turns tasks into replies, updates into masked ones."""

    def __init__(self, config: SiteConfig, signer: Signer, coordinator_pub: bytes) -> None:
        coordinators = TrustStore()
        coordinators.add(COORDINATOR, coordinator_pub)
        self.config = config
        self.enabled = config.peers_dir is not None and config.policy.secure_aggregation != "off"
        self.state = SiteSecAgg(config.state_dir, config.site_id, signer, coordinators, load_peers(config),
                                coordinator=COORDINATOR,
                                min_contributors_floor=config.policy.secure_aggregation_min_contributors)

    def _refused(self, env: Envelope, rule: str, detail: str) -> Declined:
        log.warning("secure_aggregation_refused", task_id=env.message_id, rule=rule, detail=detail[:300])
        return Declined(task_id=env.message_id, reason="secure_aggregation", detail=f"{rule}: {detail}"[:8000])

    def handle(self, env: Envelope) -> SecAggKey | SecAggAnswer | Declined | None:
        """The reply to a secure-aggregation task (None: nothing to say, e.g. a share kept)."""
        p = env.payload
        if not self.enabled:
            why = ("its policy says secure_aggregation = off" if self.config.policy.secure_aggregation == "off"
                   else "it has no peers_dir (the federation's site keys) in site.toml")
            return self._refused(env, "not_enabled", f"this site does not take part in secure aggregation: {why}")
        try:
            if isinstance(p, SecAggJoin):
                b = self.state.key_binding(env.run_id)
                return SecAggKey(task_id=env.message_id, public=b.public, kid=b.kid, sig=b.sig)
            if isinstance(p, SecAggRoster):
                try:
                    roster = Roster.from_body(p.body)
                except ValueError as e:
                    raise SecAggRefused("roster_invalid", str(e)) from None
                if roster.run_id != env.run_id:
                    raise SecAggRefused("roster_mismatch", f"roster for run {roster.run_id!r} sent in run {env.run_id!r}")
                self.state.commit_roster(roster, Signed(p.body, p.kid, p.sig))
                log.info("secure_aggregation_roster_committed", run_id=env.run_id, sites=len(roster.sites),
                         threshold=roster.threshold, min_contributors=roster.min_contributors)
                return None
            if isinstance(p, SecAggShare):
                if len(p.sealed) != 1 or p.sealed[0][0] != p.sender or p.sealed[0][1].dtype != np.uint8:
                    raise SecAggRefused("share_invalid", "a relayed share is one uint8 array named after its sender")
                self.state.receive_share(env.run_id, p.sender, p.tag, p.sealed[0][1].tobytes())
                return None
            assert isinstance(p, SecAggUnmask)
            try:
                req = UnmaskRequest.from_body(p.body)
            except ValueError as e:
                raise SecAggRefused("request_invalid", str(e)) from None
            if req.run_id != env.run_id:
                raise SecAggRefused("roster_mismatch", f"request for run {req.run_id!r} sent in run {env.run_id!r}")
            out = self.state.answer(req, Signed(p.body, p.kid, p.sig))
            log.info("secure_aggregation_answered", request_id=req.request_id, contributors=len(req.contributors))
            return SecAggAnswer(task_id=env.message_id, request_id=req.request_id,
                                share=(("share", np.frombuffer(out, dtype="<u4")),))
        except SecAggRefused as e:
            return self._refused(env, e.rule, str(e))
        except (ProtocolError, ValueError) as e:
            return self._refused(env, "invalid", str(e))

    def ready(self, env: Envelope) -> Declined | None:
        """Before training for a secure run: a committed roster, or a refusal (nothing is spent)."""
        if not self.enabled:
            return self._refused(env, "not_enabled", "this site does not take part in secure aggregation "
                                                     "(policy off, or no peers_dir in site.toml)")
        try:
            self.state.roster(env.run_id)
        except SecAggRefused as e:
            return self._refused(env, e.rule, str(e))
        return None

    def masked(self, env: Envelope, global_weights: Tensors, update: Update, weight_cap: int) -> MaskedUpdate | Declined:
        """The ``Update`` as it may leave under secure aggregation: masked, its shares sealed."""
        names = [n for n, _ in global_weights]
        if [n for n, _ in update.weights] != names:
            return self._refused(env, "roster_mismatch", "the trained model's tensors are not the task's")
        try:
            values = weighted_delta(update.weights, global_weights, update.num_examples, weight_cap,
                                    self.state.roster(env.run_id).length)
            tag = self.state.next_tag(env.run_id, env.round)
            out = self.state.mask(env.run_id, tag, values)
        except SecAggRefused as e:
            return self._refused(env, e.rule, str(e))
        return MaskedUpdate(
            task_id=update.task_id, tag=tag,
            masked=(("masked", F.to_bytes_array(out.masked)),),
            shares=tuple((site, np.frombuffer(sealed, dtype=np.uint8)) for site, sealed in sorted(out.sealed.items())),
            epsilon=update.epsilon, delta=update.delta, base_round=update.base_round,
        )


__all__ = ["SECAGG_TASKS", "SecAggSite", "flat", "room_for_union", "wants_secagg"]
