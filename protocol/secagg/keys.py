"""Pairwise keys for the share relay: X25519 bound to each site's Ed25519 identity, AES-GCM.

Shares travel site -> broker -> site, so the broker (and the coordinator that relays them)
must neither read nor redirect one. Each site draws an X25519 key per run and signs its
public half with its enrolled Ed25519 key (``KeyBinding``): a coordinator cannot slip in a
key of its own for a hospital without that hospital's signing key. Two sites derive one
AES-256-GCM key by HKDF-SHA256 over their X25519 secret, bound to the run and the pair; every
share is encrypted with a random 96-bit nonce and associated data naming the run, the update
tag, the sender and the recipient, so a share replayed to another recipient, another update
or another run fails authentication (``ShareRefused``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import BadSignature
from protocol.signing import Signer, TrustStore

_BIND = b"fedbus-secagg-x25519-v1\0"
_KDF = b"fedbus-secagg-share-key-v1\0"
NONCE_BYTES = 12
PUBLIC_BYTES = 32


class ShareRefused(ValueError):
    """An encrypted share that does not authenticate for this run, tag, sender and recipient."""


@dataclass(frozen=True)
class KeyBinding:
    """A site's X25519 public key for one run, signed by its Ed25519 identity."""

    site_id: str
    run_id: str
    public: bytes  # 32 raw bytes
    kid: str
    sig: bytes

    def signed_bytes(self) -> bytes:
        return _BIND + msgpack.packb([self.run_id, self.site_id, self.public], use_bin_type=True)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class AgreementKey:
    """One site's X25519 key for one run."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._key = private or X25519PrivateKey.generate()

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> AgreementKey:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """Raw 32 bytes for the site's state (mode 0600): losing them loses this run's shares."""
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public(self) -> bytes:
        return _raw(self._key.public_key())

    def bind(self, signer: Signer, site_id: str, run_id: str) -> KeyBinding:
        unsigned = KeyBinding(site_id, run_id, self.public, signer.kid, b"")
        return KeyBinding(site_id, run_id, self.public, signer.kid, signer.sign(unsigned.signed_bytes()))

    def pair_key(self, mine: str, other: KeyBinding) -> bytes:
        """The AES-256 key this site shares with ``other`` for ``other.run_id``."""
        if len(other.public) != PUBLIC_BYTES:
            raise ShareRefused(f"{other.site_id}: an X25519 public key is {PUBLIC_BYTES} bytes")
        secret = self._key.exchange(X25519PublicKey.from_public_bytes(other.public))
        a, b = sorted((mine, other.site_id))
        info = _KDF + msgpack.packb([other.run_id, a, b], use_bin_type=True)
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def verify_binding(trust: TrustStore, binding: KeyBinding, *, site_id: str, run_id: str) -> None:
    """The binding is ``site_id``'s for ``run_id``, signed by a key enrolled as ``site_id``."""
    if binding.site_id != site_id or binding.run_id != run_id:
        raise BadSignature(
            f"X25519 key binding names {binding.site_id!r}/{binding.run_id!r}, expected {site_id!r}/{run_id!r}"
        )
    signer = trust.verify(binding.kid, binding.signed_bytes(), binding.sig)
    if signer != site_id:
        raise BadSignature(f"X25519 key of {site_id!r} is signed by {signer!r}'s key, not its own")


def _ad(run_id: str, tag: int, sender: str, recipient: str) -> bytes:
    return b"fedbus-secagg-share-v1\0" + msgpack.packb([run_id, tag, sender, recipient], use_bin_type=True)


def seal_share(key: bytes, plaintext: bytes, *, run_id: str, tag: int, sender: str, recipient: str) -> bytes:
    """nonce || AES-GCM(plaintext) with the routing as associated data."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _ad(run_id, tag, sender, recipient))


def open_share(key: bytes, sealed: bytes, *, run_id: str, tag: int, sender: str, recipient: str) -> bytes:
    """The plaintext, or ``ShareRefused`` if anything about it (bytes or routing) was changed."""
    if len(sealed) < NONCE_BYTES + 16:
        raise ShareRefused("encrypted share too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _ad(run_id, tag, sender, recipient))
    except InvalidTag:
        raise ShareRefused(
            f"share from {sender!r} to {recipient!r} (run {run_id}, update {tag}) does not authenticate: "
            "tampered, or meant for another recipient, update or run"
        ) from None
