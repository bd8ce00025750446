"""The PostgreSQL server for tests: ``SINGLETON_TEST_POSTGRES_URL``, else 127.0.0.1:5432, else a throwaway one.

The URL found is exported in the environment so child processes use the same
server. Under ``CI=true`` a missing server raises; elsewhere the test is skipped.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from . import free_port, unavailable

__all__ = ["DEFAULT_URL", "ENV", "answers", "start_throwaway", "url"]

ENV = "SINGLETON_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

_found: str | None = None


def answers(candidate: str, timeout: int = 3) -> bool:
    """True when a PostgreSQL server at ``candidate`` accepts a session and runs a query."""
    try:
        import psycopg
    except ImportError:  # without the driver, an open port is the best available sign
        return _port_open(candidate, timeout)
    try:
        with psycopg.connect(candidate, connect_timeout=timeout, autocommit=True) as connection:
            connection.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _port_open(candidate: str, timeout: float) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(candidate)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=timeout):
            return True
    except OSError:
        return False



def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


def _restart_system_cluster() -> bool:
    """Start this machine's packaged cluster if it was stopped (Debian's pg_ctlcluster, as root)."""
    control = shutil.which("pg_ctlcluster")
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if control is None or not versions or os.geteuid() != 0:
        return False
    subprocess.run([control, "--skip-systemctl-redirect", versions[-1], "main", "start"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if answers(DEFAULT_URL, timeout=2):
            return True
        time.sleep(0.2)
    return False


def start_throwaway(ready: float = 30.0) -> str:
    """A private server in a temporary directory on a free port (trust auth), stopped at exit; returns its URL.

    PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user.
    """
    initdb, postgres = _binary("initdb"), _binary("postgres")
    if initdb is None or postgres is None:
        raise FileNotFoundError("initdb/postgres are not installed")
    directory = Path(tempfile.mkdtemp(prefix="singleton-postgres-"))
    demote: dict[str, Any] = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(directory, account.pw_uid, account.pw_gid)
        demote = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    data = directory / "data"
    subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=120, **demote)
    port = free_port()
    process = subprocess.Popen(
        [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(directory), "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **demote,
    )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    found = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + ready
    while not answers(found, timeout=2):
        if process.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"postgres did not start on port {port}")
        time.sleep(0.1)
    return found



def url() -> str:
    """The test PostgreSQL URL, found or started once per process."""
    global _found
    if _found is not None:
        return _found
    candidate = os.environ.get(ENV)
    if candidate:
        if not answers(candidate):
            unavailable("PostgreSQL", f"{ENV} is set but its server does not answer")
    elif answers(DEFAULT_URL) or _restart_system_cluster():
        candidate = DEFAULT_URL
    else:
        try:
            candidate = start_throwaway()
        except (OSError, KeyError, RuntimeError, subprocess.SubprocessError) as error:
            unavailable("PostgreSQL", f"nothing answers at {DEFAULT_URL} and no throwaway server: {error}")
    os.environ[ENV] = candidate
    _found = candidate
    return candidate
