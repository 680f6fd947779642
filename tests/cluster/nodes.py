"""Extra RabbitMQ nodes on this machine for tests: a TLS node, a three-node cluster.

Each node has its own name (``<name>@localhost``), ports, data, log and config under a
temporary folder owned by the ``rabbitmq`` user, and runs as that user so its Erlang
cookie is the one ``rabbitmqctl`` uses. Nodes are stopped by the OS pid in their own
pid file, never by name: the shared default node at 5672 is never touched.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def missing_prerequisite() -> str | None:
    """Why extra nodes cannot run here, or None."""
    if not Path(SERVER).exists() or not shutil.which("rabbitmqctl"):
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "no 'rabbitmq' system user"
    if os.geteuid() != 0:
        return "starting extra RabbitMQ nodes as the rabbitmq user needs root"
    if not shutil.which("runuser"):
        return "runuser is missing"
    return None


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_taken: set[int] = set()


def free_port() -> int:
    """A free listening port *below* the kernel's ephemeral range. A node keeps its ports
    across a kill -9 and restart; an ephemeral port freed by the kill can meanwhile become the
    local end of any client's outbound connection (every fedbus client reconnects just then),
    and the restarted node could not listen on it again."""
    floor = _ephemeral_floor()
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(max(1024, floor - 12000), floor)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError(f"no free port below the ephemeral range ({floor})")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def make_root(prefix: str) -> Path:
    """A temporary folder the rabbitmq user owns (pytest's tmp dirs are root-only)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    chown_rabbitmq(root)
    os.chmod(root, 0o755)
    return root


def chown_rabbitmq(path: Path) -> None:
    pw = pwd.getpwnam("rabbitmq")
    for p in [path, *path.rglob("*")]:
        os.chown(p, pw.pw_uid, pw.pw_gid)


class RabbitNode:
    """One RabbitMQ node with its own everything; ``conf`` is its rabbitmq.conf text."""

    def __init__(self, root: Path, name: str, conf: str, *, port: int, plugins: tuple[str, ...] = ()) -> None:
        self.name = name
        self.node = f"{name}@localhost"
        self.port = port
        self.dist_port = free_port()
        self.home = root / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.conf_file = self.home / "rabbitmq.conf"
        self.conf_file.write_text(conf)
        (self.home / "enabled_plugins").write_text("[" + ",".join(plugins) + "].\n")
        (self.home / "rabbitmq-env.conf").write_text("")
        self.pid_file = self.home / "node.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        chown_rabbitmq(self.home)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME="/var/lib/rabbitmq",  # the rabbitmq user's cookie: rabbitmqctl's too
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.home / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.home / "log"),
            RABBITMQ_CONFIG_FILE=str(self.conf_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.home / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.home / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +A 4",  # two shared cores: one scheduler each
        )
        return env

    def start(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        out = open(self.home / "stdout.log", "ab")  # noqa: SIM115 - lives as long as the node
        self.proc = subprocess.Popen(
            ["runuser", "-u", "rabbitmq", "--", SERVER], env=self.env(), stdout=out, stderr=subprocess.STDOUT,
            cwd=str(self.home), start_new_session=True,
        )
        out.close()

    def ctl(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        r = subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "HOME": "/var/lib/rabbitmq"})
        if check and r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.node} {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node} exited ({self.proc.returncode}); the end of its stdout.log:\n"
                                   + self.stdout_tail())
            try:
                self.ctl("await_startup", timeout=max(5.0, deadline - time.monotonic()), check=True)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                threading.Event().wait(1.0)

    def stdout_tail(self, chars: int = 2000) -> str:
        try:
            return (self.home / "stdout.log").read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(unreadable: {e})"

    def os_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill9(self) -> None:
        """kill -9 of this node's Erlang VM (by its own pid file)."""
        pid = self.os_pid()
        if pid is None:
            raise RuntimeError(f"{self.node} has no pid file")
        os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while port_open(self.port) and time.monotonic() < deadline:
            threading.Event().wait(0.1)

    def stop(self) -> None:
        pid = self.os_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pid = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(timeout=30)


def start_all(nodes: list[RabbitNode]) -> None:
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()
