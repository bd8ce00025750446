"""The PostgreSQL persister's rules, written once for the sync and the async driver.

Each primitive is a generator of ``Op`` values (one statement, named by its key
in ``_postgres_sql.statements``) that is sent each one's answer, or has its
driver error thrown in, and returns the primitive's answer: ``postgres.Postgres``
drives the same generator on psycopg's sync and async connections, as
``_mysql_steps`` does for PyMySQL and aiomysql. Which text a key is sent as
(a message that starts with ``SET LOCAL statement_timeout``, or a statement
prepared on a direct connection) is the I/O's choice; what the answer means is
decided here.

Every statement is atomic on its own (the row is locked and judged by
``clock_timestamp()`` in one step), so a primitive is a few independent
statements at most, and replaying one after a dropped connection is safe: a
write that did land finds our own token the next time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Generator
from contextlib import suppress
from datetime import datetime, timezone
from typing import Any, TypeVar

from .._record import AcquireResult, LockRecord, Owner
from . import _postgres_sql as q

__all__ = ["Op", "Rules", "Steps", "channel", "record"]

_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated


class Op:
    """One statement: ``key`` names it (``_postgres_sql.statements``); ``kind`` is what is read back:
    ``one`` (a row or None), ``all`` (rows), ``count`` (rows affected), or ``pids`` (the server
    process's id, and the one the connection was told at startup)."""

    __slots__ = ("key", "kind", "params")

    def __init__(self, kind: str, key: str, params: dict[str, Any] | None = None) -> None:
        self.kind, self.key, self.params = kind, key, params

    def __repr__(self) -> str:
        return f"Op({self.kind}, {self.key})"


_R = TypeVar("_R")
#: A primitive's steps: each yields an ``Op``, is sent its answer, and returns the primitive's answer.
Steps = Generator[Op, Any, _R]


def channel(schema: str, relation: str) -> str:
    """The NOTIFY channel of a table, named from its canonical name so ``public.t`` and ``t`` agree."""
    name = f"singleton:{schema}.{relation}"
    if len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        name = f"singleton:{hashlib.sha256(name.encode()).hexdigest()[:40]}"
    return name


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(timezone.utc)


def record(row: tuple[Any, ...] | None, start: int = 0) -> LockRecord | None:
    """A row (from ``start``) as a record: a held lock, or one released into its minimum hold.

    A released record carries an empty owner token: no token can renew or release it.
    Callers select only live rows; a free row's leftovers never reach here.
    """
    if row is None:
        return None
    name, owner_token, fence, host, pid, created, expires, metadata, released, hold_until = row[start:start + 10]
    if name is None:
        return None
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    return LockRecord(
        name, owner_token or "", fence, host, pid, _utc(created), _utc(expires),  # type: ignore[arg-type]
        {str(key): str(value) for key, value in (metadata or {}).items()},
        released_at=_utc(released) if owner_token is None else None, hold_until=_utc(hold_until),
    )


def _taken(name: str, owner: Owner, fence: int, created: datetime, expires: datetime | None,
           hold_until: datetime | None) -> LockRecord:
    return LockRecord(name, owner.owner_token, fence, owner.host, owner.pid, _utc(created), _utc(expires),  # type: ignore[arg-type]
                      dict(owner.metadata), hold_until=_utc(hold_until))


def _seconds_left(remaining: Any) -> float | None:
    return None if remaining is None else max(float(remaining), 0.0)


def _free_taken(row: tuple[Any, ...] | None, name: str, owner: Owner) -> AcquireResult | None:
    """ACQUIRE_FREE's answer; None when the name was not free (look closer)."""
    if row is None:
        return None
    return AcquireResult(True, _taken(name, owner, row[0], row[1], row[2], row[3]))


def _shared(row: tuple[Any, ...] | None, start: int = 0) -> bool:
    """Whether a row read whole (from ``start``) is a shared one: holds taken with ``limit=N``, listed inside it."""
    return row is not None and row[start + 1] == q.SHARED


def _limited(rows: list[tuple[Any, ...]], owner: Owner) -> AcquireResult | None:
    """ACQUIRE_LIMITED's answer; None when the name's row appeared after the statement's snapshot (look again)."""
    if not rows:
        return None
    if rows[0][0] == "taken":
        return AcquireResult(True, record(rows[0], 1))
    holds = [found for found in (record(row, 1) for row in rows) if found is not None]
    mine = next((hold for hold in holds if hold.owner_token == owner.owner_token), None)
    if mine is not None:  # already ours, or our own write retried after a dropped connection
        return AcquireResult(True, mine)
    ends = [float(row[11]) for row in rows if row[11] is not None]
    return AcquireResult(False, holds[0], retry_after=max(min(ends), 0.0) if ends else None, holders=tuple(holds))


def _peeked(row: tuple[Any, ...] | None, owner: Owner, hinting: bool) -> AcquireResult | None:
    """PEEK's answer: a conflict, or None when only the locking ACQUIRE can say (free, expired,
    never seen, or a hint to write)."""
    if row is None or not row[10]:
        return None
    holder = record(row)
    if holder is None:
        return None
    if holder.owner_token == owner.owner_token:  # our own write, retried after a dropped connection
        return AcquireResult(True, holder)
    if hinting and not row[12]:
        return None
    return AcquireResult(False, holder, retry_after=_seconds_left(row[11]))


def _acquired(row: tuple[Any, ...], name: str, owner: Owner) -> AcquireResult | None:
    """ACQUIRE's answer; None when the name's row appeared after the statement's snapshot (look again)."""
    fence, created, expires, hold_until = row[0:4]
    previous = record(row, 4)
    live, remaining = row[14], row[15]
    if fence is not None:
        # Only a holder that never released is reported as expired; a hold that ran out is a normal acquire.
        expired = previous if previous is not None and previous.owner_token else None
        return AcquireResult(True, _taken(name, owner, fence, created, expires, hold_until), expired=expired)
    if previous is None:
        return None
    if previous.owner_token == owner.owner_token:  # our own write, retried after a dropped connection
        return AcquireResult(True, previous)
    if not live:  # not taken although not live: the clock moved between two reads of it; look again
        return None
    return AcquireResult(False, previous, retry_after=_seconds_left(remaining))


class Rules:
    """The primitives as step generators; ``errors`` is ``psycopg.errors`` (so no import of the driver here)."""

    def __init__(self, errors: Any) -> None:
        self._answered = (errors.UniqueViolation, errors.DuplicateTable)

    def answerable(self, error: BaseException) -> bool:
        """The driver errors the steps answer themselves (thrown in rather than ending the primitive)."""
        return isinstance(error, self._answered)

    def open_table(self, table: str, detect: bool, queue: str) -> Steps[tuple[bool | None, str | None]]:
        """Create or migrate ``table`` (quoted) if need be, and create its waiter ``queue`` (quoted) beside it.

        Returns whether a pooler is in front (None unless ``detect``: a pooler hands out
        its own cancel keys, so the pid a connection is told is not the server's) and
        the table's NOTIFY channel, None when the table could not be made ready.
        """
        pooled = None
        if detect:
            server_pid, told_pid = yield Op("pids", "backend_pid")
            pooled = server_pid != told_pid
        params = {"table": table, "columns": list(q.NEW_COLUMNS), "queue": queue}
        for _ in range(3):
            found = yield Op("one", "inspect", params)
            table_ready = found is not None and found[1] is not None and int(found[2]) >= len(q.NEW_COLUMNS)
            if table_ready and found[3]:
                return pooled, channel(found[0], found[1])
            # Created meanwhile by a process that does not take the advisory lock: look again.
            with suppress(*self._answered):
                yield Op("count", "setup_queue" if table_ready else "setup")
        return pooled, None

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
                hinting: Callable[[str], bool], limit: int = 1, queue_for: float | None = None) -> Steps[AcquireResult]:
        """A free name with one plain UPDATE; a held one answered by a read without row locks;
        the rest (expired, in its hold, never seen, or a waiter's hint to leave) by ACQUIRE.

        ``limit`` > 1 takes one of up to ``limit`` holds with ACQUIRE_LIMITED, one statement
        whatever the name's state; so does a ``limit`` of 1 on a shared row (only the list
        in it says which holds are live). ``hinting(name)``: this process LISTENs for
        ``name``, so a failed attempt leaves the waiters' hint on the row. ``queue_for``:
        the caller waits in the name's queue (``_queued``). Replaying the steps is safe:
        our own earlier write is found and reported as acquired.
        """
        params = {
            "name": name, "owner_token": owner.owner_token, "host": owner.host, "pid": owner.pid,
            "ttl": ttl, "min_hold": min_hold, "limit": limit, "ahead": 0,
            "metadata": json.dumps(dict(owner.metadata)) if owner.metadata else "{}",
        }
        if queue_for is not None:
            return (yield from self._queued(params, owner, limit, queue_for))
        if limit > 1:
            return (yield from self._acquire_limited(params, owner, hinting(name)))
        result = _free_taken((yield Op("one", "acquire_free", params)), name, owner)
        if result is not None:
            return result
        hint = hinting(name)
        row = yield Op("one", "peek", params)
        if _shared(row):
            return (yield from self._acquire_limited(params, owner, hint))
        result = _peeked(row, owner, hint)
        if result is not None:
            return result
        return (yield from self._acquire_locking(params, owner, hint))

    def _acquire_locking(self, params: dict[str, Any], owner: Owner, hint: bool) -> Steps[AcquireResult]:
        """ACQUIRE: a name held, expired, in its minimum hold, or never seen."""
        key = "acquire_hint" if hint else "acquire"
        for _ in range(2):
            row = yield Op("one", key, params)
            if row[0] is None and _shared(row, 4):  # turned shared since the read
                return (yield from self._acquire_limited(params, owner, hint))
            result = _acquired(row, params["name"], owner)
            if result is not None:
                return result
        return AcquireResult(False, None)

    def _queued(self, params: dict[str, Any], owner: Owner, limit: int, queue_for: float) -> Steps[AcquireResult]:
        """A waiter's attempt: a free name only when no earlier live place is queued, else its place kept.

        The common hand-over is one statement (the woken head takes the free name and
        drops its place); a refusal is a second, which reads the name and the queue and
        writes the caller's place only when it is missing or due for renewal. A queued
        waiter leaves no hint: the queue itself tells a release to wake its head.
        """
        name = params["name"]
        if limit == 1:
            result = _free_taken((yield Op("one", "acquire_free_queued", params)), name, owner)
            if result is not None:
                return result
        row = yield Op("one", "queue", {**params, "queue_for": queue_for})
        ahead, head_left = int(row[12]), row[13]
        behind = AcquireResult(False, None, retry_after=_seconds_left(head_left), queued_behind=True)
        if limit > 1 or _shared(row):
            result = yield from self._acquire_limited({**params, "ahead": ahead}, owner, False)
            if result.acquired:
                yield Op("count", "dequeue", params)
            elif ahead and len(result.holders) < limit:
                return behind
            return result
        if row[0] is not None and row[10]:  # held, or in its minimum hold
            holder = record(row)
            if holder is not None and holder.owner_token == owner.owner_token:  # our own take, retried
                yield Op("count", "dequeue", params)  # the look above may have queued us again
                return AcquireResult(True, holder)
            return AcquireResult(False, holder, retry_after=_seconds_left(row[11]))
        if ahead:
            return behind
        # First in the queue, and the name is free, expired or never seen: ACQUIRE decides.
        result = yield from self._acquire_locking(params, owner, False)
        if result.acquired:
            yield Op("count", "dequeue", params)
        return result

    def _acquire_limited(self, params: dict[str, Any], owner: Owner, hint: bool) -> Steps[AcquireResult]:
        key = "acquire_limited_hint" if hint else "acquire_limited"
        params = {**params, "hinting": hint}
        for _ in range(2):  # the second only when the name's row appeared meanwhile
            result = _limited((yield Op("all", key, params)), owner)
            if result is not None:
                return result
        return AcquireResult(False, None)

    def release(self, name: str, owner_token: str, notify_channel: str,
                durable: bool = False) -> Steps[tuple[bool, bool, str | None]]:
        """(released while live, the name is free now, the queue's head it woke); a release into a
        minimum hold frees nothing yet. ``durable``: wait for the WAL flush whatever the lease."""
        params = {"name": name, "owner_token": owner_token, "channel": notify_channel, "durable": durable}
        row = yield Op("one", "release", params)
        if row is None:  # not an ordinary holder: perhaps one of a shared row's
            row = yield Op("one", "release_shared", params)
        if row is None:
            return False, False, None
        return bool(row[0]), not row[1], row[3]

    def leave_queue(self, name: str, owner_token: str, notify_channel: str) -> Steps[str | None]:
        """Drop a waiter's place; the next place it woke (the name is free), if any."""
        row = yield Op("one", "leave_queue", {"name": name, "owner_token": owner_token, "channel": notify_channel})
        return None if row is None else row[0]

    def renew(self, name: str, owner_token: str, ttl: float | None) -> Steps[LockRecord | None]:
        params = {"name": name, "owner_token": owner_token, "ttl": ttl}
        renewed = record((yield Op("one", "renew", params)))
        if renewed is None:  # not an ordinary holder: perhaps one of a shared row's
            renewed = record((yield Op("one", "renew_shared", params)))
        return renewed

    def get(self, name: str) -> Steps[LockRecord | None]:
        return record((yield Op("one", "get", {"name": name})))

    def holders(self, name: str) -> Steps[list[LockRecord]]:
        rows = yield Op("all", "holders", {"name": name})
        return [found for found in map(record, rows) if found is not None]

    def list(self, prefix: str) -> Steps[list[LockRecord]]:
        rows = yield Op("all", "list", {"prefix": prefix})
        return [found for found in map(record, rows) if found is not None]

    def force_release(self, name: str, notify_channel: str) -> Steps[tuple[LockRecord | None, str | None]]:
        """The live hold with the lowest fencing token it removed, and the queue's head it woke."""
        row = yield Op("one", "force_release", {"name": name, "channel": notify_channel})
        return record(row), None if row is None else row[11]

    def purge(self, after: float, limit: int) -> Steps[int]:
        removed: int = yield Op("count", "purge", {"after": after, "limit": limit})
        return removed
