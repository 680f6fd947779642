"""Provisioned users: the broker itself enforces what a site may read, write and declare."""

from __future__ import annotations

import json
import stat
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions as px
import pytest
from typer.testing import CliRunner

from protocol.transport import BusPermissionError, PublishError, Topology, open_bus
from protocol.transport.provision import (
    Credentials,
    ProvisionError,
    _Management,
    deprovision,
    provision,
    site_permissions,
    user_url,
)
from protocol.transport.topology import (
    CONTROL,
    DEAD,
    REASON_HEADER,
    TASKS,
    UPDATES,
    liveness_queue,
    site_queue,
    updates_queue,
)
from tests.conftest import unavailable
from tests.transport.conftest import Collector, ack, new_id

# Tests that create real users are marked slow: rabbitmqctl takes seconds per call.


def _management_available(url: str) -> bool:
    try:
        return _Management(f"http://{urlsplit(url).hostname}:15672", "guest", "guest").available()
    except ProvisionError:
        return False


# The same least-privilege checks run for users made through rabbitmqctl and through the
# real management HTTP API (.ci/run enables rabbitmq_management on the broker).
@pytest.fixture(scope="module", params=["rabbitmqctl", "management"])
def provisioned(request: pytest.FixtureRequest, amqp_url: str, local_broker: str) -> Iterator[tuple[Credentials, str, str, str, str]]:
    method = request.param
    if method == "management" and not _management_available(amqp_url):
        unavailable("the management API does not answer on :15672 (rabbitmq-plugins enable rabbitmq_management)")
    tag = uuid.uuid4().hex[:8]
    a, b, coord, fed = f"site-a-{tag}", f"site-b-{tag}", f"coord-{tag}", f"fed-{tag}"
    creds = provision(amqp_url, sites=[a, b], coordinator=coord, federation=fed, method=method)
    try:
        yield creds, a, b, coord, fed
    finally:
        deprovision(amqp_url, [a, b, coord], method=method)
        admin = open_bus(amqp_url)
        for q in (site_queue(a), site_queue(b), updates_queue(fed), f"fedbus.control.{fed}",
                  liveness_queue(fed)):
            admin.delete_queue(q)  # type: ignore[attr-defined]
        admin.close()


@pytest.mark.broker
@pytest.mark.slow
def test_site_user_is_confined(amqp_url: str, provisioned: tuple[Credentials, str, str, str, str]) -> None:
    creds, a, b, coord, fed = provisioned
    assert creds.method in ("rabbitmqctl", "management")
    assert set(creds.passwords) == {a, b, coord}
    site = open_bus(user_url(amqp_url, a, creds.passwords[a]))
    coordinator = open_bus(user_url(amqp_url, coord, creds.passwords[coord]))
    try:
        # Allowed: the coordinator sends a task, the site reads its own queue and replies.
        task = new_id()
        coordinator.publish(TASKS, a, b"task", message_id=task)
        tasks = Collector(ack)
        c = site.consume(site_queue(a), tasks)
        assert tasks.wait_count(1)
        c.cancel()
        assert tasks.ids() == [task] and tasks.deliveries[0].user_id == coord
        reply = new_id()
        site.publish(UPDATES, fed, b"update", message_id=reply)
        site.publish(CONTROL, fed, b"hello", message_id=new_id())
        updates = Collector(ack)
        c = coordinator.consume(updates_queue(fed), updates)
        assert updates.wait_count(1)
        c.cancel()
        assert updates.ids() == [reply]
        assert updates.deliveries[0].user_id == a  # the broker vouches: sender is site a
        copies = Collector(ack)  # the dashboard's liveness monitor, as the coordinator user, reads its copy
        c = coordinator.consume(liveness_queue(fed), copies)
        assert copies.wait_count(1)
        c.cancel()
        assert copies.deliveries[0].user_id == a

        # Refused: another site's queue, the tasks exchange, declaring anything.
        with pytest.raises(BusPermissionError, match=rf"ACCESS_REFUSED.*{site_queue(b)}|{site_queue(b)}.*ACCESS_REFUSED") as e:
            site.consume(site_queue(b), ack)
        assert repr(a) in str(e.value)  # names the user
        with pytest.raises(BusPermissionError, match="ACCESS_REFUSED"):  # nor another site's beats
            site.consume(liveness_queue(fed), ack)
        with pytest.raises(PublishError, match="ACCESS_REFUSED") as e2:
            site.publish(TASKS, b, b"forged task", message_id=new_id())
        assert isinstance(e2.value, BusPermissionError) and TASKS in str(e2.value)
        with pytest.raises(BusPermissionError, match="ACCESS_REFUSED"):
            site.declare(Topology(sites=[f"rogue-{uuid.uuid4().hex[:6]}"]))
        # The coordinator cannot read a site's tasks either, nor publish as a site,
        # but it may re-declare its topology (Coordinator.run does).
        with pytest.raises(BusPermissionError, match="ACCESS_REFUSED"):
            coordinator.consume(site_queue(a), ack)
        with pytest.raises(PublishError, match="ACCESS_REFUSED"):
            coordinator.publish(UPDATES, fed, b"fake update", message_id=new_id())
        coordinator.declare(Topology(sites=[a, b], federations=[fed]))
        # The bus still works after refusals.
        site.publish(UPDATES, fed, b"still fine", message_id=new_id())

        # A site dead-letters a bad task with its reason; the coordinator can read fedbus.dead.
        bad = new_id()
        coordinator.publish(TASKS, a, b"forged task", message_id=bad)
        rejected = Collector(lambda d: d.nack("bad_signature: not from our coordinator"))
        c = site.consume(site_queue(a), rejected)
        assert rejected.wait_count(1)
        c.cancel()
        found: list = []
        dead = Collector(lambda d: (found.append(d), d.ack()) if d.message_id == bad else None)
        c = coordinator.consume(DEAD, dead, prefetch=1000)
        assert dead.wait_for(lambda _: bool(found))
        c.cancel()
        assert found[0].headers[REASON_HEADER] == "bad_signature: not from our coordinator"
        assert found[0].headers["x-fedbus-user"] == coord and found[0].user_id == a
    finally:
        site.close()
        coordinator.close()


def _raw_publish(url: str, exchange: str, key: str, user_id: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange, key, b"forged", properties=pika.BasicProperties(user_id=user_id, delivery_mode=2))
    finally:
        if conn.is_open:
            conn.close()


@pytest.mark.broker
@pytest.mark.slow
def test_forged_user_id_is_refused_by_the_broker(amqp_url: str, provisioned: tuple[Credentials, str, str, str, str]) -> None:
    creds, a, b, coord, fed = provisioned
    url_a = user_url(amqp_url, a, creds.passwords[a])
    with pytest.raises(px.ChannelClosedByBroker) as e:
        _raw_publish(url_a, UPDATES, fed, user_id=b)  # site a pretends to be site b
    assert e.value.reply_code == 406 and "user_id" in str(e.value.reply_text)
    _raw_publish(url_a, UPDATES, fed, user_id=a)  # its own name is accepted


@pytest.mark.broker
@pytest.mark.slow
def test_reprovision_is_idempotent_and_rotates(amqp_url: str, provisioned: tuple[Credentials, str, str, str, str]) -> None:
    creds, a, b, coord, fed = provisioned
    again = provision(amqp_url, sites=[b], method=creds.method)  # type: ignore[arg-type]  # site b only
    assert again.passwords[b] != creds.passwords[b]
    with pytest.raises(BusPermissionError, match="login refused by the broker"):
        open_bus(user_url(amqp_url, b, creds.passwords[b])).consume(site_queue(b), ack)
    bus = open_bus(user_url(amqp_url, b, again.passwords[b]))
    with pytest.raises(BusPermissionError, match="ACCESS_REFUSED"):
        bus.consume(site_queue(a), ack)  # permissions re-applied, still confined
    c = bus.consume(site_queue(b), ack)
    c.cancel()
    bus.close()


@pytest.mark.broker
@pytest.mark.slow
def test_cli_writes_credentials_0600(amqp_url: str, local_broker: str, tmp_path: Any) -> None:
    from fedbus.cli import app

    site = f"site-cli-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "creds.json"
    try:
        r = CliRunner().invoke(app, ["broker", "provision", "--broker", amqp_url, "--site", site, "--out", str(out),
                                     "--method", "rabbitmqctl"])
        assert r.exit_code == 0, r.output
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        doc = json.loads(out.read_text())
        assert doc["method"] == "rabbitmqctl" and doc["users"][site]["role"] == "site"
        bus = open_bus(doc["users"][site]["url"])
        bus.consume(site_queue(site), ack).cancel()
        bus.close()
    finally:
        deprovision(amqp_url, [site])
        admin = open_bus(amqp_url)
        admin.delete_queue(site_queue(site))  # type: ignore[attr-defined]
        admin.close()


def test_cli_bad_input_exit_2() -> None:
    from fedbus.cli import app

    r = CliRunner().invoke(app, ["broker", "provision", "--broker", "amqp://x@127.0.0.1/", "--site", "bad id!"])
    assert r.exit_code == 2 and "not a valid name" in r.output
    r = CliRunner().invoke(app, ["broker", "provision", "--broker", "memory://", "--site", "s1"])
    assert r.exit_code == 2 and "amqp://" in r.output
    with pytest.raises(ProvisionError, match="needs --federation"):
        provision("amqp://g:g@127.0.0.1/", sites=[], coordinator="c")


class _FakeManagement(BaseHTTPRequestHandler):
    calls: list[tuple[str, str, Any, str]] = []

    def _reply(self, code: int, body: bytes = b"{}") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.calls.append((self.command, self.path, body, self.headers.get("Authorization", "")))
        return body

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        if self.path == "/api/overview":
            self._reply(200)
        else:
            self._reply(404)

    def do_PUT(self) -> None:  # noqa: N802
        self._record()
        self._reply(201)

    def log_message(self, *args: Any) -> None:
        pass


def test_management_api_requests() -> None:
    """Without a management-enabled broker, check the HTTP calls against a fake API."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeManagement)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        api = _Management(f"http://127.0.0.1:{server.server_address[1]}", "admin", "s3cret")
        assert api.available()
        api.put_user("site-1", "pw1", existed=True)
        api.put_user("site-2", "pw2", existed=False)
        api.set_permissions("/", "site-2", site_permissions("site-2"))
    finally:
        server.shutdown()
    puts = [(p, b) for verb, p, b, _ in _FakeManagement.calls if verb == "PUT"]
    assert ("/api/users/site-1", {"password": "pw1", "tags": ""}) in puts
    assert puts[-1] == (
        "/api/permissions/%2F/site-2",
        {"configure": "^$", "write": r"^(fedbus\.updates|fedbus\.control|fedbus\.dlx)$", "read": r"^(fedbus\.site\.site\-2)$"},
    )
    assert all(auth.startswith("Basic ") for *_, auth in _FakeManagement.calls)
