"""Running the dashboard: in the foreground (``coordinator serve``) or on a thread (``simulate --serve``, tests)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fedbus.dashboard.app import create_app
from fedbus.dashboard.security import Access, is_loopback, read_token


class ServeError(ValueError):
    """Bad ``serve`` options (exit 2); the message says which and how to fix it."""


@dataclass
class ServeOptions:
    state: Path
    host: str = "127.0.0.1"
    port: int = 8765
    token_file: Path | None = None
    allow_actions: bool = False
    key: Path | None = None
    broker: str | None = None
    federation: str | None = None
    poll_s: float = 2.0
    tls_cert: Path | None = None  # PEM certificate (chain) served over HTTPS
    tls_key: Path | None = None
    port_option: str = "--port"  # how the command that serves names its port (simulate: --serve-port)
    users_file: Path | None = None  # named users with roles (fedbus/dashboard/users.py)
    simulate_out: Path | None = None  # ``simulate --serve``: started experiments are simulated into this OUT
    mlflow: str | None = None  # MLflow tracking URI: "Mark valid" registers there too, started runs log there
    liveness: bool = False  # with a broker: watch heartbeats between runs (fedbus/dashboard/liveness.py)
    liveness_tick_s: float = 2.0


def check_port(opts: ServeOptions) -> None:
    """The address is free to listen on (else ServeError naming the option), checked before
    uvicorn, which would print its own error and exit with no word about the option."""
    if opts.port == 0:
        return
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((opts.host, opts.port))
        except OSError as e:
            raise ServeError(f"{opts.port_option} {opts.port}: cannot listen on {opts.host}:{opts.port} "
                             f"({e.strerror or e}); give another port with {opts.port_option} PORT "
                             f"({opts.port_option} 0 picks a free one)") from None


def check_tls(opts: ServeOptions) -> bool:
    """Whether to serve HTTPS; the certificate and key must load together (else ServeError)."""
    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ServeError("--tls-cert and --tls-key go together: give the server certificate (PEM) and its private key")
    if opts.tls_cert is None:
        return False
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(opts.tls_cert, opts.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ServeError(f"--tls-cert {opts.tls_cert} / --tls-key {opts.tls_key}: cannot load them "
                         f"({getattr(e, 'strerror', None) or e}); does the key belong to the certificate? "
                         "(issue one with `fedbus certs issue NAME --server-name HOST`)") from None
    return True


def build(opts: ServeOptions):
    """(app, access) for ``opts``; refuses to listen beyond localhost without a token and TLS
    (the token, the cookie and every page would otherwise cross the network in clear)."""
    tls = check_tls(opts)
    loopback = is_loopback(opts.host)
    if not loopback and not tls:
        raise ServeError(f"--host {opts.host} listens beyond localhost: give --tls-cert FILE and --tls-key FILE "
                         "(HTTPS) so that the token and the pages are not sent in clear, and --token FILE")
    token = read_token(opts.token_file) if opts.token_file is not None else None
    users = None
    if opts.users_file is not None:
        from fedbus.dashboard.users import UsersError, UsersFile

        users = UsersFile(opts.users_file)
        try:
            known = users.load()
        except UsersError as e:
            raise ServeError(f"--users {opts.users_file}: {e}") from None
        if not known:
            raise ServeError(f"--users {opts.users_file}: no users yet; add one with "
                             f"`fedbus coordinator users add NAME --role admin --file {opts.users_file}`")
    if not loopback and token is None and users is None:
        raise ServeError(f"--host {opts.host} listens beyond localhost: give --users FILE (named users) or --token FILE "
                         "(a file holding a secret token) so that only people you chose can read the dashboard")
    if opts.key is not None and not opts.key.exists():
        raise ServeError(f"--key {opts.key} does not exist")
    if opts.mlflow is not None:
        from coordinator.tracking import TrackingError, check_uri

        try:
            check_uri(opts.mlflow)
        except TrackingError as e:
            raise ServeError(str(e)) from None
    check_port(opts)
    access = Access(token=token, allow_actions=opts.allow_actions, loopback_only=loopback, tls=tls, users=users)
    app = create_app(opts.state, access=access, key=opts.key, broker=opts.broker, federation=opts.federation,
                     poll_s=opts.poll_s, simulate_out=opts.simulate_out, mlflow=opts.mlflow)
    return app, access


def base_of(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def url_of(host: str, port: int, access: Access) -> str:
    """Where to open the dashboard: the sign-in page when a token is needed (the token
    itself never goes in a URL)."""
    return base_of(host, port, access.tls) + ("/login" if access.sign_in_required else "/runs")


def uvicorn_config(app, opts: ServeOptions, tls: bool) -> uvicorn.Config:
    extra = {"ssl_certfile": str(opts.tls_cert), "ssl_keyfile": str(opts.tls_key)} if tls else {}
    return uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False, ws="none",
                          lifespan="off", **extra)


def monitor_of(opts: ServeOptions):
    """The liveness monitor this dashboard runs (``coordinator serve --broker``), or None."""
    if not (opts.liveness and opts.broker):
        return None
    from fedbus.dashboard.liveness import start_monitor

    return start_monitor(opts.state, opts.broker, opts.federation, tick_s=opts.liveness_tick_s)


class BackgroundServer:
    """uvicorn on a daemon thread; ``start()`` returns once it accepts connections."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.app, self.access = build(opts)
        self.server = uvicorn.Server(uvicorn_config(self.app, opts, self.access.tls))
        self.thread = threading.Thread(target=self.server.run, name="fedbus-dashboard", daemon=True)
        self.monitor = None

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServeError(f"{self.opts.port_option} {self.opts.port}: the dashboard could not listen on "
                                 f"{self.opts.host}:{self.opts.port}; give another port with {self.opts.port_option} PORT")
            if time.monotonic() > deadline:
                raise ServeError(f"the dashboard did not start within {timeout_s:.0f} s")
            time.sleep(0.02)
        self.monitor = monitor_of(self.opts)
        return self

    @property
    def port(self) -> int:
        for s in self.server.servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.opts.port

    @property
    def url(self) -> str:
        return url_of(self.opts.host, self.port, self.access)

    @property
    def base(self) -> str:
        return base_of(self.opts.host, self.port, self.access.tls)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve_forever(opts: ServeOptions, *, announce) -> None:
    """Serve in the foreground until Ctrl-C; ``announce(url)`` is told the address first."""
    app, access = build(opts)
    server = uvicorn.Server(uvicorn_config(app, opts, access.tls))
    announce(url_of(opts.host, opts.port, access))
    monitor = monitor_of(opts)
    try:
        server.run()
    finally:
        if monitor is not None:
            monitor.stop()
