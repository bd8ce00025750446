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
from dataclasses import dataclass, replace
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
class _Name:
    """One name's state: its latest record and counter, and when it became (or becomes) free."""

    fence: int
    record: LockRecord | None = None  # held, or released into its minimum hold
    free_at: float | None = None  # None while held without expiry

    def live(self, now: float) -> bool:
        return self.record is not None and (self.free_at is None or self.free_at > now)

    def holds(self, owner_token: str, now: float) -> bool:
        return self.live(now) and self.record is not None and not self.record.released and \
            self.record.owner_token == owner_token


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
                 queue_for: float | None = None) -> AcquireResult:
        now = time.time()
        state = self._names.get(name)
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
        fence = (state.fence if state is not None else self._purged_fence) + 1
        hold_until = now + min_hold if min_hold else None
        free_at = None if not ttl else max(now + ttl, hold_until or 0.0)
        record = LockRecord(name=name, owner_token=owner.owner_token, fencing_token=fence, host=owner.host,
                            pid=owner.pid, created_at=_at(now), expires_at=_at(free_at),  # type: ignore[arg-type]
                            metadata=dict(owner.metadata), hold_until=_at(hold_until))
        self._names[name] = _Name(fence, record, free_at)
        self._changed(name, free_at)
        return AcquireResult(True, record, expired=expired)

    def _release(self, name: str, owner_token: str) -> tuple[bool, bool]:
        now = time.time()
        state = self._names.get(name)
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

    def _renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        now = time.time()
        state = self._names.get(name)
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
        return state.record if state is not None and state.live(time.time()) else None

    def _list(self, prefix: str) -> list[LockRecord]:
        now = time.time()
        return [state.record for name, state in sorted(self._names.items())  # type: ignore[misc]
                if name.startswith(prefix) and state.live(now)]

    def _force_release(self, name: str) -> LockRecord | None:
        now = time.time()
        state = self._names.get(name)
        if state is None or not state.live(now):
            return None
        removed, state.record, state.free_at = state.record, None, now
        self._changed(name, now)
        return removed

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
            if free_at < cutoff and name != skip:
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
                queue_for: float | None = None) -> AcquireResult:
        with self._guard:
            return self._acquire(name, owner, ttl, min_hold, queue_for)

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
            free = state is None or not state.live(time.time())
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
    async def aacquire(self, name: str, owner: Owner, ttl: float | None,
                       min_hold: float | None = None, *, queue_for: float | None = None) -> AcquireResult:
        await asyncio.sleep(0)
        return self.acquire(name, owner, ttl, min_hold, queue_for=queue_for)

    async def arelease(self, name: str, owner_token: str) -> bool:
        await asyncio.sleep(0)
        return self.release(name, owner_token)

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        await asyncio.sleep(0)
        return self.renew(name, owner_token, ttl)

    async def aget(self, name: str) -> LockRecord | None:
        await asyncio.sleep(0)
        return self.get(name)

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
