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


def test_a_spilled_body_is_copied_from_its_file_and_durable_once_wait_returns(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Copied from the spill file at the body's offset, fsynced, renamed into place, then its folder fsynced."""
    import coordinator.bodies as bodies_mod
    from protocol import durable

    steps: list[str] = []
    real_fsync, real_replace, real_dir = os.fsync, os.replace, durable.fsync_dir
    monkeypatch.setattr(bodies_mod.os, "fsync", lambda fd: (steps.append("fsync file"), real_fsync(fd))[1])
    monkeypatch.setattr(bodies_mod.os, "replace", lambda a, b: (steps.append("rename"), real_replace(a, b))[1])
    monkeypatch.setattr(bodies_mod.durable, "fsync_dir", lambda p: (steps.append("fsync folder"), real_dir(p))[1])
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
    assert store.copied == 1 and steps[:3] == ["fsync file", "rename", "fsync folder"]  # (then the folder's own fsync)
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


def test_the_round_commit_waits_for_every_stored_body_before_recording_them(tmp_path: Path) -> None:
    """``RunContext.commit_round`` makes the stored bodies durable (``bodies.wait``) before the
    transaction that records the rows naming them, and acks the held deliveries only after it."""
    from types import SimpleNamespace

    import numpy as np

    from coordinator.rounds.context import RunContext

    order: list[str] = []

    class Bodies:
        def wait(self) -> None:
            order.append("bodies durable")

    class Store:
        dir = tmp_path

        def commit_round(self, row: object, rows: list[object]) -> None:
            order.append("commit")

    class Delivery:
        def ack(self) -> None:
            order.append("ack")

    ctx = SimpleNamespace(inbox=SimpleNamespace(bodies=Bodies()), store=Store(), run_id="r",
                          checkpoint_path=lambda rnd, suffix="": tmp_path / f"round-{rnd}{suffix}.safetensors")
    held = {"m": SimpleNamespace(delivery=Delivery(), row=object(), payload=SimpleNamespace(metrics={}))}
    RunContext.commit_round(ctx, 1, (("w", np.zeros(3, dtype=np.float32)),), agg_state={}, sampled=["a"],  # type: ignore[arg-type]
                            attempts=1, held=held, accepted={}, metrics={"aggregate": {}}, wall_s=1.0, agg_s=0.1)
    assert order == ["bodies durable", "commit", "ack"]
