"""A MongoDB-wire server for the tests: a real ``mongod`` from MONGODB_URL, else SecantusDB.

No real ``mongod`` can be installed from the registries these machines reach, so
the fixture starts SecantusDB (PyPI ``SecantusDB``: the MongoDB wire protocol on
WiredTiger) as its own process, on a free loopback port with a throwaway data
directory. The first process to call :func:`url` starts it and exports
``SINGLETON_TEST_MONGODB_URL`` so child processes reuse that server; only the
starting process stops it, at exit.

The reliability tests restart the store mid-hold with :func:`restart` (same port,
same data directory, so documents survive as they would on a mongod restart);
``restart(kill=True)`` simulates a crash with SIGKILL instead of SIGTERM.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import ServerUnavailable, free_port, unavailable

__all__ = ["ENV_VAR", "ServerUnavailable", "extra_server", "is_managed", "ping", "restart", "start", "stop", "url"]

#: Set by the process that started the server, read by its children.
ENV_VAR = "SINGLETON_TEST_MONGODB_URL"
#: Startup on a busy 2-core machine can take several seconds; allow plenty.
_START_TIMEOUT = 60.0
_PING_TIMEOUT_MS = 2000



@dataclass
class _Managed:
    """The SecantusDB process this test process started."""

    port: int
    data_dir: Path
    log_path: Path
    flags: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def ping_url(self) -> str:
        return self.url if "--tls-cert-file" not in self.flags else self.url + "?tls=true&tlsInsecure=true"


_guard = threading.Lock()
_managed: _Managed | None = None
_url: str | None = None


def ping(target: str, timeout_ms: int = _PING_TIMEOUT_MS) -> bool:
    """True when a server at ``target`` answers ``ping``."""
    import pymongo

    client: pymongo.MongoClient = pymongo.MongoClient(
        target, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, socketTimeoutMS=timeout_ms
    )
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _launch(managed: _Managed) -> None:
    """Start SecantusDB for ``managed`` and wait until it answers ``ping``."""
    config = managed.data_dir.parent / "secantusd.toml"
    config.touch()  # an explicit, empty config disables auto-discovery of stray ones
    command = [
        sys.executable, "-m", "secantus",
        "--config", str(config),
        "--host", "127.0.0.1",
        "--port", str(managed.port),
        "--storage-path", str(managed.data_dir),
        "--log-level", "WARNING",
        *managed.flags,
    ]  # fmt: skip
    log = open(managed.log_path, "ab")  # noqa: SIM115 - owned by the child from here on
    try:
        managed.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=managed.data_dir.parent, start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if managed.process.poll() is not None:
            raise ServerUnavailable(
                f"SecantusDB exited with code {managed.process.returncode} on port {managed.port}:\n"
                + _log_tail(managed.log_path)
            )
        if ping(managed.ping_url, timeout_ms=500):
            return
        time.sleep(0.1)
    _terminate(managed.process, kill=True)
    raise ServerUnavailable(
        f"SecantusDB did not answer ping within {_START_TIMEOUT:.0f} s:\n" + _log_tail(managed.log_path)
    )


def _terminate(process: subprocess.Popen[bytes] | None, *, kill: bool = False, timeout: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _stop_at_exit(owner_pid: int) -> None:
    global _managed
    if os.getpid() != owner_pid or _managed is None:
        return  # a forked child never stops its parent's server
    _terminate(_managed.process)
    shutil.rmtree(_managed.data_dir.parent, ignore_errors=True)
    if os.environ.get(ENV_VAR) == _managed.url:
        del os.environ[ENV_VAR]
    _managed = None


def _start(flags: tuple[str, ...] = ()) -> _Managed:
    if importlib.util.find_spec("secantus") is None:
        raise ServerUnavailable("SecantusDB is not installed; pip install 'singleton-integrations[test]'")
    root = Path(tempfile.mkdtemp(prefix="singleton-secantus-"))
    (root / "data").mkdir()
    last: Exception | None = None
    for _ in range(3):  # the free port can be taken between probing and binding
        managed = _Managed(port=free_port(), data_dir=root / "data", log_path=root / "secantusd.log", flags=flags)
        try:
            _launch(managed)
        except ServerUnavailable as error:
            last = error
            continue
        return managed
    shutil.rmtree(root, ignore_errors=True)
    raise ServerUnavailable(str(last))


def start() -> str:
    """Start a SecantusDB owned by this process (a few tries on a fresh port); returns its URL."""
    global _managed
    _managed = _start()
    atexit.register(_stop_at_exit, os.getpid())
    return _managed.url


@contextmanager
def extra_server(*flags: str) -> Iterator[str]:
    """A separate, short-lived SecantusDB with extra flags (``--standalone``, ``--tls-cert-file`` ...).

    Only SecantusDB can be started this way, so under MONGODB_URL these tests
    still run against a SecantusDB of their own.
    """
    try:
        managed = _start(tuple(flags))
    except ServerUnavailable as error:
        unavailable("MongoDB", f"cannot start SecantusDB {' '.join(flags)}: {error}")
        raise
    try:
        yield managed.url
    finally:
        _terminate(managed.process)
        shutil.rmtree(managed.data_dir.parent, ignore_errors=True)


def url() -> str:
    """The test server's URL: MONGODB_URL, a server a parent process started, or a new SecantusDB."""
    global _url
    with _guard:
        if _url is not None:
            return _url
        explicit = os.environ.get("MONGODB_URL")
        if explicit:
            if not ping(explicit, timeout_ms=5000):
                unavailable("MongoDB", "MONGODB_URL is set but its server does not answer ping")
            _url = explicit
            return _url
        inherited = os.environ.get(ENV_VAR)
        if inherited and ping(inherited):
            _url = inherited
            return _url
        try:
            started = start()
        except ServerUnavailable as error:
            unavailable("MongoDB", f"cannot start SecantusDB: {error}")
        os.environ[ENV_VAR] = started
        _url = started
        return _url


def is_managed() -> bool:
    """True when this process started the server, so it can stop or restart it."""
    return _managed is not None and _managed.process is not None


def stop(*, kill: bool = False) -> None:
    """Stop the managed server (SIGTERM, or SIGKILL with ``kill``) keeping its data for :func:`restart`."""
    if _managed is None:
        raise RuntimeError("this process did not start the MongoDB test server (MONGODB_URL or a parent's)")
    _terminate(_managed.process, kill=kill)


def restart(*, kill: bool = False, down_for: float = 0.0) -> str:
    """Stop the managed server, stay down ``down_for`` seconds, start it again on the same port and data."""
    stop(kill=kill)
    if down_for > 0:
        time.sleep(down_for)
    assert _managed is not None
    _launch(_managed)
    return _managed.url
