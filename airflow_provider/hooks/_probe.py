"""Read-only looks at a lock store, for the connection form's Test button.

A persister creates what it needs on first use (PostgreSQL's table, SQLite's file
and directories, MongoDB's clean-up index), so the Test button cannot simply call
one of its primitives: pointed at a mistyped path, or at Airflow's own metadata
database, that would write. Each probe here opens its own short-lived client with a
deadline, only reads, and reports a missing table or file as "no locks yet".
"""

from __future__ import annotations

import inspect
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from singleton_integrations.persisters import Persister

__all__ = ["probe"]

#: Seconds any one probe may take (connect plus one read).
PROBE_TIMEOUT = 5.0


def _locks(count: int) -> str:
    return "no live locks" if count == 0 else f"{count} live lock{'s' if count != 1 else ''}"


def _own_options(persister: Persister) -> set[str]:
    """The URL query keys the persister consumes itself (its constructor's keywords), not the driver."""
    return {name for name in inspect.signature(type(persister).__init__).parameters if name != "self"}


def _without(url: str, keys: set[str], keep: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in keys or k in keep]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _sqlite(persister: Any) -> tuple[bool, str]:
    path = Path(persister.path)
    if not path.exists():
        if path.parent.is_dir():
            return True, "no such file yet; its directory exists, and the first lock creates the file"
        return False, f"no such file or directory (the directory {str(path.parent)!r} does not exist either)"
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=PROBE_TIMEOUT)
    except sqlite3.Error as error:
        return False, f"cannot open the file read-only: {error}"
    try:
        if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'singleton_locks'").fetchone() is None:
            return True, "readable; no locks yet"
        count = connection.execute(
            "SELECT count(*) FROM singleton_locks WHERE owner_token IS NOT NULL AND (expires_at IS NULL OR expires_at > ?)",
            (time.time(),),
        ).fetchone()[0]
    except sqlite3.Error as error:
        return False, f"not a readable lock store: {error}"
    finally:
        connection.close()
    return True, f"readable; {_locks(count)}"


def _postgres(persister: Any, url: str) -> tuple[bool, str]:
    import psycopg

    libpq = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
    dsn = _without(url, _own_options(persister), keep=libpq)
    # The session refuses every write, whatever this code does.
    options = f"-c default_transaction_read_only=on -c statement_timeout={int(PROBE_TIMEOUT * 1000)}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=max(2, int(PROBE_TIMEOUT)), options=options) as db:
            exists = db.execute("SELECT to_regclass(%s) IS NOT NULL", (persister.table,)).fetchone()
            if not (exists and exists[0]):
                return True, f"reachable; no locks yet (table {persister.table!r} is created by the first lock)"
            table = psycopg.sql.Identifier(*persister.table.split("."))
            count = db.execute(
                psycopg.sql.SQL("SELECT count(*) FROM {} WHERE owner_token IS NOT NULL AND "
                                "(expires_at IS NULL OR expires_at > clock_timestamp())").format(table)
            ).fetchone()
    except psycopg.Error as error:
        return False, f"{type(error).__name__}: {error}"
    return True, f"reachable; table {persister.table!r} has {_locks(int(count[0]))}"


def _mongodb(persister: Any, url: str) -> tuple[bool, str]:
    import pymongo

    driver_url = _without(url, _own_options(persister))
    timeout_ms = int(PROBE_TIMEOUT * 1000)
    client: Any = pymongo.MongoClient(driver_url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
                                      socketTimeoutMS=timeout_ms, tz_aware=True)
    try:
        database = client[persister.database_name]
        names = database.list_collection_names(filter={"name": persister.collection_name})
        if not names:
            return True, f"reachable; no locks yet (collection {persister.collection_name!r} is created by the first lock)"
        count = database[persister.collection_name].estimated_document_count()
    except pymongo.errors.PyMongoError as error:
        return False, f"{type(error).__name__}: {error}"
    finally:
        client.close()
    return True, f"reachable; collection {persister.collection_name!r} has {count} name{'s' if count != 1 else ''}"


def _mysql(persister: Any, url: str) -> tuple[bool, str]:
    import pymysql

    parts = urlsplit(url)
    try:
        # A read-only session (MySQL 8 and MariaDB both refuse its writes), bounded by the probe's timeout.
        connection = pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                                     user=unquote(parts.username or ""), password=unquote(parts.password or ""),
                                     database=persister.database, connect_timeout=max(2, int(PROBE_TIMEOUT)),
                                     read_timeout=PROBE_TIMEOUT, write_timeout=PROBE_TIMEOUT)
    except pymysql.MySQLError as error:
        return False, f"{type(error).__name__}: {error}"
    try:
        with closing(connection), connection.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION READ ONLY")
            cursor.execute("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() "
                           "AND table_name = %s", (persister.table,))
            if not cursor.fetchone()[0]:
                return True, f"reachable; no locks yet (table {persister.table!r} is created by the first lock)"
            table = "`" + persister.table.replace("`", "``") + "`"
            cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE owner_token IS NOT NULL AND "
                           "(expires_at IS NULL OR expires_at > UTC_TIMESTAMP(6))")
            count = int(cursor.fetchone()[0])
    except pymysql.MySQLError as error:
        return False, f"{type(error).__name__}: {error}"
    return True, f"reachable; table {persister.table!r} has {_locks(count)}"


def probe(persister: Persister, url: str) -> tuple[bool, str]:
    """Reach the store and read once; never create a table, file, index or key."""
    backend = persister.backend
    if backend == "sqlite":
        return _sqlite(persister)
    if backend == "postgres":
        return _postgres(persister, url)
    if backend == "mongodb":
        return _mongodb(persister, url)
    if backend == "mysql":
        return _mysql(persister, url)
    # Redis (and any store whose reads write nothing): one read of a name nobody uses.
    persister.get("singleton-integrations/connection-test")
    return True, "reachable"
