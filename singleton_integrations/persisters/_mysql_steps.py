"""The MySQL/MariaDB persister's rules, written once for the sync and the async driver.

Each primitive is a generator of ``Op`` values (one statement, a commit or a
rollback) that is sent each one's answer, or has its driver error thrown in,
and returns the primitive's answer: ``mysql.MySql`` drives the same generator
with PyMySQL and with aiomysql, as ``_mongodb_steps`` does for pymongo.

Each write is one short transaction under READ COMMITTED: ``SELECT ... FOR
UPDATE`` locks the name's row and reads it with the server's clock
(``UTC_TIMESTAMP(6)``, fixed for the statement), the step decides, and one
``INSERT`` or ``UPDATE`` writes values computed from that reading, then
``COMMIT``. While the row is locked nobody else can change it, so the decision
stays true until the commit. A lock wait can only make the reading older than
the commit, which judges a lease live a little longer and starts a new one a
little earlier: both on the safe side.

Round trips are few because a write goes with its ``COMMIT`` (``Op.commit``): the
usual acquire (a free name, a caller not queued) is one conditional ``UPDATE`` at one
clock reading, and a release is three owner-checked ``UPDATE``s whose affected-row
counts say what it released; both judged in SQL, one round trip each. An acquire with
``limit=N`` (N > 1) is judged in SQL too, in one round trip whether it takes a hold or
finds all N live (``ACQUIRE_SOME``); its holds live in the slots table.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from .._record import AcquireResult, LockRecord, Owner
from . import _mysql_sql as q

__all__ = ["Op", "Rules", "Steps", "record"]

_EPOCH = datetime(1970, 1, 1)
_RETRIES = 5
#: MySQL error numbers the steps answer themselves.
DUPLICATE_KEY, DEADLOCK = 1062, 1213


class Op:
    """One driver call (one round trip): ``kind`` is ``one`` (a row or None), ``all`` (rows),
    ``count`` (affected rows), ``counts`` (the affected rows of each statement of several sent
    together), ``results`` (each one's affected rows and rows), ``commit`` or ``rollback``. ``commit``: the driver sends ``COMMIT`` in the same
    round trip, after the statement (a statement's error stops the server before it)."""

    __slots__ = ("commit", "kind", "params", "sql")

    def __init__(self, kind: str, sql: str = "", params: dict[str, Any] | None = None, *,
                 commit: bool = False) -> None:  # fmt: skip
        self.kind, self.sql, self.params, self.commit = kind, sql, params, commit

    def __repr__(self) -> str:
        return f"Op({self.kind}{', commit' if self.commit else ''})"


_R = TypeVar("_R")
#: A primitive's steps: each yields an ``Op``, is sent its result, and returns the primitive's answer.
Steps = Generator[Op, Any, _R]

COMMIT, ROLLBACK = Op("commit"), Op("rollback")


def _utc(moment: datetime | None) -> datetime | None:
    """A DATETIME read back (naive, UTC by ``UTC_TIMESTAMP``) as an aware datetime."""
    return None if moment is None else moment.replace(tzinfo=timezone.utc)


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _after(moment: datetime, microseconds: int | None) -> datetime | None:
    return None if microseconds is None else moment + timedelta(microseconds=microseconds)


def _name(raw: Any) -> str:
    return bytes(raw).decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)


def record(row: tuple[Any, ...] | None) -> LockRecord | None:
    """A live row as a record; a row released into its minimum hold has no owner token.

    Such a row ends with its hold, whatever its ``expires_at`` says: that column may carry the
    ``limit=N`` mark (``_mysql_sql.MARK``), which is the store's bookkeeping, not a lease.
    """
    if row is None:
        return None
    name, owner_token, fence, host, pid, created, expires, metadata, released, hold_until = row[:10]
    if owner_token is None and hold_until is not None:
        expires = hold_until
    values = json.loads(metadata) if metadata else {}
    return LockRecord(
        _name(name), owner_token or "", int(fence), str(host), int(pid), _utc(created),  # type: ignore[arg-type]
        _utc(expires), {str(key): str(value) for key, value in values.items()},
        released_at=_utc(released) if owner_token is None else None, hold_until=_utc(hold_until),
    )


def _live(row: tuple[Any, ...]) -> bool:
    return bool(row[10])


def _held(row: tuple[Any, ...]) -> bool:
    return bool(row[11])


def _now(row: tuple[Any, ...]) -> datetime:
    now: datetime = row[12]
    return now


def _retry_after(row: tuple[Any, ...]) -> float | None:
    """Seconds until a live row can be free: its lease's end, or its hold's end once released."""
    end = row[9] if row[1] is None else row[6]
    return None if end is None else max((end - _now(row)).total_seconds(), 0.0)


def _soonest(rows: list[tuple[Any, ...]]) -> float | None:
    """Seconds until the first of these live holds can end; None if none of them can."""
    ends = [end for end in map(_retry_after, rows) if end is not None]
    return min(ends) if ends else None


def _records(rows: list[tuple[Any, ...]]) -> list[LockRecord]:
    return [found for found in map(record, rows) if found is not None]


def _error_code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class Rules:
    """The primitives as step generators for one table (its backquoted name)."""

    def __init__(self, table: str, waiters: str, holds: str, errors: Any) -> None:
        #: pymysql.err, so the steps recognise a duplicate key without importing the driver.
        self.errors = errors
        self.sql = {key: getattr(q, key).format(table=table, waiters=waiters, holds=holds)
                    for key in q.__all__ if key.isupper()}  # fmt: skip

    def ensure_table(self) -> Steps[bool]:
        """Create the tables if they are missing; False when CREATE was refused and one is not there."""
        for create, probe in (("CREATE_TABLE", "PROBE_TABLE"), ("CREATE_WAITERS", "PROBE_WAITERS"),
                              ("CREATE_HOLDS", "PROBE_HOLDS")):
            try:
                yield Op("count", self.sql[create])
            except self.errors.MySQLError as error:
                # 1142: CREATE command denied; 1044: access denied to the database. The
                # table may exist all the same (an administrator made it): look for it.
                if _error_code(error) not in (1142, 1044, 1227):
                    raise
                yield ROLLBACK
                try:
                    yield Op("all", self.sql[probe])
                except (self.errors.ProgrammingError, self.errors.OperationalError):
                    yield ROLLBACK
                    return False
        yield COMMIT
        return True

    def _queued_behind(self, name: str, owner_token: str, queue_for: float | None,
                       now: datetime) -> Steps[AcquireResult | None]:
        """With the name's row locked (or absent) and the name free: None when the caller may take
        it, else a refusal behind the queue's head (keeping the caller's place)."""
        head = yield Op("one", self.sql["HEAD"], {"name": name})
        if head is None or head[0] == owner_token:
            return None
        yield from self._keep_place(name, owner_token, queue_for, now)
        return AcquireResult(False, None, retry_after=max((head[1] - now).total_seconds(), 0.001), queued_behind=True)

    def _keep_place(self, name: str, owner_token: str, queue_for: float | None, now: datetime) -> Steps[None]:
        """Keep (or take) the caller's place and commit; without ``queue_for``, only end the transaction."""
        if queue_for is None:
            yield ROLLBACK
            return
        ends = now + timedelta(seconds=queue_for)
        yield Op("count", self.sql["PLACE"], {"name": name, "owner_token": owner_token, "ends_at": ends}, commit=True)

    def leave_queue(self, name: str, owner_token: str) -> Steps[None]:
        key = name.encode("utf-8").hex()
        yield Op("one", self.sql["LOCK_NAME"], {"name": key})  # the queue of a name changes under its row lock
        yield Op("count", self.sql["DROP_PLACE"], {"name": key, "owner_token": owner_token}, commit=True)

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
                queue_for: float | None = None, limit: int = 1) -> Steps[AcquireResult]:
        """``queue_for`` (a waiting caller): keep its place while the name is held, and take a
        free name only when no earlier place is queued. ``limit`` > 1: see ``acquire_some``."""
        key = name.encode("utf-8").hex()
        # Integer microseconds, so the server's times and this record's are the same values.
        lease_us = None if ttl is None else round(max(ttl, min_hold or 0.0) * 1_000_000)
        hold_us = round(min_hold * 1_000_000) if min_hold else None
        metadata = json.dumps(dict(owner.metadata)) if owner.metadata else "{}"
        if limit > 1:
            return (yield from self.acquire_some(key, owner, lease_us, hold_us, metadata, queue_for, limit))
        if queue_for is None:  # a free name in one round trip; the rest (and a queue's rules) take the steps below
            results = yield Op("results", self.sql["TAKE_FREE"], {
                "name": key, "owner_token": owner.owner_token, "host": owner.host, "pid": owner.pid,
                "lease_us": lease_us, "hold_us": hold_us, "metadata": metadata}, commit=True)  # fmt: skip
            if results[0][0] == 1:  # the UPDATE took the row
                at, fence = results[1][1][0]
                return self._taken(name, owner, int(fence), at, lease_us, hold_us, None)
        for attempt in range(_RETRIES):
            try:
                (_, found), (_, slots) = (yield Op("results", self.sql["LOCK_NAME_AND_HOLDS"], {"name": key}))[:2]
                row = found[0] if found else None
                if row is not None and _live(row):
                    if row[1] == owner.owner_token:  # our own write, retried after a lost reply
                        yield COMMIT
                        return AcquireResult(True, record(row))
                    yield from self._keep_place(key, owner.owner_token, queue_for, _now(row))
                    return AcquireResult(False, record(row), retry_after=_retry_after(row))
                live = [slot for slot in slots if _live(slot)]
                if live:  # holds taken with limit=N > 1: an N = 1 attempt waits until all have ended
                    mine = [slot for slot in live if slot[1] == owner.owner_token]
                    if mine:
                        yield COMMIT
                        return AcquireResult(True, record(mine[0]))
                    yield from self._keep_place(key, owner.owner_token, queue_for, _now(live[0]))
                    return AcquireResult(False, record(live[0]), retry_after=_soonest(live))
                if row is None:  # a name without a row has no slots either: they go before it (purge)
                    now: datetime = (yield Op("one", q.NOW))[0]
                    fence = _ms(now)
                else:
                    now = _now(row)
                    fence = max(int(row[2]) + 1, _ms(now), *(int(slot[2]) + 1 for slot in slots))
                if queue_for is not None:
                    refused = yield from self._queued_behind(key, owner.owner_token, queue_for, now)
                    if refused is not None:
                        return refused
                    yield Op("count", self.sql["DROP_PLACE"], {"name": key, "owner_token": owner.owner_token})
                # A minimum hold is folded into the lease: a crashed holder frees the name at the later end.
                values: dict[str, Any] = {
                    "name": key, "owner_token": owner.owner_token, "fencing_token": fence, "host": owner.host,
                    "pid": owner.pid, "created_at": now, "expires_at": _after(now, lease_us), "metadata": metadata,
                    "hold_until": _after(now, hold_us),
                }  # fmt: skip
                yield Op("count", self.sql["INSERT" if row is None else "TAKE"], values, commit=True)
            except (self.errors.IntegrityError, self.errors.OperationalError) as error:
                # Two first-time inserts of one name (the loser then waits on the winner's
                # row like any contender), or InnoDB chose this transaction as a deadlock victim.
                if _error_code(error) not in (DUPLICATE_KEY, DEADLOCK) or attempt == _RETRIES - 1:
                    raise
                yield ROLLBACK
                continue
            return self._taken(name, owner, fence, now, lease_us, hold_us, row)
        return AcquireResult(False, None)  # pragma: no cover - the loop returns or raises

    def acquire_some(self, key: str, owner: Owner, lease_us: int | None, hold_us: int | None, metadata: str,
                     queue_for: float | None, limit: int) -> Steps[AcquireResult]:
        """One of up to ``limit`` holds of the name, judged and written in SQL in one round trip
        (``ACQUIRE_SOME``), whether it takes one, finds one of the caller's, or finds all N live."""
        values: dict[str, Any] = {
            "name": key, "owner_token": owner.owner_token, "host": owner.host, "pid": owner.pid,
            "lease_us": lease_us, "hold_us": hold_us, "metadata": metadata, "limit": limit,
            "queue_us": None if queue_for is None else round(queue_for * 1_000_000),
        }  # fmt: skip
        queued = queue_for is not None
        for attempt in range(_RETRIES):
            try:
                results = yield Op("results", self.sql["ACQUIRE_SOME_QUEUED" if queued else "ACQUIRE_SOME"], values,
                                   commit=True)  # fmt: skip
            except self.errors.OperationalError as error:  # InnoDB chose this transaction as a deadlock victim
                if _error_code(error) != DEADLOCK or attempt == _RETRIES - 1:
                    raise
                yield ROLLBACK
                continue
            live = sorted(results[-3 if queued else -2][1], key=lambda row: int(row[2]))  # by fencing token
            mine = [row for row in live if row[1] == owner.owner_token]
            if mine:
                return AcquireResult(True, record(mine[0]))
            holders = tuple(_records(live))
            if queued and len(live) < limit:  # refused only because earlier places are queued
                _, ahead_end, now = results[-2][1][0]
                wait = 0.001 if ahead_end is None else max((ahead_end - now).total_seconds(), 0.001)
                return AcquireResult(False, holders[0] if holders else None, retry_after=wait, queued_behind=True,
                                     holders=holders)  # fmt: skip
            return AcquireResult(False, holders[0] if holders else None, retry_after=_soonest(live), holders=holders)
        return AcquireResult(False, None)  # pragma: no cover - the loop returns or raises

    @staticmethod
    def _taken(name: str, owner: Owner, fence: int, now: datetime, lease_us: int | None, hold_us: int | None,
               row: tuple[Any, ...] | None) -> AcquireResult:
        """What an acquire that wrote the row answers: the new record, and the holder whose lease ran out."""
        taken = LockRecord(
            name, owner.owner_token, fence, owner.host, owner.pid, _utc(now),  # type: ignore[arg-type]
            _utc(_after(now, lease_us)), dict(owner.metadata), hold_until=_utc(_after(now, hold_us)),
        )
        # Only a holder whose lease ran out is reported expired; a hold that ended is a normal acquire.
        expired = record(row) if row is not None and row[1] is not None else None
        return AcquireResult(True, taken, expired=expired)

    def release(self, name: str, owner_token: str, slot_first: bool = False) -> Steps[tuple[bool, bool, bool]]:
        """(released while live, the hold is free now, it was a slot), in one round trip when
        the hold is where ``slot_first`` says (the name's row unless told), two otherwise."""
        key = name.encode("utf-8").hex()
        params = {"name": key, "owner_token": owner_token}
        for slot in (slot_first, not slot_first):
            into_hold, freed, expired = (yield Op("counts", self.sql["RELEASE_HOLD" if slot else "RELEASE_OWNED"],
                                                  params, commit=True))[:3]  # fmt: skip
            if into_hold or freed or expired:
                return bool(into_hold or freed), bool(freed or expired), slot
        return False, False, slot_first

    def renew(self, name: str, owner_token: str, ttl: float | None,
              slot_first: bool = False) -> Steps[LockRecord | None]:
        """The hold's new record, or None when the token holds nothing live here; the name's
        row is tried first unless ``slot_first``."""
        for slot in (slot_first, not slot_first):
            renewed = yield from (self._renew_slot if slot else self._renew_row)(name, owner_token, ttl)
            if renewed is not None:
                return renewed
        return None

    def _renew_row(self, name: str, owner_token: str, ttl: float | None) -> Steps[LockRecord | None]:
        key = name.encode("utf-8").hex()
        row = yield Op("one", self.sql["LOCK_OWNED"], {"name": key, "owner_token": owner_token})
        if row is None or not _held(row):
            yield ROLLBACK
            return None
        expires: datetime | None = None
        if ttl is not None:
            expires = _now(row) + timedelta(seconds=ttl)
            if row[9] is not None and row[9] > expires:  # never before the minimum hold's end
                expires = row[9]
        yield Op("count", self.sql["RENEW"], {"name": key, "expires_at": expires}, commit=True)
        return record((*row[:6], expires, *row[7:]))

    def _renew_slot(self, name: str, owner_token: str, ttl: float | None) -> Steps[LockRecord | None]:
        """A slot's renewal in one round trip, judged in SQL (``RENEW_HOLD``)."""
        results = yield Op("results", self.sql["RENEW_HOLD"], {
            "name": name.encode("utf-8").hex(), "owner_token": owner_token,
            "lease_us": None if ttl is None else round(ttl * 1_000_000)}, commit=True)  # fmt: skip
        rows = results[2][1]  # held now (the name's row still locked): it was when the UPDATE judged it
        return record(rows[0]) if rows and _held(rows[0]) else None

    def get(self, name: str) -> Steps[LockRecord | None]:
        row = yield Op("one", self.sql["READ"], {"name": name.encode("utf-8").hex()})
        yield COMMIT
        return record(row)

    def holders(self, name: str) -> Steps[list[LockRecord]]:
        rows = yield Op("all", self.sql["HOLDERS"], {"name": name.encode("utf-8").hex()})
        yield COMMIT
        return _records(rows)

    def list(self, prefix: str) -> Steps[list[LockRecord]]:
        rows = yield Op("all", self.sql["LIST"], {"prefix": prefix.encode("utf-8").hex()})
        yield COMMIT
        return _records(rows)

    def force_release(self, name: str) -> Steps[LockRecord | None]:
        """Frees every live hold of the name; returns the one with the lowest fencing token."""
        key = name.encode("utf-8").hex()
        live = (yield Op("results", self.sql["LOCK_ALL_LIVE"], {"name": key}))[1][1]
        if not live:
            yield ROLLBACK
            return None
        now = _now(live[0])
        if any(row[13] == 0 for row in live):
            yield Op("count", self.sql["FORCE_FREE"], {"name": key, "now": now})
        yield Op("count", self.sql["FORCE_FREE_HOLDS"], {"name": key, "now": now}, commit=True)
        return record(live[0])

    def purge(self, after: float, limit: int) -> Steps[int]:
        idle = {"after_us": int(after * 1_000_000), "limit": limit}
        removed: int = yield Op("count", self.sql["DELETE_IDLE"], idle)
        yield Op("count", self.sql["DELETE_IDLE_HOLDS"], idle)
        yield Op("count", self.sql["DELETE_ENDED_PLACES"], {"limit": limit}, commit=True)
        return removed
