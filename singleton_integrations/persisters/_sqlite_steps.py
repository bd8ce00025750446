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

``limit=N`` (N > 1): a hold taken with it is a row of ``singleton_holds``, keyed by
(name, fencing token), with the same columns and states and the N it was taken
with; ``singleton_locks`` keeps only holds taken without a limit, exactly as
before. A name's fencing sequence is the greatest token among its rows of both
tables: each attempt that mints a token removes the name's dead holds in the same
transaction, and the new token is above them. An attempt without a limit looks at
``singleton_holds`` in the same statement that reads its row (one index probe).
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
# The holds taken with ``limit=N`` (N > 1): one row each, by fencing token, whatever N each was
# taken with (``hold_limit``). Older versions ignore the table.
HOLDS = """
CREATE TABLE IF NOT EXISTS singleton_holds (
    name TEXT NOT NULL,
    fencing_token INTEGER NOT NULL,
    owner_token TEXT,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    metadata TEXT NOT NULL,
    released_at REAL,
    hold_until REAL,
    hold_limit INTEGER NOT NULL,
    PRIMARY KEY (name, fencing_token)
)
"""
HOLDS_INDEX = "CREATE INDEX IF NOT EXISTS singleton_holds_expires_at ON singleton_holds (expires_at)"
ADDED_COLUMNS = {"released_at": "REAL", "hold_until": "REAL"}  # since 0.3: the minimum hold
_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata, released_at, hold_until"
_LIVE = "(owner_token IS NOT NULL OR released_at IS NOT NULL) AND (expires_at IS NULL OR expires_at > ?)"
_ROW = f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ?"
_LIVE_ROW = f"{_ROW} AND {_LIVE}"
#: The holds taken with a limit, in one value: NULL for none, -1 when one is live, else their
#: greatest fencing token (params: now, name).
_OTHERS = f"SELECT CASE WHEN max({_LIVE}) THEN -1 ELSE max(fencing_token) END FROM singleton_holds AS h WHERE h.name = ?"
#: A name's row and ``_OTHERS`` in one statement, one row even for a name without a row (its
#: columns NULL), so the check costs no extra call either way (params: now, name).
_ROW_AND_OTHERS = (f"SELECT {', '.join('l.' + column for column in _COLUMNS.split(', '))}, "
                   f"({_OTHERS.replace('h.name = ?', 'h.name = wanted.name')}) "
                   "FROM (SELECT ? AS name) AS wanted LEFT JOIN singleton_locks AS l ON l.name = wanted.name")
#: Every row of a name in both tables, by fencing token; the 11th column is NULL for
#: ``singleton_locks``' row, else the N the hold was taken with (params: name, name).
_ALL_HOLDS = (f"SELECT {_COLUMNS}, NULL AS hold_limit FROM singleton_locks WHERE name = ? UNION ALL "
              f"SELECT {_COLUMNS}, hold_limit FROM singleton_holds WHERE name = ? ORDER BY fencing_token")
#: ``_ALL_HOLDS``' live ones (params: name, now, name, now).
_LIVE_HOLDS = (f"SELECT {_COLUMNS}, NULL AS hold_limit FROM singleton_locks WHERE name = ? AND {_LIVE} UNION ALL "
               f"SELECT {_COLUMNS}, hold_limit FROM singleton_holds WHERE name = ? AND {_LIVE} ORDER BY fencing_token")
#: How many more holds the name's limit leaves room for: its greatest N (1 without holds taken
#: with a limit) less its live holds; may be negative (params: name, name, now, name, now).
_ROOM = ("SELECT coalesce((SELECT max(hold_limit) FROM singleton_holds WHERE name = ?), 1)"
         f" - (SELECT count(*) FROM singleton_holds WHERE name = ? AND {_LIVE})"
         f" - (SELECT count(*) FROM singleton_locks WHERE name = ? AND {_LIVE})")
_HEAD = "SELECT owner_token, ends FROM singleton_waiters WHERE name = ? AND ends > ? ORDER BY place LIMIT 1"
_PLACES = "SELECT owner_token, ends FROM singleton_waiters WHERE name = ? AND ends > ? ORDER BY place"
#: The places a release wakes: as many as the name has room for, one at least
#: (params: name, now, then ``_ROOM``'s).
_WAKE_PLACES = f"{_PLACES} LIMIT max(1, ({_ROOM}))"
_DEQUEUE = "DELETE FROM singleton_waiters WHERE name = ? AND owner_token = ?"
_FREE_UP = "UPDATE singleton_locks SET owner_token = NULL, released_at = ?, expires_at = ? WHERE name = ?"
_RENEW = ("UPDATE {table} SET expires_at = CASE WHEN ? IS NULL THEN NULL ELSE max(?, coalesce(hold_until, 0)) END "
          f"WHERE name = ? AND owner_token = ? AND {_LIVE} RETURNING {_COLUMNS}")
#: Rows removed per sweep, so a sweep stays a small part of the write that runs it.
SWEEP_LIMIT = 100
#: How long after its end the sweep removes a waiter's place that was never renewed or left.
STALE_PLACE_SECONDS = 60.0
_CHUNK = 500  # names per query in ``free``, well under SQLite's parameter limit


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _record(row: tuple[Any, ...]) -> LockRecord:
    name, owner_token, fence, host, pid, created, expires, metadata, released, hold = row[:10]
    return LockRecord(name, owner_token or "", fence, host, pid, datetime.fromtimestamp(created, timezone.utc),
                      _when(expires), json.loads(metadata), _when(released), _when(hold))


def _live(row: tuple[Any, ...] | None, now: float) -> bool:
    return row is not None and (row[1] is not None or row[8] is not None) and (row[6] is None or row[6] > now)


def _conflict(row: tuple[Any, ...], now: float) -> AcquireResult:
    return AcquireResult(False, _record(row), retry_after=None if row[6] is None else row[6] - now)


def _queued_behind(head: tuple[str, float], now: float) -> AcquireResult:
    return AcquireResult(False, None, retry_after=head[1] - now, queued_behind=True)


def _full(live: list[tuple[Any, ...]], now: float) -> AcquireResult:
    """The refusal of an attempt that finds its N holds live: every holder, and the soonest end."""
    ends = [row[6] for row in live if row[6] is not None]
    return AcquireResult(False, _record(live[0]), retry_after=min(ends) - now if ends else None,
                         holders=tuple(_record(row) for row in live))


def _ahead(places: list[tuple[str, float]], owner_token: str) -> int:
    """How many live places come before ``owner_token``'s (all of them when it has none)."""
    return next((index for index, place in enumerate(places) if place[0] == owner_token), len(places))


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


def _enqueue(now: float, name: str, owner_token: str, span: float) -> Steps[None]:
    """Queue ``owner_token`` last, or renew its place; places that ended are dropped first."""
    yield COUNT, "DELETE FROM singleton_waiters WHERE name = ? AND ends <= ?", (name, now)
    yield COUNT, ("INSERT INTO singleton_waiters (name, owner_token, place, ends) "
                  "VALUES (?, ?, (SELECT coalesce(max(place), 0) + 1 FROM singleton_waiters WHERE name = ?), ?) "
                  "ON CONFLICT (name, owner_token) DO UPDATE SET ends = excluded.ends"), \
        (name, owner_token, name, now + span)


def _room(now: float, name: str) -> Steps[int]:
    """How many of ``name``'s first places may take a hold now (0 when its holds are all live)."""
    room: int = (yield ONE, _ROOM, (name, name, now, name, now))[0]
    return max(room, 0)


def _heads(now: float, name: str, count: int) -> Steps[tuple[str | None, ...]]:
    """Whom a release wakes: the first ``count`` places, or (None,) for the longest waiter when nobody queues."""
    rows = yield ALL, f"{_PLACES} LIMIT ?", (name, now, count)
    return tuple(row[0] for row in rows) or (None,)


def leave_queue(now: float, name: str, owner_token: str) -> Steps[tuple[str] | None]:
    """Give up a place; the place that moves up into the free holds' reach, if any (it should try now)."""
    places = yield ALL, _PLACES, (name, now)
    yield COUNT, _DEQUEUE, (name, owner_token)
    index = _ahead(places, owner_token)
    if index == len(places):
        return None
    room = yield from _room(now, name)
    if index >= room or room >= len(places):
        return None
    return (places[room][0],)


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


def peek_among(now: float, name: str, owner_token: str, queue_for: float | None,
               limit: int) -> Steps[AcquireResult | None]:
    """``peek`` for an attempt with ``limit``: the refusal it would meet, read without the write lock."""
    if queue_for is not None:
        place = yield ONE, "SELECT ends FROM singleton_waiters WHERE name = ? AND owner_token = ?", (name, owner_token)
        if place is None or place[0] - now < queue_for / 2:
            return None
    live = yield ALL, _LIVE_HOLDS, (name, now, name, now)
    if any(row[1] == owner_token for row in live):
        return None  # the write answers with the caller's own hold
    free = limit - len(live)
    if free <= 0:
        return _full(live, now)
    if queue_for is not None:
        places = yield ALL, _PLACES, (name, now)
        if _ahead(places, owner_token) >= free:
            return _queued_behind(places[0], now)
    return None


def acquire(now: float, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
            queue_for: float | None = None) -> Steps[AcquireResult]:
    found = yield ONE, _ROW_AND_OTHERS, (now, name)
    row: Any = found if found[0] is not None else None
    others = found[10]
    if _live(row, now):
        if queue_for is not None:
            yield from _enqueue(now, name, owner.owner_token, queue_for)
        return _conflict(row, now)
    if others == -1:  # a hold taken with a limit is live: this attempt is one of N = 1 among them
        return (yield from acquire_among(now, name, owner, ttl, min_hold, queue_for, 1))
    if queue_for is not None:
        head = yield from _head(now, name)
        if head is not None and head[0] != owner.owner_token:
            yield from _enqueue(now, name, owner.owner_token, queue_for)
            return _queued_behind(head, now)
        yield COUNT, _DEQUEUE, (name, owner.owner_token)
    # An unreleased lease that ran out is a takeover; a name released (or whose hold ended) is simply free.
    expired = _record(row) if row is not None and row[1] is not None else None
    # Tokens rise across purges: a name with no row starts at the clock in ms, above any token it had.
    fence = max((row[2] if row is not None else 0) + 1, (others or 0) + 1, int(now * 1000))
    if others is not None:  # dead holds taken with a limit: the new token is above theirs
        yield COUNT, "DELETE FROM singleton_holds WHERE name = ?", (name,)
    values = _values(now, name, owner, ttl, min_hold, fence)
    yield COUNT, f"INSERT OR REPLACE INTO singleton_locks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values
    return AcquireResult(True, _record(values), expired=expired)


def _values(now: float, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
            fence: int) -> tuple[Any, ...]:
    """A new hold's row: its lease, minimum hold and owner."""
    hold_until = now + min_hold if min_hold else None
    lease_end = now + ttl if ttl else None
    expires = None if lease_end is None else max(lease_end, hold_until or lease_end)
    return (name, owner.owner_token, fence, owner.host, owner.pid, now, expires, json.dumps(dict(owner.metadata)),
            None, hold_until)


def acquire_among(now: float, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
                  queue_for: float | None, limit: int) -> Steps[AcquireResult]:
    """An attempt that succeeds while fewer than ``limit`` holds of the name are live, whatever N each took.

    A new hold is a row of ``singleton_holds``; with ``limit`` 1 (an attempt without a limit that
    found such a hold live) it never takes one, but gets its own hold back or the refusal.
    """
    rows = yield ALL, _ALL_HOLDS, (name, name)
    live = [row for row in rows if _live(row, now)]
    mine = next((row for row in live if row[1] == owner.owner_token), None)
    if mine is not None:
        return AcquireResult(True, _record(mine))
    free = limit - len(live)
    if free <= 0:
        if queue_for is not None:
            yield from _enqueue(now, name, owner.owner_token, queue_for)
        return _full(live, now)
    if queue_for is not None:
        places = yield ALL, _PLACES, (name, now)
        if _ahead(places, owner.owner_token) >= free:
            yield from _enqueue(now, name, owner.owner_token, queue_for)
            return _queued_behind(places[0], now)
        yield COUNT, _DEQUEUE, (name, owner.owner_token)
    fence = max(max((row[2] for row in rows), default=0) + 1, int(now * 1000))
    values = _values(now, name, owner, ttl, min_hold, fence)
    dead = [row for row in rows if row[10] is not None and not _live(row, now)]
    if dead:  # the new hold takes a dead one's row, and the others go: its token is above theirs
        if len(dead) > 1:
            yield COUNT, f"DELETE FROM singleton_holds WHERE name = ? AND NOT ({_LIVE}) AND fencing_token != ?", \
                (name, now, dead[0][2])
        yield COUNT, (f"UPDATE singleton_holds SET ({_COLUMNS}, hold_limit) = (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                      "WHERE name = ? AND fencing_token = ?"), (*values, limit, name, dead[0][2])
    else:
        yield COUNT, f"INSERT INTO singleton_holds ({_COLUMNS}, hold_limit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", \
            (*values, limit)
    expired = next((_record(row) for row in dead if row[1] is not None), None)
    return AcquireResult(True, _record(values), expired=expired)


#: Whom a release wakes: None for nobody (the hold is not free yet), else each place to wake,
#: or (None,) for the longest waiter when nobody is queued.
Wake = tuple[str | None, ...] | None


def release(now: float, name: str, owner_token: str) -> Steps[tuple[bool, Wake]]:
    """(was it a clean release, whom it wakes)."""
    row = yield ONE, "SELECT expires_at, hold_until FROM singleton_locks WHERE name = ? AND owner_token = ?", \
        (name, owner_token)
    if row is None:
        return (yield from _release_hold(now, name, owner_token))
    expires, hold_until = row
    if expires is not None and expires <= now:  # a lease that ran out untaken: cleared, but it was not held
        yield COUNT, "UPDATE singleton_locks SET owner_token = NULL WHERE name = ?", (name,)
        return (yield from _release_hold(now, name, owner_token))  # the token may have taken a hold since
    free_at = hold_until if hold_until is not None and hold_until > now else now
    yield COUNT, _FREE_UP, (now, free_at, name)
    if free_at > now:  # released into its minimum hold: nobody may take it yet
        return True, None
    head = yield ONE, _HEAD, (name, now)
    return True, (head[0] if head is not None else None,)


def _release_hold(now: float, name: str, owner_token: str) -> Steps[tuple[bool, Wake]]:
    """``release`` of a hold taken with a limit: the same rules on its row; it wakes as many
    places as the name has room for after it."""
    row = yield ONE, ("SELECT fencing_token, expires_at, hold_until FROM singleton_holds "
                      "WHERE name = ? AND owner_token = ? ORDER BY fencing_token DESC LIMIT 1"), (name, owner_token)
    if row is None:
        return False, None
    fence, expires, hold_until = row
    if expires is not None and expires <= now:
        yield COUNT, "UPDATE singleton_holds SET owner_token = NULL WHERE name = ? AND fencing_token = ?", (name, fence)
        return False, None
    free_at = hold_until if hold_until is not None and hold_until > now else now
    yield COUNT, ("UPDATE singleton_holds SET owner_token = NULL, released_at = ?, expires_at = ? "
                  "WHERE name = ? AND fencing_token = ?"), (now, free_at, name, fence)
    if free_at > now:
        return True, None
    places = yield ALL, _WAKE_PLACES, (name, now, name, name, now, name, now)
    return True, tuple(place[0] for place in places) or (None,)


def renew(now: float, name: str, owner_token: str, ttl: float | None) -> Steps[LockRecord | None]:
    params = (ttl or None, now + ttl if ttl else 0, name, owner_token, now)
    row = yield ONE, _RENEW.format(table="singleton_locks"), params
    if row is None:  # not the name's hold without a limit: perhaps one taken with a limit
        row = yield ONE, _RENEW.format(table="singleton_holds"), params
    return _record(row) if row else None


def get(now: float, name: str) -> Steps[LockRecord | None]:
    """The live hold with the lowest fencing token (one statement: one snapshot)."""
    row = yield ONE, f"{_LIVE_HOLDS} LIMIT 1", (name, now, name, now)
    return _record(row) if row else None


def holders(now: float, name: str) -> Steps[list[LockRecord]]:
    rows = yield ALL, _LIVE_HOLDS, (name, now, name, now)
    return [_record(row) for row in rows]


def list_live(now: float, prefix: str) -> Steps[list[LockRecord]]:
    rows = yield ALL, (f"SELECT {_COLUMNS} FROM singleton_locks WHERE substr(name, 1, ?) = ? AND {_LIVE} UNION ALL "
                       f"SELECT {_COLUMNS} FROM singleton_holds WHERE substr(name, 1, ?) = ? AND {_LIVE} "
                       "ORDER BY name, fencing_token"), (len(prefix), prefix, now, len(prefix), prefix, now)
    return [_record(row) for row in rows]


def force_release(now: float, name: str) -> Steps[tuple[LockRecord | None, int]]:
    """Free every live hold of ``name``: (the one with the lowest fencing token, how many)."""
    live = yield ALL, _LIVE_HOLDS, (name, now, name, now)
    if not live:
        return None, 0
    if any(row[10] is None for row in live):  # the hold taken without a limit
        yield COUNT, _FREE_UP, (now, now, name)
    if any(row[10] is not None for row in live):
        yield COUNT, f"UPDATE singleton_holds SET owner_token = NULL, released_at = ?, expires_at = ? " \
                     f"WHERE name = ? AND {_LIVE}", (now, now, name, now)
    return _record(live[0]), len(live)


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
    holds: int = yield COUNT, ("DELETE FROM singleton_holds WHERE rowid IN "
                               "(SELECT rowid FROM singleton_holds WHERE expires_at < ? LIMIT ?)"), \
        (now - purge_after, SWEEP_LIMIT)
    return removed + holds


def free(now: float, names: Iterable[str], seen: dict[str, frozenset[int]]) -> Steps[list[tuple[str, str | None]]]:
    """Whom to wake among the waiters of ``names``: (name, place to wake, or None for the longest waiter).

    A name nobody holds (no row, released, or expired) wakes its queue's head, as
    always. A name with holds taken with a limit also wakes its first places while it
    has room for them, but only when a hold seen live at the last look (``seen``, the
    caller's, updated here) is gone: a waiter refused by its own smaller N, whose
    refusal writes its queue place, must not wake itself again and again.
    """
    wanted = sorted(names)
    live: dict[str, set[int]] = {}
    limits: dict[str, int] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = yield ALL, f"SELECT name, fencing_token FROM singleton_locks WHERE name IN ({marks}) AND {_LIVE}", \
            (*chunk, now)
        for name, fence in rows:
            live.setdefault(name, set()).add(fence)
        rows = yield ALL, (f"SELECT name, fencing_token, hold_limit, {_LIVE} FROM singleton_holds "
                           f"WHERE name IN ({marks})"), (now, *chunk)
        for name, fence, limit, alive in rows:
            limits[name] = max(limits.get(name, 1), limit)
            if alive:
                live.setdefault(name, set()).add(fence)
    found: list[tuple[str, str | None]] = []
    looked: dict[str, frozenset[int]] = {}
    for name in wanted:
        tokens = looked[name] = frozenset(live.get(name, ()))
        room = limits.get(name, 1) - len(tokens)
        before = seen.get(name)
        if not tokens or (room > 0 and (before is None or not before <= tokens)):
            found.extend((name, head) for head in (yield from _heads(now, name, max(room, 1))))
    seen.clear()
    seen.update(looked)
    return found
