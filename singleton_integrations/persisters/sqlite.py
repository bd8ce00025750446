"""The embedded default: one SQLite file shared by every process on one host.

The rules are in ``_sqlite_steps`` (written once as steps); this module keeps
the I/O: the connections, running a primitive's steps as one transaction
(``BEGIN IMMEDIATE`` for writes) with the shared ``drive``, the error
translation, and the release hub. Both faces drive the steps with blocking
``sqlite3`` calls, because each is a local call of well under a millisecond that
never waits on the async face. Sync calls use a connection with SQLite's busy
timeout. Async calls run on the event loop's thread with a connection that never
waits inside SQLite: a busy file makes the call ``await asyncio.sleep`` and try
again, so a coroutine holds no thread and no executor slot. Not ``adrive``: the
loop's connection is shared by its coroutines, so no ``await`` may come between
a transaction's ``BEGIN`` and its ``COMMIT``.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .._errors import PersisterError
from .._record import AcquireResult, LockRecord, Owner
from . import _sqlite_steps as rules
from ._base import (
    DEFAULT_PURGE_AFTER_SECONDS,
    ClientRegistry,
    ErrorTranslation,
    Persister,
    ReleaseHub,
    ReleaseWatch,
    name_prefix,
    option_retention,
    option_seconds,
    positive_seconds,
    retention_seconds,
    run_blocking,
    url_options,
)
from ._sqlite_steps import SWEEP_LIMIT, Op, Steps
from ._sqlite_watch import inotify_listener
from ._steps import drive

__all__ = ["SWEEP_LIMIT", "Sqlite", "default_path"]

_R = TypeVar("_R")
#: A primitive's rules: made with the host's clock and the call's arguments, once the transaction has begun.
_Make = Callable[..., Steps[_R]]
#: The most often one persister sweeps (an index seek when nothing is due), unless the
#: last sweep found a backlog.
SWEEP_INTERVAL = 10.0
_URL_OPTIONS: dict[str, Callable[[str, str], Any]] = {"timeout": option_seconds,
                                                      "purge_after_seconds": option_retention}


def default_path() -> Path:
    """The user's state directory, so every process of a user finds the same store."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "singleton-integrations" / "locks.sqlite3"


def _busy(error: BaseException | None) -> bool:
    text = str(error)
    return isinstance(error, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _retry_busy(step: Callable[[], object], timeout: float) -> None:
    """Run ``step``, retrying "database is locked" until ``timeout``.

    Several processes opening a fresh file at once can get SQLITE_BUSY from the
    switch to WAL without SQLite calling its busy handler (it would deadlock), so
    the busy timeout alone does not cover the first open.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as error:
            if not _busy(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


# -- running steps: the only I/O ---------------------------------------------------------------------


def _unanswerable(_error: BaseException) -> bool:
    return False  # no rule answers a driver error: every one ends the primitive


def _drive(db: sqlite3.Connection, steps: Steps[_R]) -> _R:
    """Run ``steps`` on ``db`` as they are (the caller chose the transaction)."""

    def call(op: Op) -> Any:
        kind, sql, params = op
        return kind(db.execute(sql, params))

    return drive(steps, call, _unanswerable)


#: How a primitive's transaction begins: a write takes the write lock first; a read of
#: several statements reads one snapshot; a read of one statement is a transaction by itself.
WRITE, READ, ONE_READ = "BEGIN IMMEDIATE", "BEGIN", None


def _in_transaction(db: sqlite3.Connection, begin: str | None, make: _Make[_R], *args: Any) -> _R:
    """``make(now, *args)``'s steps as one transaction (``begin`` says how), ``now`` read once it
    has begun: for a write, no other process can write between the clock's reading and the commit."""
    if begin is None:
        return _drive(db, make(time.time(), *args))
    db.execute(begin)
    try:
        answer = _drive(db, make(time.time(), *args))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return answer


def _peek_begin(queue_for: float | None) -> str | None:
    """A queued waiter's look reads its place, the name and the queue: one snapshot for the three."""
    return ONE_READ if queue_for is None else READ


def _free(db: sqlite3.Connection, names: Iterable[str], seen: dict[str, frozenset[int]]) -> list[tuple[str, str | None]]:
    """For the inotify listener: whom to wake among the waiters of ``names`` (one snapshot; see ``rules.free``)."""
    return _in_transaction(db, READ, rules.free, names, seen)


# -- the store ----------------------------------------------------------------------------------------

class _File:
    """What every Sqlite object on one file (and busy timeout) shares in a process.

    One connection for sync calls, one per event-loop thread for async calls, the
    sweep schedule and the ``ReleaseHub``: many ``Singleton`` objects built from
    the same URL cost one connection, and each wakes the others' waiters. The hub
    hears other processes' releases through inotify where the OS offers it.
    """

    def __init__(self, path: Path) -> None:
        self.guard = threading.RLock()  # re-entrant: a SIGTERM handler may release mid-call
        self.connection: sqlite3.Connection | None = None
        self.pid = 0
        self.loop_connections = threading.local()  # async: one non-waiting connection per event-loop thread
        self.next_sweep = 0.0
        key = os.path.abspath(path)
        self.hub = _hubs.get(key, lambda: ReleaseHub(inotify_listener(key, _free), thread_name="singleton-sqlite-listener"))

    def reset_after_fork(self) -> None:
        # The parent's connections are not ours to use or close; a lock held at the fork never frees.
        self.guard = threading.RLock()
        self.connection, self.pid = None, 0
        self.loop_connections = threading.local()


def _keep(_hub: ReleaseHub) -> None:
    """A hub resets itself in a forked child (``_base``); the files keep theirs."""


#: By file alone: objects with different busy timeouts still wake each other's waiters.
_hubs: ClientRegistry[str, ReleaseHub] = ClientRegistry(after_fork=_keep)
#: By file and busy timeout; kept across a fork (objects made before it refer to them), each reset.
_files: ClientRegistry[tuple[str, float], _File] = ClientRegistry(after_fork=_File.reset_after_fork)


class Sqlite(Persister):
    """Locks in a SQLite file; ``BEGIN IMMEDIATE`` makes each primitive one atomic step.

    The clock is the host's: every process sharing the file shares that host's
    clock, which is why this store is for one host only. Waiters in this process
    are woken by its releases at once, and by other processes' releases through
    inotify on Linux; ``poll_interval`` stays as the safety net.

    ``limit=N``: holds taken with it live in a table of their own, so a hold taken
    without one is stored as it always was (see ``_sqlite_steps``).
    """

    backend: ClassVar[str] = "sqlite"
    clock: ClassVar[str] = "the host's clock"
    distributed: ClassVar[bool] = False
    multiprocess: ClassVar[bool] = True
    notifies: ClassVar[bool] = False  # inotify only speeds the 50 ms poll up, where Linux offers it
    fair: ClassVar[bool] = True
    supports_min_hold: ClassVar[bool] = True
    native_async: ClassVar[bool] = True  # no thread: steps run on the loop's thread, never waiting in SQLite
    limits: ClassVar[bool] = True
    poll_interval: float = 0.05

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 10.0,
                 purge_after_seconds: float | None = DEFAULT_PURGE_AFTER_SECONDS) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"a SQLite path must be a str or path, not {type(path).__name__}")
        self.path = Path(path) if path is not None else default_path()
        self.timeout = positive_seconds(timeout, "timeout")
        self.call_timeout = self.timeout  # the busy timeout bounds each call
        self.purge_after_seconds = retention_seconds(purge_after_seconds)
        self._errors = ErrorTranslation(self.backend, sqlite3.Error, self._describe)
        self._shared = _files.get((os.path.abspath(self.path), self.timeout), lambda: _File(self.path))

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Sqlite:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db``; ``sqlite://`` is the default file.

        Query options: ``timeout`` and ``purge_after_seconds`` (a number, or ``none``
        to keep every name's state); keyword options override them.
        """
        rest, _, query = url.partition("://")[2].partition("?")
        options = {**url_options(query, _URL_OPTIONS, "SQLite"), **options}
        if rest in ("", "/"):
            return cls(None, **options)
        if not rest.startswith("/"):
            raise ValueError("a SQLite URL has no host: write sqlite:///relative.db or sqlite:////absolute.db")
        return cls(rest[1:], **options)

    # -- connections ---------------------------------------------------------------------------

    def _describe(self, error: BaseException) -> str:
        return f"{error} (file {str(self.path)!r})"

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                         check_same_thread=False)
            _retry_busy(lambda: connection.execute("PRAGMA journal_mode=WAL"), self.timeout)
            connection.execute("PRAGMA synchronous=NORMAL")
            _retry_busy(lambda: connection.execute(rules.SCHEMA), self.timeout)
            _retry_busy(lambda: connection.execute(rules.WAITERS), self.timeout)
            _retry_busy(lambda: connection.execute(rules.HOLDS), self.timeout)
            _retry_busy(lambda: connection.execute(rules.HOLDS_INDEX), self.timeout)
            if _drive(connection, rules.outdated()):
                _retry_busy(lambda: _in_transaction(connection, WRITE, rules.migrate), self.timeout)
        except (sqlite3.Error, OSError) as error:
            raise PersisterError(self.backend, f"cannot open {str(self.path)!r}: {error}") from error
        return connection

    def _connect(self) -> sqlite3.Connection:
        if self._shared.connection is not None and self._shared.pid == os.getpid():
            return self._shared.connection
        connection = self._open(self.timeout)
        self._shared.connection, self._shared.pid = connection, os.getpid()
        return connection

    async def _aconnect(self) -> sqlite3.Connection:
        local = self._shared.loop_connections
        if getattr(local, "pid", None) == os.getpid() and local.connection is not None:
            kept: sqlite3.Connection = local.connection  # this thread's, set below
            return kept
        # Opening may wait on a file being created by others: do it once per thread, off the loop.
        connection = await run_blocking(self._open, 0.0)
        local.connection, local.pid = connection, os.getpid()
        return connection

    # -- one primitive, one transaction --------------------------------------------------------

    def _run(self, make: _Make[_R], *args: Any, begin: str | None = WRITE, sweep: bool = True) -> _R:
        with self._shared.guard:
            connection = self._connect()
            if connection.in_transaction:  # re-entered by a signal handler mid-call: use a connection of its own
                connection = self._open(self.timeout)
                try:
                    return self._run_on(connection, begin, sweep, make, args)
                finally:
                    connection.close()
            return self._run_on(connection, begin, sweep, make, args)

    def _run_on(self, connection: sqlite3.Connection, begin: str | None, sweep: bool, make: _Make[_R],
                args: tuple[Any, ...]) -> _R:
        try:
            if begin == WRITE and sweep and self.purge_after_seconds is not None and \
                    time.monotonic() >= self._shared.next_sweep:
                swept: _R = _in_transaction(connection, WRITE, self._swept, self.purge_after_seconds, make, *args)
                return swept
            return _in_transaction(connection, begin, make, *args)
        except sqlite3.Error as error:  # not ``with self._errors``: a try costs nothing on this hot path
            raise self._errors.error(error) from error

    def _swept(self, now: float, purge_after: float, make: _Make[_R], *args: Any) -> Steps[_R]:
        """``make``'s steps after a retention sweep, in the same transaction (one commit for both)."""
        removed = yield from rules.sweep(now, purge_after)
        # A full sweep means a backlog: sweep again on the next write instead of waiting.
        wait = 0.0 if removed >= SWEEP_LIMIT else min(SWEEP_INTERVAL, purge_after / 2)
        self._shared.next_sweep = time.monotonic() + wait
        return (yield from make(now, *args))

    async def _arun(self, make: _Make[_R], *args: Any, begin: str | None = WRITE) -> _R:
        await asyncio.sleep(0)  # yield once, as a round trip would: other tasks get their turn first
        connection = await self._aconnect()
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                # No await between BEGIN and COMMIT: the transaction is one uninterrupted step on the loop.
                return self._run_on(connection, begin, True, make, args)
            except Exception as error:
                if not _busy(error.__cause__) or time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.poll_interval)

    # -- primitives ------------------------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        # A refusal is answered by a read first: in WAL mode it never waits for (or blocks) a writer.
        if limit > 1:
            refused = self._run(rules.peek_among, name, owner.owner_token, queue_for, limit,
                                begin=_peek_begin(queue_for))
            return refused if refused is not None else \
                self._run(rules.acquire_among, name, owner, ttl, min_hold, queue_for, limit)
        refused = self._run(rules.peek, name, owner.owner_token, queue_for, begin=_peek_begin(queue_for))
        return refused if refused is not None else self._run(rules.acquire, name, owner, ttl, min_hold, queue_for)

    def _woken(self, name: str, wake: rules.Wake) -> None:
        """Wake who should try after a release: each place to wake if it waits here, else the longest waiter."""
        if wake is not None:
            for head in wake:
                self._shared.hub.notify(name, head)

    def _forced(self, name: str, removed: tuple[LockRecord | None, int]) -> LockRecord | None:
        """After ``force_release``: one wake-up per hold it freed (one at least, as ever)."""
        for _ in range(max(removed[1], 1)):
            self._shared.hub.notify(name)
        return removed[0]

    def release(self, name: str, owner_token: str) -> bool:
        released, head = self._run(rules.release, name, owner_token)
        self._woken(name, head)
        return released

    def leave_queue(self, name: str, owner_token: str) -> None:
        self._woken(name, self._run(rules.leave_queue, name, owner_token))

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return self._run(rules.renew, name, owner_token, ttl)

    def get(self, name: str) -> LockRecord | None:
        return self._run(rules.get, name, begin=ONE_READ)

    def holders(self, name: str) -> builtins.list[LockRecord]:
        return self._run(rules.holders, name, begin=ONE_READ)

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self._run(rules.list_live, name_prefix(prefix), begin=ONE_READ)

    def force_release(self, name: str) -> LockRecord | None:
        return self._forced(name, self._run(rules.force_release, name))

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        if limit > 1:
            refused = await self._arun(rules.peek_among, name, owner.owner_token, queue_for, limit,
                                       begin=_peek_begin(queue_for))
            return refused if refused is not None else \
                await self._arun(rules.acquire_among, name, owner, ttl, min_hold, queue_for, limit)
        refused = await self._arun(rules.peek, name, owner.owner_token, queue_for, begin=_peek_begin(queue_for))
        return refused if refused is not None else await self._arun(rules.acquire, name, owner, ttl, min_hold, queue_for)

    async def arelease(self, name: str, owner_token: str) -> bool:
        released, head = await self._arun(rules.release, name, owner_token)
        self._woken(name, head)
        return released

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        self._woken(name, await self._arun(rules.leave_queue, name, owner_token))

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return await self._arun(rules.renew, name, owner_token, ttl)

    async def aget(self, name: str) -> LockRecord | None:
        return await self._arun(rules.get, name, begin=ONE_READ)

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        return await self._arun(rules.holders, name, begin=ONE_READ)

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:
        return await self._arun(rules.list_live, name_prefix(prefix), begin=ONE_READ)

    async def aforce_release(self, name: str) -> LockRecord | None:
        return self._forced(name, await self._arun(rules.force_release, name))

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        """Woken at once by releases in this process, and by other processes' through inotify (Linux)."""
        return self._shared.hub.watch(name, owner_token)

    def purge(self) -> int:
        """Run one retention sweep now (normally acquires do it in passing); returns rows removed."""
        if self.purge_after_seconds is None:
            return 0
        return self._run(rules.sweep, self.purge_after_seconds, sweep=False)

    def close(self) -> None:
        with self._shared.guard:
            if self._shared.connection is not None and self._shared.pid == os.getpid():
                self._shared.connection.close()
            self._shared.connection = None
            local = self._shared.loop_connections
            if getattr(local, "pid", None) == os.getpid() and local.connection is not None:
                local.connection.close()
            local.connection = None

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sqlite({str(self.path)!r})"
