"""The coordinator's update reassembly budget is sized to the round, on disk, and bounded (issue 23)."""

from __future__ import annotations

import shutil
from pathlib import Path

from coordinator.run import UPDATE_OVERHEAD_BYTES, reassembly_budget
from protocol.chunking import Reassembler
from protocol.transport.amqp import AmqpBus

MODEL = 400_000_000  # a 100 M parameter float32 model


def test_the_budget_holds_one_update_per_site_within_half_the_free_disk(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    for sites in (1, 3, 10):
        want = sites * (MODEL + UPDATE_OVERHEAD_BYTES)
        assert reassembly_budget(sites, MODEL, spill_dir=str(tmp_path)) == min(want, free // 2)
    # However many sites and however large a model, never more than half the free disk.
    assert reassembly_budget(10**6, 2**40, spill_dir=str(tmp_path)) == free // 2
    assert reassembly_budget(0, MODEL, spill_dir=str(tmp_path)) == 0
    assert reassembly_budget(3, MODEL, spill_dir=str(tmp_path / "missing")) == 0  # unknown disk: the default stays


def test_an_amqp_bus_budget_only_grows_and_each_user_keeps_one_frame_at_most() -> None:
    """``spill_budget`` never lowers the budget the bus was opened with; a reassembler made from the
    raised budget admits three 400 MB updates from three users at once, but never two from one user."""
    bus = AmqpBus("amqp://guest:guest@127.0.0.1:5672/%2F")  # no connection is opened
    assert bus.spill_budget(10) == 2**30
    budget = bus.spill_budget(3 * (MODEL + UPDATE_OVERHEAD_BYTES))
    assert budget == 3 * (MODEL + UPDATE_OVERHEAD_BYTES)
    r = Reassembler(**bus.reassembly, spill=True)
    count = -(-MODEL // (8 * 2**20))
    assert all(r.has_room(MODEL, count, user=u, ahead=[(v, MODEL, count) for v in ("a", "b", "c")[:i]])
               for i, u in enumerate(("a", "b", "c")))
    assert not r.has_room(MODEL, count, user="a", ahead=[("a", MODEL, count)])  # one user: one frame's quota
    assert not r.has_room(MODEL, count, user="d", ahead=[(v, MODEL, count) for v in ("a", "b", "c")])
    # An operator who chose a budget keeps it: the coordinator does not raise it.
    chosen = AmqpBus("amqp://guest:guest@127.0.0.1:5672/%2F", max_reassembly_bytes=64 * 1024)
    assert chosen.spill_budget(3 * (MODEL + UPDATE_OVERHEAD_BYTES)) == 64 * 1024
