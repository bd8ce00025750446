"""The embedded default: one SQLite file shared by every process on one host.

Each primitive is one transaction (``BEGIN IMMEDIATE`` for writes) whose rules
are written once, as a step on a connection (``_acquire`` and so on); only the
running of a step is written twice. Sync calls use a connection with SQLite's
busy timeout. Async calls run the same step on the event loop's thread with a
connection that never waits inside SQLite: a busy file makes the call
``await asyncio.sleep`` and try again, so a coroutine holds no thread and no
executor slot, and a step itself takes well under a millisecond.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

from .._errors import PersisterError
from .._record import AcquireResult, LockRecord, Owner
from ._base import DEFAULT_PURGE_AFTER_SECONDS, Persister, ReleaseHub, ReleaseWatch, run_blocking
from ._sqlite_watch import inotify_listener

__all__ = ["Sqlite", "default_path"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS singleton_locks (
    name TEXT PRIMARY KEY,
    owner_token TEXT,
    fencing_token INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    metadata TEXT NOT NULL,
    released_at REAL,
    hold_until REAL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS singleton_locks_expires_at ON singleton_locks (expires_at)"
# The waiter queue: it orders waiters (first ``place`` first); exclusivity never depends on it.
# A place ends at ``ends`` unless its waiter's next attempt renews it. Older versions ignore
# the table: their waiters take a free name whoever is queued.
_WAITERS = """
CREATE TABLE IF NOT EXISTS singleton_waiters (
    name TEXT NOT NULL,
    owner_token TEXT NOT NULL,
    place INTEGER NOT NULL,
    ends REAL NOT NULL,
    PRIMARY KEY (name, owner_token)
)
"""
_ADDED_COLUMNS = {"released_at": "REAL", "hold_until": "REAL"}  # since 0.3: the minimum hold
_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"
# A row's states: held (owner_token set), released into its minimum hold (owner_token NULL,
# released_at set, expires_at = hold_until), free (expires_at in the past or NULL with no owner).
# A free name keeps its row so its fencing counter survives, until the purge sweep removes it.
_LIVE = "(owner_token IS NOT NULL OR released_at IS NOT NULL) AND (expires_at IS NULL OR expires_at > ?)"
#: Rows removed per sweep, so a sweep stays a small part of the acquire that runs it.
SWEEP_LIMIT = 100
#: The most often one persister sweeps (an index seek when nothing is due), unless the
#: last sweep found a backlog.
SWEEP_INTERVAL = 10.0
#: How long after its end the sweep removes a waiter's place that was never renewed or left.
_STALE_PLACE_SECONDS = 60.0


def default_path() -> Path:
    """The user's state directory, so every process of a user finds the same store."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "singleton-integrations" / "locks.sqlite3"


def _busy(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "locked" in text or "busy" in text


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


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _record(row: tuple[Any, ...]) -> LockRecord:
    name, owner_token, fence, host, pid, created, expires, metadata, released, hold = row
    return LockRecord(name, owner_token or "", fence, host, pid, datetime.fromtimestamp(created, timezone.utc),
                      _when(expires), json.loads(metadata),
                      _when(released), _when(hold))


def _live(row: tuple[Any, ...] | None, now: float) -> bool:
    return row is not None and (row[1] is not None or row[8] is not None) and (row[6] is None or row[6] > now)


def _validate_purge(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"purge_after_seconds must be a positive number of seconds or None, not {value!r}")
    return float(value)


# -- the rules: one step per primitive, each inside one transaction, ``now`` from the host clock --


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file made by an older version up to this schema (inside BEGIN IMMEDIATE)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(singleton_locks)")}
    for column, kind in _ADDED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE singleton_locks ADD COLUMN {column} {kind}")
    if not have.issuperset(_ADDED_COLUMNS):
        # Old free rows have no time they became free: count their idleness from now.
        db.execute("UPDATE singleton_locks SET expires_at = ? WHERE owner_token IS NULL AND expires_at IS NULL",
                   (time.time(),))
    db.execute(_INDEX)


def _head(db: sqlite3.Connection, now: float, name: str) -> tuple[str, float] | None:
    """The first place in ``name``'s queue that has not ended: (owner token, end)."""
    row = db.execute("SELECT owner_token, ends FROM singleton_waiters WHERE name = ? AND ends > ? "
                     "ORDER BY place LIMIT 1", (name, now)).fetchone()
    return (row[0], row[1]) if row is not None else None


def _head_token(db: sqlite3.Connection, now: float, name: str) -> str | None:
    head = _head(db, now, name)
    return head[0] if head is not None else None


def _place_ends(db: sqlite3.Connection, name: str, owner_token: str) -> float | None:
    row = db.execute("SELECT ends FROM singleton_waiters WHERE name = ? AND owner_token = ?",
                     (name, owner_token)).fetchone()
    return row[0] if row is not None else None


def _enqueue(db: sqlite3.Connection, now: float, name: str, owner_token: str, span: float) -> None:
    """Queue ``owner_token`` last, or renew its place; places that ended are dropped first."""
    db.execute("DELETE FROM singleton_waiters WHERE name = ? AND ends <= ?", (name, now))
    db.execute("INSERT INTO singleton_waiters (name, owner_token, place, ends) "
               "VALUES (?, ?, (SELECT coalesce(max(place), 0) + 1 FROM singleton_waiters WHERE name = ?), ?) "
               "ON CONFLICT (name, owner_token) DO UPDATE SET ends = excluded.ends", (name, owner_token, name, now + span))


def _dequeue(db: sqlite3.Connection, name: str, owner_token: str) -> None:
    db.execute("DELETE FROM singleton_waiters WHERE name = ? AND owner_token = ?", (name, owner_token))


def _leave_queue(db: sqlite3.Connection, now: float, name: str, owner_token: str) -> str | None:
    """Give up a place; the new head when the leaver was the head of a free name (it should try now)."""
    head = _head(db, now, name)
    _dequeue(db, name, owner_token)
    if head is None or head[0] != owner_token or _peek(db, now, name) is not None:
        return None
    return _head_token(db, now, name)


def _queued_behind(head: tuple[str, float], now: float) -> AcquireResult:
    return AcquireResult(False, None, retry_after=head[1] - now, queued_behind=True)


def _acquire(db: sqlite3.Connection, now: float, name: str, owner: Owner, ttl: float | None,
             min_hold: float | None, queue_for: float | None = None) -> AcquireResult:
    row = db.execute(f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ?", (name,)).fetchone()
    if row is not None and _live(row, now):
        if queue_for is not None:
            _enqueue(db, now, name, owner.owner_token, queue_for)
        holder = _record(row)
        return AcquireResult(False, holder, retry_after=None if row[6] is None else row[6] - now)
    if queue_for is not None:
        head = _head(db, now, name)
        if head is not None and head[0] != owner.owner_token:
            _enqueue(db, now, name, owner.owner_token, queue_for)
            return _queued_behind(head, now)
        _dequeue(db, name, owner.owner_token)
    # An unreleased lease that ran out is a takeover; a name released (or whose hold ended) is simply free.
    expired = _record(row) if row is not None and row[1] is not None else None
    # Tokens rise across purges: a name with no row starts at the clock in ms, above any token it had.
    fence = max((row[2] if row is not None else 0) + 1, int(now * 1000))
    hold_until = now + min_hold if min_hold else None
    lease_end = now + ttl if ttl else None
    expires = None if lease_end is None else max(lease_end, hold_until or lease_end)
    values = (name, owner.owner_token, fence, owner.host, owner.pid, now, expires, json.dumps(dict(owner.metadata)),
              None, hold_until)
    db.execute(f"INSERT OR REPLACE INTO singleton_locks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
    return AcquireResult(True, _record(values), expired=expired)


def _peek(db: sqlite3.Connection, now: float, name: str) -> AcquireResult | None:
    """The conflict an acquire would meet, read without the write lock; None when the name looks free."""
    row = db.execute(f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ?", (name,)).fetchone()
    if row is not None and _live(row, now):
        return AcquireResult(False, _record(row), retry_after=None if row[6] is None else row[6] - now)
    return None


def _peek_queued(db: sqlite3.Connection, now: float, name: str, owner_token: str,
                 queue_for: float) -> AcquireResult | None:
    """``_peek`` for a queued waiter: its refusal, when its place needs no renewal yet; else None (write)."""
    ends = _place_ends(db, name, owner_token)
    if ends is None or ends - now < queue_for / 2:
        return None  # not queued yet, or the place is due for renewal: the write path does it
    conflict = _peek(db, now, name)
    if conflict is not None:
        return conflict
    head = _head(db, now, name)
    return _queued_behind(head, now) if head is not None and head[0] != owner_token else None


def _release(db: sqlite3.Connection, now: float, name: str, owner_token: str) -> tuple[bool, bool]:
    """(was it a clean release, is the name free now): a release into a minimum hold frees nothing yet."""
    row = db.execute("SELECT expires_at, hold_until FROM singleton_locks WHERE name = ? AND owner_token = ?",
                     (name, owner_token)).fetchone()
    if row is None:
        return False, False
    expires, hold_until = row
    if expires is not None and expires <= now:  # a lease that ran out untaken: cleared, but it was not held
        db.execute("UPDATE singleton_locks SET owner_token = NULL WHERE name = ?", (name,))
        return False, False
    free_at = hold_until if hold_until is not None and hold_until > now else now
    db.execute("UPDATE singleton_locks SET owner_token = NULL, released_at = ?, expires_at = ? WHERE name = ?",
               (now, free_at, name))
    return True, free_at <= now


def _release_to_head(db: sqlite3.Connection, now: float, name: str, owner_token: str) -> tuple[bool, str | None]:
    """``_release``, and whom it wakes: (clean release, None if the name is not free, else the queue's head or '')."""
    released, free = _release(db, now, name, owner_token)
    if not free:
        return released, None
    return released, _head_token(db, now, name) or ""


def _renew(db: sqlite3.Connection, now: float, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
    row = db.execute(
        "UPDATE singleton_locks SET expires_at = CASE WHEN ? IS NULL THEN NULL ELSE max(?, coalesce(hold_until, 0)) END "
        f"WHERE name = ? AND owner_token = ? AND {_LIVE} RETURNING {_COLUMNS}",
        (ttl or None, now + ttl if ttl else 0, name, owner_token, now),
    ).fetchone()
    return _record(row) if row else None


def _get(db: sqlite3.Connection, now: float, name: str) -> LockRecord | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ? AND {_LIVE}", (name, now)).fetchone()
    return _record(row) if row else None


def _list(db: sqlite3.Connection, now: float, prefix: str) -> list[LockRecord]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM singleton_locks WHERE substr(name, 1, ?) = ? AND {_LIVE} ORDER BY name",
        (len(prefix), prefix, now),
    ).fetchall()
    return [_record(row) for row in rows]


def _force_release(db: sqlite3.Connection, now: float, name: str) -> LockRecord | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ? AND {_LIVE}", (name, now)).fetchone()
    if row is None:
        return None
    db.execute("UPDATE singleton_locks SET owner_token = NULL, released_at = ?, expires_at = ? WHERE name = ?",
               (now, now, name))
    return _record(row)


def _sweep(db: sqlite3.Connection, now: float, purge_after: float) -> int:
    """Delete up to SWEEP_LIMIT rows free for ``purge_after`` seconds (the index on expires_at finds them).

    A row's ``expires_at`` is when its name became free: its release, the end of its
    minimum hold, or the end of a lease its crashed holder never renewed.
    """
    # Places of waiters that stopped asking without leaving (killed): nobody reads them again.
    db.execute("DELETE FROM singleton_waiters WHERE ends < ?", (now - _STALE_PLACE_SECONDS,))
    return db.execute(
        "DELETE FROM singleton_locks WHERE rowid IN (SELECT rowid FROM singleton_locks WHERE expires_at < ? LIMIT ?)",
        (now - purge_after, SWEEP_LIMIT),
    ).rowcount


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
        self.hub = _hub_for(path)

    def reset_after_fork(self) -> None:
        # The parent's connections are not ours to use or close; a lock held at the fork never frees.
        self.guard = threading.RLock()
        self.connection, self.pid = None, 0
        self.loop_connections = threading.local()


_files: dict[tuple[str, float], _File] = {}
_hubs: dict[str, ReleaseHub] = {}  # by file alone: objects with different timeouts still wake each other
_files_guard = threading.Lock()


def _hub_for(path: Path) -> ReleaseHub:
    key = os.path.abspath(path)
    hub = _hubs.get(key)  # called under _files_guard
    if hub is None:
        hub = _hubs[key] = ReleaseHub(inotify_listener(path, _head_token), thread_name="singleton-sqlite-listener")
    return hub


def _file_for(path: Path, timeout: float) -> _File:
    key = (os.path.abspath(path), timeout)
    with _files_guard:
        shared = _files.get(key)
        if shared is None:
            shared = _files[key] = _File(path)
        return shared


def _after_fork_in_child() -> None:
    global _files_guard
    _files_guard = threading.Lock()
    for shared in _files.values():
        shared.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Sqlite(Persister):
    """Locks in a SQLite file; ``BEGIN IMMEDIATE`` makes each primitive one atomic step.

    The clock is the host's: every process sharing the file shares that host's
    clock, which is why this store is for one host only. Waiters in this process
    are woken by its releases at once, and by other processes' releases through
    inotify on Linux; ``poll_interval`` stays as the safety net.
    """

    backend: ClassVar[str] = "sqlite"
    clock: ClassVar[str] = "the host's clock"
    supports_min_hold: ClassVar[bool] = True
    native_async: ClassVar[bool] = True
    fair: ClassVar[bool] = True
    poll_interval: float = 0.05

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 10.0,
                 purge_after_seconds: float | None = DEFAULT_PURGE_AFTER_SECONDS) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"a SQLite path must be a str or path, not {type(path).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.path = Path(path) if path is not None else default_path()
        self.timeout = float(timeout)
        self.call_timeout = self.timeout  # the busy timeout bounds each call
        self.purge_after_seconds = _validate_purge(purge_after_seconds)
        self._shared = _file_for(self.path, self.timeout)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Sqlite:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db``; ``sqlite://`` is the default file.

        Query options: ``timeout`` and ``purge_after_seconds`` (a number, or ``none``
        to keep every name's state); keyword options override them.
        """
        rest, _, query = url.partition("://")[2].partition("?")
        from_query: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "timeout":
                from_query[key] = _number(key, value)
            elif key == "purge_after_seconds":
                from_query[key] = None if value.lower() in ("none", "") else _number(key, value)
            else:
                raise ValueError(f"unknown SQLite URL option {key!r}; known: purge_after_seconds, timeout")
        options = {**from_query, **options}
        if rest in ("", "/"):
            return cls(None, **options)
        if not rest.startswith("/"):
            raise ValueError("a SQLite URL has no host: write sqlite:///relative.db or sqlite:////absolute.db")
        return cls(rest[1:], **options)

    # -- connections ---------------------------------------------------------------------------

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                         check_same_thread=False)
            _retry_busy(lambda: connection.execute("PRAGMA journal_mode=WAL"), self.timeout)
            connection.execute("PRAGMA synchronous=NORMAL")
            _retry_busy(lambda: connection.execute(_SCHEMA), self.timeout)
            _retry_busy(lambda: connection.execute(_WAITERS), self.timeout)
            have = {row[1] for row in connection.execute("PRAGMA table_info(singleton_locks)")}
            indexed = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'singleton_locks_expires_at'")
            if not have.issuperset(_ADDED_COLUMNS) or indexed.fetchone() is None:
                _retry_busy(lambda: self._in_transaction(connection, True, lambda db, now: _migrate(db)), self.timeout)
        except (sqlite3.Error, OSError) as error:
            raise PersisterError(self.backend, f"cannot open {str(self.path)!r}: {error}") from error
        return connection

    def _connect(self) -> sqlite3.Connection:
        if self._shared.connection is not None and self._shared.pid == os.getpid():
            return self._shared.connection
        connection = self._open(self.timeout)
        self._shared.connection, self._shared.pid = connection, os.getpid()
        return connection

    @staticmethod
    def _in_transaction(db: sqlite3.Connection, write: bool, step: Callable[..., _T], *args: Any) -> _T:
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = step(db, time.time(), *args)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _error(self, error: sqlite3.Error) -> PersisterError:
        return PersisterError(self.backend, f"{error} (file {str(self.path)!r})")

    def _run(self, step: Callable[..., _T], *args: Any, write: bool = True) -> _T:
        with self._shared.guard:
            connection = self._connect()
            if connection.in_transaction:  # re-entered by a signal handler mid-call: use a connection of its own
                connection = self._open(self.timeout)
                try:
                    return self._run_on(connection, write, step, *args)
                finally:
                    connection.close()
            return self._run_on(connection, write, step, *args)

    def _run_on(self, connection: sqlite3.Connection, write: bool, step: Callable[..., _T], *args: Any) -> _T:
        try:
            if write and step is not _sweep and self.purge_after_seconds is not None and \
                    time.monotonic() >= self._shared.next_sweep:
                swept: _T = self._in_transaction(connection, True, self._swept, step, *args)  # step's answer, after the sweep
                return swept
            return self._in_transaction(connection, write, step, *args)
        except sqlite3.Error as error:
            raise self._error(error) from error

    def _swept(self, db: sqlite3.Connection, now: float, step: Callable[..., _T], *args: Any) -> _T:
        """``step`` after a retention sweep, in the same transaction (one commit for both)."""
        assert self.purge_after_seconds is not None
        removed = _sweep(db, now, self.purge_after_seconds)
        # A full sweep means a backlog: sweep again on the next write instead of waiting.
        wait = 0.0 if removed >= SWEEP_LIMIT else min(SWEEP_INTERVAL, self.purge_after_seconds / 2)
        self._shared.next_sweep = time.monotonic() + wait
        return step(db, now, *args)

    async def _arun(self, step: Callable[..., _T], *args: Any, write: bool = True) -> _T:
        await asyncio.sleep(0)  # yield once, as a round trip would: other tasks get their turn first
        connection = await self._aconnect()
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                # No await between BEGIN and COMMIT: the transaction is one uninterrupted step on the loop.
                return self._run_on(connection, write, step, *args)
            except PersisterError as error:
                cause = error.__cause__
                if not (isinstance(cause, sqlite3.OperationalError) and _busy(cause)):
                    raise
                if time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.poll_interval)

    async def _aconnect(self) -> sqlite3.Connection:
        local = self._shared.loop_connections
        if getattr(local, "pid", None) == os.getpid() and local.connection is not None:
            kept: sqlite3.Connection = local.connection  # this thread's, set below
            return kept
        # Opening may wait on a file being created by others: do it once per thread, off the loop.
        connection = await run_blocking(self._open, 0.0)
        local.connection, local.pid = connection, os.getpid()
        return connection

    # -- primitives ------------------------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None) -> AcquireResult:
        # A held name is answered by a read, which in WAL mode never waits for (or blocks) a writer:
        # pollers in other processes then never delay the holder's release.
        conflict = self._run(*self._peek_step(name, owner, queue_for), write=False)
        return conflict if conflict is not None else self._run(_acquire, name, owner, ttl, min_hold, queue_for)

    @staticmethod
    def _peek_step(name: str, owner: Owner, queue_for: float | None) -> tuple[Any, ...]:
        return (_peek, name) if queue_for is None else (_peek_queued, name, owner.owner_token, queue_for)

    def _woken(self, name: str, head: str | None) -> None:
        """Wake who should try after a release: the queue's head if it waits here, else the longest waiter."""
        if head is not None:
            self._shared.hub.notify(name, head or None)

    def release(self, name: str, owner_token: str) -> bool:
        released, head = self._run(_release_to_head, name, owner_token)
        self._woken(name, head)
        return released

    def leave_queue(self, name: str, owner_token: str) -> None:
        self._woken(name, self._run(_leave_queue, name, owner_token))

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return self._run(_renew, name, owner_token, ttl)

    def get(self, name: str) -> LockRecord | None:
        return self._run(_get, name, write=False)

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self._run(_list, prefix, write=False)

    def force_release(self, name: str) -> LockRecord | None:
        removed = self._run(_force_release, name)
        self._shared.hub.notify(name)
        return removed

    async def aacquire(self, name: str, owner: Owner, ttl: float | None,
                       min_hold: float | None = None, *, queue_for: float | None = None) -> AcquireResult:
        conflict = await self._arun(*self._peek_step(name, owner, queue_for), write=False)
        return conflict if conflict is not None else await self._arun(_acquire, name, owner, ttl, min_hold, queue_for)

    async def arelease(self, name: str, owner_token: str) -> bool:
        released, head = await self._arun(_release_to_head, name, owner_token)
        self._woken(name, head)
        return released

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        self._woken(name, await self._arun(_leave_queue, name, owner_token))

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return await self._arun(_renew, name, owner_token, ttl)

    async def aget(self, name: str) -> LockRecord | None:
        return await self._arun(_get, name, write=False)

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:
        return await self._arun(_list, prefix, write=False)

    async def aforce_release(self, name: str) -> LockRecord | None:
        removed = await self._arun(_force_release, name)
        self._shared.hub.notify(name)
        return removed

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        """Woken at once by releases in this process, and by other processes' through inotify (Linux)."""
        return self._shared.hub.watch(name, owner_token)

    def purge(self) -> int:
        """Run one retention sweep now (normally acquires do it in passing); returns rows removed."""
        if self.purge_after_seconds is None:
            return 0
        return self._run(_sweep, self.purge_after_seconds)

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


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"SQLite URL option {key} must be a number of seconds, not {value!r}") from None
