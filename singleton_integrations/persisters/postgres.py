"""PostgreSQL: one row per name, every primitive one statement on a pooled connection.

A free name keeps its row with ``owner_token`` NULL, so its fencing counter
survives release (the same layout as the SQLite store). Expiry is judged by
``clock_timestamp()``, the server's wall clock at the moment the row is
checked: a statement that waited on a row lock still judges by the time it
actually looks, which ``now()`` (the transaction's start) would not.

Releases ``pg_notify`` one channel per table with the lock name as payload, so a
waiter LISTENs before its attempt and wakes at the release. A committing NOTIFY
holds a cluster-wide lock through its commit (so notifying transactions commit
one at a time) and wakes every listener in the database, so a release sends one
only when someone waits: each waiter holds a shared advisory lock on the name's
key while it listens, and the release notifies when it cannot take that key
exclusively.
The releaser's exclusive try-lock lasts until its commit, so a waiter arriving
meanwhile blocks on its shared lock until the release is visible and no wake-up
is lost.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url
from ._base import Persister, ReleaseWatch, SleepWatch

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["Postgres"]

logger = logging.getLogger("singleton_integrations.persisters.postgres")

_T = TypeVar("_T")
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated

# Each statement is a template: {table} is the quoted, possibly schema-qualified table.
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    name text PRIMARY KEY,
    owner_token text,
    fencing_token bigint NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    metadata jsonb NOT NULL
)
"""
_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata"
_LIVE = "owner_token IS NOT NULL AND (expires_at IS NULL OR expires_at > clock_timestamp())"

# One round trip that takes a free or expired name, or reports the live holder.
# ``previous`` locks the current row version first (FOR UPDATE re-reads the newest
# committed version under READ COMMITTED), so the row the upsert judges is the
# row we report: the expired holder we replaced, or the live one that kept it.
# The ON CONFLICT ... WHERE is the atomic guard itself: of several racers, the
# first to lock the row rewrites it and the others re-check the new, live
# version and back off. The fencing token is minted in the same write. Only what
# the client does not know comes back (a free row's leftovers are not sent).
_ACQUIRE = f"""
WITH previous AS MATERIALIZED (
    SELECT {_COLUMNS} FROM {{table}} WHERE name = %(name)s FOR UPDATE
), taken AS (
    INSERT INTO {{table}} AS held ({_COLUMNS})
    SELECT %(name)s, %(owner_token)s, 1, %(host)s, %(pid)s::integer, clock_timestamp(),
           clock_timestamp() + %(ttl)s::float8 * interval '1 second', %(metadata)s::jsonb
    FROM (VALUES (1)) AS one LEFT JOIN previous ON true
    ON CONFLICT (name) DO UPDATE SET
        owner_token = excluded.owner_token,
        fencing_token = held.fencing_token + 1,
        host = excluded.host,
        pid = excluded.pid,
        created_at = excluded.created_at,
        expires_at = excluded.expires_at,
        metadata = excluded.metadata
    WHERE held.owner_token IS NULL OR held.expires_at <= clock_timestamp()
    RETURNING fencing_token, created_at, expires_at
)
SELECT taken.*, previous.*, extract(epoch FROM previous.expires_at - clock_timestamp())::float8
FROM (VALUES (1)) AS one LEFT JOIN taken ON true LEFT JOIN previous ON previous.owner_token IS NOT NULL
"""
# The common case in one plain UPDATE: a name whose row is free (released before).
# It skips the upsert and the row lock above, a sixth of the server's time per cycle;
# a free row's leftovers are not reported, so the result is the same. Of racing
# callers the first to update the row wins: the others re-check the WHERE on the new,
# held version and update nothing, then take the full path above.
_ACQUIRE_FREE = """
UPDATE {table} SET owner_token = %(owner_token)s, fencing_token = fencing_token + 1, host = %(host)s,
    pid = %(pid)s::integer, created_at = clock_timestamp(),
    expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second', metadata = %(metadata)s::jsonb
WHERE name = %(name)s AND owner_token IS NULL
RETURNING fencing_token, created_at, expires_at
"""
# Frees the name if the token still owns it, and says whether the lease was still
# live: a lock that expired untaken is cleared too, but the caller lost it.
_RELEASE = """
WITH old AS (
    SELECT name, (expires_at IS NULL OR expires_at > clock_timestamp()) AS live FROM {table}
    WHERE name = %(name)s AND owner_token = %(owner_token)s FOR UPDATE
), released AS (
    UPDATE {table} AS freed SET owner_token = NULL, expires_at = NULL
    FROM old WHERE freed.name = old.name
    RETURNING old.live, freed.name
)
SELECT live, CASE WHEN pg_try_advisory_xact_lock(%(waiters)s) THEN false
                  ELSE (SELECT true FROM pg_notify(%(channel)s, name)) END
FROM released
"""
_RENEW = f"""
UPDATE {{table}} SET expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second'
WHERE name = %(name)s AND owner_token = %(owner_token)s AND {_LIVE}
RETURNING {_COLUMNS}
"""
_GET = f"SELECT {_COLUMNS} FROM {{table}} WHERE name = %(name)s AND {_LIVE}"
# left() compares characters literally, so '%', '_' and '\\' in a prefix are plain text;
# COLLATE "C" sorts by code point, as Python sorts the other stores' names.
_LIST = f"""
SELECT {_COLUMNS} FROM {{table}}
WHERE left(name, char_length(%(prefix)s)) = %(prefix)s AND {_LIVE}
ORDER BY name COLLATE "C"
"""
# The subquery locks and reads the row before the update, so RETURNING shows the removed holder.
_FORCE_RELEASE = f"""
UPDATE {{table}} AS freed SET owner_token = NULL, expires_at = NULL
FROM (SELECT {_COLUMNS} FROM {{table}} WHERE name = %(name)s AND {_LIVE} FOR UPDATE) AS holder
WHERE freed.name = holder.name
RETURNING holder.name, holder.owner_token, holder.fencing_token, holder.host, holder.pid,
          holder.created_at, holder.expires_at, holder.metadata, pg_notify(%(channel)s, holder.name)
"""
_CANONICAL_NAME = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(table)s)
"""

# Options that belong to this class rather than to libpq, readable from a URL's query.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "table": str,
    "connect_timeout": float,
    "statement_timeout_ms": int,
    "pool_timeout": float,
    "timeout": float,
    "min_size": int,
    "max_size": int,
    "prepare_threshold": lambda text: None if text.lower() in ("", "none", "null") else int(text),
}
# libpq settings that bound a dead peer unless the DSN chooses its own: keepalives
# notice a vanished server in about 11 s, tcp_user_timeout a send nobody acknowledges.
_NETWORK_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "singleton-integrations",
}
_KV_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
# How long a connection may stay out of the pool between calls before it goes back,
# so the pool's own lifetime and health policies still reach it.
_LEND_SECONDS = 60.0
# Pools a forked child must neither use nor finalize: their sockets belong to the parent.
_inherited_pools: list[object] = []


def _drivers() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as error:
        module = "psycopg_pool" if error.name == "psycopg_pool" else "psycopg"
        raise MissingDependency(backend="postgres", extra="postgres", module=module) from error
    return psycopg, psycopg_pool


def _redact(dsn: str) -> str:
    """A DSN safe to show: URL passwords and ``password=`` settings become ``***``."""
    return _KV_PASSWORD.sub(r"\1***", redact_url(dsn))


def _split_table(table: object) -> tuple[str, ...]:
    if isinstance(table, str):
        parts: tuple[str, ...] = tuple(table.split(".")) if "." in table else (table,)
    elif isinstance(table, tuple) and all(isinstance(part, str) for part in table):
        parts = table
    else:
        raise TypeError(f"table must be a str such as 'schema.table', not {type(table).__name__}")
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"table must be 'table' or 'schema.table', not {table!r}")
    for part in parts:
        if not part or "\x00" in part or len(part.encode()) > _MAX_IDENTIFIER_BYTES:
            raise ValueError(f"table name parts must be 1-{_MAX_IDENTIFIER_BYTES} bytes without NUL, not {part!r}")
    return parts


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, not {value!r}")
    return float(value)


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(timezone.utc)


def _record(row: tuple[Any, ...] | None, start: int = 0) -> LockRecord | None:
    if row is None:
        return None
    name, owner_token, fence, host, pid, created, expires, metadata = row[start:start + 8]
    if name is None or owner_token is None:
        return None
    return LockRecord(name, owner_token, fence, host, pid, _utc(created), _utc(expires), dict(metadata or {}))  # type: ignore[arg-type]


def _retriable(error: BaseException, pool_module: Any) -> bool:
    """A dropped connection (e.g. a server restart) rather than a verdict of the server."""
    if isinstance(error, (pool_module.PoolTimeout, pool_module.PoolClosed)):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


class _NoAnswer(TimeoutError):
    """The peer kept the socket open but did not answer within the call's deadline."""


def _bounded_waits(psycopg: Any) -> bool:
    """Whether this psycopg can wait for a statement with a deadline (3.3.6+: ``Connection.wait(timeout=)``).

    TCP settings cannot bound a peer that acknowledges bytes and never answers
    (a stuck proxy or pooler), so the deadline has to live in the client.
    """
    try:
        accepts_timeout = "timeout" in inspect.signature(psycopg.Connection.wait).parameters
    except (TypeError, ValueError):
        return False
    return accepts_timeout and hasattr(psycopg.Cursor, "_execute_gen") and hasattr(psycopg.errors, "_WaitTimeout")


class _NotifyWatch(ReleaseWatch):
    """A dedicated LISTEN connection; ``wait`` returns at a release of its name."""

    def __init__(self, connection: psycopg.Connection[Any], name: str, errors: tuple[type[BaseException], ...]) -> None:
        self._connection = connection
        self._name = name
        self._errors = errors
        self._broken = False

    def wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        if not self._broken:
            try:
                for notify in self._connection.notifies(timeout=timeout):
                    if notify.payload == self._name:
                        return
                return
            except self._errors as error:  # a lost listener degrades to polling; attempts still report outages
                self._broken = True
                logger.warning("LISTEN connection failed (%s); waiting by polling", type(error).__name__)
        time.sleep(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        with suppress(*self._errors):  # closing a broken connection has nothing left to do
            self._connection.close()


class Postgres(Persister):
    """Locks in a PostgreSQL table (created if missing), judged by the server's clock.

    ``dsn`` is a ``postgresql://`` URL or a libpq ``key=value`` string. Nothing
    connects until the first operation; each process then keeps one small pool
    of autocommit connections. ``table`` may be ``"schema.table"``.
    ``connect_timeout`` (default: the DSN's, else 5 s), ``statement_timeout_ms``
    and ``pool_timeout`` (waiting for a free pooled connection) bound every call,
    and ``timeout`` (default: the statement timeout + 0.5 s) bounds a whole call
    on the client, so a peer that swallows traffic fails it rather than hangs it.
    ``prepare_threshold=None`` turns prepared statements off, for PgBouncer in
    transaction mode before 1.21.
    """

    backend: ClassVar[str] = "postgres"
    distributed: ClassVar[bool] = True
    notifies: ClassVar[bool] = True
    clock: ClassVar[str] = "the PostgreSQL server's clock (clock_timestamp())"

    def __init__(
        self,
        dsn: str,
        *,
        table: str | tuple[str, str] = "singleton_locks",
        connect_timeout: float | None = None,
        statement_timeout_ms: int = 10_000,
        pool_timeout: float = 5.0,
        timeout: float | None = None,
        min_size: int = 1,
        max_size: int = 4,
        prepare_threshold: int | None = 5,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"a PostgreSQL DSN must be a str, not {type(dsn).__name__}")
        self._psycopg, self._psycopg_pool = _drivers()
        self.dsn = _redact(dsn)
        self._table_parts = _split_table(table)
        self.table = ".".join(self._table_parts)
        if isinstance(statement_timeout_ms, bool) or not isinstance(statement_timeout_ms, int) or statement_timeout_ms <= 0:
            raise ValueError(f"statement_timeout_ms must be a positive int, not {statement_timeout_ms!r}")
        self.statement_timeout_ms = statement_timeout_ms
        self.pool_timeout = _positive(pool_timeout, "pool_timeout")
        # Longer than the statement timeout, so a slow statement is cancelled by the
        # server (leaving its connection usable) before the client gives up on it.
        self.timeout = statement_timeout_ms / 1000 + 0.5 if timeout is None else _positive(timeout, "timeout")
        self._bounded = _bounded_waits(self._psycopg)
        if not self._bounded:
            logger.warning("psycopg %s cannot bound a statement on the client; upgrade to 3.3.9+ "
                           "so a peer that never answers cannot hang a call", self._psycopg.__version__)
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size must be an int >= 0, not {min_size!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < max(1, min_size):
            raise ValueError(f"max_size must be an int >= max(1, min_size), not {max_size!r}")
        self.min_size, self.max_size = min_size, max_size
        if prepare_threshold is not None and (isinstance(prepare_threshold, bool) or not isinstance(prepare_threshold, int)):
            raise TypeError("prepare_threshold must be an int or None (None disables prepared statements, e.g. for PgBouncer)")
        self.prepare_threshold = prepare_threshold

        try:
            params = self._psycopg.conninfo.conninfo_to_dict(dsn)
        except self._psycopg.Error as error:
            raise ValueError(f"invalid PostgreSQL DSN {self.dsn!r}: {self._scrub(str(error), dsn)}") from None
        self._password = str(params.get("password") or "")
        if connect_timeout is None:
            connect_timeout = float(params.get("connect_timeout") or 5)
        self.connect_timeout = _positive(connect_timeout, "connect_timeout")
        # libpq counts whole seconds and treats 1 as 2; round up so the bound is never shorter.
        params["connect_timeout"] = str(max(2, math.ceil(self.connect_timeout)))
        options = str(params.get("options") or "")
        params["options"] = f"{options} -c statement_timeout={statement_timeout_ms}".strip()
        for key, value in _NETWORK_DEFAULTS.items():
            params.setdefault(key, value)
        self._conninfo: str = self._psycopg.conninfo.make_conninfo("", **params)

        sql = self._psycopg.sql
        quoted = sql.Identifier(*self._table_parts)
        self._quoted_table: str = quoted.as_string(None)
        self._sql = {
            key: sql.SQL(template).format(table=quoted).as_string(None)
            for key, template in (("create", _CREATE_TABLE), ("acquire", _ACQUIRE), ("acquire_free", _ACQUIRE_FREE), ("release", _RELEASE),
                                  ("renew", _RENEW), ("get", _GET), ("list", _LIST), ("force_release", _FORCE_RELEASE))
        }
        self._channel = ""
        self._guard = threading.Lock()
        self._guard_pid = os.getpid()
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        # Connections this object keeps out of the pool between calls, with a reused
        # cursor each and the moment to hand them back (so the pool still recycles
        # them): list.pop/append are atomic, so the hot path takes no pool lock.
        self._idle: list[tuple[psycopg.Connection[Any], psycopg.Cursor[Any], float]] = []
        self._waiter_keys: dict[str, tuple[str, int]] = {}  # name -> (channel, key): a hash per release costs
        self._pool_pid = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Postgres:
        """``postgresql://`` or ``postgres://``; ``?table=`` and friends are options, keywords win.

        Other query settings (``sslmode``, ``application_name`` ...) go to libpq untouched.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"a PostgreSQL URL starts with postgresql:// or postgres://, not {_redact(url)!r}")
        # Split by hand: libpq decodes only %XX (a '+' is a plus), and its settings pass on verbatim.
        libpq: list[str] = []
        from_query: dict[str, Any] = {}
        for pair in filter(None, parts.query.split("&")):
            key, _, value = pair.partition("=")
            if unquote(key) in _URL_OPTIONS:
                key, value = unquote(key), unquote(value)
                try:
                    from_query[key] = _URL_OPTIONS[key](value)
                except ValueError:
                    raise ValueError(f"invalid {key}={value!r} in {_redact(url)!r}") from None
            else:
                libpq.append(pair)
        dsn = urlunsplit(parts._replace(query="&".join(libpq)))
        return cls(dsn, **{**from_query, **options})

    # -- connections ---------------------------------------------------------------

    def _scrub(self, message: str, dsn: str | None = None) -> str:
        """``message`` without the password, however the driver happened to quote it."""
        secrets = [getattr(self, "_password", "")]
        if dsn:
            secrets.append((urlsplit(dsn).password or "") if "://" in dsn else "")
            secrets += [match.group(2).strip("'") for match in _KV_PASSWORD.finditer(dsn)]
        for secret in secrets:
            if len(secret) >= 3:  # shorter ones would mangle the message and hide nothing
                message = message.replace(secret, "***")
        return _redact(message)

    def _error(self, action: str, error: BaseException) -> PersisterError:
        detail = self._scrub(str(error).strip() or type(error).__name__)
        return PersisterError(self.backend, f"{action} failed ({type(error).__name__.lstrip('_')}) on {self.dsn}: {detail}")

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """The one place where driver errors become ``PersisterError``, raised from the cause."""
        try:
            yield
        except PersisterError:
            raise
        except self._psycopg.Error as error:
            raise self._error(action, error) from error

    def _execute(self, connection: psycopg.Connection[Any], query: str, params: Mapping[str, Any] | tuple[Any, ...] | None,
                 timeout: float, *, prepare: bool | None = None, binary: bool = False,
                 cursor: psycopg.Cursor[Any] | None = None) -> psycopg.Cursor[Any]:
        """``connection.execute`` that gives up after ``timeout`` seconds, closing the connection.

        psycopg waits on the socket itself with the deadline: no thread, no signal.
        A statement abandoned halfway leaves the protocol in an unknown state, so the
        connection is closed (a pool then replaces it) and ``_NoAnswer`` raised.
        ``cursor`` (of ``connection``) is reused if given: creating one costs more than its use.
        """
        if cursor is None:
            cursor = connection.cursor(binary=binary)
        if not self._bounded:
            return cursor.execute(query, params, prepare=prepare)
        try:
            with connection.lock:
                connection.wait(cursor._execute_gen(query, params, prepare=prepare, binary=binary), timeout=max(timeout, 0.001))
        except self._psycopg.errors._WaitTimeout:
            connection.close()
            raise _NoAnswer(f"no answer within {timeout:.1f} s") from None
        return cursor

    def _check_connection(self, connection: psycopg.Connection[Any]) -> None:
        """The pool's health check (an empty statement), bounded like every other call."""
        self._execute(connection, "", None, min(self.timeout, self.connect_timeout))

    def _connect(self) -> psycopg.Connection[Any]:
        return self._psycopg.Connection.connect(
            self._conninfo, autocommit=True, prepare_threshold=self.prepare_threshold
        )

    def _ensure_table(self, connection: psycopg.Connection[Any]) -> None:
        """Create the table once, serialized by an advisory lock so racing processes don't collide.

        The caller closes ``connection`` afterwards, which also ends a failed transaction.
        """
        deadline = time.monotonic() + self.timeout
        exists = self._execute(connection, "SELECT to_regclass(%s) IS NOT NULL", (self._quoted_table,),
                               deadline - time.monotonic()).fetchone()
        if not (exists and exists[0]):
            key = int.from_bytes(hashlib.sha256(f"singleton_integrations:{self._quoted_table}".encode()).digest()[:8], "big", signed=True)
            try:
                self._execute(connection, "BEGIN", None, deadline - time.monotonic())
                self._execute(connection, "SELECT pg_advisory_xact_lock(%s)", (key,), deadline - time.monotonic())
                self._execute(connection, self._sql["create"], None, deadline - time.monotonic())
                self._execute(connection, "COMMIT", None, deadline - time.monotonic())
            except (self._psycopg.errors.UniqueViolation, self._psycopg.errors.DuplicateTable):
                # created meanwhile by a process that does not take our advisory lock
                self._execute(connection, "ROLLBACK", None, deadline - time.monotonic())
        # One channel per table, named from its canonical name so 'public.t' and 't' agree.
        row = self._execute(connection, _CANONICAL_NAME, {"table": self._quoted_table}, deadline - time.monotonic()).fetchone()
        schema, relation = row if row else ("", self.table)
        channel = f"singleton:{schema}.{relation}"
        if len(channel.encode()) > _MAX_IDENTIFIER_BYTES:
            channel = f"singleton:{hashlib.sha256(channel.encode()).hexdigest()[:40]}"
        self._channel = channel

    def _lock(self) -> threading.Lock:
        pid = os.getpid()
        if self._guard_pid != pid:  # a lock copied by fork may be held by a parent thread
            self._guard, self._guard_pid = threading.Lock(), pid
        return self._guard

    def _get_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._lock():
            if self._pool is not None and self._pool_pid == pid:
                return self._pool
            if self._pool is not None:
                _inherited_pools.append(self._pool)  # the parent's: never close or reuse it here
                self._pool = None
            # A direct first connection reports why a server is unreachable within
            # connect_timeout (a pool would only say it timed out) and creates the table.
            with self._translated("connecting"):
                connection = self._connect()
            try:
                with self._translated(f"opening table {self.table!r}"):
                    self._ensure_table(connection)
            except _NoAnswer as error:
                raise self._error(f"opening table {self.table!r}", error) from error
            finally:
                connection.close()
            with self._translated("connecting"):
                pool = self._psycopg_pool.ConnectionPool(
                    self._conninfo,
                    kwargs={"autocommit": True, "prepare_threshold": self.prepare_threshold},
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.pool_timeout,
                    name=f"singleton-{self.table}",
                    num_workers=1,
                    open=False,
                )
                pool.check_connection = self._check_connection  # pool.check() must not hang either
                # Waiting for min_size connections keeps the first getconn from growing the pool.
                try:
                    pool.open(wait=self.min_size > 0, timeout=self.pool_timeout)
                except BaseException:
                    pool.close(timeout=0)
                    raise
            self._idle = []  # a forked child must not touch the parent's connections
            self._pool, self._pool_pid = pool, pid
            return pool

    def _run(self, action: str, query_key: str, params: Mapping[str, Any], fetch: Callable[[Any], _T]) -> _T:
        """One statement on a pooled connection, tried again once on a fresh one if the connection dropped.

        A pooled connection dies unseen when the server restarts or a proxy drops it,
        and then fails before the server runs anything, so one more try is what a
        caller wants. (A connection lost after the server committed would make a
        retried release report False; that needs a crash in a microsecond window.)
        """
        deadline = time.monotonic() + self.timeout  # for the whole call, retry included
        pool = self._get_pool()
        idle = self._idle
        prepare = True if self.prepare_threshold is not None else None
        query = self._sql[query_key]
        for attempt in (1, 2):
            try:
                connection, cursor, hand_back = self._borrow(pool, idle, deadline)
                try:
                    result = fetch(self._execute(connection, query, params, deadline - time.monotonic(),
                                                 prepare=prepare, binary=True, cursor=cursor))
                except BaseException:
                    pool.putconn(connection)  # the pool checks it and replaces it if broken
                    raise
                if time.monotonic() < hand_back:
                    idle.append((connection, cursor, hand_back))
                else:
                    pool.putconn(connection)
                return result
            except _NoAnswer as error:
                raise self._error(action, error) from error
            except self._psycopg.OperationalError as error:
                if attempt == 1 and _retriable(error, self._psycopg_pool):
                    logger.debug("retrying %s after a dropped connection: %s", action, type(error).__name__)
                    self._hand_back(pool, idle)  # they likely died the same way: let the pool check them
                    try:
                        pool.check()  # replace every idle connection that died the same way
                    except self._psycopg.Error:
                        pass  # the retry reports it
                    continue
                raise self._error(action, error) from error
            except self._psycopg.Error as error:
                raise self._error(action, error) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _borrow(self, pool: psycopg_pool.ConnectionPool[Any], idle: list[Any], deadline: float) -> tuple[Any, Any, float]:
        """A connection kept from an earlier call, else one from the pool, within ``pool_timeout``.

        While every connection is busy, the pool is asked in short slices, so a
        connection returned to ``idle`` meanwhile is noticed rather than starved.
        """
        with suppress(IndexError):
            return idle.pop()
        started = time.monotonic()
        give_up = min(started + self.pool_timeout, deadline)
        while True:
            try:
                connection = pool.getconn(max(min(give_up - time.monotonic(), 0.05), 0.001))
            except self._psycopg_pool.PoolTimeout:
                with suppress(IndexError):
                    return idle.pop()
                if time.monotonic() >= give_up:
                    raise self._psycopg_pool.PoolTimeout(
                        f"couldn't get a connection after {time.monotonic() - started:.2f} sec") from None
                continue
            return connection, connection.cursor(binary=True), time.monotonic() + _LEND_SECONDS

    @staticmethod
    def _hand_back(pool: psycopg_pool.ConnectionPool[Any], idle: list[Any]) -> None:
        """Return every kept connection to the pool."""
        while True:
            try:
                connection = idle.pop()[0]
            except IndexError:
                return
            pool.putconn(connection)

    # -- the primitives ------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        params = {
            "name": name, "owner_token": owner.owner_token, "host": owner.host, "pid": owner.pid,
            "ttl": ttl, "metadata": json.dumps(dict(owner.metadata)) if owner.metadata else "{}",
        }
        # Retrying after a dropped connection is safe: if the first try did write,
        # the full statement finds our own token as the holder and reports the acquisition.
        row = self._run("acquire", "acquire_free", params, lambda cursor: cursor.fetchone())
        if row is not None:
            taken = LockRecord(name, owner.owner_token, row[0], owner.host, owner.pid,
                               _utc(row[1]), _utc(row[2]), dict(owner.metadata))  # type: ignore[arg-type]
            return AcquireResult(True, taken)
        for _ in range(2):  # held, expired, or never seen
            row = self._run("acquire", "acquire", params, lambda cursor: cursor.fetchone())
            fence, created, expires = row[0:3]
            previous, remaining = _record(row, 3), row[11]
            if fence is not None:
                taken = LockRecord(name, owner.owner_token, fence, owner.host, owner.pid,
                                   _utc(created), _utc(expires), dict(owner.metadata))  # type: ignore[arg-type]
                return AcquireResult(True, taken, expired=previous)
            if previous is not None:
                if previous.owner_token == owner.owner_token:
                    return AcquireResult(True, previous)
                return AcquireResult(False, previous, retry_after=None if remaining is None else max(remaining, 0.0))
            # The name's row was created after our statement's snapshot: look again with a fresh one.
        return AcquireResult(False, None)

    def release(self, name: str, owner_token: str) -> bool:
        params = {"name": name, "owner_token": owner_token, "channel": self._channel_name(),
                  "waiters": self._waiters_key(name)}
        return self._run("release", "release", params, lambda cursor: bool((cursor.fetchone() or (False,))[0]))

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        params = {"name": name, "owner_token": owner_token, "ttl": ttl}
        return self._run("renew", "renew", params, lambda cursor: _record(cursor.fetchone()))

    def get(self, name: str) -> LockRecord | None:
        return self._run("get", "get", {"name": name}, lambda cursor: _record(cursor.fetchone()))

    def list(self, prefix: str = "") -> list[LockRecord]:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        rows = self._run("list", "list", {"prefix": prefix}, lambda cursor: cursor.fetchall())
        return [record for record in map(_record, rows) if record is not None]

    def force_release(self, name: str) -> LockRecord | None:
        params = {"name": name, "channel": self._channel_name()}
        return self._run("force_release", "force_release", params, lambda cursor: _record(cursor.fetchone()))

    def watch(self, name: str) -> ReleaseWatch:
        """LISTEN on a connection of its own, opened before the caller's first attempt.

        The shared advisory lock it holds tells releases of ``name`` that someone waits.
        """
        self._get_pool()  # resolves the channel (and creates the table) first
        try:
            connection = self._connect()
        except self._psycopg.Error as error:
            logger.warning("cannot open a LISTEN connection (%s); waiting by polling", self._scrub(str(error)))
            return SleepWatch()
        try:
            sql = self._psycopg.sql
            # Both in one round trip (simple protocol); LISTEN first, so no release is missed.
            statement = sql.SQL("LISTEN {}; SELECT pg_advisory_lock_shared({})").format(
                sql.Identifier(self._channel), sql.Literal(self._waiters_key(name)))
            self._execute(connection, statement.as_string(connection), None, self.timeout)
        except (self._psycopg.Error, _NoAnswer) as error:
            connection.close()
            raise self._error("LISTEN", error) from error
        return _NotifyWatch(connection, name, (self._psycopg.Error, OSError))

    def _waiters_key(self, name: str) -> int:
        """The advisory-lock key that waiters on ``name`` hold shared (collisions only add a NOTIFY)."""
        channel = self._channel_name()
        key = self._waiter_keys.get(name)
        if key is None or key[0] != channel:
            digest = hashlib.sha256(f"{channel}\x00{name}".encode()).digest()
            if len(self._waiter_keys) >= 1024:  # a process locking endless distinct names
                self._waiter_keys.clear()
            key = self._waiter_keys[name] = (channel, int.from_bytes(digest[:8], "big", signed=True))
        return key[1]

    def _channel_name(self) -> str:
        if not self._channel or self._pool_pid != os.getpid():
            self._get_pool()
        return self._channel

    def close(self) -> None:
        """Close this process's pool; the next operation opens a new one."""
        with self._lock():
            pool, self._pool = self._pool, None
            if pool is None:
                return
            if self._pool_pid != os.getpid():
                _inherited_pools.append(pool)  # the parent's: its sockets are not ours to close
                return
            self._hand_back(pool, self._idle)
            with self._translated("closing"):
                pool.close(timeout=self.pool_timeout)

    def __repr__(self) -> str:
        return f"Postgres({self.dsn!r}, table={self.table!r})"
