"""Running the dashboard: in the foreground (``coordinator serve``) or on a thread (``simulate --serve``, tests)."""

from __future__ import annotations

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


def build(opts: ServeOptions):
    """(app, access) for ``opts``; refuses to listen beyond localhost without a token."""
    token = read_token(opts.token_file) if opts.token_file is not None else None
    loopback = is_loopback(opts.host)
    if not loopback and token is None:
        raise ServeError(f"--host {opts.host} listens beyond localhost: give --token FILE (a file holding a secret "
                         "token) so that only people who have it can read the dashboard")
    if opts.key is not None and not opts.key.exists():
        raise ServeError(f"--key {opts.key} does not exist")
    access = Access(token=token, allow_actions=opts.allow_actions, loopback_only=loopback)
    app = create_app(opts.state, access=access, key=opts.key, broker=opts.broker, federation=opts.federation,
                     poll_s=opts.poll_s)
    return app, access


def url_of(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/runs" + (f"?token={token}" if token else "")


class BackgroundServer:
    """uvicorn on a daemon thread; ``start()`` returns once it accepts connections."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.app, self.access = build(opts)
        config = uvicorn.Config(self.app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                                ws="none", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fedbus-dashboard", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServeError(f"the dashboard could not listen on {self.opts.host}:{self.opts.port} (port in use?)")
            if time.monotonic() > deadline:
                raise ServeError(f"the dashboard did not start within {timeout_s:.0f} s")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        for s in self.server.servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.opts.port

    @property
    def url(self) -> str:
        return url_of(self.opts.host, self.port, self.access.token)

    @property
    def base(self) -> str:
        shown = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return f"http://{shown}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve_forever(opts: ServeOptions, *, announce) -> None:
    """Serve in the foreground until Ctrl-C; ``announce(url)`` is told the address first."""
    app, access = build(opts)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False, ws="none",
                            lifespan="off")
    server = uvicorn.Server(config)
    announce(url_of(opts.host, opts.port, access.token))
    server.run()
