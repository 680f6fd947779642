"""Root fixtures: a RabbitMQ URL for broker tests and a bus URL for conformance tests.

``amqp_url``: ``FEDBUS_AMQP_URL`` if set, else the local default broker if reachable,
else a testcontainers RabbitMQ when a Docker engine is present; otherwise the test is
skipped locally and fails under ``CI=true`` (CI promises a broker). On the local
default broker, where ``rabbitmqctl`` works, each test session gets its own throwaway
virtual host so concurrent sessions and their dead letters never mix.

``bus_url``: parametrized over ``memory`` and ``amqp`` so the same conformance tests run
against both buses.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def unavailable(message: str) -> None:
    """Skip locally; fail under CI=true, where the broker is part of the contract."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true requires it)")
    pytest.skip(message)


def _reachable(url: str, timeout: float = 1.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_RABBITMQCTL_OK: bool | None = None


def rabbitmqctl_available() -> bool:
    """Whether ``rabbitmqctl`` controls the local node.

    Asked once per session, with retries: on a loaded machine one call can time out,
    or land while another test restarts the broker app, and a single miss must not
    turn every fault test into an error.
    """
    global _RABBITMQCTL_OK
    if _RABBITMQCTL_OK is not None:
        return _RABBITMQCTL_OK
    _RABBITMQCTL_OK = False
    if not shutil.which("rabbitmqctl"):
        return False
    for _ in range(3):
        try:
            r = subprocess.run(["rabbitmqctl", "-q", "await_startup"], capture_output=True, timeout=90)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            _RABBITMQCTL_OK = True
            break
    return _RABBITMQCTL_OK


def rabbitmqctl(*args: str, check: bool = True, timeout: float = 60) -> str:
    """Run rabbitmqctl against the local node; returns stdout."""
    r = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


# ``make test``'s first phase runs the serial tests beside the tests of these folders that never
# reach a broker ("early"), one process each, so both cores work while the serial tests stop and
# start the broker. Whole folders, so a new test file lands predictably; a test in them that asks
# for a broker (a fixture or the ``broker`` mark) is not early, nor is a file in NOT_EARLY.
# Sized to last about as long as the serial tests (~4-5 minutes on 2 cores, 7 December 2026).
EARLY_DIRS = ("tests/dashboard/", "tests/protocol/", "tests/site_worker/")
NOT_EARLY: tuple[str, ...] = ()  # a file there that reaches the broker without asking for it


def uses_broker(item: pytest.Item) -> bool:
    """The test reaches a RabbitMQ broker: it asks for one (even indirectly), or is marked ``broker``."""
    return "amqp_broker_url" in getattr(item, "fixturenames", ()) or item.get_closest_marker("broker") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``serial`` the tests that act on the whole local broker node, and ``early`` those that
    can run beside them (``make test``: ``-m serial`` beside ``-m early``, then the rest on two workers).

    A test that asks for ``local_broker`` may stop the node's app, close every connection or
    change a node-wide setting, which would fail whatever broker test is in flight beside it.
    """
    for item in items:
        if "local_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.serial)
        elif not uses_broker(item):
            path = item.nodeid.split("::")[0]
            if path.startswith(EARLY_DIRS) and path not in NOT_EARLY:
                item.add_marker(pytest.mark.early)


@pytest.fixture(scope="session")
def amqp_broker_url() -> Iterator[str]:
    """The broker's base URL (default vhost), found as described in the module docstring."""
    env = os.environ.get("FEDBUS_AMQP_URL")
    if env:
        if not _reachable(env):
            unavailable(f"FEDBUS_AMQP_URL={env} is not reachable")
        yield env
        return
    if _reachable(DEFAULT_AMQP_URL):
        yield DEFAULT_AMQP_URL
        return
    if _docker_engine():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as rmq:
            host, port = rmq.get_container_host_ip(), rmq.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/%2F"
        return
    unavailable("no RabbitMQ: set FEDBUS_AMQP_URL, start one on 127.0.0.1:5672, or provide Docker")


@pytest.fixture(scope="session")
def local_broker(amqp_broker_url: str) -> str:
    """Base URL of a broker this machine controls with rabbitmqctl (for fault tests)."""
    host = urlsplit(amqp_broker_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1") or not rabbitmqctl_available():
        unavailable("this test needs rabbitmqctl for the local broker")
    return amqp_broker_url


@pytest.fixture(scope="session")
def amqp_vhost(amqp_broker_url: str) -> Iterator[str | None]:
    """A throwaway vhost on the local broker for this session (None if we cannot make one)."""
    if os.environ.get("FEDBUS_AMQP_URL") or urlsplit(amqp_broker_url).hostname not in ("127.0.0.1", "localhost"):
        yield None
        return
    vhost = f"fedbus-test-{uuid.uuid4().hex[:10]}"
    user = urlsplit(amqp_broker_url).username or "guest"
    try:
        rabbitmqctl("add_vhost", vhost)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        yield None  # no rabbitmqctl here: share the default vhost (names are unique anyway)
        return
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def amqp_url(amqp_broker_url: str, amqp_vhost: str | None) -> str:
    """URL of a reachable RabbitMQ (in a private vhost where possible)."""
    if amqp_vhost is None:
        return amqp_broker_url
    p = urlsplit(amqp_broker_url)
    return urlunsplit((p.scheme, p.netloc, "/" + quote(amqp_vhost, safe=""), p.query, ""))


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.broker)])
def bus_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A bus URL: a fresh named in-memory broker, or the test RabbitMQ."""
    if request.param == "memory":
        from protocol.transport.memory import drop_broker

        name = f"test-{uuid.uuid4().hex[:12]}"
        yield f"memory://{name}"
        drop_broker(name)
    else:
        yield request.getfixturevalue("amqp_url")
