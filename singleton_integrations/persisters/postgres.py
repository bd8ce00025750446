"""PostgreSQL: one row per name, every primitive one message on a shared, bounded set of connections.

The lock's statements and the reading of their answers live in
``_postgres_sql`` (no I/O); this module runs them on sync connections
(``psycopg_pool.ConnectionPool``) and on async ones (``psycopg.AsyncConnection``).

Behind a pooler each call is one simple-protocol message that begins with
``SET LOCAL statement_timeout``: it leaves no session state and prepares nothing
on the server, so the same code works behind PgBouncer in transaction pooling
and in session pooling, with PgBouncer's default configuration. On a direct
connection (``pooler='none'``, or ``auto`` finding none) the connections are
ours alone: each gets ``statement_timeout`` once, and the lock's hot statements
are prepared on it, which saves the server parsing and planning them on every
call (about a third of an uncontended cycle). Every call also has a client-side
deadline (``timeout``), because a pooler or proxy that accepts bytes and never
answers is invisible to TCP.

All persisters built from the same DSN and options in one process share one
store: one connection pool (at most ``max_size`` connections), one LISTEN
connection per table for waiters, one retention sweep schedule.

Waiting: releases ``pg_notify`` one channel per table with the lock name as
payload; one listener thread per store and table LISTENs and wakes the waiters
of this process (``ReleaseHub``). A release notifies only when a waiter's hint
is on the row (see ``_postgres_sql``). Behind a pooler, LISTEN needs a direct
connection (``listen_dsn``); without one, waiters poll every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url
from . import _postgres_sql as q
from ._base import DEFAULT_PURGE_AFTER_SECONDS, HubWatch, Persister, ReleaseHub, ReleaseWatch, run_blocking
from ._steps import asweep, purge_limit, sweep

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["POOLER_MODES", "Postgres"]

logger = logging.getLogger("singleton_integrations.persisters.postgres")

_T = TypeVar("_T")
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated

#: ``pooler=``: ``auto`` detects a pooler (its cancel key is not the server's) and then
#: behaves as ``session``; ``none`` is a direct server; ``transaction`` and ``session``
#: name PgBouncer's pool modes (``pgbouncer-transaction`` and ``pgbouncer-session`` too).
POOLER_MODES = ("auto", "none", "transaction", "session")
_POOLER_ALIASES = {"pgbouncer-transaction": "transaction", "pgbouncer-session": "session", "direct": "none"}

# Options that belong to this class rather than to libpq, readable from a URL's query.
_NONE_WORDS = ("", "none", "null")
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "table": str,
    "connect_timeout": float,
    "statement_timeout_ms": int,
    "pool_timeout": float,
    "timeout": float,
    "min_size": int,
    "max_size": int,
    "prepare_threshold": lambda text: None if text.lower() in _NONE_WORDS else int(text),
    "purge_after_seconds": lambda text: None if text.lower() in _NONE_WORDS else float(text),
    "pooler": str,
    "listen_dsn": str,
    "poll_interval": float,
}
# libpq settings that bound a dead peer unless the DSN chooses its own: keepalives
# notice a vanished server in about 11 s, tcp_user_timeout a send nobody acknowledges.
# None of them is a startup parameter a pooler could refuse.
_NETWORK_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "singleton-integrations",
}
_KV_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
#: A process sweeps a table for long-idle names at most this often.
PURGE_EVERY_SECONDS = 600.0
#: The listener checks its quiet LISTEN connection this often (keepalives may be off).
_LISTEN_HEARTBEAT = 10.0


def _rowcount(cursor: psycopg.Cursor[Any]) -> int:
    return cursor.rowcount


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


def _retriable(error: BaseException, pool_module: Any) -> bool:
    """A dropped connection (e.g. a server restart) rather than a verdict of the server."""
    if isinstance(error, (pool_module.PoolTimeout, pool_module.PoolClosed)):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


class _NoAnswer(TimeoutError):
    """The peer kept the socket open but did not answer within the call's deadline."""


#: psycopg's ``prepare_threshold`` when only statements executed with ``prepare=True`` may be
#: prepared: None would forbid even those, and no count of plain executions reaches this.
_PREPARE_ONLY_ON_REQUEST = 2**31 - 1


def _bounded_waits(psycopg: Any) -> bool:
    """Whether this psycopg can wait for a statement with a deadline (3.3.6+: ``Connection.wait(timeout=)``).

    TCP settings cannot bound a peer that acknowledges bytes and never answers
    (a stuck proxy or pooler), so the deadline has to live in the client.
    """
    try:
        accepts_timeout = all("timeout" in inspect.signature(cls.wait).parameters
                              for cls in (psycopg.Connection, psycopg.AsyncConnection))
    except (TypeError, ValueError):
        return False
    return accepts_timeout and hasattr(psycopg.Cursor, "_execute_gen") and hasattr(psycopg.errors, "_WaitTimeout")


def _channel(schema: str, relation: str) -> str:
    channel = f"singleton:{schema}.{relation}"
    if len(channel.encode()) > _MAX_IDENTIFIER_BYTES:
        channel = f"singleton:{hashlib.sha256(channel.encode()).hexdigest()[:40]}"
    return channel


def _setup_key(quoted_table: str) -> int:
    """The advisory-lock key that serializes creating or migrating one table."""
    return int.from_bytes(hashlib.sha256(f"singleton_integrations:{quoted_table}".encode()).digest()[:8], "big", signed=True)


# -- the store shared by every persister of one configuration in one process ------------


class _AsyncConnections:
    """Connections for one event loop: at most ``max_size`` in use, idle ones kept when the mode allows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_size: int, keep: bool) -> None:
        self.loop = loop
        self.slots = asyncio.Semaphore(max_size)
        self.idle: list[Any] = []
        self.keep = keep

    def discard_idle(self) -> None:
        """Close idle connections without a loop (theirs has closed): the socket is all there is left."""
        while self.idle:
            with suppress(Exception):
                self.idle.pop().pgconn.finish()


class _Store:
    """One configuration's connections in this process, shared by every ``Postgres`` built with it."""

    def __init__(self, conninfo: str, listen_conninfo: str | None, pooler: str, min_size: int, max_size: int,
                 pool_timeout: float, connect_timeout: float) -> None:
        self.conninfo = conninfo
        self.listen_conninfo = listen_conninfo
        self.declared = pooler
        #: 'direct', 'transaction' or 'session'; None until detected (pooler='auto').
        self.mode: str | None = {"none": "direct", "auto": None}.get(pooler, pooler)
        self.min_size, self.max_size = min_size, max_size
        self.pool_timeout, self.connect_timeout = pool_timeout, connect_timeout
        self.guard = threading.Lock()  # quick state changes only, never held across I/O
        self.setup = threading.Lock()  # creating tables and the pool: I/O, so watch() never waits on it
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self.per_call = threading.BoundedSemaphore(max_size)  # session mode: connections in use at once
        self.tables: dict[str, str] = {}  # quoted table -> NOTIFY channel, once created/migrated here
        self.hubs: dict[str, ReleaseHub] = {}
        self.purge_due: dict[str, float] = {}
        self.loops: dict[int, _AsyncConnections] = {}
        self.users = 0

    @property
    def keeps_connections(self) -> bool:
        """Session pooling pins a server connection to each open client connection: keep none between calls."""
        return self.mode != "session"

    def listen_target(self) -> str | None:
        """Where LISTEN goes: ``listen_dsn``, else the server itself when nothing pools in between."""
        if self.listen_conninfo is not None:
            return self.listen_conninfo
        return self.conninfo if self.mode == "direct" else None

    def async_connections(self) -> _AsyncConnections:
        loop = asyncio.get_running_loop()
        with self.guard:
            found = self.loops.get(id(loop))
            if found is not None and found.loop is loop:
                return found
            for key, stale in list(self.loops.items()):  # loops that closed (asyncio.run returned)
                if stale.loop.is_closed():
                    stale.discard_idle()
                    del self.loops[key]
            found = self.loops[id(loop)] = _AsyncConnections(loop, self.max_size, self.keeps_connections)
            return found

    def shut(self, pool_timeout: float) -> None:
        """Close everything this process holds for the store; the next call opens it again."""
        with self.guard:
            pool, self.pool = self.pool, None
            hubs, self.hubs = list(self.hubs.values()), {}
            for connections in self.loops.values():
                connections.discard_idle()
            self.loops = {}
            self.tables = {}
        for hub in hubs:
            hub.close()
        if pool is not None:
            pool.close(timeout=pool_timeout)


_stores: dict[tuple[Any, ...], _Store] = {}
_stores_guard = threading.Lock()
# Stores a forked child must neither use nor finalize: their sockets belong to the parent.
_inherited: list[object] = []


def _forget_parent_stores() -> None:
    global _stores_guard
    _stores_guard = threading.Lock()
    _inherited.extend(_stores.values())
    _stores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_stores)


class _Watch(ReleaseWatch):
    """A waiter on the store's hub; polls every ``poll`` seconds while nothing LISTENs for it."""

    def __init__(self, inner: HubWatch, hub: ReleaseHub, poll: float) -> None:
        self._inner, self._hub, self._poll = inner, hub, poll

    def _bound(self, timeout: float) -> float:
        return timeout if self._hub.subscribed.is_set() else min(timeout, self._poll)

    def wait(self, timeout: float) -> bool:
        return self._inner.wait(self._bound(timeout))

    async def wait_async(self, timeout: float) -> bool:
        return await self._inner.wait_async(self._bound(timeout))

    def close(self) -> None:
        self._inner.close()


class Postgres(Persister):
    """Locks in a PostgreSQL table (created if missing), judged by the server's clock.

    ``dsn`` is a ``postgresql://`` URL or a libpq ``key=value`` string. Nothing
    connects until the first operation. Every ``Postgres`` built from the same
    DSN, pool options and statement timeout in one process shares one pool of at most
    ``max_size`` connections (per event loop for the async calls), and callers
    wait up to ``pool_timeout`` (within the call's deadline) for a free one.
    ``table`` may be ``"schema.table"``.

    ``statement_timeout_ms`` bounds each statement on the server: behind a
    pooler it is set for each call's transaction (``SET LOCAL``, never at
    connection start, which PgBouncer refuses), on a direct connection once per
    connection; ``timeout`` (default: the statement timeout + 0.5 s) bounds a
    whole call on the client.
    ``pooler`` says what is in front of the server (``POOLER_MODES``);
    ``listen_dsn`` is a direct connection for LISTEN when a pooler is;
    ``poll_interval`` is how often waiters look again when nothing LISTENs.
    ``purge_after_seconds`` (default 30 days, ``None`` keeps all) is how long a
    free name's row is kept. ``prepare_threshold`` is accepted for old
    configurations and has no effect: what is prepared depends on ``pooler``.
    """

    backend: ClassVar[str] = "postgres"
    distributed: ClassVar[bool] = True

    @property
    def notifies(self) -> bool:  # type: ignore[override]  # a class attribute in Persister, worked out per store here
        """True unless a pooler is in front and no ``listen_dsn`` was given: then waiters poll."""
        store = self._store
        return store is None or store.listen_conninfo is not None or store.mode in (None, "direct")
    clock: ClassVar[str] = "the PostgreSQL server's clock (clock_timestamp())"
    supports_min_hold: ClassVar[bool] = True
    native_async: ClassVar[bool] = True

    @classmethod
    def preload(cls) -> None:
        _drivers()

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
        prepare_threshold: int | None = None,
        purge_after_seconds: float | None = DEFAULT_PURGE_AFTER_SECONDS,
        pooler: str = "auto",
        listen_dsn: str | None = None,
        poll_interval: float = 0.25,
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
        self.call_timeout = self.timeout
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
            raise TypeError("prepare_threshold must be an int or None")
        self.prepare_threshold = prepare_threshold
        self.purge_after_seconds = None if purge_after_seconds is None else _positive(purge_after_seconds, "purge_after_seconds")
        mode = _POOLER_ALIASES.get(str(pooler).lower(), str(pooler).lower()) if isinstance(pooler, str) else None
        if mode not in POOLER_MODES:
            raise ValueError(f"pooler must be one of {', '.join(POOLER_MODES)}, not {pooler!r}")
        self.pooler = mode
        self.poll_interval = _positive(poll_interval, "poll_interval")
        if listen_dsn is not None and not isinstance(listen_dsn, str):
            raise TypeError(f"listen_dsn must be a str, not {type(listen_dsn).__name__}")
        self.listen_dsn = None if listen_dsn is None else _redact(listen_dsn)

        self._secrets: list[str] = []
        if connect_timeout is None:
            connect_timeout = float(self._parse_dsn(dsn).get("connect_timeout") or 5)
        self.connect_timeout = _positive(connect_timeout, "connect_timeout")
        self._conninfo = self._conninfo_for(dsn)
        self._listen_conninfo = None if listen_dsn is None else self._conninfo_for(listen_dsn)

        sql = self._psycopg.sql
        quoted = sql.Identifier(*self._table_parts)
        self._quoted_table: str = quoted.as_string(None)
        table_sql = {name: template.format(table=self._quoted_table) for name, template in (
            ("acquire_free", q.ACQUIRE_FREE), ("acquire", q.ACQUIRE), ("hint", q.HINT), ("release", q.RELEASE),
            ("renew", q.RENEW), ("get", q.GET), ("list", q.LIST), ("force_release", q.FORCE_RELEASE),
            ("peek", q.PEEK), ("purge", q.PURGE), ("create", q.CREATE_TABLE), ("migrate", q.MIGRATE))}
        timeout_ms = statement_timeout_ms
        self._sql = {key: q.message(timeout_ms, table_sql[key]) for key in
                     ("acquire_free", "acquire", "peek", "release", "renew", "get", "list", "force_release", "purge")}
        # On a direct connection: the hot single statements, prepared (see the module docstring).
        self._prepared = {key: table_sql[key] for key in ("acquire_free", "acquire", "peek", "release", "renew", "get")}
        self._sql["acquire_hint"] = q.message(timeout_ms, table_sql["acquire"], table_sql["hint"])
        self._sql["inspect"] = q.message(timeout_ms, q.INSPECT)
        self._sql["setup"] = q.message(
            timeout_ms, f"SET LOCAL lock_timeout = {timeout_ms}",
            f"SELECT pg_advisory_xact_lock({_setup_key(self._quoted_table)})", table_sql["create"], table_sql["migrate"])
        # The statement timeout is in the key: a direct connection carries it as session state.
        self._store_key = (self._conninfo, self._listen_conninfo, self.pooler, min_size, max_size,
                           self.pool_timeout, self.connect_timeout, statement_timeout_ms)
        self._store: _Store | None = None
        self._store_pid = 0

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
                    shown = "***" if key == "listen_dsn" else value
                    raise ValueError(f"invalid {key}={shown!r} in {_redact(url)!r}") from None
            else:
                libpq.append(pair)
        dsn = urlunsplit(parts._replace(query="&".join(libpq)))
        return cls(dsn, **{**from_query, **options})

    # -- configuration ---------------------------------------------------------------

    def _parse_dsn(self, dsn: str) -> dict[str, Any]:
        try:
            params: dict[str, Any] = self._psycopg.conninfo.conninfo_to_dict(dsn)
        except self._psycopg.Error as error:
            raise ValueError(f"invalid PostgreSQL DSN {_redact(dsn)!r}: {self._scrub(str(error), dsn)}") from None
        password = str(params.get("password") or "")
        if password and password not in self._secrets:
            self._secrets.append(password)
        return params

    def _conninfo_for(self, dsn: str) -> str:
        params = self._parse_dsn(dsn)
        # libpq counts whole seconds and treats 1 as 2; round up so the bound is never shorter.
        params["connect_timeout"] = str(max(2, math.ceil(self.connect_timeout)))
        for key, value in _NETWORK_DEFAULTS.items():
            params.setdefault(key, value)
        return str(self._psycopg.conninfo.make_conninfo("", **params))

    # -- errors ------------------------------------------------------------------------

    def _scrub(self, message: str, dsn: str | None = None) -> str:
        """``message`` without a password, however the driver happened to quote it."""
        secrets = list(getattr(self, "_secrets", ()))
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
        except _NoAnswer as error:
            raise self._error(action, error) from error
        except self._psycopg.Error as error:
            raise self._error(action, error) from error

    # -- the shared store ------------------------------------------------------------------

    def _shared(self) -> _Store:
        """This configuration's store in this process (a forked child gets its own)."""
        pid = os.getpid()
        store = self._store
        if store is not None and self._store_pid == pid:
            return store
        with _stores_guard:
            store = _stores.get(self._store_key)
            if store is None:
                store = _stores[self._store_key] = _Store(
                    self._conninfo, self._listen_conninfo, self.pooler, self.min_size, self.max_size,
                    self.pool_timeout, self.connect_timeout)
            with store.guard:
                store.users += 1
        self._store, self._store_pid = store, pid
        return store

    def _detected(self, store: _Store, server_pid: int, key_pid: int) -> None:
        """pooler='auto': a pooler hands out its own cancel keys, so the pid it reports is not the server's."""
        if store.mode is not None:
            return
        store.mode = "direct" if server_pid == key_pid else "session"
        if store.mode == "session":
            logger.info("a connection pooler is in front of %s: connections are not kept between calls and "
                        "waiters %s; declare pooler='transaction' (or 'session') to choose", self.dsn,
                        "LISTEN through listen_dsn" if store.listen_conninfo else f"poll every {self.poll_interval:g} s")

    def _setup_plan(self, row: tuple[Any, ...] | None) -> str | None:
        """The channel when the table is ready, None when it must be created or migrated first."""
        if row is None or row[1] is None or int(row[2]) < len(q.NEW_COLUMNS):
            return None
        return _channel(row[0], row[1])

    def _execute(self, connection: psycopg.Connection[Any], query: str, params: Mapping[str, Any] | None,
                 timeout: float, prepared: bool = False) -> psycopg.Cursor[Any]:
        """Send one message and wait at most ``timeout`` seconds, closing the connection if it never answers.

        psycopg waits on the socket itself with the deadline: no thread, no signal.
        A message abandoned halfway leaves the protocol in an unknown state, so the
        connection is closed (a pool then replaces it) and ``_NoAnswer`` raised.
        A ``SET LOCAL`` message leaves the cursor on its second result; a
        ``prepared`` statement binds on the server and is prepared on first use.
        """
        cursor = self._psycopg.Cursor(connection) if prepared else connection.cursor()
        if not self._bounded:
            cursor.execute(query, params, prepare=prepared)
        else:
            try:
                with connection.lock:
                    connection.wait(cursor._execute_gen(query, params, prepare=prepared), timeout=max(timeout, 0.001))
            except self._psycopg.errors._WaitTimeout:
                connection.close()
                raise _NoAnswer(f"no answer within {max(timeout, 0.0):.1f} s") from None
        if not prepared:
            cursor.nextset()
        return cursor

    async def _aexecute(self, connection: psycopg.AsyncConnection[Any], query: str, params: Mapping[str, Any] | None,
                        timeout: float, prepared: bool = False) -> psycopg.AsyncCursor[Any]:
        """``_execute`` on an async connection: the wait holds no thread."""
        cursor = self._psycopg.AsyncCursor(connection) if prepared else connection.cursor()
        try:
            async with connection.lock:
                await connection.wait(cursor._execute_gen(query, params, prepare=prepared), timeout=max(timeout, 0.001))
        except self._psycopg.errors._WaitTimeout:
            await connection.close()
            raise _NoAnswer(f"no answer within {max(timeout, 0.0):.1f} s") from None
        if not prepared:
            cursor.nextset()
        return cursor

    def _statement(self, store: _Store, key: str) -> tuple[str, bool]:
        """The text to send for ``key`` and whether it is prepared: only on a direct connection."""
        if store.mode == "direct" and key in self._prepared:
            return self._prepared[key], True
        return self._sql[key], False

    def _session_timeout(self) -> str:
        return f"SET statement_timeout = {int(self.statement_timeout_ms)}"

    def _configure_direct(self, connection: psycopg.Connection[Any]) -> None:
        """A new direct connection's one piece of session state: the statement timeout its prepared statements run under."""
        self._execute(connection, self._session_timeout(), None, self.connect_timeout)

    def _connect_kwargs(self, asynchronous: bool = False, direct: bool = False) -> dict[str, Any]:
        """Behind a pooler psycopg may prepare nothing; on a direct connection only what asks to (``prepare=True``)."""
        factory = self._psycopg.AsyncClientCursor if asynchronous else self._psycopg.ClientCursor
        return {"autocommit": True, "cursor_factory": factory, "prepare_threshold": _PREPARE_ONLY_ON_REQUEST if direct else None}

    def _ready(self, deadline: float) -> _Store:
        """The store with this table created, migrated and its channel known (once per process)."""
        store = self._shared()
        if self._quoted_table in store.tables:
            return store
        with store.setup:
            if self._quoted_table in store.tables:
                return store
            with self._translated("connecting"):
                connection = self._psycopg.Connection.connect(self._conninfo, **self._connect_kwargs())
            try:
                with self._translated(f"opening table {self.table!r}"):
                    if store.mode is None:
                        pid = self._execute(connection, q.message(self.statement_timeout_ms, "SELECT pg_backend_pid()"),
                                            None, deadline - time.monotonic()).fetchone()
                        self._detected(store, int(pid[0]), connection.info.backend_pid)  # type: ignore[index]
                    store.tables[self._quoted_table] = self._prepare_table(connection, deadline)
            finally:
                connection.close()
        return store

    def _prepare_table(self, connection: psycopg.Connection[Any], deadline: float) -> str:
        params = {"table": self._quoted_table, "columns": list(q.NEW_COLUMNS)}
        for _ in range(3):
            channel = self._setup_plan(self._execute(connection, self._sql["inspect"], params, deadline - time.monotonic()).fetchone())
            if channel is not None:
                return channel
            # Created meanwhile by a process that does not take the advisory lock: look again.
            with suppress(self._psycopg.errors.UniqueViolation, self._psycopg.errors.DuplicateTable):
                self._execute(connection, self._sql["setup"], None, deadline - time.monotonic())
        raise self._error(f"opening table {self.table!r}", RuntimeError("the table could not be created"))

    async def _aready(self, deadline: float) -> _Store:
        store = self._shared()
        if self._quoted_table in store.tables:
            return store
        with self._translated("connecting"):
            connection = await asyncio.wait_for(
                self._psycopg.AsyncConnection.connect(self._conninfo, **self._connect_kwargs(True)),
                max(deadline - time.monotonic(), 0.001))
        try:
            with self._translated(f"opening table {self.table!r}"):
                if store.mode is None:
                    pid = await (await self._aexecute(connection, q.message(self.statement_timeout_ms, "SELECT pg_backend_pid()"),
                                                      None, deadline - time.monotonic())).fetchone()
                    self._detected(store, int(pid[0]), connection.info.backend_pid)  # type: ignore[index]
                params = {"table": self._quoted_table, "columns": list(q.NEW_COLUMNS)}
                channel = None
                for _ in range(3):
                    cursor = await self._aexecute(connection, self._sql["inspect"], params, deadline - time.monotonic())
                    channel = self._setup_plan(await cursor.fetchone())
                    if channel is not None:
                        break
                    with suppress(self._psycopg.errors.UniqueViolation, self._psycopg.errors.DuplicateTable):
                        await self._aexecute(connection, self._sql["setup"], None, deadline - time.monotonic())
                if channel is None:
                    raise self._error(f"opening table {self.table!r}", RuntimeError("the table could not be created"))
                store.tables[self._quoted_table] = channel
        finally:
            await connection.close()
        return store

    # -- borrowing connections -------------------------------------------------------------

    def _pool(self, store: _Store) -> psycopg_pool.ConnectionPool[psycopg.Connection[Any]]:
        pool = store.pool
        if pool is not None:
            return pool
        with store.setup:
            if store.pool is None:
                with self._translated("connecting"):
                    pool = self._psycopg_pool.ConnectionPool(
                        store.conninfo, kwargs=self._connect_kwargs(direct=store.mode == "direct"),
                        min_size=store.min_size, max_size=store.max_size,
                        timeout=store.pool_timeout, name="singleton-postgres", num_workers=1, open=False,
                        configure=self._configure_direct if store.mode == "direct" else None)
                    pool.check_connection = self._check_connection  # pool.check() must not hang either
                    try:
                        pool.open(wait=store.min_size > 0, timeout=store.pool_timeout)
                    except BaseException:
                        pool.close(timeout=0)
                        raise
                store.pool = pool
            return store.pool

    def _check_connection(self, connection: psycopg.Connection[Any]) -> None:
        """The pool's health check, bounded like every other call."""
        self._execute(connection, q.message(self.statement_timeout_ms, "SELECT 1"), None, min(self.timeout, self.connect_timeout))

    def _borrow(self, store: _Store, deadline: float) -> psycopg.Connection[Any]:
        wait = max(min(store.pool_timeout, deadline - time.monotonic()), 0.001)
        if store.keeps_connections:
            return self._pool(store).getconn(timeout=wait)
        if not store.per_call.acquire(timeout=wait):
            raise self._psycopg_pool.PoolTimeout(f"couldn't get a connection after {wait:.2f} sec")
        try:
            connection: psycopg.Connection[Any] = self._psycopg.Connection.connect(store.conninfo, **self._connect_kwargs())
            return connection
        except BaseException:
            store.per_call.release()
            raise

    def _give_back(self, store: _Store, connection: psycopg.Connection[Any]) -> None:
        if store.keeps_connections and store.pool is not None:
            store.pool.putconn(connection)  # the pool checks it and replaces it if broken
            return
        try:
            connection.close()
        finally:
            if not store.keeps_connections:
                store.per_call.release()

    def _run(self, action: str, key: str, params: Mapping[str, Any], deadline: float,
             fetch: Callable[[Any], _T]) -> _T:
        """One message on a borrowed connection, tried again once on a fresh one if the connection dropped.

        A pooled connection dies unseen when the server restarts or a proxy drops it,
        and then fails before the server runs anything, so one more try is what a
        caller wants. (A connection lost after the server committed would make a
        retried release report False; that needs a crash in a microsecond window.)
        """
        with self._translated(action):
            store = self._ready(deadline)
        for attempt in (1, 2):
            try:
                connection = self._borrow(store, deadline)
                try:
                    query, prepared = self._statement(store, key)
                    return fetch(self._execute(connection, query, params, deadline - time.monotonic(), prepared))
                finally:
                    self._give_back(store, connection)
            except _NoAnswer as error:
                raise self._error(action, error) from error
            except self._psycopg.OperationalError as error:
                if attempt == 1 and _retriable(error, self._psycopg_pool) and time.monotonic() < deadline:
                    logger.debug("retrying %s after a dropped connection: %s", action, type(error).__name__)
                    if store.pool is not None:
                        with suppress(self._psycopg.Error):
                            store.pool.check()  # replace every idle connection that died the same way
                    continue
                raise self._error(action, error) from error
            except self._psycopg.Error as error:
                raise self._error(action, error) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _arun(self, action: str, key: str, params: Mapping[str, Any], deadline: float, many: bool = False) -> Any:
        """``_run`` for coroutines; returns the row (or rows with ``many``), or the row count for ``purge``."""
        with self._translated(action):
            store = await self._aready(deadline)
        connections = store.async_connections()
        for attempt in (1, 2):
            try:
                try:
                    await asyncio.wait_for(connections.slots.acquire(), max(min(store.pool_timeout, deadline - time.monotonic()), 0.001))
                except (asyncio.TimeoutError, TimeoutError):
                    raise self._psycopg_pool.PoolTimeout(f"couldn't get a connection after {store.pool_timeout:.2f} sec") from None
                connection: psycopg.AsyncConnection[Any] | None = None
                try:
                    while connections.idle and connection is None:
                        candidate = connections.idle.pop()
                        connection = None if candidate.closed else candidate
                    if connection is None:
                        fresh: psycopg.AsyncConnection[Any] = await asyncio.wait_for(
                            self._psycopg.AsyncConnection.connect(
                                store.conninfo, **self._connect_kwargs(True, direct=store.mode == "direct")),
                            max(deadline - time.monotonic(), 0.001))
                        connection = fresh
                        if store.mode == "direct":
                            await self._aexecute(fresh, self._session_timeout(), None, deadline - time.monotonic())
                    assert connection is not None
                    query, prepared = self._statement(store, key)
                    cursor = await self._aexecute(connection, query, params, deadline - time.monotonic(), prepared)
                    if key == "purge":
                        return cursor.rowcount
                    return await (cursor.fetchall() if many else cursor.fetchone())
                finally:
                    if connection is not None:
                        idle = self._psycopg.pq.TransactionStatus.IDLE
                        if connections.keep and not connection.closed and connection.info.transaction_status == idle:
                            connections.idle.append(connection)
                        else:
                            with suppress(self._psycopg.Error):
                                await connection.close()
                    connections.slots.release()
            except (asyncio.TimeoutError, TimeoutError, _NoAnswer) as error:
                raise self._error(action, _NoAnswer(str(error) or "no answer within the call's deadline")) from error
            except self._psycopg.OperationalError as error:
                if attempt == 1 and _retriable(error, self._psycopg_pool) and time.monotonic() < deadline:
                    logger.debug("retrying %s after a dropped connection: %s", action, type(error).__name__)
                    connections.discard_idle()
                    continue
                raise self._error(action, error) from error
            except self._psycopg.Error as error:
                raise self._error(action, error) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    # -- waiting -----------------------------------------------------------------------

    def _hub(self) -> ReleaseHub:
        store = self._shared()
        hub = store.hubs.get(self._quoted_table)
        if hub is not None:
            return hub
        with store.guard:
            hub = store.hubs.get(self._quoted_table)
            if hub is None:
                may_listen = store.listen_conninfo is not None or store.mode in (None, "direct")
                hub = store.hubs[self._quoted_table] = ReleaseHub(
                    self._listen if may_listen else None, thread_name=f"singleton-postgres-listen-{self.table}")
            return hub

    def _listen(self, hub: ReleaseHub, stop: threading.Event) -> None:
        """The hub's thread: LISTEN on one connection and wake this process's waiters at each release."""
        store = self._ready(self._deadline())  # the channel, and whether a pooler is in front
        channel = store.tables[self._quoted_table]
        target = store.listen_target()
        if target is None:  # a pooler and no listen_dsn: waiters poll
            stop.wait()
            return
        with self._translated("LISTEN"):
            connection = self._psycopg.Connection.connect(target, autocommit=True)
        try:
            with self._translated("LISTEN"):
                statement = self._psycopg.sql.SQL("LISTEN {}").format(self._psycopg.sql.Identifier(channel))
                self._execute_plain(connection, statement.as_string(connection))
                hub.ready()
                quiet_since = time.monotonic()
                while not stop.is_set():
                    for notify in connection.notifies(timeout=0.5):
                        hub.notify(notify.payload)
                        quiet_since = time.monotonic()
                    if time.monotonic() - quiet_since > _LISTEN_HEARTBEAT:
                        self._execute_plain(connection, "SELECT 1")
                        quiet_since = time.monotonic()
        finally:
            connection.close()

    def _execute_plain(self, connection: psycopg.Connection[Any], statement: str) -> None:
        cursor = connection.cursor()
        try:
            with connection.lock:
                connection.wait(cursor._execute_gen(statement, None, prepare=False), timeout=self.timeout)
        except self._psycopg.errors._WaitTimeout:
            connection.close()
            raise _NoAnswer(f"no answer within {self.timeout:.1f} s") from None

    def watch(self, name: str) -> ReleaseWatch:  # type: ignore[override]  # owner_token is only passed when ``fair``
        """A waiter on this process's one listener for the table; registers only, no I/O here."""
        hub = self._hub()
        return _Watch(hub.watch(name), hub, self.poll_interval)

    def _hinting(self, name: str) -> bool:
        """Whether a failed attempt should leave a waiter's hint: this process LISTENs for ``name``."""
        store = self._store
        hub = None if store is None else store.hubs.get(self._quoted_table)
        return hub is not None and hub.subscribed.is_set() and name in hub.names()

    def _released(self, name: str) -> None:
        """Wake this process's waiters for ``name`` at once; other processes hear the NOTIFY."""
        store = self._store
        hub = None if store is None else store.hubs.get(self._quoted_table)
        if hub is not None:
            hub.notify(name)

    # -- retention -----------------------------------------------------------------------

    def _purge_due(self) -> bool:
        store = self._store
        if self.purge_after_seconds is None or store is None:
            return False
        now = time.monotonic()
        with store.guard:
            if store.purge_due.get(self._quoted_table, 0.0) > now:
                return False
            store.purge_due[self._quoted_table] = now + PURGE_EVERY_SECONDS
        return True

    def _purge_params(self, limit: int, after: float | None) -> dict[str, Any]:
        limit = purge_limit(limit)
        period = self.purge_after_seconds if after is None else _positive(after, "after")
        if period is None:
            raise ValueError("purge_after_seconds is None: this store keeps every name's state")
        return {"after": period, "limit": limit}

    def purge(self, limit: int = 1000, *, after: float | None = None) -> int:
        """Delete up to ``limit`` rows of names free (or expired untaken) for ``purge_after_seconds``; returns how many.

        Releases run this on their own at most every ``PURGE_EVERY_SECONDS`` per
        process and table; call it to sweep now. Fencing tokens still rise for a
        purged name: a new row starts from the server's clock in milliseconds.
        """
        return self._run("purge", "purge", self._purge_params(limit, after), self._deadline(), _rowcount)

    async def apurge(self, limit: int = 1000, *, after: float | None = None) -> int:
        """``purge`` for coroutines."""
        return int(await self._arun("purge", "purge", self._purge_params(limit, after), self._deadline()))

    def _sweep(self) -> None:
        if self._purge_due():
            sweep(self.purge, self.table)

    async def _asweep(self) -> None:
        if self._purge_due():
            await asweep(self.apurge, self.table)

    # -- the primitives ------------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None,  # type: ignore[override]  # no queue_for: it is only passed when ``fair``, and this store is not
                min_hold: float | None = None) -> AcquireResult:
        deadline = self._deadline()
        params = q.acquire_params(name, owner, ttl, min_hold)
        # Retrying after a dropped connection is safe: if the first try did write,
        # the full statement finds our own token as the holder and reports the acquisition.
        result = q.parse_acquire_free(self._run("acquire", "acquire_free", params, deadline, _one), name, owner)
        if result is not None:
            return result
        hinting = self._hinting(name)
        result = q.parse_peek(self._run("acquire", "peek", params, deadline, _one), owner, hinting)
        if result is not None:
            return result
        key = "acquire_hint" if hinting else "acquire"
        for _ in range(2):  # held, expired, in its minimum hold, or never seen
            result = q.parse_acquire(self._run("acquire", key, params, deadline, _one), name, owner)
            if result is not None:
                return result
        return AcquireResult(False, None)

    async def aacquire(self, name: str, owner: Owner, ttl: float | None,  # type: ignore[override]  # no queue_for: it is only passed when ``fair``, and this store is not
                       min_hold: float | None = None) -> AcquireResult:
        deadline = self._deadline()
        params = q.acquire_params(name, owner, ttl, min_hold)
        result = q.parse_acquire_free(await self._arun("acquire", "acquire_free", params, deadline), name, owner)
        if result is not None:
            return result
        hinting = self._hinting(name)
        result = q.parse_peek(await self._arun("acquire", "peek", params, deadline), owner, hinting)
        if result is not None:
            return result
        key = "acquire_hint" if hinting else "acquire"
        for _ in range(2):
            result = q.parse_acquire(await self._arun("acquire", key, params, deadline), name, owner)
            if result is not None:
                return result
        return AcquireResult(False, None)

    def _release_params(self, name: str, owner_token: str) -> dict[str, Any]:
        return {"name": name, "owner_token": owner_token, "channel": self._channel()}

    def _channel(self) -> str:
        store = self._store
        return "" if store is None else store.tables.get(self._quoted_table, "")

    def _after_release(self, name: str, row: tuple[Any, ...] | None) -> bool:
        if row is None:
            return False
        live, holding = bool(row[0]), bool(row[1])
        if not holding:
            self._released(name)
        return live

    def release(self, name: str, owner_token: str) -> bool:
        deadline = self._deadline()
        with self._translated("release"):
            self._ready(deadline)
        row = self._run("release", "release", self._release_params(name, owner_token), deadline, _one)
        released = self._after_release(name, row)
        self._sweep()
        return released

    async def arelease(self, name: str, owner_token: str) -> bool:
        deadline = self._deadline()
        with self._translated("release"):
            await self._aready(deadline)
        row = await self._arun("release", "release", self._release_params(name, owner_token), deadline)
        released = self._after_release(name, row)
        await self._asweep()
        return released

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        params = {"name": name, "owner_token": owner_token, "ttl": ttl}
        return q.record(self._run("renew", "renew", params, self._deadline(), _one))

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        params = {"name": name, "owner_token": owner_token, "ttl": ttl}
        return q.record(await self._arun("renew", "renew", params, self._deadline()))

    def get(self, name: str) -> LockRecord | None:
        return q.record(self._run("get", "get", {"name": name}, self._deadline(), _one))

    async def aget(self, name: str) -> LockRecord | None:
        return q.record(await self._arun("get", "get", {"name": name}, self._deadline()))

    @staticmethod
    def _list_params(prefix: str) -> dict[str, Any]:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        return {"prefix": prefix}

    def list(self, prefix: str = "") -> list[LockRecord]:
        rows = self._run("list", "list", self._list_params(prefix), self._deadline(), lambda cursor: cursor.fetchall())
        return [record for record in map(q.record, rows) if record is not None]

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:
        rows = await self._arun("list", "list", self._list_params(prefix), self._deadline(), many=True)
        return [record for record in map(q.record, rows) if record is not None]

    def force_release(self, name: str) -> LockRecord | None:
        deadline = self._deadline()
        with self._translated("force_release"):
            self._ready(deadline)
        removed = q.record(self._run("force_release", "force_release", {"name": name, "channel": self._channel()}, deadline, _one))
        if removed is not None:
            self._released(name)
        return removed

    async def aforce_release(self, name: str) -> LockRecord | None:
        deadline = self._deadline()
        with self._translated("force_release"):
            await self._aready(deadline)
        removed = q.record(await self._arun("force_release", "force_release", {"name": name, "channel": self._channel()}, deadline))
        if removed is not None:
            self._released(name)
        return removed

    # -- closing -------------------------------------------------------------------------

    def _detach(self) -> _Store | None:
        """Stop using the shared store; the last user closes it. Returns the store when it is to be closed."""
        store, self._store = self._store, None
        if store is None or self._store_pid != os.getpid():
            return None  # never opened here, or the parent's (a forked child must not close its sockets)
        with store.guard:
            store.users -= 1
            return store if store.users <= 0 else None

    def close(self) -> None:
        """Stop using the shared pool; the last persister of the configuration closes it. Used again, it reopens."""
        store = self._detach()
        if store is not None:
            with self._translated("closing"):
                store.shut(self.pool_timeout)

    async def aclose(self) -> None:
        """``close`` for coroutines: this loop's idle connections are closed on the loop."""
        store = self._detach()
        if store is None:
            return
        with suppress(RuntimeError):
            connections = store.loops.pop(id(asyncio.get_running_loop()), None)
            while connections is not None and connections.idle:
                with suppress(self._psycopg.Error):
                    await connections.idle.pop().close()
        with self._translated("closing"):
            await run_blocking(store.shut, self.pool_timeout)

    def __repr__(self) -> str:
        shown = f"Postgres({self.dsn!r}, table={self.table!r}"
        if self.pooler != "auto":
            shown += f", pooler={self.pooler!r}"
        if self.listen_dsn is not None:
            shown += f", listen_dsn={self.listen_dsn!r}"
        return shown + ")"


def _one(cursor: Any) -> Any:
    return cursor.fetchone()

