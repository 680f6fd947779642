"""Why a frame was refused: one exception class per reason.

Every ``ProtocolError`` carries a short machine ``reason`` that the buses and the
coordinator put in front of the message in the dead-letter header
(``f"{e.reason}: {e}"``); ``str(e)`` says what was wrong in words a person can act on.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every rejection of bytes from the wire."""

    reason: str = "protocol_error"

    def header(self) -> str:
        """The dead-letter reason header value: ``"<reason>: <message>"``."""
        return f"{self.reason}: {self}"


class MalformedFrame(ProtocolError):
    """Garbage, truncated bytes, bad msgpack, or a field of the wrong type."""

    reason = "malformed"


class LimitExceeded(ProtocolError):
    """Frame bytes, array count, element counts or container sizes over ``Limits``."""

    reason = "limit_exceeded"


class OutOfBounds(ProtocolError):
    """A field of the right type whose value is outside its bound (``protocol/bounds.py``):
    non-finite, negative or huge, over-long, or not among the values allowed."""

    reason = "out_of_bounds"


class UnknownMessageType(ProtocolError):
    """The envelope names a ``type`` this version does not know."""

    reason = "unknown_type"


class UnsupportedSchemaVersion(ProtocolError):
    """The frame or envelope comes from a newer (or unknown) protocol version."""

    reason = "unsupported_version"


class BadSignature(ProtocolError):
    """The signature does not verify over the body, or the signer claims another identity."""

    reason = "bad_signature"


class UnknownSigner(ProtocolError):
    """The frame's key id is not in the trust store (site not enrolled?)."""

    reason = "unknown_signer"


class ReplayError(ProtocolError):
    """Base of the replay guard's rejections."""

    reason = "replay"


class ReplayedMessage(ReplayError):
    """This ``message_id`` was handled before."""

    reason = "replayed"


class WrongRecipient(ReplayError):
    reason = "wrong_recipient"


class WrongRun(ReplayError):
    reason = "wrong_run"


class WrongRound(ReplayError):
    reason = "wrong_round"


class ClockSkew(ReplayError):
    """``sent_at`` lies outside the allowed clock skew (stale, replayed, or clocks apart)."""

    reason = "clock_skew"


class ChunkError(ProtocolError):
    """A missing, duplicate or corrupt chunk, or reassembly over its time or memory bound."""

    reason = "chunk_error"


class ChunkCapacity(ChunkError):
    """Reassembly is full for now (globally or for this sender): give the chunk back, retry later.

    Not a fault of the transfer: the buses *requeue* it instead of dead-lettering it.
    """

    reason = "chunk_capacity"


__all__ = [
    "ProtocolError",
    "MalformedFrame",
    "LimitExceeded",
    "OutOfBounds",
    "UnknownMessageType",
    "UnsupportedSchemaVersion",
    "BadSignature",
    "UnknownSigner",
    "ReplayError",
    "ReplayedMessage",
    "WrongRecipient",
    "WrongRun",
    "WrongRound",
    "ClockSkew",
    "ChunkError",
    "ChunkCapacity",
]
