"""The SQLite persister's rules, written once as steps (see ``_steps``).

Each primitive is a generator of ``Op`` values, ``(kind, sql, params)``: a
statement whose answer (``ONE`` row or None, ``ALL`` rows, or the ``COUNT`` of
rows it changed) is sent back in. The kind is what reads the answer off the
statement's cursor, so the driver's whole call is ``kind(execute(sql, params))``. ``sqlite.Sqlite`` runs each primitive's steps
as one transaction (``BEGIN IMMEDIATE`` for writes, so nothing can change
between a step's reading and its writing), on a sync face and an async face,
and ``_sqlite_watch`` runs ``free`` for its wake-ups. ``now`` is the host's
clock, read once the transaction has begun: every process sharing the file
shares that clock, which is why this store is for one host only.

A row's states: held (``owner_token`` set), released into its minimum hold
(``owner_token`` NULL, ``released_at`` set, ``expires_at = hold_until``), free
(``expires_at`` in the past, or NULL with no owner). A free name keeps its row,
so its fencing counter survives, until the retention sweep removes it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Generator, Iterable
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, TypeVar

from .._record import AcquireResult, LockRecord, Owner

__all__ = ["ALL", "COUNT", "ONE", "SWEEP_LIMIT", "Op", "Steps"]

#: The kinds of statement: what each one's answer is.
ONE: Callable[[sqlite3.Cursor], Any] = sqlite3.Cursor.fetchone
ALL: Callable[[sqlite3.Cursor], Any] = sqlite3.Cursor.fetchall
COUNT: Callable[[sqlite3.Cursor], Any] = attrgetter("rowcount")
#: One driver call: (kind, SQL, parameters).
Op = tuple[Callable[[sqlite3.Cursor], Any], str, tuple[Any, ...]]
_R = TypeVar("_R")
#: A primitive's steps: each yields an ``Op``, is sent its answer, and returns the primitive's answer.
Steps = Generator[Op, Any, _R]

SCHEMA = """
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
INDEX = "CREATE INDEX IF NOT EXISTS singleton_locks_expires_at ON singleton_locks (expires_at)"
# The waiter queue: it orders waiters (first ``place`` first); exclusivity never depends on it.
# A place ends at ``ends`` unless its waiter's next attempt renews it. Older versions ignore
# the table: their waiters take a free name whoever is queued.
WAITERS = """
CREATE TABLE IF NOT EXISTS singleton_waiters (
    name TEXT NOT NULL,
    owner_token TEXT NOT NULL,
    place INTEGER NOT NULL,
    ends REAL NOT NULL,
    PRIMARY KEY (name, owner_token)
)
"""
ADDED_COLUMNS = {"released_at": "REAL", "hold_until": "REAL"}  # since 0.3: the minimum hold
_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"
_LIVE = "(owner_token IS NOT NULL OR released_at IS NOT NULL) AND (expires_at IS NULL OR expires_at > ?)"
_ROW = f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ?"
_LIVE_ROW = f"{_ROW} AND {_LIVE}"
_HEAD = "SELECT owner_token, ends FROM singleton_waiters WHERE name = ? AND ends > ? ORDER BY place LIMIT 1"
_DEQUEUE = "DELETE FROM singleton_waiters WHERE name = ? AND owner_token = ?"
_FREE_UP = "UPDATE singleton_locks SET owner_token = NULL, released_at = ?, expires_at = ? WHERE name = ?"
#: Rows removed per sweep, so a sweep stays a small part of the write that runs it.
SWEEP_LIMIT = 100
#: How long after its end the sweep removes a waiter's place that was never renewed or left.
STALE_PLACE_SECONDS = 60.0
_CHUNK = 500  # names per query in ``free``, well under SQLite's parameter limit


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _record(row: tuple[Any, ...]) -> LockRecord:
    name, owner_token, fence, host, pid, created, expires, metadata, released, hold = row
    return LockRecord(name, owner_token or "", fence, host, pid, datetime.fromtimestamp(created, timezone.utc),
                      _when(expires), json.loads(metadata), _when(released), _when(hold))


def _live(row: tuple[Any, ...] | None, now: float) -> bool:
    return row is not None and (row[1] is not None or row[8] is not None) and (row[6] is None or row[6] > now)


def _conflict(row: tuple[Any, ...], now: float) -> AcquireResult:
    return AcquireResult(False, _record(row), retry_after=None if row[6] is None else row[6] - now)


def _queued_behind(head: tuple[str, float], now: float) -> AcquireResult:
    return AcquireResult(False, None, retry_after=head[1] - now, queued_behind=True)


def outdated() -> Steps[bool]:
    """True when the file was made by an older version (read without a transaction, on each open)."""
    have = {row[1] for row in (yield ALL, "PRAGMA table_info(singleton_locks)", ())}
    indexed = yield ONE, "SELECT 1 FROM sqlite_master WHERE name = 'singleton_locks_expires_at'", ()
    return not have.issuperset(ADDED_COLUMNS) or indexed is None


def migrate(now: float) -> Steps[None]:
    """Bring a file made by an older version up to this schema (in a write transaction: once, whoever
    opens it at the same time)."""
    have = {row[1] for row in (yield ALL, "PRAGMA table_info(singleton_locks)", ())}
    for column, kind in ADDED_COLUMNS.items():
        if column not in have:
            yield COUNT, f"ALTER TABLE singleton_locks ADD COLUMN {column} {kind}", ()
    if not have.issuperset(ADDED_COLUMNS):
        # Old free rows have no time they became free: count their idleness from now.
        yield COUNT, "UPDATE singleton_locks SET expires_at = ? WHERE owner_token IS NULL AND expires_at IS NULL", (now,)
    yield COUNT, INDEX, ()


# -- the waiter queue -------------------------------------------------------------------------------


def _head(now: float, name: str) -> Steps[tuple[str, float] | None]:
    """The first place in ``name``'s queue that has not ended: (owner token, end)."""
    row = yield ONE, _HEAD, (name, now)
    return (row[0], row[1]) if row is not None else None


def _head_token(now: float, name: str) -> Steps[str | None]:
    row = yield ONE, _HEAD, (name, now)
    return row[0] if row is not None else None


def _enqueue(now: float, name: str, owner_token: str, span: float) -> Steps[None]:
    """Queue ``owner_token`` last, or renew its place; places that ended are dropped first."""
    yield COUNT, "DELETE FROM singleton_waiters WHERE name = ? AND ends <= ?", (name, now)
    yield COUNT, ("INSERT INTO singleton_waiters (name, owner_token, place, ends) "
                  "VALUES (?, ?, (SELECT coalesce(max(place), 0) + 1 FROM singleton_waiters WHERE name = ?), ?) "
                  "ON CONFLICT (name, owner_token) DO UPDATE SET ends = excluded.ends"), \
        (name, owner_token, name, now + span)


def leave_queue(now: float, name: str, owner_token: str) -> Steps[str | None]:
    """Give up a place; the new head when the leaver was the head of a free name (it should try now)."""
    head = yield from _head(now, name)
    yield COUNT, _DEQUEUE, (name, owner_token)
    if head is None or head[0] != owner_token or _live((yield ONE, _ROW, (name,)), now):
        return None
    return (yield from _head_token(now, name))


# -- the primitives -----------------------------------------------------------------------------------


def peek(now: float, name: str, owner_token: str, queue_for: float | None) -> Steps[AcquireResult | None]:
    """The refusal an acquire would meet, read without the write lock; None when the write must decide.

    In WAL mode a read never waits for (or blocks) a writer, so pollers in other
    processes never delay the holder's release. A queued waiter is answered here
    only while its place needs no renewal yet.
    """
    if queue_for is not None:
        place = yield ONE, "SELECT ends FROM singleton_waiters WHERE name = ? AND owner_token = ?", (name, owner_token)
        if place is None or place[0] - now < queue_for / 2:
            return None  # not queued yet, or the place is due for renewal: the write does it
    row = yield ONE, _ROW, (name,)
    if _live(row, now):
        return _conflict(row, now)
    if queue_for is not None:
        head = yield from _head(now, name)
        if head is not None and head[0] != owner_token:
            return _queued_behind(head, now)
    return None


def acquire(now: float, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
            queue_for: float | None = None) -> Steps[AcquireResult]:
    row = yield ONE, _ROW, (name,)
    if _live(row, now):
        if queue_for is not None:
            yield from _enqueue(now, name, owner.owner_token, queue_for)
        return _conflict(row, now)
    if queue_for is not None:
        head = yield from _head(now, name)
        if head is not None and head[0] != owner.owner_token:
            yield from _enqueue(now, name, owner.owner_token, queue_for)
            return _queued_behind(head, now)
        yield COUNT, _DEQUEUE, (name, owner.owner_token)
    # An unreleased lease that ran out is a takeover; a name released (or whose hold ended) is simply free.
    expired = _record(row) if row is not None and row[1] is not None else None
    # Tokens rise across purges: a name with no row starts at the clock in ms, above any token it had.
    fence = max((row[2] if row is not None else 0) + 1, int(now * 1000))
    hold_until = now + min_hold if min_hold else None
    lease_end = now + ttl if ttl else None
    expires = None if lease_end is None else max(lease_end, hold_until or lease_end)
    values = (name, owner.owner_token, fence, owner.host, owner.pid, now, expires, json.dumps(dict(owner.metadata)),
              None, hold_until)
    yield COUNT, f"INSERT OR REPLACE INTO singleton_locks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values
    return AcquireResult(True, _record(values), expired=expired)


def release(now: float, name: str, owner_token: str) -> Steps[tuple[bool, str | None]]:
    """(was it a clean release, whom it wakes): None when the name is not free yet (a minimum hold,
    or nothing released), else the queue's head, or '' when nobody is queued."""
    row = yield ONE, "SELECT expires_at, hold_until FROM singleton_locks WHERE name = ? AND owner_token = ?", \
        (name, owner_token)
    if row is None:
        return False, None
    expires, hold_until = row
    if expires is not None and expires <= now:  # a lease that ran out untaken: cleared, but it was not held
        yield COUNT, "UPDATE singleton_locks SET owner_token = NULL WHERE name = ?", (name,)
        return False, None
    free_at = hold_until if hold_until is not None and hold_until > now else now
    yield COUNT, _FREE_UP, (now, free_at, name)
    if free_at > now:  # released into its minimum hold: nobody may take it yet
        return True, None
    head = yield ONE, _HEAD, (name, now)
    return True, head[0] if head is not None else ""


def renew(now: float, name: str, owner_token: str, ttl: float | None) -> Steps[LockRecord | None]:
    row = yield ONE, ("UPDATE singleton_locks SET expires_at = "
                      "CASE WHEN ? IS NULL THEN NULL ELSE max(?, coalesce(hold_until, 0)) END "
                      f"WHERE name = ? AND owner_token = ? AND {_LIVE} RETURNING {_COLUMNS}"), \
        (ttl or None, now + ttl if ttl else 0, name, owner_token, now)
    return _record(row) if row else None


def get(now: float, name: str) -> Steps[LockRecord | None]:
    row = yield ONE, _LIVE_ROW, (name, now)
    return _record(row) if row else None


def list_live(now: float, prefix: str) -> Steps[list[LockRecord]]:
    rows = yield ALL, f"SELECT {_COLUMNS} FROM singleton_locks WHERE substr(name, 1, ?) = ? AND {_LIVE} ORDER BY name", \
        (len(prefix), prefix, now)
    return [_record(row) for row in rows]


def force_release(now: float, name: str) -> Steps[LockRecord | None]:
    row = yield ONE, _LIVE_ROW, (name, now)
    if row is None:
        return None
    yield COUNT, _FREE_UP, (now, now, name)
    return _record(row)


def sweep(now: float, purge_after: float) -> Steps[int]:
    """Delete up to SWEEP_LIMIT rows free for ``purge_after`` seconds (the index on expires_at finds them).

    A row's ``expires_at`` is when its name became free: its release, the end of its
    minimum hold, or the end of a lease its crashed holder never renewed.
    """
    # Places of waiters that stopped asking without leaving (killed): nobody reads them again.
    yield COUNT, "DELETE FROM singleton_waiters WHERE ends < ?", (now - STALE_PLACE_SECONDS,)
    removed: int = yield COUNT, ("DELETE FROM singleton_locks WHERE rowid IN "
                                 "(SELECT rowid FROM singleton_locks WHERE expires_at < ? LIMIT ?)"), \
        (now - purge_after, SWEEP_LIMIT)
    return removed


def free(now: float, names: Iterable[str]) -> Steps[list[tuple[str, str | None]]]:
    """The names among ``names`` nobody holds now (no row, released, or expired), each with its queue's head."""
    wanted = sorted(names)
    held: set[str] = set()
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = yield ALL, f"SELECT name FROM singleton_locks WHERE name IN ({marks}) AND {_LIVE}", (*chunk, now)
        held.update(row[0] for row in rows)
    found = []
    for name in wanted:
        if name not in held:
            found.append((name, (yield from _head_token(now, name))))
    return found
