"""A three-node RabbitMQ cluster on localhost, started once per session.

Nodes ``fedbus-c<N>-<tag>@localhost`` with their own AMQP and distribution ports and
directories under a temporary folder owned by the rabbitmq user; joined with
``join_cluster``; stopped by their own pids at the end. Tests that kill a node
restart it (same name and data) before they return, so the next test finds three.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.nodes import RabbitNode, free_port, make_root, missing_prerequisite, start_all
from tests.conftest import unavailable


@dataclass
class Cluster:
    root: Path
    nodes: list[RabbitNode]

    @property
    def url(self) -> str:
        """Every node, comma-separated: what fedbus takes for a clustered broker."""
        return ",".join(f"amqp://guest:guest@127.0.0.1:{n.port}/%2F" for n in self.nodes)

    def node_url(self, n: RabbitNode) -> str:
        return f"amqp://guest:guest@127.0.0.1:{n.port}/%2F"

    def alive(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def by_name(self, node: str) -> RabbitNode:
        return next(n for n in self.nodes if n.node == node)

    def restart(self, n: RabbitNode, attempts: int = 3) -> None:
        """Start ``n`` again (same name and data) as an operator's service manager would: a
        node whose VM exits while booting is started again, up to ``attempts`` times; each
        early exit is printed with the end of the node's own log, so a run says why."""
        for attempt in range(1, attempts + 1):
            n.start()
            try:
                n.wait_ready()
                return
            except RuntimeError as e:
                if n.proc is None or n.proc.poll() is None or attempt == attempts:
                    raise
                print(f"cluster: {n.node} exited while booting (attempt {attempt}/{attempts}): {e}", file=sys.stderr)

    def running_members(self) -> set[str]:
        import json

        status = json.loads(self.alive()[0].ctl("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])


def _conf(port: int) -> str:
    return "\n".join([
        f"listeners.tcp.1 = 127.0.0.1:{port}",
        "loopback_users = none",
        "cluster_partition_handling = pause_minority",
        "",
    ])


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    why = missing_prerequisite()
    if why:
        unavailable(why)
    root = make_root("fedbus-cluster-")
    tag = uuid.uuid4().hex[:6]
    nodes = []
    for i in (1, 2, 3):
        port = free_port()
        nodes.append(RabbitNode(root, f"fedbus-c{i}-{tag}", _conf(port), port=port))
    try:
        start_all(nodes)
        for n in nodes[1:]:
            n.ctl("stop_app")
            n.ctl("reset")
            n.ctl("join_cluster", nodes[0].node)
            n.ctl("start_app")
        c = Cluster(root, nodes)
        assert c.running_members() == {n.node for n in nodes}
        yield c
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(root, ignore_errors=True)
