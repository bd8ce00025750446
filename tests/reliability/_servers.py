"""Throwaway store servers the reliability tests may crash, freeze or stop: redis-server, SecantusDB, PostgreSQL.

Each runs on a free loopback port with its own data directory, so what a test
does to it disturbs no other test. ``freeze``/``thaw`` send SIGSTOP/SIGCONT to
the server and every process it forked (PostgreSQL serves each connection from
its own backend process).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["SERVERS", "SHORT", "MongoServer", "PostgresServer", "RedisServer", "Server", "descendants"]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, parents first (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        queue.extend(children.get(current, []))
    return found


SHORT = {"redis": "socket_timeout=1&socket_connect_timeout=1",
         "postgres": "connect_timeout=1&pool_timeout=2&statement_timeout_ms=2000",
         "mongodb": "timeoutMS=2000&serverSelectionTimeoutMS=2000&connectTimeoutMS=1000&socketTimeoutMS=2000"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {seconds} s")
        time.sleep(0.1)


class Server:
    """A throwaway server that can be crashed and started again on the same port and data."""

    kind = ""
    durable = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def url(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        **self.popen_options())
        _until(self.ready, 60, self.kind)

    def popen_options(self) -> dict[str, Any]:
        return {}

    def crash(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def signal_tree(self, signum: int) -> None:
        assert self.process is not None
        for pid in descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def freeze(self) -> None:
        """SIGSTOP the server and its children: connections stay open, nothing answers."""
        self.signal_tree(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal_tree(signal.SIGCONT)

    def kill_tree(self) -> None:
        """SIGKILL the server and its children: connections drop, the port refuses."""
        self.signal_tree(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _port_answers(port: int, probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            sock.sendall(probe)
            return sock.recv(64).startswith(expect)
    except OSError:
        return False


class RedisServer(Server):
    kind = "redis"

    def __init__(self, directory: Path, durable: bool) -> None:
        super().__init__(directory)
        self.durable = durable

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        return [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--dir", str(self.directory),
                *persistence]

    def ready(self) -> bool:
        return _port_answers(self.port, b"PING\r\n", b"+PONG")

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class MongoServer(Server):
    kind = "mongodb"

    def command(self) -> list[str]:
        binary = Path(sys.executable).with_name("secantusd-py")
        return [str(binary), "--host", "127.0.0.1", "--port", str(self.port), "--storage-path",
                str(self.directory / "data"), "--log-level", "WARNING"]

    def ready(self) -> bool:
        import pymongo

        try:
            with pymongo.MongoClient(self.url(), serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return True
        except Exception:
            return False

    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/singleton_restart?directConnection=true"


class PostgresServer(Server):
    kind = "postgres"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.bin = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
        initdb = shutil.which("initdb") or (str(self.bin / "initdb") if self.bin else None)
        if initdb is None:
            pytest.fail("initdb is not installed")
        self.postgres = str(Path(os.path.realpath(initdb)).with_name("postgres"))
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(directory, account.pw_uid, account.pw_gid)
        subprocess.run([initdb, "-D", str(directory / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=120,
                       **self.popen_options())

    def popen_options(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        account = pwd.getpwnam("postgres")

        def demote() -> None:
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)

        return {"preexec_fn": demote}

    def command(self) -> list[str]:
        return [self.postgres, "-D", str(self.directory / "data"), "-p", str(self.port), "-h", "127.0.0.1",
                "-k", str(self.directory)]

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except Exception:
            return False

    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


SERVERS = {
    "redis-aof": lambda d: RedisServer(d, durable=True),
    "redis-no-persistence": lambda d: RedisServer(d, durable=False),
    "mongodb": MongoServer,
    "postgres": PostgresServer,
}
