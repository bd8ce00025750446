"""A throwaway 3-master Redis Cluster on loopback, from Debian's ``redis-server``.

Each node is a private ``redis-server --cluster-enabled yes`` on a free port with
a free cluster-bus port; the slots are split in three and the nodes meet each
other through ``CLUSTER ADDSLOTSRANGE`` / ``CLUSTER MEET``, so ``redis-cli`` is
not needed. ``start()`` returns once every node reports ``cluster_state:ok``.
"""

from __future__ import annotations

import atexit
import time
from dataclasses import dataclass, field

from . import free_port
from .redis_server import Throwaway, start_throwaway

__all__ = ["Cluster", "start"]

_SLOTS = 16384


@dataclass
class Cluster:
    """The nodes of a running cluster; ``url`` is what the persister takes."""

    nodes: list[Throwaway] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def start(masters: int = 3, ready: float = 30.0) -> Cluster:
    """Start ``masters`` cluster nodes, split the slots between them and wait for ``cluster_state:ok``."""
    import redis

    ports = _distinct_ports(2 * masters)
    cluster = Cluster()
    atexit.register(cluster.stop)
    try:
        for port, bus in zip(ports[:masters], ports[masters:], strict=True):
            cluster.nodes.append(start_throwaway(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus),
                "--cluster-node-timeout", "3000", port=port,
            ))
        clients = [redis.Redis(port=port, socket_timeout=5, decode_responses=True) for port in cluster.ports]
        share = _SLOTS // masters
        for index, client in enumerate(clients):
            first = index * share
            last = _SLOTS - 1 if index == masters - 1 else first + share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for port, bus in zip(ports[1:masters], ports[masters + 1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        deadline = time.monotonic() + ready
        while not all(_healthy(client, masters) for client in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the throwaway Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        for client in clients:
            client.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _healthy(client: object, masters: int) -> bool:
    info = client.execute_command("CLUSTER", "INFO")  # type: ignore[attr-defined]
    text = info if isinstance(info, str) else str(info)
    return "cluster_state:ok" in text and f"cluster_known_nodes:{masters}" in text
