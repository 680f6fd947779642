"""Ed25519 signer, key files and trust store."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import BadSignature, UnknownSigner
from protocol.signing import KeyFileError, Signer, TrustStore, generate_keypair, key_id_of_pem


def test_key_id_is_a_prefix_of_the_public_key_hash():
    signer = Signer.generate()
    pub = serialization.load_pem_public_key(signer.public_pem())
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signer.kid == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id_of_pem(signer.public_pem()) == signer.kid
    assert Signer.generate().kid != signer.kid


def test_sign_and_verify_over_exact_bytes():
    signer = Signer.generate()
    trust = TrustStore()
    assert trust.add("site-a", signer.public_pem()) == signer.kid
    body = b"the exact body bytes"
    sig = signer.sign(body)
    assert len(sig) == 64
    assert trust.verify(signer.kid, body, sig) == "site-a"
    assert trust.verify(signer.kid, memoryview(b"xx" + body)[2:], sig) == "site-a"
    with pytest.raises(BadSignature, match="does not verify"):
        trust.verify(signer.kid, body + b" ", sig)
    with pytest.raises(BadSignature):
        trust.verify(signer.kid, body, bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(BadSignature, match="64 bytes"):
        trust.verify(signer.kid, body, sig + b"\x00")


def test_unknown_kid_is_unknown_signer():
    trust = TrustStore()
    with pytest.raises(UnknownSigner, match="enroll"):
        trust.verify("0123456789abcdef", b"x", b"\x00" * 64)
    with pytest.raises(UnknownSigner):
        trust.identity("nope")


def test_one_key_cannot_serve_two_identities_but_an_identity_may_rotate_keys():
    a, b = Signer.generate(), Signer.generate()
    trust = TrustStore()
    trust.add("site-a", a.public_pem())
    trust.add("site-a", a.public_pem())  # idempotent
    with pytest.raises(ValueError, match="already enrolled as 'site-a'"):
        trust.add("site-b", a.public_pem())
    trust.add("site-a", b.public_pem())
    assert sorted(trust.kids("site-a")) == sorted([a.kid, b.kid])
    trust.remove(a.kid)
    assert a.kid not in trust and b.kid in trust and len(trust) == 1


def test_trust_store_refuses_non_ed25519_and_garbage():
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    trust = TrustStore()
    with pytest.raises(KeyFileError, match="expected an Ed25519 public key"):
        trust.add("site-a", rsa_pub)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        trust.add("site-a", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match="identity"):
        trust.add("", Signer.generate().public_pem())


def test_generate_keypair_files_and_modes(tmp_path):
    key, pub = generate_keypair("site-1", tmp_path / "keys")
    assert key == tmp_path / "keys" / "site-1.key" and pub == tmp_path / "keys" / "site-1.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert isinstance(serialization.load_pem_public_key(pub.read_bytes()), Ed25519PublicKey)
    signer = Signer.from_file(key)
    trust = TrustStore.from_files({"site-1": pub})
    assert trust.verify(signer.kid, b"body", signer.sign(b"body")) == "site-1"


def test_generate_keypair_refuses_to_overwrite_unless_forced(tmp_path):
    key, _ = generate_keypair("coord", tmp_path)
    old = key.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        generate_keypair("coord", tmp_path)
    assert key.read_bytes() == old
    generate_keypair("coord", tmp_path, force=True)
    assert key.read_bytes() != old
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_generate_keypair_refuses_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="not allowed"):
        generate_keypair(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_key_file_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read private key"):
        Signer.from_file(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(KeyFileError, match="fedbus keys generate"):
        Signer.from_file(tmp_path / "bad.key")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "rsa.key").write_bytes(rsa_key)
    with pytest.raises(KeyFileError, match="expected an Ed25519 private key"):
        Signer.from_file(tmp_path / "rsa.key")
    with pytest.raises(KeyFileError, match="cannot read public key of 'site-9'"):
        TrustStore.from_files({"site-9": tmp_path / "missing.pub"})


def test_signer_repr_never_shows_key_material():
    signer = Signer.generate()
    assert repr(signer) == f"Signer(kid={signer.kid!r})"
