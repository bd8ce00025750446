"""``Singleton``: one holder of a name across processes and hosts, over any persister."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from . import _process
from ._errors import LockConflict, LockLost, PersisterError, SingletonError
from ._events import EventEmitter, logger
from ._record import AcquireResult, LockRecord, Owner, validate_metadata, validate_name, validate_ttl
from .persisters._base import Persister, ReleaseWatch

__all__ = ["DEFAULT_LOCK_EXPIRE_SECONDS", "AsyncSingleton", "Singleton"]

#: Five minutes, the seed's example: a crashed holder never wedges a name for
#: good, and longer jobs opt into ``auto_renew=True`` or a longer lease.
DEFAULT_LOCK_EXPIRE_SECONDS = 300.0
#: While waiting on a store that notifies, still look again this often (a lost
#: notification costs at most this much).
_NOTIFY_SAFETY_POLL = 2.0
#: How soon a cancelled wait (async cancellation, a CLI signal) notices.
_CANCEL_CHECK_INTERVAL = 0.1

_UNSET: Any = object()


def _resolve_persister(persister: Persister | str | None) -> Persister:
    from . import persisters

    if persister is None:
        return persisters.Sqlite()
    if isinstance(persister, str):
        return persisters.from_url(persister)
    if not isinstance(persister, Persister):
        raise TypeError(f"persister must be a Persister, a store URL or None, not {type(persister).__name__}")
    return persister


def _validate_wait(wait: object) -> float:
    if wait is None:
        return 0.0
    if isinstance(wait, bool) or not isinstance(wait, (int, float)):
        raise TypeError(f"wait must be a number of seconds or None, not {type(wait).__name__}")
    if math.isnan(wait) or wait < 0:
        raise ValueError(f"wait must be zero or more seconds, not {wait!r}")
    return float(wait)


class Singleton(EventEmitter):
    """A named lock held by at most one live owner, judged by the store's clock.

    >>> from singleton_integrations import Singleton, persisters
    >>> job = Singleton("nightly-report", persisters.Memory(), lock_expire_seconds=60)
    >>> job.lock()
    True
    >>> job.fencing_token
    1
    >>> job.release()
    True
    """

    def __init__(
        self,
        name: str,
        persister: Persister | str | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        lock_expire_seconds: float | None = _UNSET,
        auto_renew: bool = False,
        renew_interval: float | None = None,
        metadata: Mapping[str, str] | None = None,
        release_on_sigterm: bool = True,
    ) -> None:
        super().__init__()
        self.name = validate_name(name)
        if options is not None:  # the seed's options object: {"lockExpireSeconds": 300}
            if not isinstance(options, Mapping):
                raise TypeError(f"options must be a mapping, not {type(options).__name__}")
            unknown = set(options) - {"lockExpireSeconds", "lock_expire_seconds"}
            if unknown:
                raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
            if lock_expire_seconds is _UNSET:
                lock_expire_seconds = options.get("lockExpireSeconds", options.get("lock_expire_seconds", _UNSET))
        if lock_expire_seconds is _UNSET:
            lock_expire_seconds = DEFAULT_LOCK_EXPIRE_SECONDS
        self.lock_expire_seconds = validate_ttl(lock_expire_seconds)
        if not isinstance(auto_renew, bool):
            raise TypeError("auto_renew must be a bool")
        if auto_renew and self.lock_expire_seconds is None:
            raise ValueError("auto_renew needs a lock_expire_seconds: a lock that never expires has nothing to renew")
        self.auto_renew = auto_renew
        self.renew_interval = validate_ttl(renew_interval, "renew_interval")
        if self.renew_interval is None and self.lock_expire_seconds is not None:
            self.renew_interval = self.lock_expire_seconds / 3
        self.release_on_sigterm = bool(release_on_sigterm)
        self.metadata = validate_metadata(metadata)
        self.persister = _resolve_persister(persister)
        self._state = threading.RLock()
        self._hold: LockRecord | None = None
        self._owner_pid = 0
        self._lost = False
        self._last_holder: LockRecord | None = None
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()
        self._lease_deadline = 0.0  # monotonic time our lease surely ends if never renewed

    # -- state -----------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this instance believes it holds the lock (see ``verify`` to ask the store)."""
        return self._hold is not None and self._owned_here()

    @property
    def lost(self) -> bool:
        """True once a held lock expired or was taken over before ``release``."""
        return self._lost

    @property
    def fencing_token(self) -> int | None:
        """The current hold's fencing token: pass it to the resource you protect."""
        hold = self._hold
        return hold.fencing_token if hold is not None and self._owned_here() else None

    @property
    def record(self) -> LockRecord | None:
        """Our lock record while held."""
        return self._hold if self._owned_here() else None

    @property
    def last_holder(self) -> LockRecord | None:
        """The holder seen by the latest failed attempt, for conflict messages."""
        return self._last_holder

    def _owned_here(self) -> bool:
        return self._owner_pid == os.getpid()

    # -- the seed's three methods ------------------------------------------------

    def lock(
        self,
        callback: Callable[[BaseException | None, bool | None], object] | None = None,
        *,
        wait: float | None = None,
        cancel: threading.Event | None = None,
    ) -> bool:
        """Try to take the lock; with ``wait``, block up to that many seconds for it.

        Returns True when acquired, False when another live holder kept it.
        ``callback(err, success)`` is the seed's style and is called as well.
        Setting ``cancel`` (a ``threading.Event``) from another thread or a
        signal handler ends the wait early.
        """
        seconds = _validate_wait(wait)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        if self.held and not self._lost:
            return self._finish(callback, None, True)
        self.emit("locking", lambda: f"locking {self.name!r}", self.name)
        try:
            result = self._acquire(seconds, cancel)
        except Exception as error:
            return self._fail(callback, error)
        if not result.acquired:
            self._last_holder = result.record
            who = result.record.describe() if result.record else "another process"
            waited = f" after waiting {seconds:g} s" if seconds else ""
            self.emit("conflict", lambda: f"lock {self.name!r} is held by {who}{waited}", self.name)
            return self._finish(callback, None, False)
        record = result.record
        assert record is not None
        if result.expired is not None:
            self.emit("expired", lambda: f"lock {self.name!r} held by {result.expired.describe()} had expired and was taken over", self.name)
        self._take(record)
        self.emit("locked", lambda: f"locked {self.name!r} with fencing token {record.fencing_token}", self.name)
        return self._finish(callback, None, True)

    def release(self, callback: Callable[[BaseException | None], object] | None = None) -> bool:
        """Give the lock up if this instance still holds it; True when it did.

        Owner-checked: a lock that expired and was taken over is left to its new holder.
        """
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        self.emit("releasing", lambda: f"releasing {self.name!r}", self.name)
        try:
            released = self._release_for("release")
        except Exception as error:
            self.emit("error", error, self.name)
            if callback is not None:
                callback(error)
            raise
        if callback is not None:
            callback(None)
        return released

    def exists(self, callback: Callable[[BaseException | None, bool | None], object] | None = None) -> bool:
        """Whether a live lock exists for this name, whoever holds it."""
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        try:
            found = self._call(self.persister.get, self.name) is not None
        except Exception as error:
            return self._fail(callback, error)
        return self._finish(callback, None, found)

    # -- beyond the seed -----------------------------------------------------------

    def holder(self) -> LockRecord | None:
        """Who holds the lock now (host, pid, since when, fencing token), if anyone."""
        return self._call(self.persister.get, self.name)

    def verify(self) -> bool:
        """Ask the store whether we still hold the lock; a loss found here emits ``lost``."""
        hold = self._hold
        if hold is None or not self._owned_here():
            return False
        current = self._call(self.persister.get, self.name)
        if current is not None and current.owner_token == hold.owner_token:
            return True
        self._mark_lost("the store no longer shows this owner's lock")
        return False

    def ensure_held(self) -> None:
        """Raise ``LockLost`` unless the store confirms we hold the lock (call before side effects)."""
        if not self.verify():
            raise LockLost(self.name)

    def renew(self) -> bool:
        """Extend the lease now; False (and ``lost``) when the lock is no longer ours."""
        hold = self._hold
        if hold is None or not self._owned_here():
            return False
        record = self._call(self.persister.renew, self.name, hold.owner_token, self.lock_expire_seconds)
        if record is None:
            self._mark_lost("renewal refused: the lock expired or was taken over")
            return False
        with self._state:
            if self._hold is not None and self._hold.owner_token == record.owner_token:
                self._hold = record
                self._lease_deadline = time.monotonic() + (self.lock_expire_seconds or math.inf)
        self.emit("renewed", lambda: f"renewed {self.name!r} until {record.expires_at.isoformat() if record.expires_at else 'never'}", self.name)
        return True

    def __enter__(self) -> Singleton:
        if not self.lock():
            raise LockConflict(self.name, self._last_holder)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lost = self._lost
        self.release()
        if lost and exc_type is None:
            raise LockLost(self.name, f"exclusivity on lock {self.name!r} was lost before the block ended")

    def __repr__(self) -> str:
        state = "held" if self.held else ("lost" if self._lost else "free")
        return f"Singleton({self.name!r}, {self.persister!r}, {state})"

    # -- internals -------------------------------------------------------------------

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except SingletonError:
            raise
        except Exception as error:  # a persister that leaked a driver error
            raise PersisterError(self.persister.backend, f"{type(error).__name__}: {error}") from error

    def _attempt(self) -> AcquireResult:
        owner = Owner(metadata=self.metadata)
        return self._call(self.persister.acquire, self.name, owner, self.lock_expire_seconds)

    def _acquire(self, wait: float, cancel: threading.Event | None) -> AcquireResult:
        if wait <= 0:
            return self._attempt()
        deadline = time.monotonic() + wait
        poll = _NOTIFY_SAFETY_POLL if self.persister.notifies else self.persister.poll_interval
        with self.persister.watching(self.name) as watch:
            while True:
                result = self._attempt()
                remaining = deadline - time.monotonic()
                if result.acquired or remaining <= 0 or (cancel is not None and cancel.is_set()):
                    return result
                pause = min(remaining, poll)
                if result.retry_after is not None:
                    pause = min(pause, max(result.retry_after, 0.0) + 0.001)
                if cancel is None:
                    watch.wait(pause)
                elif not self._wait_cancellable(watch, pause, cancel):
                    return result

    @staticmethod
    def _wait_cancellable(watch: ReleaseWatch, pause: float, cancel: threading.Event) -> bool:
        """Wait in short slices so ``cancel`` is seen soon, without more store round trips.

        A slice that ends early was woken by a release: stop waiting and try again.
        Returns False when cancelled.
        """
        end = time.monotonic() + pause
        while (left := end - time.monotonic()) > 0:
            step = min(_CANCEL_CHECK_INTERVAL, left)
            started = time.monotonic()
            watch.wait(step)
            if cancel.is_set():
                return False
            if time.monotonic() - started < step * 0.9:
                break
        return not cancel.is_set()

    def _take(self, record: LockRecord) -> None:
        with self._state:
            self._hold = record
            self._owner_pid = os.getpid()
            self._lost = False
            self._lease_deadline = time.monotonic() + (self.lock_expire_seconds or math.inf)
            if self.auto_renew:
                self._stop_renewing = threading.Event()
        _process.register(self, self.release_on_sigterm)
        if self.auto_renew:
            self._renewer = threading.Thread(
                target=self._renew_loop, args=(self._stop_renewing, record.owner_token),
                name=f"singleton-renew:{self.name}", daemon=True,
            )
            self._renewer.start()

    def _drop(self) -> LockRecord | None:
        with self._state:
            hold, self._hold = self._hold, None
            self._stop_renewing.set()
        _process.unregister(self)
        return hold

    def _release_for(self, reason: str) -> bool:
        if not self._owned_here():
            return False  # a forked child never releases its parent's lock
        hold = self._hold
        if hold is None:
            self.emit("released", lambda: f"{self.name!r} was not held; nothing to release", self.name)
            return False
        self._stop_renewing.set()
        # Ask the store first: if it fails, we still know our token and release() can be retried.
        released = self._call(self.persister.release, self.name, hold.owner_token)
        self._drop()
        if released:
            self.emit("released", lambda: f"released {self.name!r} ({reason})", self.name)
        else:
            if not self._lost:
                self._lost = True
                self.emit("lost", lambda: f"exclusivity on lock {self.name!r} was lost: it expired or was taken over before release", self.name)
            self.emit("released", lambda: f"{self.name!r} was no longer ours; left to its new holder", self.name)
        return released

    def _mark_lost(self, why: str) -> None:
        with self._state:
            if self._hold is None:
                return
            self._lost = True
        self._drop()
        self.emit("lost", lambda: f"exclusivity on lock {self.name!r} was lost: {why}", self.name)

    def _renew_loop(self, stop: threading.Event, owner_token: str) -> None:
        interval = self.renew_interval or 1.0
        while not stop.wait(interval):
            hold = self._hold
            if hold is None or hold.owner_token != owner_token or not self._owned_here():
                return
            try:
                if not self.renew():
                    return
                interval = self.renew_interval or 1.0
            except Exception as error:
                self.emit("error", error, self.name)
                left = self._lease_deadline - time.monotonic()
                if left <= 0:
                    self._mark_lost(f"renewal failed until the lease ran out ({error})")
                    return
                interval = min(self.renew_interval or 1.0, max(left / 3, 0.05))

    def _fail(self, callback: Callable[[BaseException | None, Any], object] | None, error: Exception) -> Any:
        self.emit("error", error, self.name)
        if callback is not None:
            callback(error, None)
        raise error

    @staticmethod
    def _finish(callback: Callable[[BaseException | None, Any], object] | None, error: None, value: Any) -> Any:
        if callback is not None:
            callback(error, value)
        return value


class AsyncSingleton:
    """``Singleton`` as coroutines: persister calls run in a worker thread, never on the loop.

    Cancelling ``lock(wait=...)`` stops the wait; a lock acquired as the
    cancellation arrived is released, so cancellation never leaks a lock.
    """

    def __init__(self, name: str, persister: Persister | str | None = None, options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.sync = Singleton(name, persister, options, **kwargs)

    name = property(lambda self: self.sync.name)
    persister = property(lambda self: self.sync.persister)
    held = property(lambda self: self.sync.held)
    lost = property(lambda self: self.sync.lost)
    fencing_token = property(lambda self: self.sync.fencing_token)
    record = property(lambda self: self.sync.record)
    last_holder = property(lambda self: self.sync.last_holder)

    def on(self, event: str, handler: Callable[[Any], object]) -> Callable[[Any], object]:
        return self.sync.on(event, handler)

    def once(self, event: str, handler: Callable[[Any], object]) -> Callable[[Any], object]:
        return self.sync.once(event, handler)

    def off(self, event: str, handler: Callable[[Any], object]) -> None:
        self.sync.off(event, handler)

    async def lock(self, callback: Callable[[BaseException | None, bool | None], object] | None = None, *, wait: float | None = None) -> bool:
        cancelled = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self.sync.lock, callback, wait=wait, cancel=cancelled))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled.set()
            try:
                acquired = await task
            except Exception:
                acquired = False
            if acquired:
                await asyncio.to_thread(self.sync.release)
            raise

    async def release(self, callback: Callable[[BaseException | None], object] | None = None) -> bool:
        return await asyncio.shield(asyncio.to_thread(self.sync.release, callback))

    async def exists(self, callback: Callable[[BaseException | None, bool | None], object] | None = None) -> bool:
        return await asyncio.to_thread(self.sync.exists, callback)

    async def holder(self) -> LockRecord | None:
        return await asyncio.to_thread(self.sync.holder)

    async def verify(self) -> bool:
        return await asyncio.to_thread(self.sync.verify)

    async def ensure_held(self) -> None:
        await asyncio.to_thread(self.sync.ensure_held)

    async def renew(self) -> bool:
        return await asyncio.to_thread(self.sync.renew)

    async def __aenter__(self) -> AsyncSingleton:
        if not await self.lock():
            raise LockConflict(self.name, self.sync.last_holder)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lost = self.sync.lost
        await self.release()
        if lost and exc_type is None:
            raise LockLost(self.name, f"exclusivity on lock {self.name!r} was lost before the block ended")

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"


# Keep the logger name importable for users configuring it.
_ = logger
