"""Locks in a MySQL or MariaDB table (InnoDB), judged by the server's clock (``UTC_TIMESTAMP(6)``).

One row per name; the rules are in ``_mysql_steps`` (written once, driven here
by PyMySQL and by aiomysql, one driver family: the same protocol code, errors
and parameter quoting) and the statements in ``_mysql_sql``.

Why it is shaped this way:

* **Each write is one short transaction.** ``SELECT ... FOR UPDATE`` locks the
  name's row and reads the server's clock with it; the step decides (free,
  expired, live, ours) and one ``INSERT`` or ``UPDATE`` writes the new holder and
  its fencing token before ``COMMIT``. Sessions run READ COMMITTED, so a name
  with no row takes no gap lock: two first-time inserters meet at the primary
  key, and the loser (a duplicate-key error) retries and finds the winner's row.
  A write is sent with its ``COMMIT`` (connections allow several statements per
  call), so the usual acquire and a release are one round trip each.
* **Fencing tokens never go back.** Release keeps the row; each acquire writes
  ``max(previous + 1, server clock in ms)``, so a purged name starts above its
  old tokens.
* **No notifications.** MySQL cannot tell a client that a row changed: waiters
  poll every ``poll_interval`` (0.25 s); a release in the same process wakes its
  waiters at once.
* **A fair queue.** Waiters keep places in ``<table>_waiters``, changed only in a
  transaction holding the name's row lock; a free name goes to the first live place.
* **Up to N holds** (``limit=N``): the holds beyond today's one row live in
  ``<table>_holds``, one row per slot of a name; an attempt locks the name's row first
  (also the name's one fencing counter), then judges every hold in SQL, in one round trip.
* **One bounded pool per URL and process**, shared by every persister with the
  same URL and pool options (``max_size``, default 4; one set per event loop for
  aiomysql); a forked child opens its own.
* **Every call is bounded**: the server ends a statement after
  ``statement_timeout_ms`` (MariaDB's ``max_statement_time``; MySQL's
  ``max_execution_time`` covers SELECTs only, so ``innodb_lock_wait_timeout``
  bounds the row-lock waits of writes on both), PyMySQL's ``read_timeout`` and
  ``write_timeout`` bound each socket wait, and ``timeout`` bounds the whole call.
* **TLS** (``ssl``, ``ssl_ca``, ...; ``_mysql_tls``): one ``SSLContext`` for both
  drivers; once asked for, TLS is required and the certificate checked.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url
from . import _mysql_sql as q
from ._base import DEFAULT_PURGE_AFTER_SECONDS, Persister, ReleaseHub, ReleaseWatch
from ._mysql_steps import Op, Rules, Steps
from ._mysql_tls import Tls, flag, tls_connection_class
from ._steps import adrive, asweep, drive, purge_limit, sweep

__all__ = ["DEFAULT_TABLE", "MySql", "TableNotCreated"]

logger = logging.getLogger("singleton_integrations")
_R = TypeVar("_R")

DEFAULT_TABLE = "singleton_locks"
#: A release sweeps idle rows at most this often per process and table.
PURGE_EVERY_SECONDS = 600.0
_NONE_WORDS = ("none", "null", "never", "")
#: Connection-level errors after which a reused idle connection is dropped and the call tried once more.
_GONE = {2006, 2013, 2014, 2055}
#: Sent after a write in the same round trip (``Op.commit``): connections allow several statements per call.
_COMMIT_TAIL = ";\nCOMMIT"


#: How many slot holds a process remembers taking (``_Pool.slots_held``); a forgotten one costs
#: its release a second round trip, nothing else.
_SLOTS_REMEMBERED = 4096


def _limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, not {limit!r}")
    return limit


class TableNotCreated(PersisterError):
    """The lock table is missing and this user may not create it; the message holds the DDL to run."""


def _import_drivers(asynchronous: bool = False) -> Any:
    module = "aiomysql" if asynchronous else "pymysql"
    try:  # by name: the lint environment has neither driver, and neither ships type hints
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependency(backend="mysql", extra="mysql", module=module) from error


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be a positive number, not {value!r}")
    return number


def _retention(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        return None
    return _positive(value, "purge_after_seconds")


def _quote_table(table: object) -> str:
    if not isinstance(table, str):
        raise TypeError(f"table must be a str, not {type(table).__name__}")
    if not table or len(table) > 56 or "\x00" in table or table.endswith(" "):  # 64 with "_waiters"
        raise ValueError(f"table must be 1-56 characters, no NUL and no trailing space, not {table!r}")
    return "`" + table.replace("`", "``") + "`"


_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "table": str,
    "statement_timeout_ms": lambda value: int(_positive(value, "statement_timeout_ms")),
    "connect_timeout": lambda value: _positive(value, "connect_timeout"),
    "timeout": lambda value: _positive(value, "timeout"),
    "max_size": lambda value: int(_positive(value, "max_size")),
    "purge_after_seconds": _retention,
    "poll_interval": lambda value: _positive(value, "poll_interval"),
    "ssl": lambda value: flag(value, "ssl"),
    "ssl_ca": str,
    "ssl_cert": str,
    "ssl_key": str,
    "ssl_verify_cert": lambda value: flag(value, "ssl_verify_cert"),
    "ssl_verify_identity": lambda value: flag(value, "ssl_verify_identity"),
}


class _Pool:
    """At most ``max_size`` PyMySQL connections for one configuration in one process."""

    def __init__(self, connect: Callable[[float], Any], max_size: int) -> None:
        self.connect = connect
        self.slots = threading.BoundedSemaphore(max_size)
        self.idle: list[Any] = []
        self.guard = threading.Lock()
        self.pid = os.getpid()
        self.users = 0
        self.tables: set[str] = set()
        self.hubs: dict[str, ReleaseHub] = {}
        #: (table, name, owner token) of the holds this process took in a slot (``limit=N``), so their
        #: release and renewal go to the slots first: one round trip. Oldest dropped past the bound.
        self.slots_held: dict[tuple[str, str, str], None] = {}
        self.purge_due: dict[str, float] = {}
        #: aiomysql binds a connection to its event loop: each loop has its own (dropped once it closes).
        self.loops: dict[asyncio.AbstractEventLoop, _LoopPool] = {}

    def shut(self) -> None:
        with self.guard:
            idle, self.idle = self.idle, []
            hubs = list(self.hubs.values())
            self.hubs.clear()
            loops, self.loops = self.loops, {}
        for connection in idle:
            with suppress(Exception):
                connection.close()
        for hub in hubs:
            hub.close()
        for loop, loop_pool in loops.items():
            if loop.is_closed():
                loop_pool.abandon()
            else:  # aiomysql closes a connection through its loop
                with suppress(RuntimeError):
                    loop.call_soon_threadsafe(loop_pool.close_idle)

    def sweep_loops(self) -> None:
        """Drop the connections of event loops that have closed (asyncio.run returned)."""
        with self.guard:
            closed = [loop for loop in self.loops if loop.is_closed()]
            dropped = [self.loops.pop(loop) for loop in closed]
        for loop_pool in dropped:
            loop_pool.abandon()


class _LoopPool:
    """The aiomysql connections of one event loop (at most ``max_size``)."""

    def __init__(self, max_size: int) -> None:
        self.slots = asyncio.Semaphore(max_size)
        self.idle: list[Any] = []

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for connection in idle:
            with suppress(Exception):
                connection.close()

    def abandon(self) -> None:
        """Let go of the connections of a loop that has closed: no close can be scheduled on it any more.

        Their sockets are closed when their transports are collected.
        """
        idle, self.idle = self.idle, []
        for connection in idle:
            with suppress(RuntimeError):  # "Event loop is closed", raised after the transport is marked closing
                connection.close()
            connection._writer = connection._reader = None  # so aiomysql's __del__ does not try again


_registry_guard = threading.Lock()
_registry: dict[tuple[Any, ...], _Pool] = {}


class _NoAnswer(Exception):
    """The call's deadline passed: no free connection, or no answer in time."""


class MySql(Persister):
    """Locks in one InnoDB table of a MySQL 8 or MariaDB server.

    ``url``: ``mysql://user:password@host:3306/database`` (or ``mariadb://``); query
    options ``table``, ``statement_timeout_ms``, ``connect_timeout``, ``timeout``,
    ``max_size``, ``purge_after_seconds``, ``poll_interval``, and the TLS options
    ``ssl``, ``ssl_ca``, ``ssl_cert``, ``ssl_key``, ``ssl_verify_cert``,
    ``ssl_verify_identity``; keywords win.

    >>> MySql("mysql://app:s3cret@db.example:3306/locks", table="jobs")
    MySql('mysql://app:***@db.example:3306/locks', table='jobs')
    """

    backend: ClassVar[str] = "mysql"
    distributed: ClassVar[bool] = True
    multiprocess: ClassVar[bool] = True
    notifies: ClassVar[bool] = False
    supports_min_hold: ClassVar[bool] = True
    fair: ClassVar[bool] = True
    native_async: ClassVar[bool] = True
    limits: ClassVar[bool] = True
    clock: ClassVar[str] = "the MySQL server's clock (UTC_TIMESTAMP(6))"

    def __init__(self, url: str = "mysql://root@127.0.0.1:3306/test", *, table: str = DEFAULT_TABLE,
                 statement_timeout_ms: int = 5000, connect_timeout: float = 5.0, timeout: float | None = None,
                 max_size: int = 4, purge_after_seconds: float | None = DEFAULT_PURGE_AFTER_SECONDS,
                 poll_interval: float = 0.25, ssl: bool | None = None, ssl_ca: str | None = None,
                 ssl_cert: str | None = None, ssl_key: str | None = None, ssl_verify_cert: bool | None = None,
                 ssl_verify_identity: bool | None = None) -> None:  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("mysql", "mariadb"):
            raise ValueError(f"not a mysql:// or mariadb:// URL: {redact_url(url)!r}")
        try:
            port = parts.port or 3306
        except ValueError:
            raise ValueError(f"invalid port in {redact_url(url)!r}") from None
        if parts.query:  # never dropped silently: an ignored ssl option would mean a plain connection
            raise ValueError(f"MySql() takes options as keywords; for a URL with options use persisters.from_url: "
                             f"{redact_url(url)!r}")
        database = unquote(parts.path.lstrip("/"))
        if not database or "/" in database:
            raise ValueError(f"name one database in the URL's path: {redact_url(url)!r}")
        self.url = redact_url(url)
        self._password = unquote(parts.password) if parts.password else ""
        self._connect_args = {"host": parts.hostname or "127.0.0.1", "port": port,
                              "user": unquote(parts.username) if parts.username else "root", "database": database}
        self.database = database
        self.table = table
        self._quoted = _quote_table(table)
        self._waiters = _quote_table(table + "_waiters")
        self._holds = _quote_table(table + "_holds")
        self.statement_timeout_ms = int(_positive(statement_timeout_ms, "statement_timeout_ms"))
        self.connect_timeout = _positive(connect_timeout, "connect_timeout")
        statement = self.statement_timeout_ms / 1000
        #: The client's deadline on one whole call: a free connection, connecting, every statement.
        self.timeout = _positive(timeout, "timeout") if timeout is not None else statement + self.connect_timeout + 0.5
        self.call_timeout = self.timeout
        self.max_size = int(_positive(max_size, "max_size"))
        self.purge_after_seconds = _retention(purge_after_seconds)
        self.poll_interval = _positive(poll_interval, "poll_interval")
        #: The TLS settings asked for (file paths, never their content), and the context built from them.
        self.tls = Tls.of(ssl, ssl_ca, ssl_cert, ssl_key, ssl_verify_cert, ssl_verify_identity)
        self._ssl_context = self.tls.context()
        self._pymysql = _import_drivers()
        self._rules = Rules(self._quoted, self._waiters, self._holds, self._pymysql.err)
        self._pool_: _Pool | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MySql:
        """``mysql://`` or ``mariadb://``; keyword options override the URL's query options."""
        base, _, query = url.partition("?")
        parsed: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in _OPTIONS:
                raise ValueError(f"unknown option {key!r} in {redact_url(url)!r}; known: {', '.join(sorted(_OPTIONS))}")
            parsed[key] = _OPTIONS[key](value)
        return cls(base, **{**parsed, **options})

    @classmethod
    def preload(cls) -> None:
        _import_drivers()
        _import_drivers(asynchronous=True)

    # -- connections ----------------------------------------------------------------------

    def _key(self) -> tuple[Any, ...]:
        args = self._connect_args
        return (args["host"], args["port"], args["user"], self._password, args["database"],
                self.statement_timeout_ms, self.connect_timeout, self.max_size, self.tls)  # fmt: skip

    def _pool(self) -> _Pool:
        pool = self._pool_
        if pool is not None and pool.pid == os.getpid():
            return pool
        with _registry_guard:
            key = self._key()
            pool = _registry.get(key)
            if pool is None or pool.pid != os.getpid():  # a forked child never uses the parent's sockets
                pool = _registry[key] = _Pool(self._connect, self.max_size)
            pool.users += 1
            self._pool_ = pool
        return pool

    def _driver_options(self, connect_timeout: float) -> dict[str, Any]:
        socket_timeout = self.statement_timeout_ms / 1000 + 0.5
        # MULTI_STATEMENTS: a write and its COMMIT (or a release's three UPDATEs) in one round trip.
        # Every statement is one of _mysql_sql's templates, its values quoted by the driver.
        options = {**self._connect_args, "password": self._password, "charset": "utf8mb4", "autocommit": False,
                   "connect_timeout": max(connect_timeout, 0.1), "read_timeout": socket_timeout,
                   "write_timeout": socket_timeout,
                   "client_flag": self._pymysql.constants.CLIENT.MULTI_STATEMENTS}  # fmt: skip
        if self._ssl_context is not None:
            options["ssl"] = self._ssl_context
        return options

    def _connect(self, connect_timeout: float) -> Any:
        options = self._driver_options(connect_timeout)
        options["connect_timeout"] = max(1, math.ceil(options["connect_timeout"]))  # PyMySQL wants whole seconds
        if self.tls.refused:
            options["ssl_disabled"] = True  # PyMySQL 2 otherwise tries TLS whenever the server offers it
        connection = self._pymysql.connect(**options)
        try:
            mariadb = "mariadb" in connection.get_server_info().lower()
            with connection.cursor() as cursor:
                for statement in q.session_setup(mariadb, self.statement_timeout_ms):
                    cursor.execute(statement)
            connection.commit()
        except BaseException:
            connection.close()
            raise
        return connection

    async def _aconnect(self, deadline: float) -> Any:
        aiomysql = _import_drivers(asynchronous=True)
        options = self._driver_options(min(self.connect_timeout, deadline - time.monotonic()))
        options.pop("read_timeout")
        options.pop("write_timeout")  # aiomysql has neither: every await is bounded by the deadline
        options["db"] = options.pop("database")
        connection = await asyncio.wait_for(self._aopen(aiomysql, options), max(deadline - time.monotonic(), 0.01))
        try:
            mariadb = "mariadb" in connection.get_server_info().lower()
            async with connection.cursor() as cursor:
                for statement in q.session_setup(mariadb, self.statement_timeout_ms):
                    await asyncio.wait_for(cursor.execute(statement), max(deadline - time.monotonic(), 0.01))
            await asyncio.wait_for(connection.commit(), max(deadline - time.monotonic(), 0.01))
        except BaseException:
            connection.close()
            raise
        return connection

    async def _aopen(self, aiomysql: Any, options: dict[str, Any]) -> Any:
        if self._ssl_context is None:
            return await aiomysql.connect(**options)
        connection = tls_connection_class(aiomysql, self._pymysql.err, self._pymysql.constants.CLIENT.SSL)(**options)
        await connection._connect()  # what aiomysql.connect does, with the check that TLS is on offer
        return connection

    def _loop_pool(self) -> _LoopPool:
        pool = self._pool()
        loop = asyncio.get_running_loop()
        if any(other.is_closed() for other in pool.loops):
            pool.sweep_loops()
        with pool.guard:
            found = pool.loops.get(loop)
            if found is None:
                found = pool.loops[loop] = _LoopPool(self.max_size)
        return found

    # -- running the rules: the only I/O, written once per driver ------------------------

    def _error(self, action: str, error: BaseException) -> PersisterError:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        tls = _tls_cause(error)
        if tls is not None and str(tls) not in detail:  # aiomysql says only "Can't connect"
            detail += f" ({type(tls).__name__}: {tls}; {self.tls.describe()})"
        text = f"{action} on {self.url} failed: {detail}"
        if self._password:  # a driver may echo it back; never show it
            for form in {self._password, quote(self._password, safe=""), quote(self._password)}:
                text = text.replace(form, "***")
        return PersisterError(self.backend, text)

    def _ensure_table_steps(self) -> Steps[bool]:
        return self._rules.ensure_table()

    def _not_created(self) -> TableNotCreated:
        ddl = ";\n".join(statement.format(table=self._quoted, waiters=self._waiters, holds=self._holds).strip()
                         for statement in (q.CREATE_TABLE, q.CREATE_WAITERS, q.CREATE_HOLDS))
        user = self._connect_args["user"]
        grants = "\n".join(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO '{user}'@'%';"
                           for table in (self._quoted, self._waiters, self._holds))
        return TableNotCreated(self.backend, (
            f"the tables {self.table!r}, {self.table + '_waiters'!r} and {self.table + '_holds'!r} are not all in "
            f"database {self.database!r} "
            f"and user {user!r} may not create them. Ask an administrator to run, in that database:\n{ddl};\n"
            f"{grants}\n(adjust the host part of the user), or pass table= to use existing ones."))

    def _answerable(self, error: BaseException) -> bool:
        """A statement's error the steps may answer; a gone connection never reaches them."""
        errors = self._pymysql.err
        return (isinstance(error, errors.MySQLError) and _code(error) not in _GONE
                and not isinstance(error, errors.InterfaceError))

    def _drive(self, steps: Steps[_R], connection: Any, deadline: float, progress: list[bool]) -> _R:
        def call(op: Op) -> Any:
            if time.monotonic() > deadline:
                raise _NoAnswer(f"no answer within {self.timeout:.1f} s")
            reply = self._call(connection, op)
            progress[0] = True
            return reply

        return drive(steps, call, self._answerable)

    @staticmethod
    def _call(connection: Any, op: Op) -> Any:
        if op.kind == "commit":
            connection.commit()
            return None
        if op.kind == "rollback":
            connection.rollback()
            return None
        with connection.cursor() as cursor:
            count = cursor.execute(op.sql + _COMMIT_TAIL if op.commit else op.sql, op.params)
            results = [(count, cursor.fetchall() if op.kind in ("all", "results") else ())]
            answer = cursor.fetchone() if op.kind == "one" else results[0][1] if op.kind == "all" else count
            while cursor.nextset():  # the other statements' answers (and errors), the COMMIT's last
                results.append((cursor.rowcount, cursor.fetchall() if op.kind == "results" else ()))
            return _answer(op, answer, results)

    def _run(self, action: str, make_steps: Callable[[], Steps[_R]]) -> _R:
        deadline = time.monotonic() + self.timeout
        pool = self._pool()
        errors = self._pymysql.err
        for attempt in (1, 2):
            if not pool.slots.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise self._error(action, _NoAnswer(
                    f"no free connection within {self.timeout:.1f} s (max_size={self.max_size})"))
            connection: Any = None
            reused = False
            progress = [False]
            try:
                with pool.guard:
                    if pool.idle:
                        connection, reused = pool.idle.pop(), True
                if connection is None:
                    connection = self._connect(min(self.connect_timeout, deadline - time.monotonic()))
                if self._quoted not in pool.tables:
                    if not self._drive(self._ensure_table_steps(), connection, deadline, progress):
                        raise self._not_created()
                    pool.tables.add(self._quoted)
                answer = self._drive(make_steps(), connection, deadline, progress)
            except errors.MySQLError as error:
                self._discard(connection)
                connection = None
                if attempt == 1 and reused and not progress[0] and time.monotonic() < deadline and (
                        _code(error) in _GONE or isinstance(error, errors.InterfaceError)):
                    logger.debug("mysql: retrying %s on a new connection after %s", action, type(error).__name__)
                    continue  # a pooled connection the server had closed: nothing was done on it
                raise self._error(action, error) from error
            except (_NoAnswer, OSError) as error:
                self._discard(connection)
                connection = None
                raise self._error(action, error) from error
            except BaseException:
                self._discard(connection)
                connection = None
                raise
            finally:
                if connection is not None:
                    with pool.guard:
                        pool.idle.append(connection)
                pool.slots.release()
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _discard(connection: Any) -> None:
        if connection is not None:
            with suppress(Exception):
                connection.close()

    async def _adrive(self, steps: Steps[_R], connection: Any, deadline: float, progress: list[bool]) -> _R:
        async def call(op: Op) -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _NoAnswer(f"no answer within {self.timeout:.1f} s")
            try:
                reply = await asyncio.wait_for(self._acall(connection, op), left)
            except (asyncio.TimeoutError, TimeoutError):
                raise _NoAnswer(f"no answer within {self.timeout:.1f} s") from None
            progress[0] = True
            return reply

        return await adrive(steps, call, self._answerable)

    @staticmethod
    async def _acall(connection: Any, op: Op) -> Any:
        if op.kind == "commit":
            await connection.commit()
            return None
        if op.kind == "rollback":
            await connection.rollback()
            return None
        async with connection.cursor() as cursor:
            count = await cursor.execute(op.sql + _COMMIT_TAIL if op.commit else op.sql, op.params)
            results = [(count, await cursor.fetchall() if op.kind in ("all", "results") else ())]
            answer = await cursor.fetchone() if op.kind == "one" else results[0][1] if op.kind == "all" else count
            while await cursor.nextset():
                results.append((cursor.rowcount, await cursor.fetchall() if op.kind == "results" else ()))
            return _answer(op, answer, results)

    async def _arun(self, action: str, make_steps: Callable[[], Steps[_R]]) -> _R:
        deadline = time.monotonic() + self.timeout
        pool = self._pool()
        loop_pool = self._loop_pool()
        errors = self._pymysql.err
        for attempt in (1, 2):
            try:
                await asyncio.wait_for(loop_pool.slots.acquire(), max(deadline - time.monotonic(), 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                raise self._error(action, _NoAnswer(
                    f"no free connection within {self.timeout:.1f} s (max_size={self.max_size})")) from None
            connection: Any = None
            reused = False
            progress = [False]
            try:
                if loop_pool.idle:
                    connection, reused = loop_pool.idle.pop(), True
                if connection is None:
                    try:
                        connection = await self._aconnect(deadline)
                    except (asyncio.TimeoutError, TimeoutError):
                        raise _NoAnswer(f"no connection within {self.timeout:.1f} s") from None
                if self._quoted not in pool.tables:
                    if not await self._adrive(self._ensure_table_steps(), connection, deadline, progress):
                        raise self._not_created()
                    pool.tables.add(self._quoted)
                answer = await self._adrive(make_steps(), connection, deadline, progress)
            except errors.MySQLError as error:
                self._discard(connection)
                connection = None
                if attempt == 1 and reused and not progress[0] and time.monotonic() < deadline and (
                        _code(error) in _GONE or isinstance(error, errors.InterfaceError)):
                    continue
                raise self._error(action, error) from error
            except (_NoAnswer, OSError) as error:
                self._discard(connection)
                connection = None
                raise self._error(action, error) from error
            except BaseException:  # cancelled mid-statement: the connection's state is unknown
                self._discard(connection)
                connection = None
                raise
            finally:
                if connection is not None:
                    loop_pool.idle.append(connection)
                loop_pool.slots.release()
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    # -- waiting: no notifications; in-process releases wake waiters at once --------------

    def _hub(self, create: bool = True) -> ReleaseHub | None:
        pool = self._pool()
        with pool.guard:
            hub = pool.hubs.get(self._quoted)
            if hub is None and create:
                hub = pool.hubs[self._quoted] = ReleaseHub(None)
            return hub

    def _released(self, name: str) -> None:
        pool = self._pool_
        hub = None if pool is None else pool.hubs.get(self._quoted)
        if hub is not None:
            hub.notify(name)

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        """Woken by a release in this process; others are found by polling every ``poll_interval``."""
        hub = self._hub()
        assert hub is not None
        return hub.watch(name, owner_token)

    # -- retention -----------------------------------------------------------------------

    def _purge_due(self) -> bool:
        pool = self._pool_
        if self.purge_after_seconds is None or pool is None:
            return False
        now = time.monotonic()
        with pool.guard:
            if pool.purge_due.get(self._quoted, 0.0) > now:
                return False
            pool.purge_due[self._quoted] = now + PURGE_EVERY_SECONDS
        return True

    def _purge_steps(self, limit: int, after: float | None) -> Callable[[], Steps[int]]:
        limit = purge_limit(limit)
        period = self.purge_after_seconds if after is None else _positive(after, "after")
        if period is None:
            raise ValueError("purge_after_seconds is None: this store keeps every name's state")
        return lambda: self._rules.purge(period, limit)

    def purge(self, limit: int = 1000, *, after: float | None = None) -> int:
        """Delete up to ``limit`` rows of names free (or expired untaken) for ``purge_after_seconds``; returns how many."""
        return self._run("purge", self._purge_steps(limit, after))

    async def apurge(self, limit: int = 1000, *, after: float | None = None) -> int:
        """``purge`` for coroutines."""
        return await self._arun("purge", self._purge_steps(limit, after))

    def _sweep(self) -> None:
        if self._purge_due():
            sweep(self.purge, self.table)

    async def _asweep(self) -> None:
        if self._purge_due():
            await asweep(self.apurge, self.table)

    # -- the primitives ------------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        limit = _limit(limit)
        result = self._run(f"acquire {name!r}",
                           lambda: self._rules.acquire(name, owner, ttl, min_hold, queue_for, limit))  # fmt: skip
        if limit > 1:
            self._took(name, result)
        return result

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        limit = _limit(limit)
        result = await self._arun(f"acquire {name!r}",
                                  lambda: self._rules.acquire(name, owner, ttl, min_hold, queue_for, limit))
        if limit > 1:
            self._took(name, result)
        return result

    def _took(self, name: str, result: AcquireResult) -> None:
        """Remember a hold taken in a slot, so that its release and renewal look there first."""
        if not result.acquired or result.record is None:
            return
        pool = self._pool()
        with pool.guard:
            pool.slots_held[(self._quoted, name, result.record.owner_token)] = None
            if len(pool.slots_held) > _SLOTS_REMEMBERED:
                del pool.slots_held[next(iter(pool.slots_held))]

    def _in_slot(self, name: str, owner_token: str, forget: bool = False) -> bool:
        """Whether this process took that hold in a slot (``forget``: and no longer needs to know)."""
        pool = self._pool()
        key = (self._quoted, name, owner_token)
        with pool.guard:
            if forget:
                return pool.slots_held.pop(key, False) is None
            return key in pool.slots_held

    def leave_queue(self, name: str, owner_token: str) -> None:
        """A waiter gave up: drop its place, and wake this process's next waiter."""
        self._run(f"leave the queue of {name!r}", lambda: self._rules.leave_queue(name, owner_token))
        self._released(name)

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        await self._arun(f"leave the queue of {name!r}", lambda: self._rules.leave_queue(name, owner_token))
        self._released(name)

    def release(self, name: str, owner_token: str) -> bool:
        slot = self._in_slot(name, owner_token, forget=True)
        released, freed, _ = self._run(f"release {name!r}", lambda: self._rules.release(name, owner_token, slot))
        if freed:
            self._released(name)
        self._sweep()
        return released

    async def arelease(self, name: str, owner_token: str) -> bool:
        slot = self._in_slot(name, owner_token, forget=True)
        released, freed, _ = await self._arun(f"release {name!r}",
                                              lambda: self._rules.release(name, owner_token, slot))  # fmt: skip
        if freed:
            self._released(name)
        await self._asweep()
        return released

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        slot = self._in_slot(name, owner_token)
        return self._run(f"renew {name!r}", lambda: self._rules.renew(name, owner_token, ttl, slot))

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        slot = self._in_slot(name, owner_token)
        return await self._arun(f"renew {name!r}", lambda: self._rules.renew(name, owner_token, ttl, slot))

    def get(self, name: str) -> LockRecord | None:
        return self._run(f"read {name!r}", lambda: self._rules.get(name))

    async def aget(self, name: str) -> LockRecord | None:
        return await self._arun(f"read {name!r}", lambda: self._rules.get(name))

    def holders(self, name: str) -> builtins.list[LockRecord]:
        """Every live hold of ``name`` (its row's and its slots'), by fencing token, in one round trip."""
        return self._run(f"read the holders of {name!r}", lambda: self._rules.holders(name))

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        return await self._arun(f"read the holders of {name!r}", lambda: self._rules.holders(name))

    @staticmethod
    def _prefix(prefix: str) -> str:
        if not isinstance(prefix, str):
            raise TypeError(f"a name prefix must be a str, not {type(prefix).__name__}")
        return prefix

    def list(self, prefix: str = "") -> list[LockRecord]:
        prefix = self._prefix(prefix)
        return self._run("list locks", lambda: self._rules.list(prefix))

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:  # ``list`` is a method here
        prefix = self._prefix(prefix)
        return await self._arun("list locks", lambda: self._rules.list(prefix))

    def force_release(self, name: str) -> LockRecord | None:
        removed = self._run(f"force-release {name!r}", lambda: self._rules.force_release(name))
        if removed is not None:
            self._released(name)
        return removed

    async def aforce_release(self, name: str) -> LockRecord | None:
        removed = await self._arun(f"force-release {name!r}", lambda: self._rules.force_release(name))
        if removed is not None:
            self._released(name)
        return removed

    # -- closing and plumbing ------------------------------------------------------------

    def close(self) -> None:
        """Stop using the shared pool; the last persister of the configuration closes it. Used again, it reopens."""
        pool, self._pool_ = self._pool_, None
        if pool is None or pool.pid != os.getpid():
            return
        with _registry_guard:
            pool.users -= 1
            last = pool.users <= 0
            if last and _registry.get(self._key()) is pool:
                del _registry[self._key()]
        if last:
            pool.shut()

    async def aclose(self) -> None:
        """Close this loop's idle connections, then ``close``."""
        pool = self._pool_
        if pool is not None and pool.pid == os.getpid():
            with suppress(RuntimeError):
                loop_pool = pool.loops.pop(asyncio.get_running_loop(), None)
                while loop_pool is not None and loop_pool.idle:
                    self._discard(loop_pool.idle.pop())
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only; connections are opened again on first use."""
        state = self.__dict__.copy()
        for key in ("_pymysql", "_rules", "_pool_", "_ssl_context"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ssl_context = self.tls.context()
        self._pymysql = _import_drivers()
        self._rules = Rules(self._quoted, self._waiters, self._holds, self._pymysql.err)
        self._pool_ = None

    def __repr__(self) -> str:
        return f"MySql({self.url!r}, table={self.table!r})"


def _answer(op: Op, first: Any, results: list[tuple[int, Any]]) -> Any:
    """What the steps are sent: the first statement's answer, or every statement's (``counts``, ``results``)."""
    if op.kind == "counts":
        return [count for count, _ in results]
    return results if op.kind == "results" else first


def _tls_cause(error: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind a driver's error, if that is what it was."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
