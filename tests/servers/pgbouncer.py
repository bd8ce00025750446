"""PgBouncer in front of the test PostgreSQL server: a throwaway one per pool mode, on a free loopback port.

The configuration is PgBouncer's default plus only what a private instance
needs: the one database line, trust authentication (with the user in
``auth_file``, which trust still requires), the pool mode, a small pool
(``default_pool_size = 5``) and private paths. No ``ignore_startup_parameters``,
no ``max_prepared_statements``: the persister must work with the defaults.

``SINGLETON_TEST_PGBOUNCER_<MODE>_URL`` points the tests at an existing PgBouncer
instead (and is exported for child processes). Under ``CI=true`` a missing
``pgbouncer`` binary fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import free_port, postgres_server, unavailable

__all__ = ["MODES", "POOL_SIZE", "server_connections", "url"]

MODES = ("transaction", "session")
POOL_SIZE = 5

_started: dict[str, str] = {}
_processes: dict[str, subprocess.Popen[bytes]] = {}


def _env(mode: str) -> str:
    return f"SINGLETON_TEST_PGBOUNCER_{mode.upper()}_URL"


def _binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(path)), None)


def _start(mode: str, backend: str, ready: float = 20.0) -> str:
    binary = _binary()
    if binary is None:
        raise FileNotFoundError("pgbouncer is not installed (apt-get install -y pgbouncer)")
    target = urlsplit(backend)
    user = target.username or "postgres"
    database = target.path.lstrip("/") or "postgres"
    directory = Path(tempfile.mkdtemp(prefix=f"singleton-pgbouncer-{mode}-"))
    port = free_port()
    (directory / "userlist.txt").write_text(f'"{user}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{database} = host={target.hostname or '127.0.0.1'} port={target.port or 5432} dbname={database}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'userlist.txt'}\n"
        f"pool_mode = {mode}\n"
        f"default_pool_size = {POOL_SIZE}\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
    )
    demote: dict[str, Any] = {}
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        account = pwd.getpwnam("postgres")
        for path in (directory, *directory.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        demote = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    # Its log goes to the file; a pipe nobody reads would fill up and stall PgBouncer.
    process = subprocess.Popen([binary, str(directory / "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **demote)

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    _processes[mode] = process
    found = f"postgresql://{user}@127.0.0.1:{port}/{database}"
    deadline = time.monotonic() + ready
    while not postgres_server.answers(found, timeout=2):
        if process.poll() is not None or time.monotonic() > deadline:
            log = (directory / "pgbouncer.log").read_text(errors="replace")[-2000:] if (directory / "pgbouncer.log").exists() else ""
            stop()
            raise RuntimeError(f"pgbouncer ({mode}) did not start on port {port}: {log}")
        time.sleep(0.1)
    return found


def url(mode: str) -> str:
    """A PgBouncer URL in ``mode`` ('transaction' or 'session') in front of the test server, started once per process."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode in _started:
        process = _processes.get(mode)
        if process is None or process.poll() is None:
            return _started[mode]
        # The pooler died under us (seen once while a second, slow reliability run shared the machine): start another
        # and say so, rather than fail every later test with "connection refused".
        warnings.warn(f"PgBouncer ({mode}) had exited with code {process.returncode}; starting another", stacklevel=2)
        del _started[mode]
        os.environ.pop(_env(mode), None)
    candidate = os.environ.get(_env(mode))
    if candidate:
        if not postgres_server.answers(candidate):
            unavailable("PgBouncer", f"{_env(mode)} is set but nothing answers there")
    else:
        backend = postgres_server.url()
        try:
            candidate = _start(mode, backend)
        except (OSError, KeyError, RuntimeError, subprocess.SubprocessError) as error:
            unavailable("PgBouncer", str(error))
    os.environ[_env(mode)] = candidate
    _started[mode] = candidate
    return candidate


def server_connections(admin: Any, application_prefix: str = "") -> int:
    """Server sessions of the test database opened by PgBouncer (or by the persister), seen in pg_stat_activity."""
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND application_name LIKE %s", (application_prefix + "%",)).fetchone()
    return int(row[0])
