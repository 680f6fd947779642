"""The federation CA and certificates: what they say, who they verify, file modes, kits."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from protocol.transport import certificates as certs
from protocol.transport.endpoints import EndpointError, certificate_cn, check_own_certificate, parse_endpoints


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_ca_signs_server_and_client_certificates(tmp_path: Path) -> None:
    ca = certs.make_ca(tmp_path, federation="cardio")
    server = certs.issue(tmp_path, "broker", server_names=["broker.example.org", "10.0.0.5"])
    client = certs.issue(tmp_path, "hospital-a")
    assert _mode(ca.key) == _mode(server.key) == _mode(client.key) == 0o600
    cert = x509.load_pem_x509_certificate(client.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert.read_bytes()))  # raises if not
    san = x509.load_pem_x509_certificate(server.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    # The standard library's own verifier accepts the chain.
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.load_cert_chain(client.cert, client.key)
    assert certificate_cn(client.cert) == "hospital-a"
    with pytest.raises(certs.CertificateError, match="exists"):
        certs.make_ca(tmp_path, federation="cardio")  # never silently replaced


def test_expired_certificate_is_named(tmp_path: Path) -> None:
    certs.make_ca(tmp_path, federation="f")
    old = certs.issue(tmp_path, "s1", not_before=dt.datetime(2020, 3, 1, tzinfo=dt.timezone.utc), days=10)
    with pytest.raises(EndpointError, match="expired on 2020-03-11"):
        check_own_certificate(str(old.cert))


def test_external_login_url(tmp_path: Path) -> None:
    certs.make_ca(tmp_path, federation="f")
    c = certs.issue(tmp_path, "hospital-b")
    url = f"amqps://broker:5671/fed?auth=external&ca_certs={tmp_path}/ca.pem&certfile={c.cert}&keyfile={c.key}"
    eps = parse_endpoints(url)
    assert eps.user == "hospital-b" and eps.nodes[0].external and not eps.quorum  # the broker user is the CN
    with pytest.raises(EndpointError, match="certificate .* is for 'hospital-b'"):
        parse_endpoints(url.replace("amqps://broker", "amqps://someone-else@broker"))
    with pytest.raises(EndpointError, match="needs amqps://"):
        parse_endpoints("amqp://broker/?auth=external")
    two = parse_endpoints(f"{url},{url.replace('broker:5671', 'broker2:5671')}")
    assert [n.host for n in two.nodes] == ["broker", "broker2"] and two.quorum  # several nodes: a cluster


def test_kit_hook_issues_one_certificate_per_party_and_keeps_it(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    certs.make_ca(pki, federation="f")
    kit = tmp_path / "kit-a"
    kit.mkdir()
    files = certs.kit_tls({"pki": str(pki), "auth": "external"}, kit, "hospital-a")
    assert files == {"ca": "ca.pem", "cert": "tls.pem", "key": "tls.key", "auth": "external"}
    assert certificate_cn(kit / "tls.pem") == "hospital-a" and _mode(kit / "tls.key") == 0o600
    first = (kit / "tls.pem").read_bytes()
    certs.kit_tls({"pki": str(pki), "auth": "external"}, kit, "hospital-a")
    assert (kit / "tls.pem").read_bytes() == first  # idempotent
    with pytest.raises(certs.CertificateError, match="fedbus certs ca"):
        certs.kit_tls({"pki": str(tmp_path / "nothing")}, kit, "hospital-a")


def test_cli(tmp_path: Path) -> None:
    from fedbus.cli import app

    r = CliRunner().invoke(app, ["certs", "issue", "s1", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no CA" in r.output
    assert CliRunner().invoke(app, ["certs", "ca", "--federation", "f", "--out", str(tmp_path)]).exit_code == 0
    r = CliRunner().invoke(app, ["certs", "issue", "broker", "--out", str(tmp_path), "--server-name", "localhost"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["certs", "show", str(tmp_path / "broker.pem")])
    assert r.exit_code == 0 and '"cn": "broker"' in r.output and "localhost" in r.output
