"""A site's side of secure aggregation, and the rules that keep the sum a sum.

A coordinator that wants one hospital's update has three tricks against masking: ask to
unmask a "sum" of one update (a buffer of one); ask twice, for two sets that differ by one
hospital, and subtract; or hand the sites a roster of its own (its own X25519 keys, a
threshold of one). The site refuses each, naming the rule (``SecAggRefused``):

- ``roster_signature`` / ``request_signature``: the roster or request is not signed by this
  site's coordinator (and every key binding in the roster by the site it names, from the
  peer keys in the site's kit);
- ``roster_changed`` / ``roster_mismatch``: a run's roster differs from the one the site
  committed to, or a request names another roster;
- ``min_contributors``: a request whose updates come from fewer distinct sites than the
  committed ``min_contributors`` (never below the site's own floor);
- ``update_reused``: an update already included in an answered request (each update is in at
  most one unmask request; a redelivered request with the same id and bytes gets the same answer);
- ``one_update_per_site``: under the DP modes (once a Skellam share was masked), a request whose sum
  holds two updates of one site (its sensitivity there would be twice what its ledger charged);
- ``threshold``: a roster whose U is at most half its sites: the coordinator could then send two
  overlapping requests to two disjoint groups of U sites, each of which sees only one.

The commitments are durable (``protocol.durable.write_atomic``, one JSON file per run under
``state_dir/secagg/``, named by a digest of the run id, never by the wire's string), and are
written before an answer leaves, so a restarted site refuses exactly what it refused before.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from protocol.durable import write_atomic
from protocol.errors import ProtocolError
from protocol.secagg import field as F
from protocol.secagg.coding import Coding, mask_and_shares
from protocol.secagg.keys import AgreementKey, KeyBinding, open_share, seal_share, verify_binding
from protocol.secagg.masks import new_mask_key
from protocol.secagg.statements import Roster, Signed, UnmaskRequest, verify
from protocol.signing import Signer, TrustStore

DEFAULT_MIN_CONTRIBUTORS_FLOOR = 2  # a "sum" of one update is that update
_F = TypeVar("_F", bound=Callable[..., Any])


def _one_at_a_time(run_of: Callable[[Any], str]) -> Callable[[_F], _F]:
    """Run the method under the run's file lock: check and record are one step, even for two
    daemons sharing a state directory (else both could answer overlapping requests)."""
    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def locked(self: SiteSecAgg, first: Any, *args: Any, **kwargs: Any) -> Any:
            with self._locked(run_of(first)):
                return method(self, first, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap


def update_weight(num_examples: int, max_weight: int) -> float:
    """A site's FedAvg weight under secure aggregation: ``min(num_examples, max_weight) / max_weight``
    in (0, 1] (``max_weight`` public, fixed by the run)."""
    return min(int(num_examples), int(max_weight)) / int(max_weight)


def weighted_vector(delta: np.ndarray, num_examples: int, max_weight: int) -> np.ndarray:
    """The weighted mean's numerator and denominator in one vector, so the weight is masked too:
    ``[w * delta..., w]`` with ``w = update_weight(...)``, ``delta`` this site's update minus the global model."""
    w = update_weight(num_examples, max_weight)
    return np.concatenate([w * np.asarray(delta, dtype=np.float64).ravel(), [w]])


class SecAggRefused(Exception):
    """A roster, request or share the site will not act on; ``rule`` names the rule."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {detail}")


@dataclass
class _RunState:
    """What the site committed to in one run (the JSON on disk)."""

    x25519: str = ""  # this run's private X25519 key, hex
    roster: str = ""  # the committed roster's canonical body, hex ("" before commitment)
    used: list[list[str | int]] = field(default_factory=list)  # [[site, tag], ...] in answered requests
    answered: dict[str, list[str]] = field(default_factory=dict)  # request id -> [body digest, answer file's sha256]
    masked_tags: list[int] = field(default_factory=list)  # own tags masked: one mask key per update
    shares: dict[str, str] = field(default_factory=dict)  # "site\0tag" -> sha256 of the share file held
    pooled_floor: int = 0  # assume_honest_sites once a pooled-DP share was masked: no sum of fewer sites
    integer_tags: list[int] = field(default_factory=list)  # tags masked by mask_integers (DP modes' noisy vectors)


@dataclass(frozen=True)
class MaskedOutput:
    """One masked update and its shares: ``masked`` goes to the coordinator, ``sealed[site]``
    to that roster site through the broker, ``own`` stays here."""

    masked: np.ndarray
    sealed: dict[str, bytes]


class SiteSecAgg:
    """Durable secure-aggregation state of one site (all runs)."""

    def __init__(self, state_dir: Path, site_id: str, signer: Signer, coordinators: TrustStore, peers: TrustStore,
                 *, coordinator: str = "coordinator", min_contributors_floor: int = DEFAULT_MIN_CONTRIBUTORS_FLOOR) -> None:
        self.dir = Path(state_dir) / "secagg"
        self.site_id = site_id
        self.signer = signer
        self.coordinators = coordinators  # whose signature a roster / request needs
        self.peers = peers  # the federation's site keys, from the kit: who may bind an X25519 key
        self.coordinator = coordinator
        self.floor = max(DEFAULT_MIN_CONTRIBUTORS_FLOOR, int(min_contributors_floor))
        self._thread_lock = threading.RLock()
        self._depth: dict[str, int] = {}  # run -> nesting depth of _locked in this process

    @contextlib.contextmanager
    def _locked(self, run_id: str) -> Iterator[None]:
        with self._thread_lock:
            if self._depth.get(run_id):
                self._depth[run_id] += 1
                try:
                    yield
                finally:
                    self._depth[run_id] -= 1
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self._path(run_id).with_suffix(".lock"), "a+b") as lf:
                fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
                self._depth[run_id] = 1
                try:
                    yield
                finally:
                    self._depth[run_id] = 0
                    fcntl.flock(lf.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ persistence
    def _path(self, run_id: str) -> Path:
        return self.dir / (hashlib.sha256(run_id.encode()).hexdigest()[:32] + ".json")

    def _load(self, run_id: str) -> _RunState:
        p = self._path(run_id)
        if not p.exists():
            return _RunState()
        return _RunState(**json.loads(p.read_text()))

    def _save(self, run_id: str, st: _RunState, *, fsync: bool = True) -> None:
        write_atomic(self._path(run_id), json.dumps(st.__dict__).encode(), mode=0o600, fsync=fsync)

    def _share_path(self, run_id: str, key: str) -> Path:
        """One file per held share (a share is model-sized / (U - T)): never rewritten with the run's JSON."""
        return self._path(run_id).with_suffix("") / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".share")

    def _keep_share(self, run_id: str, st: _RunState, key: str, data: bytes) -> None:
        """Atomic but not fsynced: a share lost to a power cut makes this site a dropout for that
        update (it answers ``missing_share``), never a disclosure; the commitments that keep the
        sum a sum (roster, masked tags, updates answered for) are fsynced."""
        write_atomic(self._share_path(run_id, key), data, mode=0o600, fsync=False)
        st.shares[key] = hashlib.sha256(data).hexdigest()

    def _blob(self, run_id: str, key: str, digest: str) -> bytes:
        data = self._share_path(run_id, key).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise SecAggRefused("share_changed", "a stored share does not match its digest (state directory damaged)")
        return data

    def _share(self, run_id: str, st: _RunState, key: str) -> bytes:
        return self._blob(run_id, key, st.shares[key])

    # ------------------------------------------------------------------ joining a run
    @_one_at_a_time(lambda run_id: run_id)
    def key_binding(self, run_id: str) -> KeyBinding:
        """This site's X25519 key for ``run_id`` (drawn once, kept), signed by its identity."""
        st = self._load(run_id)
        if not st.x25519:
            st.x25519 = AgreementKey().private_bytes().hex()
            self._save(run_id, st)
        return AgreementKey.from_private_bytes(bytes.fromhex(st.x25519)).bind(self.signer, self.site_id, run_id)

    @_one_at_a_time(lambda roster: roster.run_id)
    def commit_roster(self, roster: Roster, signed: Signed) -> None:
        """Check a roster and commit to it; a second, different roster for the run is refused."""
        try:
            verify(self.coordinators, signed, roster, coordinator=self.coordinator)
        except ProtocolError as e:
            raise SecAggRefused("roster_signature", f"roster for run {roster.run_id!r} refused: {e}") from None
        st = self._load(roster.run_id)
        if st.roster:
            if st.roster != roster.body().hex():
                raise SecAggRefused("roster_changed", f"run {roster.run_id!r} already has a roster this site committed "
                                                      "to; a different one is refused")
            return
        self._check_roster(roster, st)
        st.roster = roster.body().hex()
        self._save(roster.run_id, st)

    def _check_roster(self, roster: Roster, st: _RunState) -> None:
        n = len(roster.sites)
        if self.site_id not in roster.sites or len(set(roster.sites)) != n or len(roster.bindings) != n:
            raise SecAggRefused("roster_invalid", "the roster must name each site once, this one included, with one "
                                                  "key binding per site")
        if roster.min_contributors < self.floor:
            raise SecAggRefused("min_contributors", f"roster asks for min_contributors {roster.min_contributors}, "
                                                    f"this site requires at least {self.floor}")
        if 2 * roster.threshold <= n:  # two disjoint answer sets of U could unmask two overlapping requests
            raise SecAggRefused("threshold", f"threshold {roster.threshold} of {n} sites: it must exceed half the "
                                             "roster, so any two sets of answering sites share one that refuses "
                                             "the second of two overlapping requests")
        try:
            Coding(n, roster.threshold, roster.privacy, roster.length)
            F.QuantConfig(roster.clip, roster.scale, n)
        except ValueError as e:
            raise SecAggRefused("roster_invalid", str(e)) from None
        mine = self.key_binding(roster.run_id)
        for site, binding in zip(roster.sites, roster.bindings, strict=True):
            try:
                verify_binding(self.peers, binding, site_id=site, run_id=roster.run_id)
            except ProtocolError as e:
                raise SecAggRefused("roster_signature", f"key binding of {site!r}: {e}") from None
            if site == self.site_id and binding.public != mine.public:
                raise SecAggRefused("roster_signature", "the roster carries an X25519 key for this site that is not its own")

    @_one_at_a_time(lambda run_id: run_id)
    def roster(self, run_id: str) -> Roster:
        """The committed roster (``SecAggRefused`` if none)."""
        st = self._load(run_id)
        if not st.roster:
            raise SecAggRefused("roster_missing", f"no roster committed for run {run_id!r}")
        return Roster.from_body(bytes.fromhex(st.roster))

    # ------------------------------------------------------------------ masking and shares
    @_one_at_a_time(lambda run_id: run_id)
    def next_tag(self, run_id: str, at_least: int) -> int:
        """The tag of this site's next update: ``at_least`` (the task's round), or past every tag it
        masked in the run (a FedBuff site may train twice from one model version; a mask is used once)."""
        st = self._load(run_id)
        return max([int(at_least)] + [t + 1 for t in st.masked_tags])

    def _fresh(self, run_id: str, tag: int, values: np.ndarray) -> tuple[Roster, _RunState]:
        """The run's roster and state for masking update ``tag``: refused if that tag was masked
        before (a mask is used once) or the vector's length is not the roster's."""
        roster = self.roster(run_id)
        st = self._load(run_id)
        if tag in st.masked_tags:
            raise SecAggRefused("mask_reused", f"update {tag} of run {run_id!r} was already masked; a mask is used once")
        if values.size != roster.length:
            raise SecAggRefused("roster_mismatch", f"update has {values.size} values, the roster says {roster.length}")
        return roster, st

    @_one_at_a_time(lambda run_id: run_id)
    def mask(self, run_id: str, tag: int, values: np.ndarray) -> MaskedOutput:
        """Quantise ``values`` (clipped), mask them under a fresh key, seal one share per roster site."""
        roster, st = self._fresh(run_id, tag, values)
        cfg = F.QuantConfig(roster.clip, roster.scale, len(roster.sites))
        return self._masked(run_id, tag, roster, st, F.quantise(values, cfg))

    @_one_at_a_time(lambda run_id: run_id)
    def mask_integers(self, run_id: str, tag: int, values: np.ndarray, *, assume_honest_sites: int,
                      bound: int) -> MaskedOutput:
        """Mask an integer vector (the pooled-DP mode's noisy batch sum, ``site_worker.pooled_dp``),
        only under a roster whose K is at least m, and commit to never answering for a sum of fewer
        than max(K, m) sites: fewer would carry less noise than the site's ledger charged for."""
        roster, st = self._fresh(run_id, tag, values)
        # Every roster site enforces the committed K at unmask, this site's m only where it answers:
        # so K itself must cover m, or U other sites could unmask a sum of fewer than m shares.
        if roster.min_contributors < int(assume_honest_sites):
            raise SecAggRefused("min_contributors", f"the roster unmasks sums of {roster.min_contributors} site(s), "
                                                    f"fewer than the {int(assume_honest_sites)} noise shares this site "
                                                    "assumes (assume_honest_sites): ask for min_contributors >= that")
        ints = np.asarray(values, dtype=np.int64)
        if ints.size and int(np.abs(ints).max()) > bound:
            raise SecAggRefused("field_budget", f"a coordinate of {int(np.abs(ints).max())} exceeds the stated "
                                                f"per-site bound {bound}: the sum could wrap around the field")
        st.pooled_floor = max(st.pooled_floor, int(assume_honest_sites))
        st.integer_tags.append(int(tag))
        return self._masked(run_id, tag, roster, st, np.mod(ints, F.P))

    @_one_at_a_time(lambda run_id: run_id)
    def integer_masked(self, run_id: str) -> int:
        """How many noisy integer vectors this site masked in ``run_id`` (the central mode's T cap)."""
        return len(self._load(run_id).integer_tags)

    def _masked(self, run_id: str, tag: int, roster: Roster, st: _RunState, elements: np.ndarray) -> MaskedOutput:
        coding = Coding(len(roster.sites), roster.threshold, roster.privacy, roster.length)
        mask, shares = mask_and_shares(new_mask_key(), coding)
        me = AgreementKey.from_private_bytes(bytes.fromhex(st.x25519))
        sealed: dict[str, bytes] = {}
        for j, (site, binding) in enumerate(zip(roster.sites, roster.bindings, strict=True)):
            if site == self.site_id:
                self._keep_share(run_id, st, f"{site}\0{tag}", F.to_bytes(shares[j]))
                continue
            sealed[site] = seal_share(me.pair_key(self.site_id, binding), F.to_bytes(shares[j]),
                                      run_id=run_id, tag=tag, sender=self.site_id, recipient=site)
        st.masked_tags.append(tag)
        self._save(run_id, st)
        return MaskedOutput(F.add(elements, mask), sealed)

    @_one_at_a_time(lambda run_id: run_id)
    def receive_share(self, run_id: str, sender: str, tag: int, sealed: bytes) -> None:
        """Decrypt and keep ``sender``'s share of its update ``tag`` (idempotent on redelivery)."""
        roster = self.roster(run_id)
        if sender not in roster.sites or sender == self.site_id:
            raise SecAggRefused("roster_mismatch", f"share from {sender!r}, not another site of the roster")
        st = self._load(run_id)
        binding = roster.bindings[roster.index(sender)]
        me = AgreementKey.from_private_bytes(bytes.fromhex(st.x25519))
        plain = open_share(me.pair_key(self.site_id, binding), sealed, run_id=run_id, tag=tag,
                           sender=sender, recipient=self.site_id)
        coding = Coding(len(roster.sites), roster.threshold, roster.privacy, roster.length)
        F.from_bytes(plain, coding.piece)
        key = f"{sender}\0{tag}"
        known = st.shares.get(key)
        if known is not None and known != hashlib.sha256(plain).hexdigest():
            raise SecAggRefused("share_changed", f"{sender!r} already sent a different share for update {tag}")
        if known is None:
            self._keep_share(run_id, st, key, plain)
        self._save(run_id, st, fsync=False)  # only a held share's digest changed (see _keep_share)

    # ------------------------------------------------------------------ answering an unmask request
    @_one_at_a_time(lambda request: request.run_id)
    def answer(self, request: UnmaskRequest, signed: Signed) -> bytes:
        """The sum of this site's shares of exactly ``request.contributors`` (field bytes), or a refusal."""
        try:
            verify(self.coordinators, signed, request, coordinator=self.coordinator)
        except ProtocolError as e:
            raise SecAggRefused("request_signature", f"unmask request {request.request_id!r} refused: {e}") from None
        roster = self.roster(request.run_id)
        if request.roster_digest != roster.digest():
            raise SecAggRefused("roster_mismatch", "the request names a roster this site did not commit to")
        st = self._load(request.run_id)
        digest = hashlib.sha256(request.body()).hexdigest()
        done = st.answered.get(request.request_id)
        if done is not None:
            if done[0] != digest:
                raise SecAggRefused("update_reused", f"request id {request.request_id!r} was answered for another set")
            return self._blob(request.run_id, f"\0answer\0{request.request_id}", done[1])  # redelivered: same answer
        wanted = [(str(s), int(t)) for s, t in request.contributors]
        if len(set(wanted)) != len(wanted):
            raise SecAggRefused("update_reused", "the request names one update twice")
        hospitals = {s for s, _ in wanted}  # K updates from one site would be that site's own sum
        floor = max(roster.min_contributors, st.pooled_floor)  # pooled DP: never fewer than m noise shares
        if len(hospitals) < floor:
            raise SecAggRefused("min_contributors", f"the request sums updates of {len(hospitals)} site(s); this site "
                                                    f"answers only for at least {floor} sites")
        if st.pooled_floor and len(hospitals) != len(wanted):  # DP modes: a site's two updates in one sum would
            # double its sensitivity there, past what the ledger's one-update-per-sum accounting charged
            raise SecAggRefused("one_update_per_site", "the request sums two updates of one site; under the DP modes "
                                                       "each sum holds at most one update per site")
        used = {(str(s), int(t)) for s, t in st.used}
        reused = [f"{s}#{t}" for s, t in wanted if (s, t) in used]
        if reused:
            raise SecAggRefused("update_reused", f"update(s) {', '.join(reused)} were already in an answered request; "
                                                 "each update is unmasked in at most one sum")
        missing = [f"{s}#{t}" for s, t in wanted if f"{s}\0{t}" not in st.shares]
        if missing:
            raise SecAggRefused("missing_share", f"this site holds no share of {', '.join(missing)}")
        coding = Coding(len(roster.sites), roster.threshold, roster.privacy, roster.length)
        total = np.zeros(coding.piece, dtype=np.int64)
        for s, t in wanted:
            F.add(total, F.from_bytes(self._share(request.run_id, st, f"{s}\0{t}"), coding.piece), out=total)
        out = F.to_bytes(total)
        st.used.extend([s, t] for s, t in wanted)
        write_atomic(self._share_path(request.run_id, f"\0answer\0{request.request_id}"), out, mode=0o600)
        st.answered[request.request_id] = [digest, hashlib.sha256(out).hexdigest()]
        for s, t in wanted:  # a share is never needed again: do not keep it
            st.shares.pop(f"{s}\0{t}", None)
        self._save(request.run_id, st)  # durable before the answer leaves
        for s, t in wanted:
            self._share_path(request.run_id, f"{s}\0{t}").unlink(missing_ok=True)
        return out
