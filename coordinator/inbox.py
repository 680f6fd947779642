"""The coordinator's inbound path: every message from a site is opened, checked and settled here.

Opening (codec, signature, enrollment) runs on the run loop's thread when it takes the
delivery (``Inbox.next``), one at a time: a large update arrives as an untouched map of its
spill file, so updates waiting in the queue cost no memory, and the coordinator holds at
most one update being decoded beside the global model and the accumulator (issue 23).
``Inbox.on_delivery`` only queues, and never raises.
The run loop (``coordinator/run.py``) then hands each delivery to ``Inbox.handle``,
which checks the envelope (federation, run, recipient, clock), the type, replays and
duplicates (by message id and by (run, round, site)), and calls the round loop's
``route`` for what only the loop knows (which round is open, who was tasked).

Settling is decided here too: an accepted message is *held* (its delivery is acked
by the caller only after the commit that includes it), a message without effect is
recorded and acked, a bad one is recorded and dead-lettered with its reason. Any
exception while handling one message dead-letters that message (``internal_error``):
it never crashes the run and, being settled, never comes back on ``--resume``.

Every field was bounded by the codec (``protocol/bounds.py``) before it got here; what one
site can claim is bounded further here: ``num_examples`` and every row count in its metrics
(``n``, ``n_val``, ``personalized_n``: the weights of the validation and final means) by the
rows its ``SiteHello`` announced, every stored integer by the signed 64-bit range, and bodies
are stored under their sha256, never under a wire-chosen name.
"""

from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

from coordinator.bodies import BodyStore
from coordinator.state import StateStore, UpdateRow
from coordinator.validation import Rejected, check_envelope, check_weights
from protocol.bounds import COUNT_METRICS
from protocol.messages import Declined, EvalResult, MaskedUpdate, SecAggAnswer, SecAggKey, Tensors, Update
from protocol.transport.base import BusError, Delivery

MAX_CLOSED_REQUESTS = 4096  # surplus unmask answers still recognised (rounds x roster sites)

INT64_MAX = 2**63 - 1


@dataclass
class Inbound:
    """A delivery with the result of ``open_frame``: exactly one of ``opened`` and ``error`` is set."""

    delivery: Delivery
    opened: Any = None
    error: Exception | None = None


def open_delivery(delivery: Delivery, trust: Any) -> Inbound:
    """Verify and decode on the bus's worker thread; a frame that does not open carries its error."""
    from protocol.codec import open_frame
    from protocol.errors import MalformedFrame, ProtocolError

    try:
        # A reassembled frame's sha256 was verified chunk by chunk as it came (protocol.chunking).
        return Inbound(delivery, opened=open_frame(delivery.body, trust,
                                                   frame_sha256=getattr(delivery, "frame_sha256", None)))
    except ProtocolError as e:
        return Inbound(delivery, error=e)
    except Exception as e:  # noqa: BLE001 - a bug must reject the frame, not kill the consumer thread
        return Inbound(delivery, error=MalformedFrame(f"cannot open frame ({type(e).__name__}: {e})"))


@dataclass
class Held:
    """An accepted message whose delivery waits for the commit that includes it."""

    delivery: Delivery
    row: UpdateRow
    payload: Any


@dataclass
class Message:
    """A delivery that opened, is signed by its sender and is addressed to this run."""

    delivery: Delivery
    opened: Any

    @property
    def env(self) -> Any:
        return self.opened.envelope

    @property
    def payload(self) -> Any:
        return self.opened.envelope.payload

    @property
    def site(self) -> str:
        return self.opened.envelope.sender


Route = Callable[[Message], None]


class Inbox:
    """Opens, checks and settles the messages of one run; see the module docstring."""

    def __init__(self, store: StateStore, *, federation: str, dataset: str, max_skew_s: float = 300.0,
                 store_bodies: bool = True, log: Any = None,
                 wait_hello: Callable[[str, float], bool] | None = None, hello_wait_s: float = 5.0) -> None:
        import structlog

        self.store = store
        self.federation = federation
        self.dataset = dataset
        self.max_skew_s = max_skew_s
        self.store_bodies = store_bodies
        self.bodies = BodyStore()  # ``bodies.wait()`` before any commit that records stored bodies
        self.run_id: str | None = None
        self.trust: Any = None
        self.log = log if log is not None else structlog.get_logger(__name__)
        self._queue: queue.Queue[Delivery] = queue.Queue()
        # Told of a site that declined model_unavailable (coordinator/models.py re-sends it its model).
        self.on_model_unavailable: Callable[[str], None] | None = None
        self._announced: dict[str, int] = {}  # site -> training rows, pinned at first use
        self._wait_hello = wait_hello  # the hello travels on another queue: an update may overtake it
        self.hello_wait_s = hello_wait_s
        # Unmask requests whose sum was unmasked before every site answered (task id -> site): a
        # surplus answer is the protocol working (U of N suffice), not a late or rejected message.
        self._surplus: dict[str, str] = {}

    def close_requests(self, asked: dict[str, str]) -> None:
        """``asked`` (task id -> site) were unmask requests of a sum already unmasked; bounded."""
        self._surplus.update(asked)
        while len(self._surplus) > MAX_CLOSED_REQUESTS:
            self._surplus.pop(next(iter(self._surplus)))

    # ------------------------------------------------------------------ bus side
    def refresh_trust(self) -> None:
        self.trust = self.store.trust_store()

    def on_delivery(self, delivery: Delivery) -> None:
        """Bus worker thread: queue only (opening here would hold every waiting update's bytes)."""
        self._queue.put(delivery)

    def next(self, deadline: float) -> Inbound | None:
        """The next delivery, opened, or None once ``deadline`` (unix s) passed with nothing waiting."""
        timeout = deadline - time.time()
        try:
            if timeout <= 0:
                delivery = self._queue.get_nowait()
            else:
                delivery = self._queue.get(timeout=min(timeout, 0.5))
        except queue.Empty:
            return None
        return open_delivery(delivery, self.trust)

    # ------------------------------------------------------------------ one message
    def handle(self, inbound: Inbound, *, round: int, held: dict[str, Held], route: Route) -> None:
        """Open and check ``inbound``, then ``route`` it; every failure settles this message only."""
        msg: Message | None = None
        try:
            msg = self._open(inbound, round=round, held=held)
            if msg is not None and isinstance(msg.payload, SecAggAnswer) \
                    and self._surplus.pop(msg.payload.task_id, None) == msg.site:
                self.settle(msg, verdict="secagg", reason="surplus secure aggregation answer: its sum was unmasked "
                                                          "before it came (threshold answers suffice)", round=round)
            elif msg is not None:
                route(msg)
        except Rejected as e:
            self.reject(inbound.delivery, e, round=round, opened=msg.opened if msg else None)
        except Exception as e:  # noqa: BLE001 - one message must never crash the run or poison a restart
            self.log.exception("error while handling a message; dead-lettering it",
                               message_id=inbound.delivery.message_id)
            self.reject(inbound.delivery, Rejected("internal_error", f"{type(e).__name__}: {e}"), round=round,
                        opened=msg.opened if msg else None)
        finally:
            inbound.opened = None  # the caller's reference must not keep the decoded update (a model) alive

    def _open(self, inbound: Inbound, *, round: int, held: dict[str, Held]) -> Message | None:
        from protocol.errors import ProtocolError

        delivery = inbound.delivery
        try:
            if inbound.error is not None:
                raise inbound.error
            opened = inbound.opened
            env = opened.envelope
            if env.sender != opened.signer:
                raise Rejected("bad_signature", f"envelope sender {env.sender!r} is not the signer {opened.signer!r}")
            check_envelope(env, federation=self.federation, run_id=self.run_id, max_skew_s=self.max_skew_s)
            if not isinstance(env.payload, (Update, EvalResult, Declined, MaskedUpdate, SecAggKey, SecAggAnswer)):
                raise Rejected("unexpected_type", f"{env.type} does not belong on the updates queue")
        except (ProtocolError, Rejected) as e:
            self.reject(delivery, e, round=round)
            return None
        msg = Message(delivery, opened)
        return None if self._is_replay(msg, held, round=round) else msg

    def _is_replay(self, msg: Message, held: dict[str, Held], *, round: int) -> bool:
        """A message id seen before: a redelivery is settled quietly, a fresh copy is a replay."""
        mid, delivery = msg.env.message_id, msg.delivery
        if mid in held:
            if delivery.redelivered:
                held[mid].delivery = delivery  # same message again (connection recovered): keep one count
                delivery.release_body()
                return True
            self.reject(delivery, Rejected("replayed", f"message {mid} was already received in this round"),
                        round=round, opened=msg.opened)
            return True
        if self.store.accepted_message(mid):
            if delivery.redelivered:
                self.settle(msg, verdict="duplicate", reason="redelivered after commit", round=round)
            else:
                self.reject(delivery, Rejected("replayed", f"message {mid} was already accepted"), round=round,
                            opened=msg.opened)
            return True
        return False

    # ------------------------------------------------------------------ settling
    def reject(self, delivery: Delivery, error: Exception, *, round: int, opened: Any = None) -> None:
        """Record and dead-letter with the reason; never raises (a log row that fails is only logged)."""
        reason = error.header() if hasattr(error, "header") else f"error: {error}"
        site, msg_round = _claimed(delivery, opened)
        if opened is None and getattr(error, "signer", None):
            site = error.signer  # the signature verified; only the envelope was bad
        try:
            self.store.record([UpdateRow(
                run_id=self.run_id, round=_int64(msg_round if msg_round is not None else round), site=site,
                message_id=str(delivery.message_id)[:128], kind=getattr(opened.envelope, "type", None) if opened else None,
                bytes=len(delivery.body), verdict="rejected", reason=reason,
                body_sha256=opened.body_sha256 if opened else None, kid=opened.kid if opened else None,
            )])
        except Exception:  # noqa: BLE001 - the dead letter below still carries the reason
            self.log.exception("could not record a rejected message", message_id=delivery.message_id)
        try:
            delivery.nack(reason)
        except BusError as e:  # already settled, or the body was released: the broker redelivers it
            self.log.error("could not dead-letter a message", message_id=delivery.message_id, error=str(e))
        self.log.warning("message rejected", site_id=site, message_id=delivery.message_id, reason=reason)

    def settle(self, msg: Message, *, verdict: str, reason: str, round: int) -> None:
        """Record a valid message that has no effect (late, stale, duplicate, declined) and ack it."""
        env, p, opened = msg.env, msg.payload, msg.opened
        self.store.record([UpdateRow(
            run_id=self.run_id, round=env.round, message_id=env.message_id, site=env.sender, kind=env.type,
            bytes=len(msg.delivery.body), verdict=verdict, reason=reason, body_sha256=opened.body_sha256,
            frame_sha256=opened.frame_sha256, signature=bytes(opened.signature), kid=opened.kid,
            base_round=getattr(p, "base_round", None), metrics=_finite_metrics(getattr(p, "metrics", {}) or {}),
            task_id=getattr(p, "task_id", None),
        )])
        msg.delivery.ack()
        self.log.info(f"message {verdict}", site_id=env.sender, round=env.round, current_round=round, reason=reason)

    def decline(self, msg: Message, *, round: int) -> None:
        p = msg.payload
        if p.reason == "untrusted_task":  # our signing key is not the one the site trusts
            self.log.error(f"site {msg.env.sender} rejected our tasks: unknown signer", site_id=msg.env.sender,
                           detail=p.detail)
        if p.reason == "model_unavailable" and self.on_model_unavailable is not None:
            self.on_model_unavailable(msg.env.sender)
        self.settle(msg, verdict="declined", reason=f"{p.reason}: {p.detail}", round=round)

    def late_eval(self, msg: Message, *, round: int) -> None:
        self.settle(msg, verdict="late", reason="evaluation result outside an evaluation", round=round)

    def hold(self, msg: Message, held: dict[str, Held], *, payload: Any, staleness: int | None = None,
             split: str | None = None) -> Held:
        """Accept: store the body (named by its hash), keep the delivery unacked until the commit."""
        h = Held(delivery=msg.delivery, row=self._accept_row(msg, staleness=staleness, split=split), payload=payload)
        held[msg.env.message_id] = h
        msg.delivery.release_body()  # held until the commit: keep its tag, not its bytes
        return h

    def accept_update(self, msg: Message, held: dict[str, Held], *, weights: Tensors, norm_bound: float | None,
                      fold: Callable[[Any], Any], staleness: int | None = None) -> tuple[Held, Any]:
        """Check an Update, fold it into the aggregator (``fold(contribution)``) and hold it.

        Everything that can refuse it runs before ``fold``, so a rejected update never
        touches the aggregate; returns the held entry and what ``fold`` returned.
        """
        from coordinator.aggregators import Contribution

        p = msg.payload
        self.check_update(msg, weights, norm_bound=norm_bound)
        row = self._accept_row(msg, staleness=staleness)
        out = fold(Contribution(site=msg.site, weights=p.weights, num_examples=p.num_examples,
                                base_round=p.base_round, metrics=dict(p.metrics)))
        h = Held(delivery=msg.delivery, row=row, payload=_light(p))
        held[msg.env.message_id] = h
        msg.delivery.release_body()  # acked by the commit that includes it, not before
        return h, out

    # ------------------------------------------------------------------ checks
    def check_update(self, msg: Message, weights: Tensors, *, norm_bound: float | None) -> None:
        p, site = msg.payload, msg.site
        if p.num_examples <= 0:
            raise Rejected("bad_num_examples", f"update from {site} reports num_examples={p.num_examples}; must be > 0")
        rows = self.announced_rows(site)
        if rows is None:
            raise Rejected("num_examples_bound", f"update from {site} claims num_examples={p.num_examples} but its "
                           f"SiteHello announced no dataset {self.dataset!r}; the site must say hello first")
        if p.num_examples > rows:
            raise Rejected("num_examples_bound", f"update from {site} claims num_examples={p.num_examples} but its "
                           f"SiteHello announced {rows} rows of dataset {self.dataset!r}")
        self.check_counts(msg, rows)
        check_weights(p.weights, weights, norm_bound=norm_bound)

    def check_counts(self, msg: Message, rows: int) -> None:
        """Every row count a site reports in its metrics (``n``, ``n_val``, ``personalized_n`` ...:
        the coordinator weighs by them) is at most the rows its SiteHello announced."""
        for key in COUNT_METRICS:
            v = msg.payload.metrics.get(key)
            if v is not None and v > rows:
                raise Rejected("count_bound", f"{msg.env.type} from {msg.site} reports metrics[{key!r}]={v:g} but "
                               f"its SiteHello announced {rows} rows of dataset {self.dataset!r}")

    def check_eval(self, msg: Message) -> None:
        p = msg.payload
        if p.num_examples < 0 or any(
            not isinstance(v, (int, float)) or not math.isfinite(float(v)) for v in p.metrics.values()
        ):
            raise Rejected("bad_metrics", f"evaluation result from {msg.site} has negative n or non-finite metrics")
        n = float(p.metrics.get("n", p.num_examples))
        rows = self.announced_rows(msg.site)
        if rows is None or max(n, p.num_examples) > rows:
            raise Rejected("num_examples_bound", f"evaluation result from {msg.site} counts {max(n, p.num_examples):g} "
                           f"rows but its SiteHello announced {rows} rows of dataset {self.dataset!r}")
        self.check_counts(msg, rows)

    def announced_rows(self, site: str) -> int | None:
        """Rows the site's SiteHello announced for the run's dataset (pinned for this run), ≤ 2^63−1."""
        if site in self._announced:
            return self._announced[site]
        s = self.store.site(site)
        if s is not None and s["hello"] is None and self._wait_hello is not None:
            self._wait_hello(site, self.hello_wait_s)
            s = self.store.site(site)
        datasets = ((s or {}).get("hello") or {}).get("datasets") or []
        named = [d for d in datasets if d.get("name") == self.dataset] if self.dataset else datasets
        counts = [d.get("train_rows", d.get("rows")) for d in named]
        counts = [c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c >= 0]
        if not counts:
            return None  # not pinned: a later hello may still announce the dataset
        self._announced[site] = min(max(counts), INT64_MAX)
        return self._announced[site]

    def _accept_row(self, msg: Message, *, staleness: int | None = None, split: str | None = None) -> UpdateRow:
        env, p, opened = msg.env, msg.payload, msg.opened
        eps, delta = getattr(p, "epsilon", None), getattr(p, "delta", None)
        for name, v in (("epsilon", eps), ("delta", delta)):
            if v is not None and not math.isfinite(v):
                raise Rejected("bad_privacy", f"{env.type} from {env.sender} reports {name}={v}; must be finite")
        body_path = None
        if self.store_bodies:
            # Named by the body's sha256 (64 hex digits): never by anything the sender chose. Hashed
            # once, by open_frame: hashing it again here cost 0.25 s per update at 100 M parameters.
            path = self.store.run_dir(self.run_id) / "bodies" / f"{opened.body_sha256}.body"
            self.bodies.store(path, opened.body)  # durable by the commit that records it (bodies.py)
            body_path = str(path.relative_to(self.store.dir))
        return UpdateRow(
            run_id=self.run_id, round=env.round, message_id=env.message_id, site=env.sender, kind=env.type,
            bytes=len(msg.delivery.body), verdict="accepted", split=split, body_sha256=opened.body_sha256,
            frame_sha256=opened.frame_sha256, signature=bytes(opened.signature), kid=opened.kid,
            num_examples=int(getattr(p, "num_examples", 0)), base_round=int(p.base_round), staleness=staleness,
            metrics=_finite_metrics(getattr(p, "metrics", {})), epsilon=eps, delta=delta,
            body_path=body_path, task_id=getattr(p, "task_id", None),
        )


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as stored: the JSON column takes finite numbers only (NaN/inf become None)."""
    out: dict[str, Any] = {}
    for k, v in dict(metrics).items():
        out[k] = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None
    return out


def _int64(v: int) -> int | None:
    return v if isinstance(v, int) and -(2**63) <= v <= INT64_MAX else None


def _light(p: Any) -> Any:
    """What a held update keeps after aggregation: everything but the weights (their bytes are dropped)."""
    from types import SimpleNamespace

    return SimpleNamespace(metrics=dict(p.metrics), num_examples=p.num_examples, epsilon=getattr(p, "epsilon", None),
                           reproducible=bool(getattr(p, "reproducible", False)))


def _claimed(delivery: Delivery, opened: Any) -> tuple[str | None, int | None]:
    """Sender and round a message claims (for the log only; unverified when ``opened`` is None)."""
    if opened is not None:
        return opened.envelope.sender, opened.envelope.round
    try:
        from protocol.codec import decode_envelope, decode_frame

        _, _, body, _ = decode_frame(delivery.body)
        env = decode_envelope(body)
        return f"{env.sender} (unverified)", env.round
    except Exception:  # noqa: BLE001 - best effort: the message is rejected either way
        return delivery.user_id, None
