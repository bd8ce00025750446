"""PostgreSQL: one row per name, every primitive a few single statements on a shared, bounded set of connections.

The rules (which statement, what its answer means) are written once in
``_postgres_steps`` and the statements in ``_postgres_sql``; this module is the
I/O, written once per face: it drives the steps on sync connections
(``psycopg_pool.ConnectionPool``) and on async ones (``psycopg.AsyncConnection``).

Behind a pooler each statement is one simple-protocol message that begins with
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

``limit=N`` keeps up to N holds of a name in its one row (``_postgres_sql``'s
shared rows), so every statement still locks and judges one row, and an attempt
with a limit, taken or refused, is one statement.

Waiting: releases ``pg_notify`` one channel per table with the lock name as
payload; one listener thread per store and table LISTENs and wakes the waiters
of this process (``ReleaseHub``). A release notifies only when a waiter's hint
is on the row (see ``_postgres_sql``). Behind a pooler, LISTEN needs a direct
connection (``listen_dsn``); without one, waiters poll every ``poll_interval``.

Fair waiting (``fair``): waiters queue in a table beside the lock table
(``<table>_waiters``, created with it), so a free name goes to the longest
waiter across processes, and the release wakes only that waiter: its NOTIFY
names the queue's head. A caller that does not wait never reads the queue.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from .._errors import MissingDependency
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url, scrub
from . import _postgres_sql as q
from ._base import (
    DEFAULT_PURGE_AFTER_SECONDS,
    ClientRegistry,
    ErrorTranslation,
    HubWatch,
    Persister,
    ReleaseHub,
    ReleaseWatch,
    SweepSchedule,
    name_prefix,
    option_retention,
    option_seconds,
    option_whole_number,
    positive_seconds,
    purge_period,
    retention_seconds,
    run_blocking,
    whole_number,
)
from ._postgres_steps import Op, Rules, Steps
from ._steps import adrive, asweep, drive, purge_limit, sweep

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["POOLER_MODES", "Postgres"]

logger = logging.getLogger("singleton_integrations.persisters.postgres")

_R = TypeVar("_R")
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated

#: ``pooler=``: ``auto`` detects a pooler (its cancel key is not the server's) and then
#: behaves as ``session``; ``none`` is a direct server; ``transaction`` and ``session``
#: name PgBouncer's pool modes (``pgbouncer-transaction`` and ``pgbouncer-session`` too).
POOLER_MODES = ("auto", "none", "transaction", "session")
_POOLER_ALIASES = {"pgbouncer-transaction": "transaction", "pgbouncer-session": "session", "direct": "none"}


def _text(text: str, what: str) -> str:
    return text


def _flag(text: str, what: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what} must be true or false, not {text!r}")


def _prepare_threshold(text: str, what: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "null") else option_whole_number(text, what)


# Options that belong to this class rather than to libpq, readable from a URL's query.
_URL_OPTIONS: dict[str, Callable[[str, str], Any]] = {
    "table": _text,
    "connect_timeout": option_seconds,
    "statement_timeout_ms": option_whole_number,
    "pool_timeout": option_seconds,
    "timeout": option_seconds,
    "min_size": option_whole_number,
    "max_size": option_whole_number,
    "prepare_threshold": _prepare_threshold,
    "purge_after_seconds": option_retention,
    "pooler": _text,
    "listen_dsn": _text,
    "poll_interval": option_seconds,
    "durable_release": _flag,
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
#: A process sweeps a table for long-idle names at most this often.
PURGE_EVERY_SECONDS = 600.0
#: The listener checks its quiet LISTEN connection this often (keepalives may be off).
_LISTEN_HEARTBEAT = 10.0
#: psycopg's ``prepare_threshold`` when only statements executed with ``prepare=True`` may be
#: prepared: None would forbid even those, and no count of plain executions reaches this.
_PREPARE_ONLY_ON_REQUEST = 2**31 - 1


def _drivers() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as error:
        module = "psycopg_pool" if error.name == "psycopg_pool" else "psycopg"
        raise MissingDependency(backend="postgres", extra="postgres", module=module) from error
    return psycopg, psycopg_pool


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


def _queue_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The waiter queue table beside a table: ``<table>_waiters`` in the same schema, or a
    hashed name when that would pass PostgreSQL's identifier length."""
    queue = f"{parts[-1]}_waiters"
    if len(queue.encode()) > _MAX_IDENTIFIER_BYTES:
        queue = f"singleton_waiters_{hashlib.sha256(parts[-1].encode()).hexdigest()[:32]}"
    return (*parts[:-1], queue)


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
        accepts_timeout = all("timeout" in inspect.signature(cls.wait).parameters
                              for cls in (psycopg.Connection, psycopg.AsyncConnection))
    except (TypeError, ValueError):
        return False
    return accepts_timeout and hasattr(psycopg.Cursor, "_execute_gen") and hasattr(psycopg.errors, "_WaitTimeout")


def _answer(op: Op, rows: list[Any], connection: Any) -> Any:
    """What a step is sent back for ``op``, from the rows its statement returned."""
    if op.kind == "all":
        return rows
    if op.kind == "pids":
        return int(rows[0][0]), connection.info.backend_pid
    return rows[0] if rows else None


def _heard(hub: ReleaseHub, payload: str) -> None:
    """One NOTIFY: a name (wake this process's longest waiter), or a queue's head and the name
    (wake that waiter, if it waits here: the unqueued ones hear the plain NOTIFY)."""
    if payload.startswith(q.QUEUED_WAKE):
        head, _, name = payload[1:].partition(q.QUEUED_WAKE)
        hub.notify(name, head, unqueued=False)
    else:
        hub.notify(payload)


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


# Sockets a forked child must neither use nor finalize: they belong to the parent.
_inherited: list[object] = []


class _Store:
    """One configuration's connections in this process, shared by every ``Postgres`` built with it."""

    def __init__(self, conninfo: str, listen_conninfo: str | None, pooler: str, min_size: int, max_size: int,
                 pool_timeout: float, connect_timeout: float) -> None:
        self.conninfo = conninfo
        self.listen_conninfo = listen_conninfo
        #: 'direct', 'transaction' or 'session'; None until detected (pooler='auto').
        self.mode: str | None = {"none": "direct", "auto": None}.get(pooler, pooler)
        self.min_size, self.max_size = min_size, max_size
        self.pool_timeout, self.connect_timeout = pool_timeout, connect_timeout
        self.tables: dict[str, str] = {}  # quoted table -> NOTIFY channel, once created/migrated here
        self.hubs: dict[str, ReleaseHub] = {}
        self._reset()

    def _reset(self) -> None:
        self.guard = threading.Lock()  # quick state changes only, never held across I/O
        self.setup = threading.Lock()  # creating tables and the pool: I/O, so watch() never waits on it
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self.per_call = threading.BoundedSemaphore(self.max_size)  # session mode: connections in use at once
        self.sweeps = SweepSchedule(PURGE_EVERY_SECONDS)
        self.loops: dict[int, _AsyncConnections] = {}
        self.users = 0

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's connections stay untouched (kept referenced, never closed);
        the child opens its own. What was learnt (the mode, the tables) still holds; each hub resets itself."""
        _inherited.append((self.pool, self.loops))
        self._reset()

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


#: One store per configuration and process; a forked child resets each (see ``_Store.reset_after_fork``).
_stores: ClientRegistry[tuple[Any, ...], _Store] = ClientRegistry(after_fork=_Store.reset_after_fork)


class _Watch(ReleaseWatch):
    """A waiter on the store's hub; polls every ``poll`` seconds while nothing LISTENs for it."""

    wakes_coroutines: ClassVar[bool] = True

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
    A bad number raises ``ValueError``.

    The release of a lease with an end commits without waiting for the server's WAL
    flush (the next synchronous commit, such as the acquire that follows, flushes it
    first): a server crash in the few hundred milliseconds before the flush can only
    undo the release, which keeps the name held until its lease ends, as a holder that
    crashed would. Exclusivity and fencing never depend on it. ``durable_release=True``
    waits for the flush on every release, as a lock without an end always does.
    """

    backend: ClassVar[str] = "postgres"
    distributed: ClassVar[bool] = True
    clock: ClassVar[str] = "the PostgreSQL server's clock (clock_timestamp())"
    supports_min_hold: ClassVar[bool] = True
    native_async: ClassVar[bool] = True
    limits: ClassVar[bool] = True
    fair: ClassVar[bool] = True

    @property
    def notifies(self) -> bool:  # type: ignore[override]  # a class attribute in Persister, worked out per store here
        """True unless a pooler is in front and no ``listen_dsn`` was given: then waiters poll."""
        store = self._store
        return store is None or store.listen_conninfo is not None or store.mode in (None, "direct")

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
        durable_release: bool = False,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"a PostgreSQL DSN must be a str, not {type(dsn).__name__}")
        self._psycopg, self._psycopg_pool = _drivers()
        self.dsn = redact_url(dsn)
        self._table_parts = _split_table(table)
        self.table = ".".join(self._table_parts)
        self.statement_timeout_ms = whole_number(statement_timeout_ms, "statement_timeout_ms")
        self.pool_timeout = positive_seconds(pool_timeout, "pool_timeout")
        # Longer than the statement timeout, so a slow statement is cancelled by the
        # server (leaving its connection usable) before the client gives up on it.
        self.timeout = self.statement_timeout_ms / 1000 + 0.5 if timeout is None else positive_seconds(timeout, "timeout")
        self.call_timeout = self.timeout
        self._bounded = _bounded_waits(self._psycopg)
        if not self._bounded:
            logger.warning("psycopg %s cannot bound a statement on the client; upgrade to 3.3.9+ "
                           "so a peer that never answers cannot hang a call", self._psycopg.__version__)
        self.min_size = whole_number(min_size, "min_size", 0)
        self.max_size = whole_number(max_size, "max_size", max(1, self.min_size))
        self.prepare_threshold = None if prepare_threshold is None else whole_number(prepare_threshold, "prepare_threshold", 0)
        self.purge_after_seconds = retention_seconds(purge_after_seconds)
        mode = _POOLER_ALIASES.get(str(pooler).lower(), str(pooler).lower()) if isinstance(pooler, str) else None
        if mode not in POOLER_MODES:
            raise ValueError(f"pooler must be one of {', '.join(POOLER_MODES)}, not {pooler!r}")
        self.pooler = mode
        self.poll_interval = positive_seconds(poll_interval, "poll_interval")
        if not isinstance(durable_release, bool):
            raise TypeError(f"durable_release must be a bool, not {type(durable_release).__name__}")
        self.durable_release = durable_release
        if listen_dsn is not None and not isinstance(listen_dsn, str):
            raise TypeError(f"listen_dsn must be a str, not {type(listen_dsn).__name__}")
        self.listen_dsn = None if listen_dsn is None else redact_url(listen_dsn)

        self._secrets: list[str] = []
        self._errors = ErrorTranslation(self.backend, (self._psycopg.Error, TimeoutError, asyncio.TimeoutError),
                                        self._describe)
        if connect_timeout is None:
            connect_timeout = float(self._parse_dsn(dsn).get("connect_timeout") or 5)
        self.connect_timeout = positive_seconds(connect_timeout, "connect_timeout")
        self._conninfo = self._conninfo_for(dsn)
        self._listen_conninfo = None if listen_dsn is None else self._conninfo_for(listen_dsn)

        self._quoted_table: str = self._psycopg.sql.Identifier(*self._table_parts).as_string(None)
        self._quoted_queue: str = self._psycopg.sql.Identifier(*_queue_parts(self._table_parts)).as_string(None)
        self._rules = Rules(self._psycopg.errors)
        # Messages fit any connection; on a direct one the hot statements are prepared instead.
        self._sql, self._prepared = q.statements(self._quoted_table, self.statement_timeout_ms, self._quoted_queue)
        # The statement timeout is in the key: a direct connection carries it as session state.
        self._store_key = (self._conninfo, self._listen_conninfo, self.pooler, self.min_size, self.max_size,
                           self.pool_timeout, self.connect_timeout, self.statement_timeout_ms)
        self._store: _Store | None = None
        self._store_pid = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Postgres:
        """``postgresql://`` or ``postgres://``; ``?table=`` and friends are options, keywords win.

        Other query settings (``sslmode``, ``application_name`` ...) go to libpq untouched.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(f"a PostgreSQL URL starts with postgresql:// or postgres://, not {redact_url(url)!r}")
        # Split by hand: libpq decodes only %XX (a '+' is a plus), and its settings pass on verbatim.
        libpq: list[str] = []
        from_query: dict[str, Any] = {}
        for pair in filter(None, parts.query.split("&")):
            key, _, value = pair.partition("=")
            reader = _URL_OPTIONS.get(unquote(key))
            if reader is None:
                libpq.append(pair)
                continue
            key, value = unquote(key), unquote(value)
            try:
                from_query[key] = reader(value, key)
            except ValueError as error:
                shown = "***" if key == "listen_dsn" else value
                raise ValueError(f"invalid {key}={shown!r} in {redact_url(url)!r}: {error}") from None
        dsn = urlunsplit(parts._replace(query="&".join(libpq)))
        return cls(dsn, **{**from_query, **options})

    # -- configuration and errors ----------------------------------------------------

    def _parse_dsn(self, dsn: str) -> dict[str, Any]:
        try:
            params: dict[str, Any] = self._psycopg.conninfo.conninfo_to_dict(dsn)
        except self._psycopg.Error as error:
            raise ValueError(f"invalid PostgreSQL DSN {redact_url(dsn)!r}: {self._scrub(str(error), dsn)}") from None
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

    def _scrub(self, message: str, dsn: str | None = None) -> str:
        """``message`` without a password, however the driver happened to quote it."""
        message = scrub(message, dsn)
        for secret in self._secrets:
            if len(secret) >= 3:  # shorter ones would mangle the message and hide nothing
                message = message.replace(secret, "***")
        return message

    def _describe(self, error: BaseException) -> str:
        detail = self._scrub(str(error).strip() or type(error).__name__)
        return f"{type(error).__name__.lstrip('_')} on {self.dsn}: {detail}"

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Driver errors met doing ``action`` become ``PersisterError``, raised from the cause."""
        try:
            yield
        except self._errors.errors as error:
            raise self._errors.failed(action, error) from error

    def _give_up(self, action: str, error: BaseException, attempt: int, deadline: float) -> None:
        """Raise ``error`` as ``PersisterError``, unless it is a dropped connection worth one more try.

        A pooled connection dies unseen when the server restarts or a proxy drops it,
        and then fails before the server runs anything, so one more try on a fresh
        connection is what a caller wants; the steps are safe to replay. (A connection
        lost after the server committed would make a retried release report False;
        that needs a crash in a microsecond window.)
        """
        if (attempt == 1 and isinstance(error, self._psycopg.OperationalError)
                and _retriable(error, self._psycopg_pool) and time.monotonic() < deadline):
            logger.debug("retrying %s after a dropped connection: %s", action, type(error).__name__)
            return
        shown = error
        if isinstance(error, (asyncio.TimeoutError, TimeoutError)) and not isinstance(error, _NoAnswer):
            shown = _NoAnswer(str(error) or "no answer within the call's deadline")
        raise self._errors.failed(action, shown) from error

    # -- the shared store ------------------------------------------------------------------

    def _shared(self) -> _Store:
        """This configuration's store in this process (a forked child gets its own)."""
        pid = os.getpid()
        store = self._store
        if store is not None and self._store_pid == pid:
            return store
        store = _stores.get(self._store_key, lambda: _Store(
            self._conninfo, self._listen_conninfo, self.pooler, self.min_size, self.max_size,
            self.pool_timeout, self.connect_timeout))
        with store.guard:
            store.users += 1
        self._store, self._store_pid = store, pid
        return store

    def _opened(self, store: _Store, pooled: bool | None, channel: str | None) -> str:
        """Note what opening the table found: its channel, and (pooler='auto') whether a pooler is in front."""
        if channel is None:
            raise self._errors.failed(f"opening table {self.table!r}", RuntimeError("the table could not be created"))
        if pooled is not None and store.mode is None:
            store.mode = "session" if pooled else "direct"
            if pooled:
                logger.info("a connection pooler is in front of %s: connections are not kept between calls and "
                            "waiters %s; declare pooler='transaction' (or 'session') to choose", self.dsn,
                            "LISTEN through listen_dsn" if store.listen_conninfo else f"poll every {self.poll_interval:g} s")
        store.tables[self._quoted_table] = channel
        return channel

    def _statement(self, store: _Store, key: str) -> tuple[str, bool]:
        """The text to send for ``key`` and whether it is prepared: only on a direct connection."""
        if store.mode == "direct" and key in self._prepared:
            return self._prepared[key], True
        return self._sql[key], False

    def _session_timeout(self) -> str:
        return f"SET statement_timeout = {int(self.statement_timeout_ms)}"

    def _connect_kwargs(self, asynchronous: bool = False, direct: bool = False) -> dict[str, Any]:
        """Behind a pooler psycopg may prepare nothing; on a direct connection only what asks to (``prepare=True``)."""
        factory = self._psycopg.AsyncClientCursor if asynchronous else self._psycopg.ClientCursor
        return {"autocommit": True, "cursor_factory": factory, "prepare_threshold": _PREPARE_ONLY_ON_REQUEST if direct else None}

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    # -- sync I/O: psycopg_pool's ConnectionPool ---------------------------------------------

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

    def _caller(self, store: _Store, connection: psycopg.Connection[Any], deadline: float) -> Callable[[Op], Any]:
        """The one store call the driver makes for each of a primitive's steps."""

        def call(op: Op) -> Any:
            query, prepared = self._statement(store, op.key)
            cursor = self._execute(connection, query, op.params, deadline - time.monotonic(), prepared)
            return cursor.rowcount if op.kind == "count" else _answer(op, cursor.fetchall(), connection)

        return call

    def _ready(self, deadline: float) -> tuple[_Store, str]:
        """The store, with this table created, migrated and its channel known (once per process)."""
        store = self._shared()
        channel = store.tables.get(self._quoted_table)
        if channel is not None:
            return store, channel
        with store.setup:
            channel = store.tables.get(self._quoted_table)
            if channel is not None:
                return store, channel
            with self._translated("connecting"):
                connection = self._psycopg.Connection.connect(self._conninfo, **self._connect_kwargs())
            try:
                with self._translated(f"opening table {self.table!r}"):
                    opened = drive(self._rules.open_table(self._quoted_table, store.mode is None, self._quoted_queue),
                                   self._caller(store, connection, deadline), self._rules.answerable)
            finally:
                connection.close()
            return store, self._opened(store, *opened)

    def _configure_direct(self, connection: psycopg.Connection[Any]) -> None:
        """A new direct connection's one piece of session state: the statement timeout its prepared statements run under."""
        self._execute(connection, self._session_timeout(), None, self.connect_timeout)

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

    def _run(self, action: str, steps: Callable[[str], Steps[_R]]) -> _R:
        """Drive one primitive's ``steps(channel)`` on a borrowed connection, once more on a fresh one if it dropped."""
        deadline = self._deadline()
        store, channel = self._ready(deadline)
        for attempt in (1, 2):
            try:
                connection = self._borrow(store, deadline)
                try:
                    return drive(steps(channel), self._caller(store, connection, deadline), self._rules.answerable)
                finally:
                    self._give_back(store, connection)
            except self._errors.errors as error:
                self._give_up(action, error, attempt, deadline)
                if store.pool is not None:
                    with suppress(self._psycopg.Error):
                        store.pool.check()  # replace every idle connection that died the same way
        raise AssertionError("unreachable")  # pragma: no cover

    # -- async I/O: psycopg's AsyncConnection, a set per event loop -------------------------

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

    def _acaller(self, store: _Store, connection: psycopg.AsyncConnection[Any],
                 deadline: float) -> Callable[[Op], Coroutine[Any, Any, Any]]:
        """``_caller`` for coroutines."""

        async def call(op: Op) -> Any:
            query, prepared = self._statement(store, op.key)
            cursor = await self._aexecute(connection, query, op.params, deadline - time.monotonic(), prepared)
            return cursor.rowcount if op.kind == "count" else _answer(op, await cursor.fetchall(), connection)

        return call

    async def _aconnect(self, conninfo: str, deadline: float, direct: bool = False) -> psycopg.AsyncConnection[Any]:
        connection: psycopg.AsyncConnection[Any] = await asyncio.wait_for(
            self._psycopg.AsyncConnection.connect(conninfo, **self._connect_kwargs(True, direct)),
            max(deadline - time.monotonic(), 0.001))
        return connection

    async def _aready(self, deadline: float) -> tuple[_Store, str]:
        """``_ready`` for coroutines."""
        store = self._shared()
        channel = store.tables.get(self._quoted_table)
        if channel is not None:
            return store, channel
        with self._translated("connecting"):
            connection = await self._aconnect(self._conninfo, deadline)
        try:
            with self._translated(f"opening table {self.table!r}"):
                opened = await adrive(self._rules.open_table(self._quoted_table, store.mode is None, self._quoted_queue),
                                      self._acaller(store, connection, deadline), self._rules.answerable)
        finally:
            await connection.close()
        return store, self._opened(store, *opened)

    async def _aborrow(self, store: _Store, connections: _AsyncConnections, deadline: float) -> psycopg.AsyncConnection[Any]:
        """An idle connection of this loop, or a new one (given the statement timeout when direct)."""
        try:
            await asyncio.wait_for(connections.slots.acquire(), max(min(store.pool_timeout, deadline - time.monotonic()), 0.001))
        except (asyncio.TimeoutError, TimeoutError):
            raise self._psycopg_pool.PoolTimeout(f"couldn't get a connection after {store.pool_timeout:.2f} sec") from None
        try:
            while connections.idle:
                idle: psycopg.AsyncConnection[Any] = connections.idle.pop()
                if not idle.closed:
                    return idle
            direct = store.mode == "direct"
            connection = await self._aconnect(store.conninfo, deadline, direct)
            if direct:
                try:
                    await self._aexecute(connection, self._session_timeout(), None, deadline - time.monotonic())
                except BaseException:
                    with suppress(self._psycopg.Error):
                        await connection.close()
                    raise
            return connection
        except BaseException:
            connections.slots.release()
            raise

    async def _agive_back(self, connections: _AsyncConnections, connection: psycopg.AsyncConnection[Any]) -> None:
        """Keep a connection that is idle (between transactions) for the next call, when the mode allows."""
        try:
            idle = self._psycopg.pq.TransactionStatus.IDLE
            if connections.keep and not connection.closed and connection.info.transaction_status == idle:
                connections.idle.append(connection)
            else:
                with suppress(self._psycopg.Error):
                    await connection.close()
        finally:
            connections.slots.release()

    async def _arun(self, action: str, steps: Callable[[str], Steps[_R]]) -> _R:
        """``_run`` for coroutines."""
        deadline = self._deadline()
        store, channel = await self._aready(deadline)
        connections = store.async_connections()
        for attempt in (1, 2):
            try:
                connection = await self._aborrow(store, connections, deadline)
                try:
                    return await adrive(steps(channel), self._acaller(store, connection, deadline), self._rules.answerable)
                finally:
                    await self._agive_back(connections, connection)
            except self._errors.errors as error:
                self._give_up(action, error, attempt, deadline)
                connections.discard_idle()
        raise AssertionError("unreachable")  # pragma: no cover

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
        store, channel = self._ready(self._deadline())  # the channel, and whether a pooler is in front
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
                        _heard(hub, notify.payload)
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

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        """A waiter on this process's one listener for the table; registers only, no I/O here.

        ``owner_token``: the waiter's place in the queue, so a release that names it as the
        queue's head wakes it.
        """
        hub = self._hub()
        return _Watch(hub.watch(name, owner_token), hub, self.poll_interval)

    def _hinting(self, name: str) -> bool:
        """Whether a failed attempt should leave a waiter's hint: this process LISTENs for ``name``."""
        store = self._store
        hub = None if store is None else store.hubs.get(self._quoted_table)
        return hub is not None and hub.subscribed.is_set() and name in hub.names()

    def _released(self, name: str, head: str | None = None) -> None:
        """Wake this process's waiter for ``name`` at once (the queue's ``head``, if it waits
        here); other processes hear the NOTIFY."""
        store = self._store
        hub = None if store is None else store.hubs.get(self._quoted_table)
        if hub is not None:
            hub.notify(name, head)

    # -- retention -----------------------------------------------------------------------

    def _sweep_due(self) -> bool:
        """A release's retention sweep is due: at most every ``PURGE_EVERY_SECONDS`` per process and table."""
        store = self._store
        return self.purge_after_seconds is not None and store is not None and store.sweeps.due(self._quoted_table)

    def _purge_steps(self, limit: int, after: float | None) -> Callable[[str], Steps[int]]:
        period, limit = purge_period(after, self.purge_after_seconds), purge_limit(limit)
        return lambda _: self._rules.purge(period, limit)

    def purge(self, limit: int = 1000, *, after: float | None = None) -> int:
        """Delete up to ``limit`` rows of names free (or expired untaken) for ``purge_after_seconds``; returns how many.

        Releases run this on their own at most every ``PURGE_EVERY_SECONDS`` per
        process and table; call it to sweep now. Fencing tokens still rise for a
        purged name: a new row starts from the server's clock in milliseconds.
        """
        return self._run("purge", self._purge_steps(limit, after))

    async def apurge(self, limit: int = 1000, *, after: float | None = None) -> int:
        """``purge`` for coroutines."""
        return await self._arun("purge", self._purge_steps(limit, after))

    # -- the primitives: the steps, driven sync or async ----------------------------------

    def _acquire_steps(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
                       limit: int, queue_for: float | None) -> Callable[[str], Steps[AcquireResult]]:
        return lambda _: self._rules.acquire(name, owner, ttl, min_hold, self._hinting, limit, queue_for)

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        """``queue_for``: the caller waits; its place in the name's queue is kept that long.

        ``limit`` > 1: one statement takes one of up to ``limit`` holds or reports every live one.
        """
        return self._run("acquire", self._acquire_steps(name, owner, ttl, min_hold, limit, queue_for))

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        return await self._arun("acquire", self._acquire_steps(name, owner, ttl, min_hold, limit, queue_for))

    def _freed(self, name: str, answer: tuple[bool, bool, str | None]) -> bool:
        released, freed, head = answer
        if freed:
            self._released(name, head)
        return released

    def release(self, name: str, owner_token: str) -> bool:
        released = self._freed(name, self._run("release", lambda channel: self._rules.release(
            name, owner_token, channel, self.durable_release)))
        if self._sweep_due():
            sweep(self.purge, self.table)
        return released

    async def arelease(self, name: str, owner_token: str) -> bool:
        released = self._freed(name, await self._arun("release", lambda channel: self._rules.release(
            name, owner_token, channel, self.durable_release)))
        if self._sweep_due():
            await asweep(self.apurge, self.table)
        return released

    def _left(self, name: str, head: str | None) -> None:
        if head is not None:
            self._released(name, head)

    def leave_queue(self, name: str, owner_token: str) -> None:
        """Drop a waiter's place; if the name is free, the next place is woken."""
        self._left(name, self._run("leave_queue", lambda channel: self._rules.leave_queue(name, owner_token, channel)))

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        self._left(name, await self._arun("leave_queue", lambda channel: self._rules.leave_queue(name, owner_token, channel)))

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return self._run("renew", lambda _: self._rules.renew(name, owner_token, ttl))

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return await self._arun("renew", lambda _: self._rules.renew(name, owner_token, ttl))

    def get(self, name: str) -> LockRecord | None:
        return self._run("get", lambda _: self._rules.get(name))

    async def aget(self, name: str) -> LockRecord | None:
        return await self._arun("get", lambda _: self._rules.get(name))

    def holders(self, name: str) -> builtins.list[LockRecord]:
        """Every live hold of ``name``, by fencing token, in one statement."""
        return self._run("holders", lambda _: self._rules.holders(name))

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        return await self._arun("holders", lambda _: self._rules.holders(name))

    def _list_steps(self, prefix: object) -> Callable[[str], Steps[list[LockRecord]]]:
        checked = name_prefix(prefix)
        return lambda _: self._rules.list(checked)

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self._run("list", self._list_steps(prefix))

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:  # ``list`` is a method here
        return await self._arun("list", self._list_steps(prefix))

    def _forced(self, name: str, answer: tuple[LockRecord | None, str | None]) -> LockRecord | None:
        removed, head = answer
        if removed is not None:
            self._released(name, head)
        return removed

    def force_release(self, name: str) -> LockRecord | None:
        return self._forced(name, self._run("force_release", lambda channel: self._rules.force_release(name, channel)))

    async def aforce_release(self, name: str) -> LockRecord | None:
        return self._forced(name, await self._arun("force_release", lambda channel: self._rules.force_release(name, channel)))

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
