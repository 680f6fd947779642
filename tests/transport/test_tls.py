"""amqps:// options: the TLS context is built from the CA, client certificate and key."""

from __future__ import annotations

import pytest


def test_tls_context_built_from_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """amqps:// options become an SSLContext that trusts the CA and presents the client cert."""
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from protocol.transport.connector import connection_parameters

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("fedbus test CA")).issuer_name(name("fedbus test CA"))
        .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("site-1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(2).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )

    params, user = connection_parameters(
        "amqps://site-1:pw@broker.example:5671/fed", tls={"ca": str(ca_pem), "cert": str(cert_pem), "key": str(key_pem)}
    )
    assert user == "site-1" and params.port == 5671 and params.virtual_host == "fed"
    ctx = params.ssl_options.context
    assert params.ssl_options.server_hostname == "broker.example"
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "fedbus test CA"),),)]

    # The same through URL query parameters.
    params2, _ = connection_parameters(f"amqps://u:p@broker.example/%2F?ca_certs={ca_pem}&certfile={cert_pem}&keyfile={key_pem}")
    assert params2.ssl_options.context.get_ca_certs() == ctx.get_ca_certs()
    # Mistakes are named.
    with pytest.raises(ValueError, match="use amqps://"):
        connection_parameters("amqp://u:p@h/", tls={"ca": str(ca_pem)})
    with pytest.raises(ValueError, match="unknown option"):
        connection_parameters("amqps://u:p@h/", tls={"cafile": str(ca_pem)})
    with pytest.raises(ValueError, match="does the key belong to the certificate"):
        connection_parameters("amqps://u:p@h/", tls={"ca": str(ca_pem), "cert": str(cert_pem), "key": str(ca_pem)})


@pytest.mark.parametrize("url, refused", [
    ("amqp://site-a:pw@broker.example:5672/%2F", True),  # a password in clear to another host
    ("amqp://site-a:pw@127.evil.example/%2F", True),  # a look-alike name is another host
    ("amqp://site-a:pw@10.0.0.5/%2F", True),
    ("amqp://site-a:pw@127.0.0.1:5672/%2F", False),  # this machine: loopback never leaves it
    ("amqp://site-a:pw@[::1]:5672/%2F", False),
    ("amqp://site-a:pw@localhost/%2F", False),
    ("amqp://broker.example/%2F", False),  # no password in the URL: nothing secret to send
])
def test_a_password_never_goes_in_clear_beyond_this_machine(url: str, refused: bool) -> None:
    """Plain amqp:// with a password is refused before any connection unless the host is loopback."""
    from protocol.transport.base import BrokerRefused
    from protocol.transport.connector import connection_parameters

    if refused:
        with pytest.raises(BrokerRefused, match="in clear"):
            connection_parameters(url)
    else:
        connection_parameters(url)
