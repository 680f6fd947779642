"""Fault injection around the production site worker, by wrapping its bus.

The simulator must test the code hospitals run, so faults never fork the site worker:
``FaultyBus`` sits between an unmodified ``SiteWorker`` and its real bus and

* **dropout** ``dropout:P`` - each round, each site misses its task with
  probability P (the task is taken off its queue and never answered);
* **straggler** ``straggler:SITE:SECONDS`` | ``straggler:SITE:exp:MEAN`` |
  ``straggler:SITE:uniform:LO:HI`` - the site starts each task late by a delay drawn
  from the distribution (``SITE`` may be ``*``);
* **crash** ``crash:SITE@ROUND`` - the site dies on receiving its task of ROUND, the
  task unacknowledged (in memory: its consumer is cancelled; as a process: SIGKILL);
* **crash after upload** ``crash-after-upload:SITE@ROUND`` - the site dies (SIGKILL as a
  process) right after it published its update of ROUND: under secure aggregation its masked
  update counts, and it never answers the unmask request;
* **byzantine** ``byzantine:SITE:flip[:K]`` | ``byzantine:SITE:scale[:K]`` - every
  update the site sends is replaced by ``base - K * delta`` (flip, K = 10 by default)
  or ``base + K * delta`` (scale, K = 10), re-signed with the site's own key: a
  compromised hospital, not a forger.

Items are separated by ``,`` or ``;``. Every random draw is seeded by
``(run seed, round, site)``, so faulty runs are reproducible.
"""

from __future__ import annotations

import dataclasses
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from protocol.transport.base import Bus, Consumer, Delivery, Handler, Topology
from protocol.transport.topology import UPDATES

log = structlog.get_logger(__name__)


class FaultSpecError(ValueError):
    """A ``--faults`` item that cannot be parsed; the message shows the accepted forms."""


_FORMS = (
    "dropout:P | straggler:SITE:SECONDS | straggler:SITE:exp:MEAN | straggler:SITE:uniform:LO:HI | "
    "crash:SITE@ROUND | crash-after-upload:SITE@ROUND | byzantine:SITE:flip[:K] | byzantine:SITE:scale[:K]"
)


@dataclass(frozen=True)
class Straggler:
    site: str  # "*" = every site
    dist: str  # "fixed" | "exp" | "uniform"
    a: float
    b: float = 0.0

    def delay(self, rng: np.random.Generator) -> float:
        if self.dist == "exp":
            return float(rng.exponential(self.a))
        if self.dist == "uniform":
            return float(rng.uniform(self.a, self.b))
        return self.a


@dataclass(frozen=True)
class Byzantine:
    site: str
    mode: str  # "flip" | "scale"
    factor: float = 10.0


@dataclass(frozen=True)
class FaultPlan:
    """Parsed ``--faults``; ``for_site`` narrows it to what one site needs."""

    dropout: float = 0.0
    stragglers: tuple[Straggler, ...] = ()
    crashes: dict[str, int] = field(default_factory=dict)
    byzantine: tuple[Byzantine, ...] = ()
    seed: int = 0
    upload_crashes: dict[str, int] = field(default_factory=dict)  # crash-after-upload:SITE@ROUND

    @property
    def empty(self) -> bool:
        return not (self.dropout or self.stragglers or self.crashes or self.byzantine or self.upload_crashes)

    def sites_named(self) -> set[str]:
        named = ({s.site for s in self.stragglers} | set(self.crashes) | {b.site for b in self.byzantine}
                 | set(self.upload_crashes))
        return named - {"*"}

    def straggler_for(self, site: str) -> Straggler | None:
        for s in self.stragglers:
            if s.site in (site, "*"):
                return s
        return None

    def byzantine_for(self, site: str) -> Byzantine | None:
        for b in self.byzantine:
            if b.site == site:
                return b
        return None

    def affects(self, site: str) -> bool:
        return bool(self.dropout or self.straggler_for(site) or site in self.crashes or self.byzantine_for(site)
                    or site in self.upload_crashes)

    def rng(self, round_: int, site: str, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, round_, zlib.crc32(site.encode()), salt])

    def drops(self, round_: int, site: str, attempt: int = 0) -> bool:
        """Whether ``site`` misses its ``attempt``-th task of ``round_`` (a retried round draws again)."""
        return bool(self.dropout) and float(self.rng(round_, site, 1000 + attempt).random()) < self.dropout

    def to_json(self) -> dict[str, Any]:
        return {
            "dropout": self.dropout,
            "stragglers": [dataclasses.asdict(s) for s in self.stragglers],
            "crashes": dict(self.crashes),
            "byzantine": [dataclasses.asdict(b) for b in self.byzantine],
            "seed": self.seed,
            "upload_crashes": dict(self.upload_crashes),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FaultPlan:
        return cls(
            dropout=float(d.get("dropout", 0.0)),
            stragglers=tuple(Straggler(**s) for s in d.get("stragglers", ())),
            crashes={str(k): int(v) for k, v in (d.get("crashes") or {}).items()},
            byzantine=tuple(Byzantine(**b) for b in d.get("byzantine", ())),
            seed=int(d.get("seed", 0)),
            upload_crashes={str(k): int(v) for k, v in (d.get("upload_crashes") or {}).items()},
        )


def parse_faults(spec: str | None, *, seed: int = 0) -> FaultPlan:
    """Parse the ``--faults`` string (see the module docstring)."""
    if not spec or not spec.strip():
        return FaultPlan(seed=seed)
    dropout = 0.0
    stragglers: list[Straggler] = []
    crashes: dict[str, int] = {}
    upload_crashes: dict[str, int] = {}
    byz: list[Byzantine] = []
    for item in (p.strip() for p in spec.replace(";", ",").split(",")):
        if not item:
            continue
        kind, _, rest = item.partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind == "dropout" and len(parts) == 1:
                dropout = float(parts[0])
                if not 0.0 <= dropout < 1.0:
                    raise FaultSpecError(f"--faults {item!r}: P must be in [0, 1)")
            elif kind == "straggler" and len(parts) == 2:
                stragglers.append(Straggler(parts[0], "fixed", _nonneg(parts[1], item)))
            elif kind == "straggler" and len(parts) == 3 and parts[1] == "exp":
                stragglers.append(Straggler(parts[0], "exp", _nonneg(parts[2], item)))
            elif kind == "straggler" and len(parts) == 4 and parts[1] == "uniform":
                lo, hi = _nonneg(parts[2], item), _nonneg(parts[3], item)
                if hi < lo:
                    raise FaultSpecError(f"--faults {item!r}: uniform needs LO <= HI")
                stragglers.append(Straggler(parts[0], "uniform", lo, hi))
            elif kind == "crash" and len(parts) == 1 and "@" in parts[0]:
                site, _, rnd = parts[0].partition("@")
                crashes[site] = int(rnd)
                if crashes[site] < 1:
                    raise FaultSpecError(f"--faults {item!r}: ROUND must be >= 1")
            elif kind == "crash-after-upload" and len(parts) == 1 and "@" in parts[0]:
                site, _, rnd = parts[0].partition("@")
                upload_crashes[site] = int(rnd)
                if upload_crashes[site] < 1:
                    raise FaultSpecError(f"--faults {item!r}: ROUND must be >= 1")
            elif kind == "byzantine" and len(parts) in (2, 3) and parts[1] in ("flip", "scale"):
                factor = float(parts[2]) if len(parts) == 3 else 10.0
                byz.append(Byzantine(parts[0], parts[1], factor))
            else:
                raise FaultSpecError(f"--faults {item!r}: not understood; use {_FORMS}")
        except ValueError as e:
            if isinstance(e, FaultSpecError):
                raise
            raise FaultSpecError(f"--faults {item!r}: {e}; use {_FORMS}") from None
    return FaultPlan(dropout=dropout, stragglers=tuple(stragglers), crashes=crashes, byzantine=tuple(byz), seed=seed,
                     upload_crashes=upload_crashes)


def _nonneg(text: str, item: str) -> float:
    v = float(text)
    if v < 0:
        raise FaultSpecError(f"--faults {item!r}: delays must be >= 0")
    return v


# ------------------------------------------------------------------------- the wrapper


@dataclass
class FaultLog:
    """What was injected, for the report (thread-safe appends)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **event: Any) -> None:
        # One structured log line per fault: a site process's faults are read back from its log.
        log.warning("fault_injected", **event)
        with self.lock:
            self.events.append(event)


class _WrappedConsumer(Consumer):
    def __init__(self) -> None:
        self.inner: Consumer | None = None

    def cancel(self) -> None:
        if self.inner is not None:
            self.inner.cancel()


class FaultyBus(Bus):
    """A site's bus with faults injected (see module docstring); everything else passes through.

    ``signer`` is the site's own key (to re-sign Byzantine updates); ``trust`` holds the
    coordinator key, used to read incoming tasks. ``on_crash`` is what "die" means for this
    site (cancel its consumer in memory mode, SIGKILL a site process).
    """

    def __init__(
        self,
        inner: Bus,
        *,
        site_id: str,
        plan: FaultPlan,
        signer: Any,
        trust: Any,
        stop: threading.Event | None = None,
        on_crash: Callable[[], None] | None = None,
        fault_log: FaultLog | None = None,
    ) -> None:
        self.inner = inner
        self.site_id = site_id
        self.plan = plan
        self.signer = signer
        self.trust = trust
        self.stop = stop or threading.Event()
        self.on_crash = on_crash
        self.fault_log = fault_log or FaultLog()
        self.crashed = False
        self._bases: dict[str, tuple[tuple[str, np.ndarray], ...]] = {}  # task id -> weights it carried
        self._consumers: list[_WrappedConsumer] = []
        self._attempts: dict[int, int] = {}  # round -> TrainTasks seen (retries draw dropout afresh)

    # -- pass-through -------------------------------------------------------------------
    def declare(self, topology: Topology) -> None:
        self.inner.declare(topology)

    def close(self) -> None:
        self.stop.set()
        self.inner.close()

    # -- tasks in ---------------------------------------------------------------------------
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 1) -> Consumer:
        wrapper = _WrappedConsumer()

        def faulty(delivery: Delivery) -> None:
            env = self._peek(delivery.body)
            if env is None or env.type not in ("TrainTask", "EvalTask") or self.crashed:
                if self.crashed:
                    return  # a dead site does nothing; the message stays unacked
                handler(delivery)
                return
            rnd = int(env.round)
            crash_round = self.plan.crashes.get(self.site_id)
            if env.type == "TrainTask" and crash_round is not None and rnd >= crash_round:
                self.crashed = True
                self.fault_log.add(kind="crash", site=self.site_id, round=rnd)
                self._crash(wrapper)
                return
            attempt = self._attempts.get(rnd, 0)
            if env.type == "TrainTask":
                self._attempts[rnd] = attempt + 1
            if env.type == "TrainTask" and self.plan.drops(rnd, self.site_id, attempt):
                self.fault_log.add(kind="dropout", site=self.site_id, round=rnd)
                delivery.ack()
                return
            straggler = self.plan.straggler_for(self.site_id)
            if straggler is not None and env.type == "TrainTask":
                delay = straggler.delay(self.plan.rng(rnd, self.site_id, 2))
                self.fault_log.add(kind="straggler", site=self.site_id, round=rnd, delay_s=round(delay, 3))
                if self.stop.wait(delay):
                    return  # shutting down: leave the task unacked, as a stopped worker would
            if env.type == "TrainTask" and self.plan.byzantine_for(self.site_id) is not None:
                self._bases[env.message_id] = tuple(env.payload.weights)
            handler(delivery)

        wrapper.inner = self.inner.consume(queue, faulty, prefetch=prefetch)
        self._consumers.append(wrapper)
        return wrapper

    def _crash(self, consumer: _WrappedConsumer) -> None:
        if self.on_crash is not None:
            self.on_crash()
            return
        # Cancel from another thread: a consumer cannot join its own dispatch thread.
        threading.Thread(target=consumer.cancel, name=f"crash-{self.site_id}", daemon=True).start()

    def _peek(self, body: bytes | memoryview) -> Any:
        """The envelope of an incoming frame, verified against the coordinator key; None if unreadable."""
        from protocol.codec import open_frame

        try:
            return open_frame(body, self.trust).envelope
        except Exception:  # noqa: BLE001 - the site worker itself rejects bad frames with a reason
            return None

    # -- replies out ------------------------------------------------------------------------
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        byz = self.plan.byzantine_for(self.site_id)
        if byz is not None and exchange == UPDATES:
            body = self._poison(body, byz)
        if self.crashed:
            return  # a dead site says nothing more
        self.inner.publish(exchange, routing_key, body, message_id=message_id, headers=headers)
        after = self.plan.upload_crashes.get(self.site_id)
        if after is not None and exchange == UPDATES:
            env = self._peek_reply(body)
            if env is not None and env.type in ("Update", "MaskedUpdate") and int(env.round) >= after:
                self.crashed = True  # the update is out; the site dies before anything else
                self.fault_log.add(kind="crash-after-upload", site=self.site_id, round=int(env.round))
                for consumer in self._consumers:
                    self._crash(consumer)

    def _peek_reply(self, body: bytes) -> Any:
        from protocol.codec import decode_envelope, decode_frame

        try:
            return decode_envelope(decode_frame(body, limits=_limits())[2], limits=_limits())
        except Exception:  # noqa: BLE001 - our own site's frame; unreadable means not an update
            return None

    def _poison(self, body: bytes, byz: Byzantine) -> bytes:
        from protocol.codec import decode_envelope, decode_frame, seal

        _, _, env_body, _ = decode_frame(body, limits=_limits())
        env = decode_envelope(env_body, limits=_limits())
        if env.type != "Update":
            return body
        update = env.payload
        base = self._bases.pop(update.task_id, None)
        if base is None:
            return body
        sign = -1.0 if byz.mode == "flip" else 1.0
        weights = tuple(
            (name, (b + sign * byz.factor * (np.asarray(w, dtype=np.float64) - b)).astype(np.asarray(w).dtype))
            for (name, w), (_, b) in zip(update.weights, ((n, np.asarray(a, dtype=np.float64)) for n, a in base))
        )
        poisoned = dataclasses.replace(env, payload=dataclasses.replace(update, weights=weights))
        self.fault_log.add(kind="byzantine", site=self.site_id, round=int(env.round), mode=byz.mode, factor=byz.factor)
        return seal(poisoned, self.signer)


def _limits() -> Any:
    from protocol.limits import DEFAULT_LIMITS

    return DEFAULT_LIMITS
