"""Size bounds checked on every frame *before* anything is allocated for it.

A frame from the wire is untrusted until its signature verifies, and a trusted
sender can still be buggy: these bounds keep one message from exhausting memory
or CPU. Raise a bound with ``dataclasses.replace(DEFAULT_LIMITS, ...)`` for
unusually large models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 512 * 2**20  # a whole (reassembled) frame
    max_arrays: int = 4096  # tensors in one message
    max_array_elements: int = 2**28  # per array
    max_total_elements: int = 2**28  # all arrays of one message together
    max_container_items: int = 65536  # msgpack map/array length
    max_str_bytes: int = 1 * 2**20  # msgpack str length
    max_dims: int = 8  # dimensions of one array
    # Additions (docs/contracts.md): bounds on the whole msgpack tree, so a body of
    # tiny nested containers cannot make the decoder run for minutes or recurse deeply.
    max_objects: int = 4 * 2**20  # msgpack objects (scalars and containers) in one body
    max_depth: int = 32  # container nesting

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS = Limits()

__all__ = ["Limits", "DEFAULT_LIMITS"]
