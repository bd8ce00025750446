"""The store crashes (kill -9) and restarts mid-hold: the holder recovers or reports ``lost``; never two holders.

Each test runs its own throwaway server so a restart disturbs no other test:
redis-server (with and without an append-only file), SecantusDB, and a
PostgreSQL cluster made with initdb.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from singleton_integrations import Singleton, persisters

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

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
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


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.slow] if name in ("postgres",) else [])
                        for name in SERVERS])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    directory = Path(tempfile.mkdtemp(prefix="singleton-restart-"))
    server = SERVERS[request.param](directory)
    server.name = request.param  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(180)
def test_store_crash_and_restart_mid_hold(server: Server, figures: dict[str, Any]) -> None:
    """kill -9 of the store while a renewing holder holds; restart on the same data. The holder either keeps the lock (a contender is refused) or reports ``lost``."""
    ttl = 6.0
    url = server.url() + ("&" if "?" in server.url() else "?") + SHORT[server.kind]
    holder = Singleton(f"reliability-restart-{uuid.uuid4().hex[:8]}", persisters.from_url(url),
                       lock_expire_seconds=ttl, auto_renew=True, renew_interval=1.0)
    lost, renewed, errors = threading.Event(), [], []
    holder.on("lost", lambda message: lost.set())
    holder.on("error", errors.append)
    holder.on("renewed", lambda message: renewed.append(time.monotonic()))
    assert holder.lock()
    first_token = holder.fencing_token
    server.crash()
    crashed_at = time.monotonic()
    time.sleep(1.0)
    server.start()
    restarted_at = time.monotonic()
    # Give renewal time to either succeed again or give up at the end of the lease.
    deadline = crashed_at + ttl + 10
    while time.monotonic() < deadline and not lost.is_set() and not any(t > restarted_at for t in renewed):
        time.sleep(0.1)
    kept = not lost.is_set() and holder.verify()
    contender = Singleton(holder.name, persisters.from_url(url), lock_expire_seconds=30)
    contender_got = contender.lock()
    figures.update(server=getattr(server, "name", server.kind), ttl_s=ttl, down_s=round(restarted_at - crashed_at, 2),
                   outcome="kept (renewals recovered)" if kept else "lost (reported)", renewal_errors=len(errors),
                   first_token=first_token, contender_acquired=contender_got,
                   contender_token=contender.fencing_token)
    if kept:
        assert not contender_got, "two holders after the restart"
        assert holder.release()
    else:
        assert lost.is_set() and holder.lost and not holder.held
        assert contender_got or contender.holder() is not None
        holder.release()
        if contender_got:
            assert contender.fencing_token > first_token, "the fencing counter went back after the restart"
        if contender_got:
            contender.release()
    if not server.durable:
        # Without persistence the restart forgets every lock: the holder must be told.
        assert not kept
    holder.persister.close()
    contender.persister.close()
