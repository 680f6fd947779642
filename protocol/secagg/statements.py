"""What the coordinator commits to, signed: the roster of a run and each unmask request.

Sites check these themselves (``site_worker/secagg.py``): a roster or request that its
coordinator did not sign, or a request that names a roster other than the one the site
committed to, is refused. Both are signed on their own (Ed25519 over a canonical msgpack
body), apart from the frame that carries them, so a site can keep the exact bytes it agreed
to and compare them after a restart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack

from protocol.errors import BadSignature
from protocol.secagg.keys import KeyBinding
from protocol.signing import Signer, TrustStore

_ROSTER = b"fedbus-secagg-roster-v1\0"
_REQUEST = b"fedbus-secagg-unmask-v1\0"


@dataclass(frozen=True)
class Roster:
    """The sites of a run in share order (site i holds share i), their X25519 key bindings,
    and the parameters every site checks before it masks or answers anything."""

    run_id: str
    sites: tuple[str, ...]
    bindings: tuple[KeyBinding, ...]  # one per site, same order
    min_contributors: int
    threshold: int  # U: aggregated shares needed to unmask
    privacy: int  # T: shares that reveal nothing about one mask
    clip: float
    scale: float
    length: int  # field elements per masked update

    def body(self) -> bytes:
        return _ROSTER + msgpack.packb(
            [self.run_id, list(self.sites),
             [[b.site_id, b.run_id, b.public, b.kid, b.sig] for b in self.bindings],
             self.min_contributors, self.threshold, self.privacy, self.clip, self.scale, self.length],
            use_bin_type=True,
        )

    def digest(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()

    @classmethod
    def from_body(cls, body: bytes) -> Roster:
        """Inverse of ``body`` (bounded msgpack; ``ValueError`` on anything else)."""
        f = _unpack(body, _ROSTER, 9)
        bindings = tuple(KeyBinding(str(b[0]), str(b[1]), bytes(b[2]), str(b[3]), bytes(b[4])) for b in f[2])
        return cls(str(f[0]), tuple(str(x) for x in f[1]), bindings, int(f[3]), int(f[4]), int(f[5]),
                   float(f[6]), float(f[7]), int(f[8]))

    def index(self, site_id: str) -> int:
        return self.sites.index(site_id)


@dataclass(frozen=True)
class UnmaskRequest:
    """Ask roster sites for the sum of their shares of exactly these updates.

    ``contributors`` are ``(site, tag)`` pairs: the site that uploaded a masked update and
    that update's tag (the round in sync runs, the site's update counter under FedBuff).
    """

    run_id: str
    roster_digest: str
    request_id: str
    contributors: tuple[tuple[str, int], ...]

    def body(self) -> bytes:
        return _REQUEST + msgpack.packb(
            [self.run_id, self.roster_digest, self.request_id, [list(c) for c in self.contributors]],
            use_bin_type=True,
        )

    @classmethod
    def from_body(cls, body: bytes) -> UnmaskRequest:
        f = _unpack(body, _REQUEST, 4)
        return cls(str(f[0]), str(f[1]), str(f[2]), tuple((str(c[0]), int(c[1])) for c in f[3]))


def _unpack(body: bytes, prefix: bytes, fields: int) -> list:  # type: ignore[type-arg]
    if not body.startswith(prefix):
        raise ValueError("not a secure-aggregation statement of this kind")
    try:
        out = msgpack.unpackb(body[len(prefix):], raw=False, max_array_len=100_000, max_map_len=0,
                              max_str_len=4096, max_bin_len=4096)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ValueError(f"malformed statement: {e}") from None
    if not isinstance(out, list) or len(out) != fields:
        raise ValueError("malformed statement: wrong number of fields")
    return out


@dataclass(frozen=True)
class Signed:
    """A statement's canonical body with the coordinator's Ed25519 signature over it."""

    body: bytes
    kid: str
    sig: bytes


def sign(signer: Signer, statement: Roster | UnmaskRequest) -> Signed:
    body = statement.body()
    return Signed(body, signer.kid, signer.sign(body))


def verify(trust: TrustStore, signed: Signed, statement: Roster | UnmaskRequest, *, coordinator: str) -> None:
    """``signed`` is ``coordinator``'s signature over exactly ``statement``; else ``BadSignature``."""
    if signed.body != statement.body():
        raise BadSignature("the signed body is not the statement it came with")
    who = trust.verify(signed.kid, signed.body, signed.sig)
    if who != coordinator:
        raise BadSignature(f"signed by {who!r}, not by the coordinator {coordinator!r}")
