"""``Singleton`` and ``AsyncSingleton``: one holder of a name across processes and hosts, over any persister.

The lock's rules live once in ``_lockstate.LockState``; the two classes here
only make the store calls, blocking or awaited (httpx's ``Client`` /
``AsyncClient`` split). Both are safe to share: concurrent ``lock()`` calls on
one object make one store attempt and all see its outcome, and so do
concurrent ``release()`` calls.

The waiting loop is written here once per face, ``wait_turn`` (blocking) and
``await_turn`` (awaited), following ``_lockstate.Waiting``'s rules; the detached
leases (``_lease``) wait through the same two.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._errors import LockConflict, LockLost
from ._events import logger
from ._lockstate import (
    DEFAULT_LOCK_EXPIRE_SECONDS,
    UNSET,
    Flight,
    LockState,
    Terms,
    TermsView,
    Waiting,
    acall_store,
    call_store,
    hold_of,
    queued_behind_message,
    store_error,
    validate_lock_options,
    validate_wait,
)
from ._record import AcquireResult, LockRecord
from .persisters._base import Persister, ReleaseWatch

if TYPE_CHECKING:
    import asyncio

    from typing_extensions import Self

__all__ = ["DEFAULT_LOCK_EXPIRE_SECONDS", "AsyncSingleton", "Singleton", "await_turn", "wait_turn"]

#: How soon a cancelled wait (a ``cancel`` event set by a CLI signal) notices.
_CANCEL_CHECK_INTERVAL = 0.1

LockCallback = Callable[[BaseException | None, bool | None], object]
ReleaseCallback = Callable[[BaseException | None], object]


def _check_callback(callback: object) -> None:
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")


_V = TypeVar("_V")


def _finish(callback: Callable[..., object] | None, value: _V) -> _V:
    if callback is not None:
        callback(None, value)
    return value


# -- the waiting loop, once per face ---------------------------------------------------------


def wait_turn(
    waiting: Waiting,
    call: Callable[[float | None], AcquireResult],
    cancel: threading.Event | None = None,
    answered: Callable[[AcquireResult], object] | None = None,
) -> tuple[float, AcquireResult]:
    """The one blocking waiting loop: ``Singleton.lock(wait=)``, ``Lease.take`` and ``Lease.wait_until_free``.

    ``call(waiting_for)`` is one store call (an acquire, or a look at the holder).
    The release watch is open before the first call, so no release is missed; a
    queued waiter that ends without the name leaves the queue. Returns the
    monotonic time the last call was sent and its answer; ``answered`` sees each.
    The metrics hear the wait's start and its end (``Waiting.begin``, ``ended``, ``failed``).
    """
    waiting.begin()
    try:
        sent_at, result = _turns(waiting, call, cancel, answered)
    except BaseException as error:
        waiting.failed(error)
        raise
    return sent_at, waiting.ended(result, cancelled=not result.acquired and cancel is not None and cancel.is_set())


def _turns(
    waiting: Waiting,
    call: Callable[[float | None], AcquireResult],
    cancel: threading.Event | None,
    answered: Callable[[AcquireResult], object] | None,
) -> tuple[float, AcquireResult]:
    persister = waiting.persister

    def attempt() -> tuple[float, AcquireResult]:
        sent_at = time.monotonic()
        result = waiting.answer(call_store(persister, call, waiting.waiting_for()))
        if answered is not None:
            answered(result)
        return sent_at, result

    if waiting.once:
        return attempt()
    try:
        with persister.watching(waiting.name, waiting.queue_token) as watch:
            while True:
                sent_at, result = attempt()
                if waiting.over(result) or (cancel is not None and cancel.is_set()):
                    return sent_at, result
                pause = waiting.pause(watch, result, asynchronous=False)
                if cancel is None:
                    watch.wait(pause)
                elif not _wait_cancellable(watch, pause, cancel):
                    return sent_at, result
    finally:
        place = waiting.place_to_leave()
        if place is not None:
            try:
                persister.leave_queue(waiting.name, place)
            except Exception as error:  # noqa: BLE001 - best effort: the place ends on its own within QUEUE_PLACE_SECONDS
                logger.debug("leaving the queue of %r failed: %s", waiting.name, type(error).__name__)


def _wait_cancellable(watch: ReleaseWatch, pause: float, cancel: threading.Event) -> bool:
    """Wait in short slices so ``cancel`` is seen soon; a slice woken by a release ends the wait.

    ``ReleaseWatch.wait`` says whether it was woken, so a wake-up landing at a
    slice's end is never mistaken for a timeout. Returns False when cancelled.
    """
    end = time.monotonic() + pause
    while (left := end - time.monotonic()) > 0:
        step = min(_CANCEL_CHECK_INTERVAL, left)
        started = time.monotonic()
        woken = watch.wait(step)
        if cancel.is_set():
            return False
        if woken or (woken is None and time.monotonic() - started < step * 0.9):  # None: an older watch
            break
    return not cancel.is_set()


# Tasks that clean up after a wait (an acquire that completed as its waiter was cancelled,
# a queue place to give up): kept referenced until done, so the event loop cannot drop them.
_cleanups: set[asyncio.Task[Any]] = set()


def _in_background(cleanup: Coroutine[Any, Any, None]) -> None:
    import asyncio  # here, not at the top: a sync lock never loads asyncio

    task = asyncio.ensure_future(cleanup)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


async def await_turn(
    waiting: Waiting,
    call: Callable[[float | None], Awaitable[AcquireResult]],
    answered: Callable[[AcquireResult], object] | None = None,
) -> tuple[float, AcquireResult]:
    """``wait_turn`` for coroutines: ``AsyncSingleton.lock(wait=)``, ``AsyncLease.take`` and ``wait_until_free``.

    Cancellation is native: a cancelled wait returns at once; in the background, an
    acquire that was in flight is awaited and what it took released, and then a
    queued waiter leaves the queue (in that order, so the finished attempt cannot
    queue it again).
    """
    waiting.begin()
    try:
        sent_at, result = await _await_turns(waiting, call, answered)
    except BaseException as error:
        waiting.failed(error)
        raise
    return sent_at, waiting.ended(result)


async def _await_turns(
    waiting: Waiting,
    call: Callable[[float | None], Awaitable[AcquireResult]],
    answered: Callable[[AcquireResult], object] | None,
) -> tuple[float, AcquireResult]:
    import asyncio  # here, not at the top: a sync lock never loads asyncio

    persister = waiting.persister
    in_flight: asyncio.Future[AcquireResult] | None = None  # set while a call is awaited

    async def attempt() -> tuple[float, AcquireResult]:
        nonlocal in_flight
        sent_at = time.monotonic()
        in_flight = asyncio.ensure_future(call(waiting.waiting_for()))
        try:
            raw = await asyncio.shield(in_flight)
        except asyncio.CancelledError:
            raise  # in_flight stays set: the cleanup settles it
        except Exception as error:
            in_flight = None
            translated = store_error(persister, error)
            if translated is error:
                raise
            raise translated from error
        in_flight = None
        result = waiting.answer(raw)
        if answered is not None:
            answered(result)
        return sent_at, result

    try:
        if waiting.once:
            return await attempt()
        async with persister.awatching(waiting.name, waiting.queue_token) as watch:
            while True:
                sent_at, result = await attempt()
                if waiting.over(result):
                    return sent_at, result
                await watch.wait_async(waiting.pause(watch, result, asynchronous=True))
    finally:
        place = waiting.place_to_leave()
        if in_flight is not None or place is not None:
            # A task, so a cancelled waiter returns at once; the place ends on its own if this fails.
            _in_background(_clean_up(persister, waiting.name, in_flight, place))


async def _clean_up(
    persister: Persister, name: str, in_flight: asyncio.Future[AcquireResult] | None, queue_token: str | None
) -> None:
    """After a wait that ended without the name: release what a cut-short attempt took, then leave the queue."""
    if in_flight is not None:
        try:
            result = await in_flight
        except BaseException:  # noqa: BLE001 - it failed or was cancelled, so it took nothing
            result = None
        if result is not None and result.acquired and result.record is not None:
            try:
                await persister.arelease(name, result.record.owner_token)
            except Exception:  # noqa: BLE001 - a task in the background: its lease ends the hold anyway
                logger.warning("could not release %r acquired as its waiter was cancelled; its lease will end", name)
            else:
                logger.debug("released %r: it was acquired as its waiter was cancelled", name)
    if queue_token is not None:
        try:
            await persister.aleave_queue(name, queue_token)
        except Exception as error:  # noqa: BLE001 - best effort: the place ends on its own within QUEUE_PLACE_SECONDS
            logger.debug("leaving the queue of %r failed: %s", name, type(error).__name__)


def _lock_call(wait: float | None, callback: object) -> tuple[float, float]:
    """``lock()``'s arguments checked: the seconds to wait and the deadline."""
    seconds = validate_wait(wait)
    _check_callback(callback)
    return seconds, time.monotonic() + seconds


def _report(callback: Callable[..., object] | None, *args: object) -> None:
    if callback is not None:
        callback(*args)


_T = TypeVar("_T")


class _FromState(Generic[_T]):
    """A face's read-only attribute that is its ``LockState``'s (both faces read the same state)."""

    def __init__(self, doc: str, attribute: str | None = None) -> None:
        self.__doc__ = doc
        self._attribute = attribute

    def __set_name__(self, owner: type, name: str) -> None:
        if self._attribute is None:
            self._attribute = name

    @overload
    def __get__(self, face: None, owner: type | None = None) -> _FromState[_T]: ...
    @overload
    def __get__(self, face: _Face, owner: type | None = None) -> _T: ...
    def __get__(self, face: _Face | None, owner: type | None = None) -> _T | _FromState[_T]:
        if face is None:
            return self
        value: _T = getattr(face._state, self._attribute or "")
        return value

    def __set__(self, face: _Face, value: object) -> None:  # read-only, as a property without a setter
        raise AttributeError(f"{type(face).__name__}.{self._attribute} is read-only")


class _Face(TermsView):
    """What both faces share with no I/O: the constructor, and every rule around a store call via ``LockState``."""

    _state: LockState

    def __init__(
        self,
        name: str,
        persister: Persister | str | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        lock_expire_seconds: float | None = UNSET,
        auto_renew: bool = False,
        renew_interval: float | None = None,
        metadata: Mapping[str, str] | None = None,
        release_on_sigterm: bool = True,
        min_hold_seconds: float | None = None,
        limit: int = 1,
    ) -> None:
        ttl, interval = validate_lock_options(name, options, lock_expire_seconds, auto_renew, renew_interval)
        terms = Terms.of(name, persister, lock_expire_seconds=ttl, metadata=metadata, min_hold_seconds=min_hold_seconds,
                         limit=limit)
        self._state = LockState(
            terms, auto_renew=auto_renew, renew_interval=interval, release_on_sigterm=release_on_sigterm
        )

    def _lock_terms(self) -> Terms:
        return self._state.terms

    auto_renew: _FromState[bool] = _FromState("Whether a renewer extends the lease while held.")
    renew_interval: _FromState[float | None] = _FromState("Seconds between renewals.")
    release_on_sigterm: _FromState[bool] = _FromState("Whether SIGTERM releases the hold before the process ends.")
    held: _FromState[bool] = _FromState(
        "Whether this object holds the lock: False once the lease may have ended (see ``loss_margin``).")
    lost: _FromState[bool] = _FromState(
        "True once a held lock expired, was taken over, or could not be renewed in time before ``release``.")
    last_holder: _FromState[LockRecord | None] = _FromState(
        "The holder seen by the latest failed attempt, for conflict messages.")
    last_holders: _FromState[tuple[LockRecord, ...]] = _FromState(
        "Under ``limit=N``: every hold the latest failed attempt saw, by fencing token.")
    loss_margin: _FromState[float] = _FromState(
        "Seconds before the locally estimated lease end at which a lock whose renewals fail is declared lost.",
        "margin")

    @property
    def fencing_token(self) -> int | None:
        """The current hold's fencing token: pass it to the resource you protect."""
        record = self._state.record()
        return record.fencing_token if record is not None else None

    @property
    def record(self) -> LockRecord | None:
        """Our lock record while held."""
        return self._state.record()

    def on(self, event: str, handler: Callable[[Any], object]) -> Callable[[Any], object]:
        """Call ``handler`` on each ``event`` (see ``EVENTS``)."""
        return self._state.on(event, handler)

    def once(self, event: str, handler: Callable[[Any], object]) -> Callable[[Any], object]:
        """Call ``handler`` on the next ``event`` only."""
        return self._state.once(event, handler)

    def off(self, event: str, handler: Callable[[Any], object]) -> None:
        """Stop calling ``handler``."""
        self._state.off(event, handler)

    def emit(self, event: str, payload: Any, name: str | None = None) -> None:
        self._state.emit(event, payload, self._state.name if name is None else name)

    # -- the rules around each store call, once for both faces -----------------------

    def _start_renewal(self, generation: int) -> None:
        raise NotImplementedError

    def _took(self, flight: Flight, outcome: tuple[float, AcquireResult], seconds: float,
              callback: LockCallback | None) -> bool:
        """Settle our acquire's answer: the hold and its renewer, the joiners, the seed's callback."""
        state = self._state
        try:
            generation = state.settle(outcome[1], outcome[0], seconds)
            if generation is not None and state.auto_renew:
                self._start_renewal(generation)
        except BaseException as error:
            state.acquire_failed(flight, error, callback)
            raise
        state.end_acquire(flight, generation is not None)
        return _finish(callback, generation is not None)

    def _releasing(self, callback: ReleaseCallback | None) -> None:
        _check_callback(callback)
        self._state.emit("releasing", lambda: f"releasing {self._state.name!r}", self._state.name)

    def _failed(self, error: Exception, callback: LockCallback | None) -> None:
        """A look at the store failed: an ``error`` event and the seed's callback; the caller re-raises."""
        self._state.emit("error", error, self.name)
        _report(callback, error, None)

    def _exit_release_raises(self, lost: bool, exc_type: type[BaseException] | None) -> bool:
        """Whether a block's exit raises its release's error: not when the block failed or the lock was lost."""
        if not lost and exc_type is None:
            return True
        logger.warning("could not release lost lock %r; its lease will end on the store", self.name, exc_info=True)
        return False

    def _exited(self, lost: bool, exc_type: type[BaseException] | None) -> None:
        if lost and exc_type is None:
            raise self._lost_error()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.persister!r}, {self._state.state_word()})"

    def _conflict_error(self) -> LockConflict:
        state = self._state
        if state.queued_behind and state.last_holder is None:
            return LockConflict(state.name, None, queued_behind_message(state.name))
        return LockConflict(state.name, state.last_holder, holders=state.last_holders, limit=state.terms.limit)

    def _lost_error(self) -> LockLost:
        return LockLost(self._state.name, f"exclusivity on lock {self._state.name!r} was lost before the block ended")


class Singleton(_Face):
    """A named lock held by at most one live owner, judged by the store's clock.

    >>> from singleton_integrations import Singleton, persisters
    >>> job = Singleton("nightly-report", persisters.Memory(), lock_expire_seconds=60)
    >>> job.lock()
    True
    >>> job.fencing_token
    1
    >>> job.release()
    True

    ``with job:`` is reentrant on one object: nested blocks share the hold and the
    outermost exit releases it.

    ``limit=N`` lets up to N objects (in any process, on any host) hold the name at
    once, each with a hold of its own: its own owner token, lease and fencing token
    from the name's one rising sequence. Every rule of a single hold applies to each;
    an attempt succeeds only while fewer than its own N holds are live.
    """

    @classmethod
    def _over(cls, state: LockState) -> Singleton:
        """A blocking face on an existing lock state (``AsyncSingleton.sync``)."""
        face = cls.__new__(cls)
        face._state = state
        return face

    # -- the seed's three methods ------------------------------------------------

    def lock(
        self, callback: LockCallback | None = None, *, wait: float | None = None, cancel: threading.Event | None = None
    ) -> bool:
        """Try to take the lock; with ``wait``, block up to that many seconds for it.

        Returns True when acquired (or already held by this object), False when
        another live holder kept it. ``callback(err, success)`` is the seed's style
        and is called as well. Setting ``cancel`` (a ``threading.Event``) from
        another thread or a signal handler ends the wait early. Concurrent calls
        on this object share one store attempt.
        """
        seconds, deadline = _lock_call(wait, callback)
        while True:
            self._settle_release()
            turn = self._state.start_acquire()
            if turn is None or turn[1]:
                break
            joined = self._join(turn[0], deadline, cancel)
            if joined is not None:
                return _finish(callback, joined)
        if turn is None:
            return _finish(callback, True)
        self._release_stale()
        self._state.locking()
        try:
            outcome = self._acquire(seconds, cancel, turn[0])
        except BaseException as error:
            self._state.acquire_failed(turn[0], error, callback)
            raise
        return self._took(turn[0], outcome, seconds, callback)

    def release(self, callback: ReleaseCallback | None = None) -> bool:
        """Give the lock up if this object still holds it; True when the store confirms it did.

        Owner-checked: a lock that expired and was taken over is left to its new
        holder. Releases regardless of ``with`` nesting. Concurrent calls share one
        store call and return its answer.
        """
        self._releasing(callback)
        try:
            released = self._release("release")
        except Exception as error:
            _report(callback, error)
            raise
        _report(callback, None)
        return released

    def exists(self, callback: LockCallback | None = None) -> bool:
        """Whether a live lock exists for this name, whoever holds it (a minimum hold counts)."""
        _check_callback(callback)
        try:
            found = self.holder() is not None
        except Exception as error:
            self._failed(error, callback)
            raise
        return _finish(callback, found)

    # -- beyond the seed -----------------------------------------------------------

    def holder(self) -> LockRecord | None:
        """Who holds the lock now (host, pid, since when, fencing token); during a minimum hold, the released record.

        Under ``limit=N``, one of the holds: ``holders()`` lists them all.
        """
        return call_store(self.persister, self.persister.get, self.name)

    def holders(self) -> list[LockRecord]:
        """Every live hold of the name, by fencing token: at most one unless callers use ``limit``."""
        return call_store(self.persister, self.persister.holders, self.name)

    def verify(self) -> bool:
        """Ask the store whether we still hold the lock; a loss found here emits ``lost``."""
        hold = self._state.record()
        if hold is None:
            return False
        current = self.holder() if self.limit == 1 else hold_of(self.holders(), hold.owner_token)
        return self._state.verified(hold, current)

    def ensure_held(self) -> None:
        """Raise ``LockLost`` unless the store confirms we hold the lock (call before side effects)."""
        if not self.verify():
            raise LockLost(self.name)

    def renew(self) -> bool:
        """Extend the lease now; False (and ``lost``) when the lock is no longer ours."""
        ticket = self._state.begin_renew()
        if ticket is None:
            return False
        return self._state.renewed(ticket, self._renew_call(ticket.owner_token))

    def __enter__(self) -> Self:
        if not self.lock():
            raise self._conflict_error()
        self._state.enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        lost = self._state.lost
        if self._state.leave():
            try:
                self.release()
            except Exception:
                if self._exit_release_raises(lost, exc_type):
                    raise
        self._exited(lost, exc_type)

    # -- internals: the store calls, blocking -----------------------------------------

    def _join(self, flight: Flight, deadline: float, cancel: threading.Event | None) -> bool | None:
        """Share another thread's attempt: its outcome, False at our own deadline, None to try ourselves."""
        flight.answered.wait()
        while not flight.done.is_set():
            latest = flight.latest
            if latest is not None and latest.acquired:
                # The attempt took the name and its owner is recording the hold (no store call
                # left): that is the answer, whatever our deadline; never settle it a second time.
                flight.done.wait()
                break
            left = deadline - time.monotonic()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                return self._state.stop_joining(flight)
            flight.done.wait(min(left, _CANCEL_CHECK_INTERVAL) if cancel is not None else min(left, 3600.0))
        return self._state.joined(flight)

    def _settle_release(self) -> None:
        releasing = self._state.pending_release()
        if releasing is not None:
            releasing.done.wait()

    def _release_stale(self) -> None:
        stale = self._state.take_stale_hold()
        if stale is not None:
            try:
                self.persister.release(self.name, stale.owner_token)
            except Exception as error:  # noqa: BLE001 - best effort: its lease ends on its own
                self._state.stale_release_failed(error)

    def _acquire(self, wait: float, cancel: threading.Event | None, flight: Flight) -> tuple[float, AcquireResult]:
        terms = self._state.terms
        # One owner token for every attempt of this wait: it is the waiter's place in a fair store's queue.
        owner = terms.owner()
        waiting = Waiting.to_take(terms, wait, owner.owner_token, self._state.info)
        return wait_turn(waiting, terms.acquirer(owner), cancel, flight.answer)

    def _release(self, reason: str) -> bool:
        flight, hold = self._state.begin_release()
        if hold is None:
            flight.done.wait()
            return bool(flight.outcome())
        try:
            # Ask the store first: if it fails, we still know our token and release() can be retried.
            confirmed = bool(call_store(self.persister, self.persister.release, self.name, hold.owner_token))
        except BaseException as error:
            self._state.release_failed(flight, error)
            raise
        return self._state.released(flight, hold, confirmed, reason)

    def _renew_call(self, owner_token: str) -> LockRecord | None:
        return call_store(self.persister, self.persister.renew, self.name, owner_token, self.lock_expire_seconds)

    def _start_renewal(self, generation: int) -> None:
        stop = threading.Event()
        thread = threading.Thread(
            target=self._renew_loop, args=(generation, stop), name=f"singleton-renew:{self.name}", daemon=True
        )
        self._state.set_renewal(generation, stop.set)
        thread.start()

    def _renew_loop(self, generation: int, stop: threading.Event) -> None:
        interval = self._state.renew_interval or 1.0
        while not stop.wait(interval):
            ticket = self._state.begin_renew(generation)
            if ticket is None:
                return
            try:
                record = self._renew_call(ticket.owner_token)
            except Exception as error:  # noqa: BLE001 - reported as an `error` event; the renewer retries
                next_pause = self._state.renew_answered(ticket, error=error)
            else:
                next_pause = self._state.renew_answered(ticket, record)
            if next_pause is None:
                return
            interval = next_pause


class AsyncSingleton(_Face):
    """``Singleton`` for coroutines, over the persister's async primitives.

    Waits hold no thread (``ReleaseWatch.wait_async``), renewal is a task on the
    loop, and cancellation is native: a cancelled ``lock(wait=...)`` returns at
    once holding nothing, and an acquire that completed as the cancellation
    arrived is released in the background. ``release()`` is shielded, so a
    cancelled task still releases. ``async with`` is reentrant on one object.
    """

    _sync: Singleton | None = None

    @property
    def sync(self) -> Singleton:
        """A blocking face on this same lock (same hold, events and token), for code that cannot await."""
        if self._sync is None:
            self._sync = Singleton._over(self._state)
        return self._sync

    async def lock(self, callback: LockCallback | None = None, *, wait: float | None = None) -> bool:
        """Try to take the lock; with ``wait``, await up to that many seconds for it (``math.inf``: for good)."""
        seconds, deadline = _lock_call(wait, callback)
        while True:
            releasing = self._state.pending_release()
            if releasing is not None:
                await releasing.done.wait_async()
            turn = self._state.start_acquire()
            if turn is None or turn[1]:
                break
            joined = await self._join(turn[0], deadline)
            if joined is not None:
                return _finish(callback, joined)
        if turn is None:
            return _finish(callback, True)
        await self._release_stale()
        self._state.locking()
        try:
            outcome = await self._acquire(seconds, turn[0])
        except BaseException as error:
            self._state.acquire_failed(turn[0], error, callback)
            raise
        return self._took(turn[0], outcome, seconds, callback)

    async def release(self, callback: ReleaseCallback | None = None) -> bool:
        """``Singleton.release``, shielded from cancellation: a cancelled task still releases."""
        import asyncio  # here, not at the top: a sync lock never loads asyncio

        self._releasing(callback)
        try:
            released = await asyncio.shield(self._release("release"))
        except Exception as error:
            _report(callback, error)
            raise
        _report(callback, None)
        return released

    async def exists(self, callback: LockCallback | None = None) -> bool:
        """Whether a live lock exists for this name, whoever holds it (a minimum hold counts)."""
        _check_callback(callback)
        try:
            found = await self.holder() is not None
        except Exception as error:
            self._failed(error, callback)
            raise
        return _finish(callback, found)

    async def holder(self) -> LockRecord | None:
        """``Singleton.holder`` for coroutines."""
        return await self._call(self.persister.aget(self.name))

    async def holders(self) -> list[LockRecord]:
        """``Singleton.holders`` for coroutines."""
        return await self._call(self.persister.aholders(self.name))

    async def verify(self) -> bool:
        """``Singleton.verify`` for coroutines."""
        hold = self._state.record()
        if hold is None:
            return False
        current = await self.holder() if self.limit == 1 else hold_of(await self.holders(), hold.owner_token)
        return self._state.verified(hold, current)

    async def ensure_held(self) -> None:
        """Raise ``LockLost`` unless the store confirms we hold the lock."""
        if not await self.verify():
            raise LockLost(self.name)

    async def renew(self) -> bool:
        """Extend the lease now; False (and ``lost``) when the lock is no longer ours."""
        ticket = self._state.begin_renew()
        if ticket is None:
            return False
        return self._state.renewed(ticket, await self._renew_call(ticket.owner_token))

    async def __aenter__(self) -> Self:
        if not await self.lock():
            raise self._conflict_error()
        self._state.enter()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        lost = self._state.lost
        if self._state.leave():
            try:
                await self.release()
            except Exception:
                if self._exit_release_raises(lost, exc_type):
                    raise
        self._exited(lost, exc_type)

    # -- internals: the store calls, awaited ------------------------------------------

    async def _call(self, call: Awaitable[_V]) -> _V:
        return await acall_store(self.persister, call)

    async def _join(self, flight: Flight, deadline: float) -> bool | None:
        await flight.answered.wait_async()
        left = deadline - time.monotonic()
        if not flight.done.is_set() and not (
            left > 0 and await flight.done.wait_async(None if math.isinf(left) else left)
        ):
            return self._state.stop_joining(flight)
        return self._state.joined(flight)

    async def _release_stale(self) -> None:
        stale = self._state.take_stale_hold()
        if stale is not None:
            try:
                await self.persister.arelease(self.name, stale.owner_token)
            except Exception as error:  # noqa: BLE001 - best effort: its lease ends on its own
                self._state.stale_release_failed(error)

    async def _acquire(self, wait: float, flight: Flight) -> tuple[float, AcquireResult]:
        terms = self._state.terms
        owner = terms.owner()  # one token for every attempt: the waiter's place in a fair queue
        waiting = Waiting.to_take(terms, wait, owner.owner_token, self._state.info)
        return await await_turn(waiting, terms.async_acquirer(owner), flight.answer)

    async def _release(self, reason: str) -> bool:
        flight, hold = self._state.begin_release()
        if hold is None:
            await flight.done.wait_async()
            return bool(flight.outcome())
        try:
            confirmed = bool(await self._call(self.persister.arelease(self.name, hold.owner_token)))
        except BaseException as error:
            self._state.release_failed(flight, error)
            raise
        return self._state.released(flight, hold, confirmed, reason)

    async def _renew_call(self, owner_token: str) -> LockRecord | None:
        return await self._call(self.persister.arenew(self.name, owner_token, self.lock_expire_seconds))

    def _start_renewal(self, generation: int) -> None:
        import asyncio  # here, not at the top: a sync lock never loads asyncio

        loop = asyncio.get_running_loop()
        task = loop.create_task(self._renew_loop(generation), name=f"singleton-renew:{self.name}")

        def stop() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed, and its tasks with it
                loop.call_soon_threadsafe(task.cancel)

        self._state.set_renewal(generation, stop)

    async def _renew_loop(self, generation: int) -> None:
        import asyncio  # here, not at the top: a sync lock never loads asyncio

        interval: float | None = self._state.renew_interval or 1.0
        while interval is not None:
            await asyncio.sleep(interval)
            ticket = self._state.begin_renew(generation)
            if ticket is None:
                return
            try:
                record = await self._renew_call(ticket.owner_token)
            except Exception as error:  # noqa: BLE001 - reported as an `error` event; the renewer retries
                interval = self._state.renew_answered(ticket, error=error)
            else:
                interval = self._state.renew_answered(ticket, record)
