"""``fedbus coordinator dead-letters list|show|requeue|purge`` (in-process, memory bus)."""

from __future__ import annotations

import json
import uuid

from typer.testing import CliRunner

from fedbus.cli import app
from protocol.transport import Topology, open_bus
from protocol.transport.memory import drop_broker
from protocol.transport.topology import UPDATES, updates_queue
from tests.transport.conftest import Collector


def test_dead_letters_commands() -> None:
    name = f"cli-dead-{uuid.uuid4().hex[:8]}"
    url, fed = f"memory://{name}", "cardio"
    bus = open_bus(url)
    try:
        bus.declare(Topology(federations=[fed]))
        ids = [uuid.uuid4().hex for _ in range(2)]
        for mid in ids:
            bus.publish(UPDATES, fed, b"frame", message_id=mid)
        col = Collector(lambda d: d.nack("bad_signature: unknown signer kid abc"))
        c = bus.consume(updates_queue(fed), col, prefetch=5)
        assert col.wait_count(2)
        c.cancel()
        r = CliRunner()
        common = ["--broker", url, "--federation", fed]

        out = r.invoke(app, ["coordinator", "dead-letters", "list", *common, "--json"])
        assert out.exit_code == 0, out.output
        doc = json.loads(out.stdout)
        assert [(d["message_id"], d["reason"], d["queue"]) for d in doc] == [
            (m, "bad_signature: unknown signer kid abc", updates_queue(fed)) for m in ids]
        assert "reason: bad_signature: unknown signer kid abc" in out.stderr

        out = r.invoke(app, ["coordinator", "dead-letters", "show", ids[0], *common, "--json"])
        assert out.exit_code == 0 and json.loads(out.stdout)["size"] == 5
        out = r.invoke(app, ["coordinator", "dead-letters", "show", "nope", *common])
        assert out.exit_code == 2 and "no dead letter 'nope'" in out.stderr

        out = r.invoke(app, ["coordinator", "dead-letters", "purge", *common])
        assert out.exit_code == 2 and "--all" in out.stderr  # neither ids nor --all
        out = r.invoke(app, ["coordinator", "dead-letters", "requeue", ids[0], *common, "--json"])
        assert out.exit_code == 0 and json.loads(out.stdout) == [ids[0]]
        out = r.invoke(app, ["coordinator", "dead-letters", "purge", "--all", *common, "--json"])
        assert out.exit_code == 0 and json.loads(out.stdout) == [ids[1]]
        out = r.invoke(app, ["coordinator", "dead-letters", "list", *common, "--json"])
        assert json.loads(out.stdout) == []
    finally:
        bus.close()
        drop_broker(name)
