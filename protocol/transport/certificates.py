"""The federation's X.509 certificates for mutual TLS with the broker (``fedbus certs``).

One federation CA signs a server certificate for the broker (its DNS names / IPs) and
one client certificate per site and coordinator. The client certificate's CN is the
party's broker user (EXTERNAL login), so it must equal the site id. Keys are EC P-256,
written 0600 through the one crash-safe writer; certificates 0644.

Layout under a directory ``DIR``: ``ca.pem`` + ``ca.key`` (the CA; keep ``ca.key`` off
the broker and away from hospitals), ``<name>.pem`` + ``<name>.key`` per party.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.durable import write_atomic

DEFAULT_DAYS = 825  # what browsers still accept for a leaf; the CA lives 10 years


class CertificateError(ValueError):
    """A certificate cannot be made; the message says what to change."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(cn: str, org: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomic(path, pem, mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _window(days: float, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))  # clock skew
    return start, start + dt.timedelta(days=days)


def make_ca(directory: Path, *, federation: str, days: float = 3650, force: bool = False) -> Issued:
    """Create ``ca.pem``/``ca.key`` (refuses to overwrite an existing CA unless ``force``)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_p, key_p = directory / "ca.pem", directory / "ca.key"
    if cert_p.exists() and not force:
        raise CertificateError(f"{cert_p} exists: a new CA would invalidate every certificate it signed (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(days, None)
    subject = _name(f"fedbus federation CA {federation}", federation)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_p, key)
    _write_cert(cert_p, cert)
    return Issued(cert_p, key_p)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_p, key_p = directory / "ca.pem", directory / "ca.key"
    if not cert_p.exists() or not key_p.exists():
        raise CertificateError(f"no CA in {directory}: run `fedbus certs ca --out {directory}` first")
    cert = x509.load_pem_x509_certificate(cert_p.read_bytes())
    key = serialization.load_pem_private_key(key_p.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_p} is not an EC key made by `fedbus certs ca`")
    return cert, key


def issue(
    directory: Path,
    name: str,
    *,
    server_names: list[str] | None = None,
    days: float = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    out: Path | None = None,
    stem: str | None = None,
) -> Issued:
    """Sign ``<name>.pem``/``<name>.key`` with the CA in ``directory``.

    ``server_names`` makes a broker (server) certificate for those DNS names / IP
    addresses; otherwise a client certificate whose CN ``name`` is the broker user.
    ``not_before``/``days`` exist so tests can make expired certificates; ``stem``
    names the files (default ``name``; kits use ``tls`` beside the Ed25519 ``<name>.key``).
    """
    if not name or "/" in name or name.startswith("."):
        raise CertificateError(f"certificate name {name!r}: use the site id (letters, digits, '.', '_', '-')")
    ca_cert, ca_key = _load_ca(directory)
    out = out or directory
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(days, not_before)
    b = (
        x509.CertificateBuilder().subject_name(_name(name, None)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server_names:
        alt: list[x509.GeneralName] = []
        for n in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    cert_p, key_p = out / f"{stem or name}.pem", out / f"{stem or name}.key"
    _write_key(key_p, key)
    _write_cert(cert_p, cert)
    return Issued(cert_p, key_p)


def describe(cert_path: Path) -> dict[str, str]:
    """Subject CN, issuer, validity and names of a certificate (for `fedbus certs show`)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ", ".join(str(v.value) for v in san)
    except x509.ExtensionNotFound:
        names = ""
    return {
        "cn": str(cn[0].value) if cn else "",
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "names": names,
        "mode": oct(os.stat(cert_path).st_mode & 0o777),
    }


def kit_tls(tls: dict[str, object], kit: Path, party: str) -> dict[str, str] | None:
    """The hook ``fedbus provision`` calls per kit (``fedbus.kits.tls_files``).

    The project's ``[tls]`` table: ``pki`` = a directory with the federation CA (made by
    ``fedbus certs ca``), optional ``auth = "external"``, optional ``days``. Each kit
    gets ``ca.pem`` and its own client certificate ``tls.pem``/``tls.key`` (0600) with
    CN = ``party`` (its broker user); an existing, still valid certificate with that CN
    is kept (re-provisioning is idempotent). With only ``ca`` given, just the CA is
    copied (server-verified TLS with password login).
    """
    import shutil

    pki = tls.get("pki")
    if pki is None:
        ca = tls.get("ca")
        if not ca:
            return None
        shutil.copyfile(Path(str(ca)), kit / "ca.pem")
        return {"ca": "ca.pem"}
    pki_dir = Path(str(pki))
    _load_ca(pki_dir)  # a clear error if there is no CA yet
    shutil.copyfile(pki_dir / "ca.pem", kit / "ca.pem")
    cert_p = kit / "tls.pem"
    keep = False
    if cert_p.exists() and (kit / "tls.key").exists():
        info = x509.load_pem_x509_certificate(cert_p.read_bytes())
        cn = info.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        keep = bool(cn) and cn[0].value == party and info.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    if not keep:
        issue(pki_dir, party, out=kit, stem="tls", days=float(str(tls.get("days", DEFAULT_DAYS))))
    files = {"ca": "ca.pem", "cert": "tls.pem", "key": "tls.key"}
    auth = tls.get("auth")
    if auth is not None:
        if auth not in ("plain", "external"):
            raise CertificateError(f"tls.auth = {auth!r}: use 'plain' or 'external' (certificate login)")
        files["auth"] = str(auth)
    return files
