"""Ed25519 keys: who signed a frame, and whether we trust them.

A ``Signer`` holds one private key; a ``TrustStore`` maps key ids to the public
keys of enrolled parties (the coordinator's store holds every site, a site's
store holds its coordinator). The key id is the first 16 hex digits of the
SHA-256 of the raw 32-byte public key, so anyone holding the public key file can
compute it (``key_id_of_pem``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.durable import write_atomic
from protocol.errors import BadSignature, UnknownSigner
from protocol.ids import NAME_RULE, is_name

SIGNATURE_BYTES = 64


class KeyFileError(ValueError):
    """A key file is missing, unreadable, or not an Ed25519 key in PEM form."""


def _kid_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_public(public_pem: bytes, *, what: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{what}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{what}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def key_id_of_pem(public_pem: bytes) -> str:
    """Key id of a PEM public key (as ``Signer.kid`` of its private half)."""
    return _kid_of(_load_public(public_pem, what="public key"))


class Signer:
    """One Ed25519 private key that signs frame bodies."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"Signer needs an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._key = private_key
        self.kid: str = _kid_of(private_key.public_key())

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Load an unencrypted PKCS8 PEM private key (as written by ``fedbus keys generate``)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise KeyFileError(f"{path}: cannot read private key ({e.strerror})") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyFileError(
                f"{path}: not an unencrypted PEM private key ({e}); "
                "create one with `fedbus keys generate NAME --out DIR`"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    def sign(self, body: bytes | memoryview) -> bytes:
        return self._key.sign(body)

    def public_pem(self) -> bytes:
        return _public_pem(self._key.public_key())

    def private_pem(self) -> bytes:
        """PKCS8 PEM, unencrypted: protect the file it goes to (mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:  # never print key material
        return f"Signer(kid={self.kid!r})"


def _write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` with ``mode`` from the first byte on (no moment where a key is world-readable)."""
    if not overwrite:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; never widened
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    write_atomic(path, data, mode=mode)


def generate_keypair(name: str, out_dir: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.key`` (PKCS8 PEM, mode 0600) and ``out_dir/NAME.pub``.

    Refuses to replace an existing ``NAME.key`` unless ``force``: a lost private key
    means re-enrolling the site. Raises ``ValueError`` on a bad name and
    ``FileExistsError`` on an existing key.
    """
    if not is_name(name):
        raise ValueError(f"key name {name!r} is not allowed: use {NAME_RULE}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if not force:
        for p in (key_path, pub_path):
            if p.exists():
                raise FileExistsError(
                    f"{p} already exists; pass --force to replace it (the old key is lost "
                    "and every party that trusts it must enroll the new public key)"
                )
    signer = Signer.generate()
    _write_atomic(key_path, signer.private_pem(), mode=0o600, overwrite=force)
    _write_atomic(pub_path, signer.public_pem(), mode=0o644, overwrite=True)
    return key_path, pub_path


class TrustStore:
    """Key id -> (identity, public key) of every party whose frames we accept.

    One identity may hold several keys (rotation); one key belongs to exactly one
    identity. Safe to read from consumer threads while another thread adds keys.
    """

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, Ed25519PublicKey, bytes]] = {}
        self._lock = threading.Lock()

    def add(self, identity: str, public_pem: bytes) -> str:
        """Trust ``public_pem`` as ``identity``; returns its key id."""
        if not isinstance(identity, str) or not identity:
            raise ValueError(f"identity must be a non-empty str, got {identity!r}")
        key = _load_public(bytes(public_pem), what=f"public key of {identity!r}")
        kid = _kid_of(key)
        with self._lock:
            known = self._keys.get(kid)
            if known is not None and known[0] != identity:
                raise ValueError(
                    f"key {kid} is already enrolled as {known[0]!r}; one key cannot sign for "
                    f"two identities (generate a separate key for {identity!r})"
                )
            self._keys[kid] = (identity, key, _public_pem(key))
        return kid

    def remove(self, kid: str) -> None:
        with self._lock:
            self._keys.pop(kid, None)

    def identity(self, kid: str) -> str:
        return self._entry(kid)[0]

    def public_pem(self, kid: str) -> bytes:
        return self._entry(kid)[2]

    def kids(self, identity: str | None = None) -> list[str]:
        with self._lock:
            return [k for k, v in self._keys.items() if identity is None or v[0] == identity]

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _entry(self, kid: str) -> tuple[str, Ed25519PublicKey, bytes]:
        entry = self._keys.get(kid) if isinstance(kid, str) else None
        if entry is None:
            raise UnknownSigner(
                f"key id {str(kid)[:64]!r} is not in the trust store; enroll the sender's public "
                "key (`fedbus coordinator enroll SITE_ID PUBKEY`) or check which key it signs with"
            )
        return entry

    def verify(self, kid: str, body: bytes | memoryview, sig: bytes) -> str:
        """Identity of ``kid`` if ``sig`` is its signature over exactly ``body``."""
        identity, key, _ = self._entry(kid)
        if not isinstance(sig, (bytes, bytearray, memoryview)) or len(sig) != SIGNATURE_BYTES:
            raise BadSignature(f"signature must be {SIGNATURE_BYTES} bytes (Ed25519)")
        try:
            key.verify(bytes(sig), body)
        except InvalidSignature:
            raise BadSignature(
                f"signature by key {kid} ({identity}) does not verify over the body: "
                "the frame was altered in transit or signed with another key"
            ) from None
        return identity

    @classmethod
    def from_files(cls, mapping: dict[str, str | os.PathLike[str]]) -> TrustStore:
        """Build a store from ``{identity: path of NAME.pub}``."""
        store = cls()
        for identity, path in mapping.items():
            try:
                pem = Path(path).read_bytes()
            except OSError as e:
                raise KeyFileError(f"{path}: cannot read public key of {identity!r} ({e.strerror})") from None
            try:
                store.add(identity, pem)
            except KeyFileError as e:
                raise KeyFileError(f"{path}: {e}") from None
        return store


__all__ = [
    "SIGNATURE_BYTES",
    "KeyFileError",
    "Signer",
    "TrustStore",
    "generate_keypair",
    "key_id_of_pem",
]
