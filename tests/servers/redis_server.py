"""The Redis server for tests: ``SINGLETON_TEST_REDIS_URL``, else 127.0.0.1:6379, else a throwaway one.

The URL found is exported in the environment so child processes use the same
server. Under ``CI=true`` a missing server raises; elsewhere the test is skipped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from . import free_port, unavailable

__all__ = ["DEFAULT_URL", "ENV", "Throwaway", "start_throwaway", "url"]

ENV = "SINGLETON_TEST_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"

_found: str | None = None


def _pong(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a Redis answers PING at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False



@dataclass
class Throwaway:
    """A private redis-server: its process, data directory and TCP port (0 when it has none)."""

    process: subprocess.Popen[bytes]
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_throwaway(*extra_args: str, port: int | None = None, ready: float = 15.0) -> Throwaway:
    """A private ``redis-server`` on 127.0.0.1 without persistence, stopped at exit at the latest.

    Tests that need a special server (a Unix socket, TLS) pass ``extra_args`` and
    ``port=0`` (no plain TCP port) and wait for it themselves.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    directory = Path(tempfile.mkdtemp(prefix="singleton-redis-"))
    chosen = free_port() if port is None else port
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(chosen), "--save", "", "--appendonly", "no",
         "--dir", str(directory), *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Throwaway(process, directory, chosen)
    atexit.register(server.stop)
    if chosen:
        deadline = time.monotonic() + ready
        while not _pong("127.0.0.1", chosen, timeout=0.5):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"redis-server did not start on port {chosen}")
            time.sleep(0.05)
    return server



def url() -> str:
    """The test Redis URL, found or started once per process."""
    global _found
    if _found is not None:
        return _found
    candidate = os.environ.get(ENV)
    if candidate:
        parts = urlsplit(candidate)
        if parts.scheme == "redis" and not _pong(parts.hostname or "127.0.0.1", parts.port or 6379):
            unavailable("Redis", f"{ENV} is set but its server does not answer")
    elif _pong("127.0.0.1", 6379):
        candidate = DEFAULT_URL
    else:
        try:
            candidate = start_throwaway().url
        except (FileNotFoundError, RuntimeError) as error:
            unavailable("Redis", f"nothing answers on 127.0.0.1:6379 and no throwaway server: {error}")
    os.environ[ENV] = candidate
    _found = candidate
    return candidate
