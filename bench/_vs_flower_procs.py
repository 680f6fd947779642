"""Process plumbing for bench/vs_flower.py: spawn with a log, sample memory, count bytes, clean up.

Kept apart from the job (``_vs_flower_common``, copied into the Flower app) and from the
systems (``vs_flower``, ``_vs_flower_fedbus``), which all use it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from _vs_flower_common import BenchError


def spawn(cmd: Sequence[str], *, log: Path, **kwargs) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr into ``log`` (the parent's copy of the file is closed)."""
    with open(log, "wb") as out:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, **kwargs)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TreeSampler(threading.Thread):
    """Samples the summed RSS of some root processes and all their descendants.

    Also remembers every descendant it saw, so teardown can end detached grandchildren
    (Flower's SuperExec starts in its own session) that this bench started indirectly.
    """

    def __init__(self, roots: Sequence[int], *, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.roots = [psutil.Process(pid) for pid in roots]
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.seen: dict[int, float] = {}
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        total = 0
        for root in self.roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    total += p.memory_info().rss
                    self.seen.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
        self.peak_bytes = max(self.peak_bytes, total)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._sample()
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak_bytes / 2**20


class ProcessSampler(TreeSampler):
    """Peak RSS of one process only (not its children)."""

    def _sample(self) -> None:
        for root in self.roots:
            try:
                self.peak_bytes = max(self.peak_bytes, root.memory_info().rss)
            except psutil.Error:
                pass


def end_processes(procs: Sequence[subprocess.Popen], seen: dict[int, float] | None = None,
                  *, grace_s: float = 10.0) -> None:
    """Terminate what this bench started (and the descendants it saw), then kill leftovers."""
    targets: list[psutil.Process] = []
    for proc in procs:
        try:
            p = psutil.Process(proc.pid)
            targets.append(p)
            targets.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    for pid, created in (seen or {}).items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:  # the very process we saw, not a reused pid
                targets.append(p)
        except psutil.Error:
            pass
    unique = {p.pid: p for p in targets}
    for p in unique.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(unique.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str,
               interval_s: float = 0.2, alive: Sequence[subprocess.Popen] = ()) -> None:
    """Poll ``predicate``; fail naming ``what`` on timeout or when a watched process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in alive:
            if proc.poll() is not None:
                raise BenchError(f"{what}: process {proc.args[0] if isinstance(proc.args, list) else proc.args} "
                                 f"exited with code {proc.returncode}")
        time.sleep(interval_s)
    raise BenchError(f"{what}: not done after {timeout_s:.0f} s")


# --------------------------------------------------------------------- counting TCP proxy


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts payload bytes per direction and per client class.

    ``classify(peer_port)`` names the client (e.g. "site" or "hub") from the port the client
    connected from; it runs once per connection, before relaying starts.
    """

    def __init__(self, target_port: int, *, classify: Callable[[int], str] | None = None) -> None:
        self.target_port = target_port
        self.classify = classify or (lambda _port: "site")
        self.port = 0
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> CountingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = fut.result(timeout=10)
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def _add(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + n

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> None:
        try:
            while data := await reader.read(1 << 16):
                self._add(key, len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except (ConnectionError, OSError, RuntimeError):
                pass

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            peer_port = client_w.get_extra_info("peername")[1]
            label = await self._loop.run_in_executor(None, self.classify, peer_port)
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_w.close()
                return
            await asyncio.gather(self._pipe(client_r, up_w, f"{label}.up"),
                                 self._pipe(up_r, client_w, f"{label}.down"))
        except asyncio.CancelledError:
            # The relay is shutting down: end quietly. A cancelled connection task makes
            # asyncio's StreamReaderProtocol log a CancelledError traceback per connection.
            client_w.close()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def total(self, label: str | None = None) -> int:
        with self._lock:
            return sum(v for k, v in self.counts.items() if label is None or k.split(".")[0] == label)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Stop listening, drop the open relays, end the loop thread."""
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        except (TimeoutError, RuntimeError):
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


def pid_of_client_port(port: int) -> int | None:
    """The local process that owns the TCP connection from 127.0.0.1:``port``."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


