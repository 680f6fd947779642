"""Mutual TLS for real: a RabbitMQ node with a TLS listener on a free port, certificate
login (EXTERNAL), every bad certificate refused with its own message, a federation of
three sites and a coordinator that log in by certificate, then ``audit``.

The node is started by this module (its own name, ports and directories; see
tests/cluster/nodes.py) and stopped by its own pid; the shared broker is not touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions as px
import pytest

from protocol.transport import certificates as certs
from protocol.transport import BusPermissionError, Topology, open_bus
from protocol.transport.base import BrokerRefused
from protocol.transport.endpoints import EndpointError, certificate_url
from protocol.transport.provision import deprovision, provision
from protocol.transport.topology import UPDATES, site_queue
from tests.cluster.nodes import RabbitNode, chown_rabbitmq, free_port, make_root, missing_prerequisite
from tests.conftest import unavailable
from tests.transport.conftest import Collector, ack, new_id

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class TlsBroker:
    node: RabbitNode
    root: Path
    certs: Path  # the federation CA and every issued certificate
    tls_port: int
    admin_url: str  # plain AMQP on another port, guest: declaring and provisioning only

    def base(self, host: str = "localhost") -> str:
        return f"amqps://{host}:{self.tls_port}/%2F"

    def url(self, name: str, *, ca: Path | None = None, cert_dir: Path | None = None, host: str = "localhost") -> str:
        d = cert_dir or self.certs
        return certificate_url(self.base(host), ca=ca or self.certs / "ca.pem", cert=d / f"{name}.pem", key=d / f"{name}.key")


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    why = missing_prerequisite()
    if why:
        unavailable(why)
    root = make_root("fedbus-tls-")
    cdir = root / "certs"
    certs.make_ca(cdir, federation="tls-test")
    certs.issue(cdir, "broker", server_names=["localhost"])  # not 127.0.0.1: the wrong-hostname case
    tls_port, admin_port = free_port(), free_port()
    conf = "\n".join([
        f"listeners.tcp.1 = 127.0.0.1:{admin_port}",
        f"listeners.ssl.1 = 127.0.0.1:{tls_port}",
        f"ssl_options.cacertfile = {cdir}/ca.pem",
        f"ssl_options.certfile = {cdir}/broker.pem",
        f"ssl_options.keyfile = {cdir}/broker.key",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "auth_mechanisms.1 = EXTERNAL",
        "auth_mechanisms.2 = PLAIN",
        "ssl_cert_login_from = common_name",
        "",
    ])
    chown_rabbitmq(root)
    node = RabbitNode(root, f"fedbus-tls-{uuid.uuid4().hex[:6]}", conf, port=admin_port,
                      plugins=("rabbitmq_auth_mechanism_ssl",))
    node.start()
    try:
        node.wait_ready()
        yield TlsBroker(node, root, cdir, tls_port, f"amqp://guest:guest@127.0.0.1:{admin_port}/%2F")
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def two_sites(tls_broker: TlsBroker) -> Iterator[tuple[str, str, str]]:
    """Sites a and b and a federation, provisioned for certificate login."""
    tag = uuid.uuid4().hex[:6]
    a, b, fed = f"site-a-{tag}", f"site-b-{tag}", f"fed-{tag}"
    for s in (a, b):
        certs.issue(tls_broker.certs, s)
    provision(tls_broker.admin_url, sites=[a, b], federation=fed, auth="external", method="rabbitmqctl",
              node=tls_broker.node.node)
    admin = open_bus(tls_broker.admin_url)
    admin.declare(Topology(federations=[fed]))
    admin.close()
    yield a, b, fed
    deprovision(tls_broker.admin_url, [a, b], method="rabbitmqctl", node=tls_broker.node.node)


def _refusal(url: str) -> str:
    with pytest.raises((BrokerRefused, EndpointError)) as e:
        bus = open_bus(url)
        try:
            bus.declare(Topology())
        finally:
            bus.close()
    return str(e.value)


def test_certificate_login_and_each_bad_certificate_refused(tls_broker: TlsBroker, two_sites: tuple[str, str, str]) -> None:
    a, b, fed = two_sites
    cdir = tls_broker.certs
    # Good: site a logs in by certificate; the broker vouches for it as user_id = its CN.
    bus = open_bus(tls_broker.url(a))
    assert bus.user == a  # type: ignore[attr-defined]
    bus.publish(UPDATES, fed, b"hello over TLS", message_id=new_id())
    bus.close()

    # Our CA does not know the broker (wrong CA file, or an impersonating broker).
    other = tls_broker.root / "other-ca"
    certs.make_ca(other, federation="someone-else")
    certs.issue(other, a)
    assert "not signed by our CA" in _refusal(tls_broker.url(a, ca=other / "ca.pem"))
    # The broker does not know our CA (a certificate from another federation, same CN).
    assert "does not trust our client certificate" in _refusal(tls_broker.url(a, cert_dir=other))
    # Connecting by a name the broker's certificate does not carry.
    assert "is not for address 127.0.0.1" in _refusal(tls_broker.url(a, host="127.0.0.1"))
    # An expired client certificate: refused before the handshake, and by the broker too.
    expired = tls_broker.root / "expired"
    certs.issue(cdir, a, not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), days=30, out=expired)
    assert "expired on 2020-01-31" in _refusal(tls_broker.url(a, cert_dir=expired))
    ctx = ssl.create_default_context(cafile=str(cdir / "ca.pem"))
    ctx.load_cert_chain(expired / f"{a}.pem", expired / f"{a}.key")
    with pytest.raises(ssl.SSLError, match="(?i)certificate expired"):
        with socket.create_connection(("localhost", tls_broker.tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"AMQP\x00\x00\x09\x01")
                tls.recv(1)
    # No client certificate at all.
    assert "requires a client certificate" in _refusal(f"{tls_broker.base()}?ca_certs={cdir / 'ca.pem'}")
    # A certificate whose CN has no broker user.
    certs.issue(cdir, "nobody-here")
    assert "no user 'nobody-here'" in _refusal(tls_broker.url("nobody-here"))


def test_site_a_certificate_cannot_read_b_or_publish_as_b(tls_broker: TlsBroker, two_sites: tuple[str, str, str]) -> None:
    a, b, fed = two_sites
    bus = open_bus(tls_broker.url(a))
    try:
        with pytest.raises(BusPermissionError, match=rf"ACCESS_REFUSED.*another party's certificate") as e:
            bus.consume(site_queue(b), ack)
        assert site_queue(b) in str(e.value) and repr(a) in str(e.value)
        got = Collector(ack)
        bus.consume(site_queue(a), got).cancel()  # its own queue: fine
    finally:
        bus.close()
    # Publishing as b with a's certificate: the broker checks user_id against the login.
    params = pika.URLParameters(f"amqps://localhost:{tls_broker.tls_port}/%2F")
    ctx = ssl.create_default_context(cafile=str(tls_broker.certs / "ca.pem"))
    ctx.load_cert_chain(tls_broker.certs / f"{a}.pem", tls_broker.certs / f"{a}.key")
    params.ssl_options = pika.SSLOptions(ctx, server_hostname="localhost")
    params.credentials = pika.credentials.ExternalCredentials()
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(px.ChannelClosedByBroker) as e2:
            ch.basic_publish(UPDATES, fed, b"forged", properties=pika.BasicProperties(user_id=b, delivery_mode=2))
        assert e2.value.reply_code == 406 and "user_id" in e2.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


# -- a whole federation by certificate ---------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _fedbus(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _workspace(root: Path, broker: TlsBroker, sites: list[str], federation: str) -> object:
    from simulator.datasets import load_dataset
    from simulator.partitions import make_partition
    from simulator.workspace import build_workspace

    data = load_dataset("heart_failure", target="DEATH_EVENT", seed=42)
    part = make_partition(data.labels, "iid", sites=len(sites), seed=42)
    ids = dict(zip(part.sites, sites))
    ws = build_workspace(root, data=data, partition=part, site_ids=ids, federation=federation,
                         broker_url="amqps://placeholder/", dataset_name="heart_failure",
                         coordinator_state=root / "coordinator")
    for s, files in ws.sites.items():  # each site presents its own certificate: site.toml's [tls] auth = "external"
        text = files.config.read_text().replace('"amqps://placeholder/"', json.dumps(broker.base()))
        text += (f'\n[tls]\nca = {json.dumps(str(broker.certs / "ca.pem"))}\ncert = {json.dumps(str(broker.certs / f"{s}.pem"))}\n'
                 f'key = {json.dumps(str(broker.certs / f"{s}.key"))}\nauth = "external"\n')
        files.config.write_text(text)
    return ws


def test_federation_logs_in_by_certificate_and_audit_passes(tls_broker: TlsBroker, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    sites = [f"hosp-{i}-{tag}" for i in (1, 2, 3)]
    coord, fed = f"coord-{tag}", f"fed-{tag}"
    for name in (*sites, coord):
        certs.issue(tls_broker.certs, name)
    provision(tls_broker.admin_url, sites=sites, coordinator=coord, federation=fed, auth="external",
              method="rabbitmqctl", node=tls_broker.node.node)
    ws = _workspace(tmp_path / "ws", tls_broker, sites, fed)
    exp = tmp_path / "exp.json"
    doc = json.loads((REPO / "examples" / "heart_failure.json").read_text())
    doc["training"]["epochs"] = 1
    exp.write_text(json.dumps(doc))
    logs = {s: open(tmp_path / f"{s}.log", "w") for s in sites}  # noqa: SIM115
    procs = {s: subprocess.Popen([sys.executable, "-m", "fedbus.cli", "site", "run", "--config", str(ws.sites[s].config)],
                                 cwd=REPO, env=_env(), stdout=logs[s], stderr=subprocess.STDOUT) for s in sites}
    try:
        r = _fedbus("coordinator", "run", str(exp), "--broker", tls_broker.url(coord), "--state", str(ws.coordinator_state),
                    "--key", str(ws.coordinator_key), "--federation", fed, "--rounds", "2", "--json",
                    *[x for s in sites for x in ("--site", s)])
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout)
        assert result["status"] in ("finished", "completed") and len(result["rounds"]) == 2
        assert all(rnd["replies"] == 3 for rnd in result["rounds"])
        audit = _fedbus("coordinator", "audit", result["run_id"], "--state", str(ws.coordinator_state), "--json")
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=60)
        for f in logs.values():
            f.close()
    for s in sites:  # the sites really logged in by certificate as themselves
        text = (tmp_path / f"{s}.log").read_text()
        assert "site_started" in text and "reply_sent" in text, text[-2000:]

    # Site 2's daemon configured with site 1's certificate: refused at start, exit 2, says why.
    cfg = ws.sites[sites[1]].config
    cfg.write_text(cfg.read_text().replace(f"{sites[1]}.pem", f"{sites[0]}.pem").replace(f"{sites[1]}.key", f"{sites[0]}.key"))
    r = _fedbus("site", "run", "--config", str(cfg), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"logged in by certificate as {sites[0]!r}" in r.stderr and "another party's certificate" in r.stderr
    deprovision(tls_broker.admin_url, [*sites, coord], method="rabbitmqctl", node=tls_broker.node.node)
