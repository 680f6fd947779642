"""What a coordinator command that talks to a live federation takes: ``coordinator run`` and
``coordinator cohort`` share these options, how a kit's ``coordinator.toml`` fills them, the
coordinator key, the one-coordinator-per-federation lock and the bus (one place for each).

Every refusal goes through the caller's ``on_error(message, code)`` (``coordinator run --json``
still prints its document when it fails), one line, exit 2 for bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

from fedbus.cli_common import broker_url

if TYPE_CHECKING:
    from fedbus.coordinator_lock import FederationLock
    from protocol.signing import Signer
    from protocol.transport.base import Bus

OnError = Callable[[str, int], NoReturn]

CONFIG = typer.Option(None, "--config", help="A kit's coordinator.toml (broker, key, state, federation).")
BROKER = typer.Option(None, "--broker", help="memory://NAME or amqp://user[:pass]@host:5672/vhost")
STATE = typer.Option(None, "--state", help="Coordinator state directory (SQLite, checkpoints, log).")
KEY = typer.Option(None, "--key", help="Coordinator private key (the sites hold its .pub).")
FEDERATION = typer.Option(None, "--federation",
                          help="Federation name, as in the sites' site.toml (queues fedbus.updates.<F>).")

NO_KEY = (
    "no coordinator key: pass --key FILE (a kit's coordinator/coordinator.key from `fedbus provision`, or "
    "--config coordinator/coordinator.toml). To make one: `fedbus keys generate coordinator --out DIR`, give "
    "DIR/coordinator.pub to every site (coordinator_pub in its site.toml), then pass --key DIR/coordinator.key"
)


@dataclass(frozen=True)
class Federation:
    """Where the coordinator's federation lives: broker URL (password filled in), state, key, name, TLS."""

    broker: str
    state: Path
    key: Optional[Path]
    federation: str
    tls: dict[str, str] | None


def resolve(*, config: Optional[Path], broker: Optional[str], password_file: Optional[Path], state: Optional[Path],
            key: Optional[Path], federation: Optional[str], prog: str, on_error: OnError) -> Federation:
    """The options, a kit's ``--config`` filling what was not given; a missing one is refused by name."""
    from fedbus.kits import ProjectError, load_coordinator_config

    tls = None
    if config is not None:
        try:
            cfg = load_coordinator_config(config)
        except ProjectError as e:
            on_error(f"--config {config}: {e}", 2)
        broker = broker or cfg.broker_url
        state, key, federation, tls = state or cfg.state_dir, key or cfg.key_path, federation or cfg.federation, cfg.tls
    if broker is None:
        on_error("--broker URL is required (or --config coordinator.toml from a kit)", 2)
    if state is None:
        on_error("--state DIR is required (or --config coordinator.toml from a kit)", 2)
    if federation is None:
        on_error("--federation NAME is required: the federation the sites serve (federation = ... in their "
                 "site.toml); the coordinator's queues are fedbus.updates.<NAME>", 2)
    url = broker_url(broker, password_file, prog=prog)
    return Federation(broker=url, state=state, key=key, federation=federation, tls=tls)


def signer(fed: Federation, *, on_error: OnError) -> tuple[Signer, Path]:
    """The coordinator's key (``--key``; else ``STATE/coordinator.key`` if it was made there on purpose,
    never generated here) and where it was read."""
    from protocol.signing import Signer

    key = fed.key
    if key is None:
        if not (fed.state / "coordinator.key").exists():
            on_error(NO_KEY, 2)
        key = fed.state / "coordinator.key"  # made on purpose earlier (fedbus keys generate ... --out STATE)
    try:
        return Signer.from_file(key), key
    except (OSError, ValueError) as e:
        on_error(f"cannot load coordinator key {key}: {e}. {NO_KEY}", 2)


def lock_and_open(fed: Federation, *, what: str, on_error: OnError) -> tuple[FederationLock, Bus]:
    """The federation's lock (one coordinator at a time), then the bus; the lock is let go if the bus fails."""
    from fedbus.coordinator_lock import FederationLock, FederationLocked
    from protocol.transport import BusError, BusPermissionError, open_bus

    fed.state.mkdir(parents=True, exist_ok=True)
    lock = FederationLock(fed.state, fed.federation)
    try:
        lock.acquire(state=str(fed.state.resolve()), experiment=what)
    except FederationLocked as e:
        on_error(str(e), 2)
    try:
        bus = open_bus(fed.broker, tls=fed.tls) if fed.tls else open_bus(fed.broker)
    except (BusError, ValueError, OSError) as e:
        lock.release()
        on_error(f"cannot open broker: {e}", 2 if isinstance(e, (BusPermissionError, ValueError)) else 1)
    return lock, bus
