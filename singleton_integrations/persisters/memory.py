"""An in-process store: for tests and for one process with many threads (or event loops).

The rules are the same as every other store's: minimum hold, retention, rising
fencing tokens. Nothing here does I/O, so the async primitives are plain
coroutines that take the same short lock, and waiters are woken by a
``ReleaseHub`` the releasing call notifies directly.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, ClassVar

from .._record import AcquireResult, LockRecord, Owner
from ._base import (
    DEFAULT_PURGE_AFTER_SECONDS,
    Persister,
    ReleaseHub,
    ReleaseWatch,
    name_prefix,
    option_retention,
    retention_seconds,
    url_options,
)

__all__ = ["Memory"]

_named_stores: dict[str, Memory] = {}
_named_stores_lock = threading.Lock()
#: Names looked at per sweep, so a sweep stays a small part of the acquire that runs it.
SWEEP_LIMIT = 100
#: The most often a store sweeps, unless the last sweep found a backlog.
SWEEP_INTERVAL = 10.0
_URL_OPTIONS: dict[str, Callable[[str, str], Any]] = {"purge_after_seconds": option_retention}


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


@dataclass
class _Hold:
    """A hold beyond a name's first, under ``limit=N``."""

    record: LockRecord
    free_at: float | None

    def live(self, now: float) -> bool:
        return self.free_at is None or self.free_at > now


@dataclass
class _Name:
    """One name's state: its latest record and counter, and when it became (or becomes) free.

    ``record`` is the name's first hold, as with one holder; ``others`` the holds beyond it
    under ``limit=N``, by owner token (a released one keeps its minimum hold under "").
    """

    fence: int
    record: LockRecord | None = None  # held, or released into its minimum hold
    free_at: float | None = None  # None while held without expiry
    others: dict[str, _Hold] = field(default_factory=dict)

    def live(self, now: float) -> bool:
        return self.record is not None and (self.free_at is None or self.free_at > now)

    def holds(self, owner_token: str, now: float) -> bool:
        return self.live(now) and self.record is not None and not self.record.released and \
            self.record.owner_token == owner_token

    def live_holds(self, now: float) -> list[LockRecord]:
        """Every live hold, by fencing token; ends the others that ran out."""
        for key in [key for key, hold in self.others.items() if not hold.live(now)]:
            del self.others[key]
        found = [hold.record for hold in self.others.values()]
        if self.live(now):
            found.append(self.record)  # type: ignore[arg-type]  # live() saw it
        return sorted(found, key=lambda record: record.fencing_token)

    def free_at_of(self, record: LockRecord) -> float | None:
        """When one of the live holds ends (None: not by itself)."""
        if record is self.record:
            return self.free_at
        return next((hold.free_at for hold in self.others.values() if hold.record is record), None)

    def busy(self, now: float) -> bool:
        return self.live(now) or any(hold.live(now) for hold in self.others.values())


class Memory(Persister):
    """Locks in a dict behind one mutex; times come from ``time.time()``.

    Fencing after a purge: the store remembers the highest token it has purged and
    starts any name it holds no state for above it, so tokens keep rising without
    consulting a clock (a fresh store starts every name at 1).
    """

    backend: ClassVar[str] = "memory"
    notifies: ClassVar[bool] = True
    multiprocess: ClassVar[bool] = False  # and so not distributed either (the default)
    clock: ClassVar[str] = "this process's clock"
    supports_min_hold: ClassVar[bool] = True
    native_async: ClassVar[bool] = True
    fair: ClassVar[bool] = True
    limits: ClassVar[bool] = True
    call_timeout: float = 0.1

    def __init__(self, *, purge_after_seconds: float | None = DEFAULT_PURGE_AFTER_SECONDS) -> None:
        self.purge_after_seconds = retention_seconds(purge_after_seconds)
        self._guard = threading.Lock()
        self._names: dict[str, _Name] = {}
        self._purged_fence = 0  # the highest token of any purged name
        # Names that will be free at some time, least recently changed first: what a sweep looks at.
        self._by_change: OrderedDict[str, float] = OrderedDict()
        self._next_sweep = 0.0
        self._queues: dict[str, OrderedDict[str, float]] = {}  # waiters' owner tokens, first come first
        self._hub = ReleaseHub(None)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Memory:
        """``memory://NAME`` gives the same store for the same NAME within a process.

        Query option: ``purge_after_seconds`` (a number, or ``none``); a keyword overrides
        it. Options apply when the store is made; asking for other options later is an error.
        """
        key, _, query = url.partition("://")[2].partition("?")
        settings = {**url_options(query, _URL_OPTIONS, "memory"), **options}
        unknown = set(settings) - {"purge_after_seconds"}
        if unknown:
            raise TypeError(f"unknown Memory option(s): {', '.join(sorted(unknown))}")
        with _named_stores_lock:
            store = _named_stores.get(key)
            if store is None:
                store = _named_stores[key] = cls(**settings)
            elif "purge_after_seconds" in settings and settings["purge_after_seconds"] != store.purge_after_seconds:
                raise ValueError(f"memory://{key} exists with purge_after_seconds={store.purge_after_seconds!r}")
            return store

    # -- the rules (under ``_guard``) ----------------------------------------------------------

    def _acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
                 queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        now = time.time()
        state = self._names.get(name)
        if limit > 1 or (state is not None and state.others and state.live_holds(now)):
            return self._acquire_among(name, state, owner, ttl, min_hold, queue_for, limit, now)
        if state is not None and state.live(now):
            if queue_for is not None:
                self._enqueue(name, owner.owner_token, now + queue_for)
            retry = None if state.free_at is None else state.free_at - now
            return AcquireResult(False, state.record, retry_after=retry)
        if queue_for is not None:
            head = self._head(name, now)
            if head is not None and head[0] != owner.owner_token:
                self._enqueue(name, owner.owner_token, now + queue_for)
                return AcquireResult(False, None, retry_after=head[1] - now, queued_behind=True)
            self._dequeue(name, owner.owner_token)
        self._sweep(now, skip=name)
        expired = state.record if state is not None and state.record is not None and not state.record.released \
            else None
        record, free_at = self._new_hold(name, state, owner, ttl, min_hold, now)
        self._names[name] = _Name(record.fencing_token, record, free_at)
        self._changed(name, free_at)
        return AcquireResult(True, record, expired=expired)

    def _new_hold(self, name: str, state: _Name | None, owner: Owner, ttl: float | None, min_hold: float | None,
                  now: float) -> tuple[LockRecord, float | None]:
        """A hold for ``owner`` with the name's next fencing token, and when it ends."""
        fence = (state.fence if state is not None else self._purged_fence) + 1
        hold_until = now + min_hold if min_hold else None
        free_at = None if not ttl else max(now + ttl, hold_until or 0.0)
        record = LockRecord(name=name, owner_token=owner.owner_token, fencing_token=fence, host=owner.host,
                            pid=owner.pid, created_at=_at(now), expires_at=_at(free_at),  # type: ignore[arg-type]
                            metadata=dict(owner.metadata), hold_until=_at(hold_until))
        return record, free_at

    def _acquire_among(self, name: str, state: _Name | None, owner: Owner, ttl: float | None,
                       min_hold: float | None, queue_for: float | None, limit: int, now: float) -> AcquireResult:
        """An attempt on a name that has (or may have) several holds: up to ``limit`` live ones."""
        live = state.live_holds(now) if state is not None else []
        mine = next((record for record in live if record.owner_token == owner.owner_token and not record.released),
                    None)
        if mine is not None:
            return AcquireResult(True, mine)
        free = limit - len(live)
        if free <= 0:
            if queue_for is not None:
                self._enqueue(name, owner.owner_token, now + queue_for)
            assert state is not None  # live holds have a state
            ends = [end - now for end in map(state.free_at_of, live) if end is not None]
            return AcquireResult(False, live[0], retry_after=min(ends) if ends else None, holders=tuple(live))
        if queue_for is not None:
            ahead = self._places_ahead(name, owner.owner_token, now)
            if ahead >= free:
                self._enqueue(name, owner.owner_token, now + queue_for)
                head = self._head(name, now)
                retry = head[1] - now if head is not None else None
                return AcquireResult(False, None, retry_after=retry, queued_behind=True)
            self._dequeue(name, owner.owner_token)
        self._sweep(now, skip=name)
        record, free_at = self._new_hold(name, state, owner, ttl, min_hold, now)
        if state is None:
            self._names[name] = state = _Name(record.fencing_token)
        state.fence = record.fencing_token
        if state.live(now):
            state.others[owner.owner_token] = _Hold(record, free_at)
        else:
            state.record, state.free_at = record, free_at
        # A name with several holds stays where sweeps look, which skip it while any hold is live.
        self._changed(name, now if state.others else free_at)
        return AcquireResult(True, record)

    def _places_ahead(self, name: str, owner_token: str, now: float) -> int:
        """How many live queue places come before ``owner_token``'s (all of them when it has none)."""
        self._head(name, now)  # drops the head's places that ran out
        queue: dict[str, float] = self._queues.get(name, {})
        ahead = 0
        for token, ends in queue.items():
            if token == owner_token:
                break
            ahead += ends > now
        return ahead

    def _release(self, name: str, owner_token: str) -> tuple[bool, bool]:
        now = time.time()
        state = self._names.get(name)
        if state is not None and owner_token in state.others:
            return self._release_other(state, owner_token, now)
        if state is None or state.record is None or state.record.released or state.record.owner_token != owner_token:
            return False, False
        if not state.live(now):  # a lease that ran out untaken: cleared, but it was not held
            state.record = None
            return False, False
        hold = state.record.hold_until.timestamp() if state.record.hold_until is not None else None
        if hold is not None and hold > now:  # the slot ran: the name stays taken until the hold ends
            state.record = replace(state.record, owner_token="", released_at=_at(now), expires_at=_at(hold))
            state.free_at = hold
            self._changed(name, hold)
            return True, False
        state.record, state.free_at = None, now
        self._changed(name, now)
        return True, True

    def _release_other(self, state: _Name, owner_token: str, now: float) -> tuple[bool, bool]:
        """Release one of the holds beyond the first: kept (released) until its minimum hold ends."""
        hold = state.others.pop(owner_token)
        if not hold.live(now):
            return False, False
        until = hold.record.hold_until.timestamp() if hold.record.hold_until is not None else None
        if until is not None and until > now:
            ran = replace(hold.record, owner_token="", released_at=_at(now), expires_at=_at(until))
            state.others["\x00" + str(ran.fencing_token)] = _Hold(ran, until)  # no token can release it again
            return True, False
        return True, True

    def _renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        now = time.time()
        state = self._names.get(name)
        if state is not None and owner_token in state.others:
            other = state.others[owner_token]
            if not other.live(now):
                return None
            until = other.record.hold_until.timestamp() if other.record.hold_until is not None else 0.0
            other.free_at = None if not ttl else max(now + ttl, until)
            other.record = replace(other.record, expires_at=_at(other.free_at))
            return other.record
        if state is None or not state.holds(owner_token, now):
            return None
        assert state.record is not None
        hold = state.record.hold_until.timestamp() if state.record.hold_until is not None else 0.0
        state.free_at = None if not ttl else max(now + ttl, hold)
        state.record = replace(state.record, expires_at=_at(state.free_at))
        self._changed(name, state.free_at)
        return state.record

    def _get(self, name: str) -> LockRecord | None:
        state = self._names.get(name)
        if state is None:
            return None
        if not state.others:
            return state.record if state.live(time.time()) else None
        live = state.live_holds(time.time())
        return live[0] if live else None

    def _holders(self, name: str) -> list[LockRecord]:
        state = self._names.get(name)
        return state.live_holds(time.time()) if state is not None else []

    def _list(self, prefix: str) -> list[LockRecord]:
        now = time.time()
        return [record for name, state in sorted(self._names.items())
                if name.startswith(prefix) for record in state.live_holds(now)]

    def _force_release(self, name: str) -> LockRecord | None:
        now = time.time()
        state = self._names.get(name)
        live = state.live_holds(now) if state is not None else []
        if state is None or not live:
            return None
        state.record, state.free_at = None, now
        state.others.clear()
        self._changed(name, now)
        return live[0]

    def _head(self, name: str, now: float) -> tuple[str, float] | None:
        """The first live place in ``name``'s queue (token, end), dropping the ones that ran out."""
        queue = self._queues.get(name)
        while queue:
            token, ends = next(iter(queue.items()))
            if ends > now:
                return token, ends
            del queue[token]
        self._queues.pop(name, None)
        return None

    def _enqueue(self, name: str, owner_token: str, ends: float) -> None:
        self._queues.setdefault(name, OrderedDict())[owner_token] = ends  # a known token keeps its place

    def _dequeue(self, name: str, owner_token: str) -> None:
        queue = self._queues.get(name)
        if queue is not None:
            queue.pop(owner_token, None)
            if not queue:
                del self._queues[name]

    def _next_in_line(self, name: str) -> str | None:
        """Whom a release that freed ``name`` wakes: the queue's head, if any."""
        head = self._head(name, time.time())
        return head[0] if head is not None else None

    def _changed(self, name: str, free_at: float | None) -> None:
        self._by_change.pop(name, None)
        if free_at is not None:  # a name held without expiry is never swept
            self._by_change[name] = free_at

    def _sweep(self, now: float, skip: str = "", force: bool = False) -> int:
        """Forget up to SWEEP_LIMIT names free for ``purge_after_seconds``, remembering their highest token."""
        if self.purge_after_seconds is None or (now < self._next_sweep and not force):
            return 0
        cutoff = now - self.purge_after_seconds
        forgotten = looked = 0
        while self._by_change and looked < SWEEP_LIMIT:
            looked += 1
            name, free_at = next(iter(self._by_change.items()))
            if free_at < cutoff and name != skip and not self._names[name].busy(now):
                del self._by_change[name]
                self._purged_fence = max(self._purged_fence, self._names.pop(name).fence)
                forgotten += 1
            else:  # not idle long enough: look at it again in a later sweep
                self._by_change.move_to_end(name)
        backlog = forgotten == SWEEP_LIMIT
        self._next_sweep = now if backlog else now + min(SWEEP_INTERVAL, self.purge_after_seconds / 2)
        return forgotten

    # -- primitives: one short critical section each ---------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        with self._guard:
            return self._acquire(name, owner, ttl, min_hold, queue_for, limit)

    def release(self, name: str, owner_token: str) -> bool:
        with self._guard:
            released, free = self._release(name, owner_token)
            head = self._next_in_line(name) if free else None
        if free:
            self._hub.notify(name, head)
        return released

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        with self._guard:
            return self._renew(name, owner_token, ttl)

    def get(self, name: str) -> LockRecord | None:
        with self._guard:
            return self._get(name)

    def holders(self, name: str) -> builtins.list[LockRecord]:
        with self._guard:
            return self._holders(name)

    def list(self, prefix: str = "") -> list[LockRecord]:
        prefix = name_prefix(prefix)
        with self._guard:
            return self._list(prefix)

    def force_release(self, name: str) -> LockRecord | None:
        with self._guard:
            removed = self._force_release(name)
            head = self._next_in_line(name)
        self._hub.notify(name, head)
        return removed

    def leave_queue(self, name: str, owner_token: str) -> None:
        with self._guard:
            head = self._head(name, time.time())
            self._dequeue(name, owner_token)
            state = self._names.get(name)
            free = state is None or not state.live(time.time()) or bool(state.others)  # a hold of N may be free
            after = self._next_in_line(name) if free and head is not None and head[0] == owner_token else None
        if after is not None:
            self._hub.notify(name, after)

    def purge(self) -> int:
        """Run one retention sweep now (acquires do it in passing); returns names forgotten."""
        with self._guard:
            return self._sweep(time.time(), force=True)

    # Native async: no I/O, so the same critical section runs on the loop (it never waits long). Each
    # call first yields to the loop once, as a store round trip would: other tasks get their turn, and
    # concurrent calls on one lock object overlap as they do on every other store.
    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        await asyncio.sleep(0)
        return self.acquire(name, owner, ttl, min_hold, queue_for=queue_for, limit=limit)

    async def arelease(self, name: str, owner_token: str) -> bool:
        await asyncio.sleep(0)
        return self.release(name, owner_token)

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        await asyncio.sleep(0)
        return self.renew(name, owner_token, ttl)

    async def aget(self, name: str) -> LockRecord | None:
        await asyncio.sleep(0)
        return self.get(name)

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        await asyncio.sleep(0)
        return self.holders(name)

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:
        await asyncio.sleep(0)
        return self.list(prefix)

    async def aforce_release(self, name: str) -> LockRecord | None:
        await asyncio.sleep(0)
        with self._guard:  # not force_release(): the base class logs this call once already
            removed = self._force_release(name)
            head = self._next_in_line(name)
        self._hub.notify(name, head)
        return removed

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        self.leave_queue(name, owner_token)

    async def aclose(self) -> None:
        self.close()

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        return self._hub.watch(name, owner_token)

    def __repr__(self) -> str:
        with self._guard:
            live = sum(1 for state in self._names.values() if state.live(time.time()))
        return f"Memory(locks={live})"
