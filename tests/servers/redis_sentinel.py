"""A throwaway master, replica and Sentinel on loopback, from Debian's ``redis-server``.

The Sentinel is ``redis-server sentinel.conf --sentinel`` (Debian's
``redis-sentinel`` package is the same binary under another name), with a
quorum of 1 so one Sentinel can fail the master over. ``failover()`` forces
``SENTINEL FAILOVER`` and waits until the replica is the master.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from . import free_port
from .redis_server import Throwaway, _pong, start_throwaway

__all__ = ["SERVICE", "Topology", "start"]

SERVICE = "singleton-test"


@dataclass
class Topology:
    """A master, its replica and one Sentinel watching them."""

    master: Throwaway
    replica: Throwaway
    sentinel: subprocess.Popen[bytes]
    sentinel_port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def master_port(self) -> int:
        import redis

        with redis.Redis(port=self.sentinel_port, socket_timeout=5, decode_responses=True) as client:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def failover(self, timeout: float = 60.0) -> int:
        """Force a failover to the replica; returns the new master's port once every side agrees."""
        import redis

        before = self.master_port()
        with redis.Redis(port=self.sentinel_port, socket_timeout=5, decode_responses=True) as client:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    client.execute_command("SENTINEL", "FAILOVER", SERVICE)
                    break
                except redis.ResponseError as error:  # INPROG / NOGOODSLAVE while it settles: retry
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"SENTINEL FAILOVER refused: {error}") from None
                    time.sleep(0.5)
        deadline = time.monotonic() + timeout
        while True:
            after = self.master_port()
            if after != before and _role(after) == "master":
                return after
            if time.monotonic() > deadline:
                raise RuntimeError("the failover did not complete")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.sentinel.poll() is None:
            self.sentinel.terminate()
            try:
                self.sentinel.wait(10)
            except subprocess.TimeoutExpired:
                self.sentinel.kill()
                self.sentinel.wait(10)
        self.replica.stop()
        self.master.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _role(port: int) -> str:
    import redis

    with redis.Redis(port=port, socket_timeout=5, decode_responses=True) as client:
        return str(client.info("replication")["role"])


def _wait(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(Exception):  # the server is still starting
            if check():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:g} s")
        time.sleep(0.1)


def start(ready: float = 30.0) -> Topology:
    """Start the master, the replica (linked) and the Sentinel (knowing both)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    master = start_throwaway()
    replica = start_throwaway("--replicaof", "127.0.0.1", str(master.port))
    directory = Path(tempfile.mkdtemp(prefix="singleton-sentinel-"))
    port = free_port()
    config = directory / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} 3000\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    sentinel = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    topology = Topology(master, replica, sentinel, port, directory)
    atexit.register(topology.stop)
    try:
        with redis.Redis(port=replica.port, socket_timeout=5, decode_responses=True) as client:
            _wait(lambda: client.info("replication").get("master_link_status") == "up", "the replica did not link", ready)
        _wait(lambda: _pong("127.0.0.1", port, timeout=0.5), "the Sentinel did not start", ready)
        with redis.Redis(port=port, socket_timeout=5, decode_responses=True) as client:
            _wait(lambda: len(client.execute_command("SENTINEL", "REPLICAS", SERVICE)) == 1,
                  "the Sentinel did not find the replica", ready)
    except BaseException:
        topology.stop()
        raise
    return topology
