"""Masks from a cryptographic stream: ChaCha20 keyed by a 256-bit secret.

Flower's SecAgg+ drew masks from a non-cryptographic generator with a 32-bit seed (its issue
#7522): whoever guessed the seed removed the mask. Here a mask is ChaCha20's keystream
(``cryptography``, OpenSSL) under a fresh 256-bit key from the OS, read as 31-bit words with
the single value >= p rejected, so every element is uniform on [0, p) exactly. The key never
leaves the site that drew it; only the MDS shares of the mask do (``protocol.secagg.coding``).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from protocol.secagg.field import P

KEY_BYTES = 32  # 256-bit mask keys
_NONCE = bytes(16)  # one key per mask: the stream never repeats under a key


def new_mask_key() -> bytes:
    """256 fresh bits from the OS for one mask (one site, one update)."""
    return os.urandom(KEY_BYTES)


def field_stream(key: bytes, n: int) -> np.ndarray:
    """``n`` uniform field elements from ChaCha20(key): 31-bit words, the value p rejected."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a mask key is {KEY_BYTES} bytes (256 bits), got {len(key)}")
    enc = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    words = np.frombuffer(enc.update(bytes(4 * n)), dtype="<u4").astype(np.int64)
    words &= P
    if not (words == P).any():  # p is hit with probability 2**-31 a word: almost always done here
        return words
    out = words[words < P]
    while out.size < n:  # reject p and draw on from the same stream
        more = np.frombuffer(enc.update(bytes(4 * (n - out.size + 8))), dtype="<u4").astype(np.int64) & P
        out = np.concatenate([out, more[more < P]])
    return out[:n]
