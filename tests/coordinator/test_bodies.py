"""Update bodies stored beside the run loop are durable, byte for byte, before the commit (issue 23)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from coordinator.bodies import BodyStore
from protocol.chunking import Reassembler, spill_origin, split_body


def _spilled(body: bytes) -> memoryview:
    r = Reassembler(spill=True)
    whole = None
    for h, p in split_body(body, chunk_size=4096):
        whole = r.add(h, bytes(p))
    assert isinstance(whole, memoryview)
    return whole


def test_a_spilled_body_is_copied_from_its_file_and_durable_once_wait_returns(tmp_path: Path) -> None:
    frame = os.urandom(50_000)
    whole = _spilled(frame)
    body = whole[123:40_123]  # the body inside its frame, as open_frame hands it on
    file, offset = spill_origin(body)  # type: ignore[misc]
    assert offset == 123 and os.pread(file.fileno(), 10, offset) == bytes(body[:10])
    assert spill_origin(memoryview(bytes(body))) is None  # not a spilled transfer: written at once

    store = BodyStore()
    path = tmp_path / "bodies" / "x.body"
    store.store(path, body)
    del whole, body  # the copy reads the file, not the map: the map may go at once
    store.wait()
    assert store.copied == 1
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(frame[123:40_123]).digest()
    assert [p.name for p in path.parent.iterdir()] == ["x.body"]  # no temporary file left
    store.close()


def test_a_body_that_cannot_be_written_fails_the_wait_not_silently(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the bodies folder should be")
    store = BodyStore()
    store.store(tmp_path / "taken" / "x.body", _spilled(os.urandom(20_000))[:10_000])
    with pytest.raises(OSError):
        store.wait()
    store.close()
