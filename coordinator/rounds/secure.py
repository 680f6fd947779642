"""Secure aggregation in the sync round loop (issue 22): the coordinator sees sums, never an update.

Before the first round the coordinator asks every available site for its X25519 key
(``SecAggJoin`` -> ``SecAggKey``), builds and signs the roster (``coordinator/secagg.py``) and
sends it (``SecAggRoster``). In each round a site answers its TrainTask with a ``MaskedUpdate``:
the masked field vector ``[w*delta..., w]`` and one AES-GCM-sealed share per other roster site.
The coordinator **relays** each sealed share to its recipient on ``fedbus.tasks``, re-signed as
its own ``SecAggShare``: sites never connect to each other, and a site's broker user may
publish only to ``fedbus.updates`` / ``fedbus.control``, so the coordinator is the one party
that can write to a site's queue. It cannot read a share (the pair key is X25519 between the
two sites, bound to their Ed25519 identities) nor redirect or alter one (the routing is GCM's
associated data). It adds the masked vector to a running ``MaskedSum``. When the round closes
it sends one signed ``SecAggUnmask`` naming exactly the contributors to every roster site,
decodes the mask sum from the first U ``SecAggAnswer``s, subtracts it and divides by the
unmasked sum of weights. Fewer than U answers by the deadline fail the round
(``NotEnoughShares``) and nothing but the masked sum was ever held.

The final test's union metrics (``protocol/secagg/union.py``) ride the same machinery: the roster's
vector has room for the union vector, each DP-metrics site's final ``EvalResult`` carries its masked
union vector (``accept_union``), and ``union`` unmasks only their sum, from at least K sites.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from coordinator.aggregators import Contribution
from coordinator.inbox import Held, Message
from coordinator.rounds.context import RunContext, RunFailed, give_up
from coordinator.secagg import (CoordinatorSecAgg, MaskedSum, central_mean, expected_batch, pooled_gradient,
                               weighted_mean)
from coordinator.validation import Rejected
from protocol.errors import ProtocolError
from protocol.messages import (Declined, EvalResult, MaskedUpdate, SecAggAnswer, SecAggJoin, SecAggKey, SecAggRoster,
                               SecAggShare, SecAggUnmask, Tensors)
from protocol.secagg import field as F
from protocol.secagg.coding import NotEnoughShares
from protocol.secagg.keys import KeyBinding, verify_binding
from protocol.secagg.union import release_length, roster_length, union_figures, union_noise_sd, union_planned, unpack

SETUP_ROUND = 0  # the join and roster travel before round 1


def _flat(tensors: Tensors) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for _, a in tensors])


def _unflat(flat: np.ndarray, like: Tensors) -> Tensors:
    out, i = [], 0
    for name, a in like:
        n = int(np.asarray(a).size)
        out.append((name, flat[i:i + n].reshape(np.asarray(a).shape).astype(np.asarray(a).dtype)))
        i += n
    return tuple(out)


class _Relay:
    """Publishes one masked update's sealed shares on a thread of its own while the round loop reads
    the next update: at most one update's shares in flight (N - 1 frames), and every relay published
    and confirmed before any unmask request (``wait``), so a site holds each share it is asked for.
    At 10 sites x 10 M parameters each update's nine 6.7 MB shares took nine confirmed publishes,
    one at a time, in the loop. A failed publish is raised in the loop by the next ``start`` or ``wait``."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, publish: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                publish()
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread, raised there
                self._error = e

        self._thread = threading.Thread(target=run, name="fedbus-share-relay", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class SecureSync:
    """One run's roster and, per round, the masked sum and its unmasking."""

    def __init__(self, ctx: RunContext) -> None:
        sa = ctx.experiment.federated.secure_aggregation
        assert sa is not None
        self.ctx = ctx
        self.cfg = sa
        self.agg: CoordinatorSecAgg | None = None
        self.report: dict[str, Any] = {"coordinator_saw": "masked updates and the unmasked sum of each round"}
        self.tags: set[tuple[str, int]] = set()  # every (site, tag) accepted in this run: each is summed once
        self.pooled = sa.dp == "pooled"  # record-level DP at pooled cost: integer batch sums + Skellam shares
        self.central = sa.dp == "central"  # user-level DP: each site's clipped rounded update + its Skellam share
        self.planned = 0  # central: the sites sampled for the round's first attempt, its public denominator
        self.base = 0  # the update's values in the roster's vector (the rest: room for the final test's union vector)
        self.outputs = 1  # the model's outputs (public: the last tensor's first dimension)
        self.relay = _Relay()

    @property
    def sites(self) -> list[str]:
        return list(self.agg.roster.sites) if self.agg else []

    # ------------------------------------------------------------------ before round 1
    def setup(self, sites: list[str], weights: Tensors) -> None:
        """Collect the available sites' key bindings, sign the roster, send it to each."""
        ctx = self.ctx
        if any(not np.issubdtype(np.asarray(a).dtype, np.floating) for _, a in weights):
            raise RunFailed("secure aggregation sums float tensors only; this model has integer buffers")
        deadline = time.time() + ctx.round_timeout_s
        asked: dict[str, str] = {}
        with ctx.tasks.batch():
            for site in sites:
                asked[ctx.tasks.publish(SecAggJoin(deadline=deadline), site=site, round=SETUP_ROUND)] = site
        bindings: dict[str, KeyBinding] = {}
        declined: set[str] = set()
        held: dict[str, Held] = {}
        trust = ctx.store.trust_store()
        while len(bindings) + len(declined) < len(sites):
            inbound = ctx.inbox.next(deadline)
            if inbound is None:
                if time.time() >= deadline:
                    break
                continue

            def route(msg: Message) -> None:
                p = msg.payload
                if not isinstance(p, (SecAggKey, Declined)) or asked.get(p.task_id) != msg.site:
                    raise Rejected("not_tasked", f"{msg.env.type} from {msg.site} answers no key request of this run")
                if isinstance(p, Declined):
                    declined.add(msg.site)
                    return ctx.inbox.decline(msg, round=SETUP_ROUND)
                b = KeyBinding(msg.site, ctx.run_id, p.public, p.kid, p.sig)
                try:
                    verify_binding(trust, b, site_id=msg.site, run_id=ctx.run_id)
                except ProtocolError as e:
                    raise Rejected("bad_signature", f"X25519 key of {msg.site}: {e}") from None
                bindings[msg.site] = b
                ctx.inbox.settle(msg, verdict="secagg", reason="secure aggregation key", round=SETUP_ROUND)

            ctx.inbox.handle(inbound, round=SETUP_ROUND, held=held, route=route)
        n = len(bindings)
        if n < self.cfg.threshold or n < self.cfg.min_contributors or 2 * self.cfg.threshold <= n:
            raise RunFailed(
                f"secure aggregation: {n} site(s) sent a key ({', '.join(sorted(bindings)) or 'none'}); the roster "
                f"needs threshold U={self.cfg.threshold} with N/2 < U <= N and at least min_contributors="
                f"{self.cfg.min_contributors} sites: start the missing sites or adjust federated.secure_aggregation")
        self.base = int(_flat(weights).size) + (0 if self.pooled or self.central else 1)  # DP modes: no weight slot
        self.outputs = int(np.asarray(weights[-1][1]).shape[0]) if weights and np.asarray(weights[-1][1]).ndim else 1
        length = self.base
        if union_planned(ctx.experiment):  # room for the final test's union vector (protocol/secagg/union.py)
            length = roster_length(self.base, loss_name=str(ctx.experiment.training.loss_function), outputs=self.outputs)
        self.agg = CoordinatorSecAgg.build(
            ctx.tasks.signer, ctx.run_id, list(bindings.values()), min_contributors=self.cfg.min_contributors,
            threshold=self.cfg.threshold, privacy=self.cfg.privacy, clip=self.cfg.clip, scale=self.cfg.scale,
            length=length)
        signed = self.agg.signed_roster
        with ctx.tasks.batch():
            for site in self.agg.roster.sites:
                ctx.tasks.publish(SecAggRoster(body=signed.body, kid=signed.kid, sig=signed.sig), site=site,
                                  round=SETUP_ROUND)
        self.report.update(sites=n, threshold=self.cfg.threshold, min_contributors=self.cfg.min_contributors,
                           privacy=self.cfg.privacy, roster_sha256=self.agg.roster.digest())
        ctx.log.info("secure aggregation roster sent", sites=n, threshold=self.cfg.threshold)

    def roster_refused(self, msg: Message, rnd: int) -> bool:
        """A site's ``Declined`` to the roster it was sent (e.g. ``roster_signature``): recorded as that
        site's decline, naming its rule; the site then declines every TrainTask of the run."""
        p = msg.payload
        task = self.ctx.tasks.get(p.task_id) if isinstance(p, Declined) else None
        if task is None or task.kind != "SecAggRoster" or task.site != msg.site:
            return False
        self.ctx.log.warning("a site refused the secure-aggregation roster", site_id=msg.site, detail=p.detail[:300])
        self.ctx.inbox.decline(msg, round=rnd)
        return True

    # ------------------------------------------------------------------ per round
    def new_sum(self) -> MaskedSum:
        assert self.agg is not None
        return self.agg.new_sum()

    def accept(self, msg: Message, rnd: int, total: MaskedSum) -> None:
        """Check a MaskedUpdate, relay its sealed shares (unopened), add the masked vector.

        A site tags each update it masks with ``max(task round, its last tag + 1)`` (a FedBuff site
        may train twice from one version), so a tag below the task's round is not this task's."""
        p: MaskedUpdate = msg.payload
        self._take(msg, rnd, total, p.tag, p.masked, p.shares, what="masked update")

    def accept_union(self, msg: Message, rnd: int, total: MaskedSum) -> None:
        """The masked union vector on a final test's ``EvalResult`` (``union_*`` fields), as an update."""
        p: EvalResult = msg.payload
        self._take(msg, rnd, total, p.union_tag, p.union_masked, p.union_shares, what="union vector")

    def _take(self, msg: Message, rnd: int, total: MaskedSum, tag: int, masked_arrays: Tensors, shares: Tensors, *,
              what: str) -> None:
        assert self.agg is not None
        roster = self.agg.roster
        if msg.site not in roster.sites:
            raise Rejected("secure_aggregation", f"a {what} from {msg.site}, not a site of the roster")
        if tag < msg.env.round or (msg.site, tag) in self.tags:
            raise Rejected("wrong_round", f"{what} tagged {tag} for a task of round {msg.env.round}"
                           + (" (a tag this site already used)" if (msg.site, tag) in self.tags else ""))
        if len(masked_arrays) != 1:
            raise Rejected("bad_shape", f"a {what} is one uint32 array")
        try:
            masked = F.from_array(masked_arrays[0][1], roster.length)
        except ValueError as e:
            raise Rejected("bad_shape", f"{what}: {e}") from None
        want = sorted(s for s in roster.sites if s != msg.site)
        if sorted(name for name, _ in shares) != want or any(a.dtype != np.uint8 or a.ndim != 1 for _, a in shares):
            raise Rejected("bad_shape", f"a {what} carries one sealed uint8 share for each of {want}")
        frames: list[tuple[str, bytes, str]] = []
        with self.ctx.tasks.batch(later=frames):  # recorded here, published beside the loop
            for recipient, sealed in shares:
                self.ctx.tasks.publish(SecAggShare(sender=msg.site, tag=tag, sealed=((msg.site, sealed),)),
                                       site=recipient, round=rnd)
        self.relay.start(lambda: self.ctx.tasks.send(frames))
        total.add(msg.site, tag, masked)
        self.tags.add((msg.site, tag))

    def unmask(self, rnd: int, weights: Tensors, total: MaskedSum, held: dict[str, Held],
               other: Callable[[Message], None] | None = None) -> Contribution:
        """Ask every roster site for its aggregated share, decode from U, and return the round's mean model.

        ``other`` (FedBuff): every message that is not an answer to this request is handed to it
        (the next buffer's masked updates keep arriving while this one unmasks)."""
        agg = self.agg
        assert agg is not None
        answers, refused = self.answers(rnd, total, held, other)
        try:
            summed = agg.unmask_integers(total, answers) if self.pooled or self.central else agg.unmask(total, answers)
        except NotEnoughShares as e:
            why = "; ".join(f"{s}: {d[:200]}" for s, d in sorted(refused.items()))
            raise give_up(held, f"round {rnd}: secure aggregation could not unmask the sum of {len(total.contributors)} "
                                f"update(s): {e}; answered: {', '.join(sorted(answers)) or 'none'}"
                                + (f"; refused: {why}" if why else "")
                                + ". Nothing but the masked sum was held.") from None
        summed = summed[:self.base]  # past it: zeros (room for the final test's union vector)
        if self.pooled:
            step, row = self._pooled_step(summed, total)
        elif self.central:
            step, row = central_mean(summed, scale=self.cfg.scale, sampled=self.planned), {"denominator": self.planned}
        else:
            step, row = weighted_mean(summed), {"weight_sum": float(summed[-1])}
        mean = _unflat(_flat(weights) + step, weights)
        self.report.setdefault("rounds", []).append({"round": rnd, "contributors": len(total.contributors),
                                                      "answered": sorted(answers), **row})
        return Contribution(site="secure-sum", weights=mean, num_examples=1, base_round=rnd - 1)

    def answers(self, rnd: int, total: MaskedSum, held: dict[str, Held],
                other: Callable[[Message], None] | None = None) -> tuple[dict[str, bytes], dict[str, str]]:
        """Send one signed unmask request for exactly ``total``'s contributors to every roster site;
        gather (answers, refusals) until U answered, every site replied, or the deadline."""
        ctx, agg = self.ctx, self.agg
        assert agg is not None
        self.relay.wait()  # every share relayed and confirmed before a site is asked for its sum
        req, signed = agg.request(total)
        deadline = time.time() + ctx.round_timeout_s
        asked: dict[str, str] = {}
        with ctx.tasks.batch():
            for site in agg.roster.sites:
                task = SecAggUnmask(body=signed.body, kid=signed.kid, sig=signed.sig, deadline=deadline)
                asked[ctx.tasks.publish(task, site=site, round=rnd)] = site
        answers: dict[str, bytes] = {}
        refused: dict[str, str] = {}
        while len(answers) < agg.roster.threshold and len(answers) + len(refused) < len(asked):
            inbound = ctx.inbox.next(deadline)
            if inbound is None:
                if time.time() >= deadline:
                    break
                continue

            def route(msg: Message) -> None:
                p = msg.payload
                if isinstance(p, (SecAggAnswer, Declined)) and asked.get(p.task_id) == msg.site:
                    if isinstance(p, Declined):
                        refused[msg.site] = p.detail
                        return ctx.inbox.decline(msg, round=rnd)
                    if p.request_id != req.request_id or len(p.share) != 1:
                        raise Rejected("bad_shape", "an answer is one uint32 share for this request")
                    try:
                        answers[msg.site] = F.from_array(p.share[0][1], agg.coding.piece).astype("<u4").tobytes()
                    except ValueError as e:
                        raise Rejected("bad_shape", f"answer: {e}") from None
                    return ctx.inbox.settle(msg, verdict="secagg", reason="secure aggregation answer", round=rnd)
                if other is not None:
                    return other(msg)
                if msg.env.round < rnd or isinstance(p, (MaskedUpdate, SecAggKey)):
                    return ctx.inbox.settle(msg, verdict="late", reason=f"{msg.env.type} after round {rnd} closed",
                                            round=rnd)
                raise Rejected("unexpected_type", f"{msg.env.type} while round {rnd} is unmasking")

            ctx.inbox.handle(inbound, round=rnd, held=held, route=route)
        ctx.inbox.close_requests({t: s for t, s in asked.items() if s not in answers and s not in refused})
        return answers, refused

    # ------------------------------------------------------------------ the final test's union
    def union(self, rnd: int, total: MaskedSum, results: dict[str, dict[str, float]],
              held: dict[str, Held]) -> tuple[dict[str, float] | None, str]:
        """The union's figures from the unmasked sum of the sites' union vectors (noise once), or
        (None, why) when it cannot be: a site's final release came without its vector (the union
        would leave it out: the caller then pools the per-site releases), fewer than K vectors,
        or fewer than U answers (nothing is revealed). Only the sum is ever unmasked."""
        agg = self.agg
        assert agg is not None
        contributors = sorted({s for s, _ in total.contributors})
        without = sorted(s for s in results if s not in contributors)
        if without:
            return None, f"the final test of {', '.join(without)} came without a union vector"
        if len(contributors) < self.cfg.min_contributors:
            return None, (f"{len(contributors)} union vector(s), fewer than min_contributors "
                          f"{self.cfg.min_contributors}: not unmasked")
        answers, refused = self.answers(rnd, total, held)
        try:
            summed = agg.unmask(total, answers)
        except NotEnoughShares as e:
            why = "; ".join(f"{s}: {d[:200]}" for s, d in sorted(refused.items()))
            return None, f"the union's sum could not be unmasked: {e}" + (f"; refused: {why}" if why else "")
        sds = [results[s].get("union_share_sd") for s in contributors]
        clips = {results[s].get("union_loss_clip") for s in contributors}
        if not all(isinstance(sd, (int, float)) and sd > 0 for sd in sds) or len(clips) != 1 or None in clips:
            return None, "a site's final release did not state its union share's noise SD and loss clip"
        loss = str(self.ctx.experiment.training.loss_function)
        size = release_length(task="classification", loss_name=loss, outputs=self.outputs)
        layout = "binary" if size == release_length(task="classification", loss_name=loss, outputs=1) \
            else f"multiclass:{self.outputs}"
        noise = union_noise_sd([float(sd) for sd in sds if sd is not None])
        rows = sum(self._announced(s) for s in contributors)
        figures = union_figures(layout, unpack(summed, size, agg.roster.clip), noise_sd=noise,
                                clip=float(clips.pop() or 0.0), rows=rows or None)
        self.report["union"] = {"contributors": len(contributors), "answered": sorted(answers), "noise_sd": noise}
        return figures, "secure_sum"

    def _announced(self, site: str) -> int:
        """The rows ``site`` announced for the run's dataset in its hello (public), 0 if none."""
        hello = (self.ctx.store.site(site) or {}).get("hello") or {}
        rows = [d.get("rows") or 0 for d in hello.get("datasets") or []
                if d.get("name") == self.ctx.experiment.dataset.name]
        return int(rows[0]) if rows and isinstance(rows[0], int) else 0

    # ------------------------------------------------------------------ the central mode's sample
    def sample(self, rnd: int, available: list[str]) -> list[str]:
        """Central DP: the round's sites, drawn from the WHOLE roster (N sites, k of them, the formula the
        sites' ledgers charge q = k/N with: ``protocol.secagg.rules.central_rate``) by a seed keyed from
        the coordinator's secret (``secrets/central_dp.key``, as ``federated.central_dp``'s), never from
        the experiment's seed: amplification by sampling needs a sample no one else can predict. k, the
        round's denominator, is fixed here, before any reply; a sampled site that is not available is a
        dropout (its share of the noise is what ``assume_honest_sites`` provisions for)."""
        import hashlib
        import hmac

        from coordinator.aggregators.central_dp import load_or_create_secret
        from coordinator.sampling import sample_count, sample_sites

        fed = self.ctx.experiment.federated
        roster = self.sites
        count = sample_count(len(roster), fed.fraction_fit, fed.min_fit_clients)
        secret = load_or_create_secret(self.ctx.store.dir / "secrets" / "central_dp.key")
        key = hmac.new(secret, f"fedbus-secure-central-sampling:{self.ctx.run_id}".encode(), hashlib.sha256)
        chosen = sample_sites(roster, count, seed=int.from_bytes(key.digest()[:4], "little") & 0x7FFFFFFF, round=rnd)
        self.planned = len(chosen)
        return [s for s in chosen if s in set(available)]

    def _pooled_step(self, summed: np.ndarray, total: MaskedSum) -> tuple[np.ndarray, dict[str, Any]]:
        """One SGD step on the noisy pooled gradient: the integer sum over s and the expected batch
        (q x the training rows the contributors announced: rows x (1 - test_fraction) x (1 -
        validation_fraction), all public). The coordinator adds no noise."""
        exp = self.ctx.experiment
        rows = {}
        for site in {s for s, _ in total.contributors}:
            hello = (self.ctx.store.site(site) or {}).get("hello") or {}
            test = float((hello.get("policy") or {}).get("test_fraction", 0.2))
            rows[site] = max(1, int(self._announced(site) * (1 - test) * (1 - float(exp.dataset.validation_fraction))))
        batch = expected_batch(rows, rows, self.cfg.sample_rate)
        grad = pooled_gradient(summed, scale=self.cfg.scale, batch=batch)
        return -float(exp.training.optimizer.learning_rate) * grad, {"expected_batch": batch}


__all__ = ["SETUP_ROUND", "SecureSync"]
