"""The MySQL/MariaDB server for tests: ``SINGLETON_TEST_MYSQL_URL``, else MariaDB at 127.0.0.1:3306 (root, database ``test``).

Also a throwaway MariaDB on a loopback port that speaks TLS with a certificate
made for the test (``start_throwaway_tls``): the packaged server here runs without TLS.
Under ``CI=true`` a missing server raises; elsewhere the test is skipped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import free_port, unavailable

__all__ = ["DEFAULT_URL", "ENV", "TlsServer", "answers", "start_throwaway_tls", "url"]

ENV = "SINGLETON_TEST_MYSQL_URL"
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"

_found: str | None = None


def answers(candidate: str, timeout: int = 3, **options: object) -> bool:
    """True when the server at ``candidate`` accepts a session (PyMySQL ``options`` added)."""
    import pymysql

    parts = urlsplit(candidate)
    try:
        pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                        user=unquote(parts.username or "root"), password=unquote(parts.password or ""),
                        database=unquote(parts.path.lstrip("/")) or None, connect_timeout=timeout,
                        **options).close()  # fmt: skip
    except pymysql.err.MySQLError:
        return False
    return True


def url() -> str:
    """The test server's URL, checked once per process."""
    global _found
    if _found is None:
        try:
            import pymysql  # noqa: F401
        except ImportError:
            unavailable("MySQL/MariaDB", "PyMySQL is not installed (pip install 'singleton-integrations[mysql]')")
        candidate = os.environ.get(ENV, DEFAULT_URL)
        if not answers(candidate):
            unavailable("MySQL/MariaDB", f"no server answers at {ENV} or {DEFAULT_URL}")
        _found = candidate
    return _found


@dataclass(frozen=True)
class TlsServer:
    """A throwaway MariaDB that offers TLS: its URL (root, no password, database ``test``) and the files made for it."""

    url: str
    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def drop_store_tables(base_url: str, table: str) -> None:
    """Drop a test's lock table and its waiters' and holds' tables from the server at ``base_url``."""
    import pymysql

    parts = urlsplit(base_url)
    connection = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=unquote(parts.username or "root"),
                                 password=unquote(parts.password or ""), database=parts.path.lstrip("/"),
                                 autocommit=True, connect_timeout=5)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS `{table}`, `{table}_waiters`, `{table}_holds`")
    finally:
        connection.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _make_certificates(directory: Path) -> None:
    """A CA, a server certificate for localhost only (not 127.0.0.1), a client certificate, and an unrelated CA."""
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=singleton test {ca}",
                 "-keyout", f"{ca}-key.pem", "-out", f"{ca}.pem", cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName = DNS:localhost\n")
    for who, extra in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=singleton test {who}",
                 "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", cwd=directory)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                 "-days", "2", "-out", f"{who}.pem", *extra, cwd=directory)


def start_throwaway_tls(ready: float = 60.0) -> TlsServer:
    """MariaDB in a temporary directory on a free loopback port, with TLS, stopped at exit."""
    install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd") or shutil.which("mysqld")
    if install is None or server is None or shutil.which("openssl") is None:
        raise FileNotFoundError("mariadb-install-db, mariadbd and openssl are needed")
    directory = Path(tempfile.mkdtemp(prefix="singleton-mariadb-tls-"))
    user = ["--user=root"] if os.geteuid() == 0 else []
    try:
        _make_certificates(directory)
        subprocess.run([install, "--no-defaults", f"--datadir={directory / 'data'}", "--auth-root-authentication-method=normal",
                        "--skip-test-db", *user], check=True, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    port = free_port()
    process = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={directory / 'data'}", f"--socket={directory / 'sock'}",
         f"--pid-file={directory / 'pid'}", "--bind-address=127.0.0.1", f"--port={port}", "--skip-name-resolve",
         "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M", "--skip-log-bin", *user,
         f"--ssl-ca={directory / 'ca.pem'}", f"--ssl-cert={directory / 'server.pem'}",
         f"--ssl-key={directory / 'server-key.pem'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    base = f"mysql://root@127.0.0.1:{port}/mysql"
    deadline = time.monotonic() + ready
    while not answers(base, timeout=2):
        if process.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"mariadbd did not start on port {port}")
        time.sleep(0.2)
    import pymysql

    with pymysql.connect(host="127.0.0.1", port=port, user="root", database="mysql", connect_timeout=5,
                         autocommit=True) as connection, connection.cursor() as cursor:  # fmt: skip
        cursor.execute("CREATE DATABASE IF NOT EXISTS test")
    return TlsServer(f"mysql://root@127.0.0.1:{port}/test", directory / "ca.pem", directory / "client.pem",
                     directory / "client-key.pem", directory / "other-ca.pem")
