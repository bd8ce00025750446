"""The lock's rules with no I/O: shared by ``Singleton``, ``AsyncSingleton`` and the detached leases.

Only the store calls are written twice (blocking in ``Singleton`` and ``Lease``,
awaited in ``AsyncSingleton`` and ``AsyncLease``); everything else lives here
once: validation (``Terms``), the rules of a wait (``Waiting``: the fair queue,
pauses, deadline), the state transitions of one lock object, its events and
their messages, the lease estimate that declares a loss in time, reentrancy,
and the single-flight bookkeeping that lets concurrent callers on one object
share one store call.

Every transition runs under a short ``threading.Lock`` that is never held
across I/O or while handlers run, so it is safe from threads, from an event
loop and from a signal handler's helper threads alike.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import _process, _record, metrics
from ._errors import PersisterError, SingletonError, conflict_message
from ._events import EventEmitter, logger
from ._record import AcquireResult, LockRecord, Owner
from .persisters._base import Persister, ReleaseWatch, resolved_within

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "DEFAULT_LOCK_EXPIRE_SECONDS",
    "Flight",
    "LockState",
    "RenewTicket",
    "Signal",
    "Terms",
    "Waiting",
    "hold_of",
    "holder_seen",
    "holds",
    "holds_seen",
    "validate_wait",
]

#: Five minutes, the seed's example: a crashed holder never wedges a name for
#: good, and longer jobs opt into ``auto_renew=True`` or a longer lease.
DEFAULT_LOCK_EXPIRE_SECONDS = 300.0
#: How long a waiter's place in a fair store's queue lasts unless its next attempt
#: renews it. Waiters try again at least every 2 s (the safety poll), so three of
#: those: a waiter that died holds up the name for a few seconds at most.
QUEUE_PLACE_SECONDS = 6.0
#: While waiting on a store that notifies, still look again this often (a lost
#: notification costs at most this much).
NOTIFY_SAFETY_POLL = 2.0
#: A holder whose end has passed by this host's clock while the store still shows it
#: (the clocks differ a little): a wait until free looks again this soon, not in a busy loop.
OVERDUE_LOOK_SECONDS = 0.25

UNSET: Any = object()


def queued_behind_message(name: str) -> str:
    """Why a waiter on a fair store was refused a free name."""
    return f"lock {name!r} is free and passes to a waiter that asked first"


def validate_wait(wait: object) -> float:
    """``lock(wait=...)``: None or zero for one attempt, else seconds (``math.inf`` waits for good)."""
    if wait is None:
        return 0.0
    if isinstance(wait, bool) or not isinstance(wait, (int, float)):
        raise TypeError(f"wait must be a number of seconds or None, not {type(wait).__name__}")
    if math.isnan(wait) or wait < 0:
        raise ValueError(f"wait must be zero or more seconds, not {wait!r}")
    return float(wait)


def resolve_persister(persister: Persister | str | None) -> Persister:
    from . import persisters

    if persister is None:
        return persisters.Sqlite()
    if isinstance(persister, str):
        return persisters.from_url(persister)
    if not isinstance(persister, Persister):
        raise TypeError(f"persister must be a Persister, a store URL or None, not {type(persister).__name__}")
    return persister


_R = TypeVar("_R")


def call_store(persister: Persister, method: Callable[..., _R], *args: Any) -> _R:
    """One blocking store call; a driver error that leaked out of a persister becomes ``PersisterError``."""
    try:
        return method(*args)
    except SingletonError:
        raise
    except Exception as error:
        raise PersisterError(persister.backend, f"{type(error).__name__}: {error}") from error


def holds(record: LockRecord | None, owner_token: str) -> bool:
    """Whether the store's ``record`` is a live hold of ``owner_token`` (a lock released into its minimum hold is not)."""
    return record is not None and record.owner_token == owner_token and not record.released


def hold_of(records: list[LockRecord], owner_token: str) -> LockRecord | None:
    """``owner_token``'s hold among a name's holds (``Persister.holders``), if the store still shows it."""
    return next((record for record in records if record.owner_token == owner_token), None)


def store_error(persister: Persister, error: Exception) -> Exception:
    """The async twin of ``call_store``'s translation."""
    if isinstance(error, SingletonError):
        return error
    wrapped = PersisterError(persister.backend, f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


async def acall_store(persister: Persister, call: Awaitable[_R]) -> _R:
    """``call_store`` for coroutines: await one store call, its leaked driver error translated alike."""
    try:
        return await call
    except Exception as error:
        translated = store_error(persister, error)
        if translated is error:
            raise
        raise translated from error


# -- what an acquire asks for, and how a wait goes ---------------------------------------


@dataclass(frozen=True)
class Terms:
    """What every acquire of one name asks of its store, validated once before any I/O.

    Shared by ``LockState`` (a ``Singleton``'s hold) and the detached leases, so
    both check their options alike and call ``Persister.acquire`` alike.
    """

    name: str
    persister: Persister
    lock_expire_seconds: float | None
    metadata: Mapping[str, str]
    min_hold_seconds: float | None
    limit: int = 1

    @classmethod
    def of(
        cls,
        name: object,
        persister: Persister | str | None,
        *,
        lock_expire_seconds: object = UNSET,
        metadata: object = None,
        min_hold_seconds: object = None,
        limit: object = 1,
    ) -> Terms:
        """Validate every option; one the store cannot keep (a minimum hold, ``limit`` > 1) is refused here, not at the acquire."""
        checked_name = _record.validate_name(name)
        ttl = _record.validate_ttl(DEFAULT_LOCK_EXPIRE_SECONDS if lock_expire_seconds is UNSET else lock_expire_seconds)
        checked_metadata = _record.validate_metadata(metadata)
        min_hold = _record.validate_min_hold(min_hold_seconds)
        checked_limit = _record.validate_limit(limit)
        store = resolve_persister(persister)
        if min_hold is not None and not store.supports_min_hold:
            raise ValueError(
                f"min_hold_seconds needs a persister that keeps a minimum hold; "
                f"{type(store).__name__} ({store.backend}) does not (supports_min_hold is False)"
            )
        if checked_limit > 1 and not store.limits:
            raise ValueError(
                f"limit={checked_limit} needs a persister that keeps several holds of a name; "
                f"{type(store).__name__} ({store.backend}) does not (limits is False)"
            )
        return cls(checked_name, store, ttl, checked_metadata, min_hold, checked_limit)

    def owner(self, owner_token: str | None = None) -> Owner:
        """Who asks: a new random token unless the caller brings its own."""
        if owner_token is None:
            return Owner(metadata=self.metadata)
        return Owner(owner_token=_record.validate_owner_token(owner_token), metadata=self.metadata)

    def acquire_call(self, owner: Owner, waiting_for: float | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments of ``Persister.acquire``: ``min_hold`` only when set and ``queue_for`` only
        for a waiter on a fair store (third parties may lack either)."""
        extra: dict[str, Any] = {"queue_for": max(min(waiting_for, QUEUE_PLACE_SECONDS), 0.001)} \
            if waiting_for is not None and self.persister.fair else {}
        if self.limit > 1:
            extra["limit"] = self.limit
        if self.min_hold_seconds is None:
            return (self.name, owner, self.lock_expire_seconds), extra
        return (self.name, owner, self.lock_expire_seconds, self.min_hold_seconds), extra

    def lock_info(self, follows_hold: bool) -> metrics.LockInfo:
        """What the metrics say this lock is: its name and its store's kind (a URL scheme)."""
        store = self.persister.backend
        return metrics.LockInfo(self.name, _STORE_KINDS.get(store, store), self.metadata, follows_hold)

    def acquirer(self, owner: Owner) -> Callable[[float | None], AcquireResult]:
        """One blocking acquire by ``owner``, for ``wait_turn``; queued for ``waiting_for`` s on a fair store."""
        return lambda waiting_for: self._acquire(self.persister.acquire, owner, waiting_for)

    def async_acquirer(self, owner: Owner) -> Callable[[float | None], Awaitable[AcquireResult]]:
        """``acquirer`` for ``await_turn``."""
        return lambda waiting_for: self._acquire(self.persister.aacquire, owner, waiting_for)

    def _acquire(self, method: Callable[..., _R], owner: Owner, waiting_for: float | None) -> _R:
        args, extra = self.acquire_call(owner, waiting_for)
        return method(*args, **extra)


#: A persister's ``backend`` -> its kind in the metrics, the scheme of its usual URL.
_STORE_KINDS = {"postgres": "postgresql"}


def measure(method: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Hand one measurement to the process's recorder; a broken recorder must not break locking."""
    try:
        method(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a recorder's bug is logged, never the lock's failure
        logger.exception("the metrics recorder failed; the lock is unaffected")


def holder_seen(record: LockRecord | None) -> AcquireResult:
    """A look at a name's holder, as a refused attempt, so a wait until free follows the same rules.

    ``retry_after`` is when the holder's lease (or minimum hold) ends by this host's
    clock: ``get`` carries no store time, and this only shortens a pause.
    """
    if record is None or record.expires_at is None:
        return AcquireResult(False, record)
    left = record.expires_at.timestamp() - time.time()
    return AcquireResult(False, record, retry_after=left if left > 0 else OVERDUE_LOOK_SECONDS)


def holds_seen(records: list[LockRecord], limit: int) -> AcquireResult:
    """A look at a name's holds under ``limit``, as ``holder_seen``: room (no ``record``) while fewer
    than ``limit`` are live; else the holds, looked at again when the first of them can end."""
    if len(records) < limit:
        return AcquireResult(False, None)
    ends = [record.expires_at.timestamp() for record in records if record.expires_at is not None]
    left = min(ends) - time.time() if ends else None
    retry = None if left is None else left if left > 0 else OVERDUE_LOOK_SECONDS
    return AcquireResult(False, records[0], retry_after=retry, holders=tuple(records))


class Waiting:
    """The rules of one wait for a name, with no I/O; each face's waiting loop follows them.

    ``to_take``: attempts to acquire, queued on a fair store under the owner token
    (the waiter's place); over once acquired. ``until_free``: looks only, never
    queued and never holding; over once nobody holds the name, and it may look
    less often (``poll_interval``) as it keeps no queue place alive. Either is over
    at its deadline, or after one attempt when it does not wait.
    """

    def __init__(self, persister: Persister, name: str, wait: float, owner_token: str | None,
                 poll_interval: float | None = None, info: metrics.LockInfo | None = None) -> None:
        self.persister = persister
        self.info = info  # None: a wait that takes nothing, so the metrics leave it out
        self.started = time.monotonic()
        self.name = name
        self.poll_interval = poll_interval  # None: the store's, or the safety poll where it notifies
        self.once = wait <= 0
        self.deadline = time.monotonic() + wait
        self.owner_token = owner_token  # None: a wait until free
        #: The token the release watch is opened with: a place in the store's queue, or None.
        self.queue_token = owner_token if owner_token is not None and persister.fair and not self.once else None
        self.taken = False  # the store handed this waiter the name (which drops its place)

    @classmethod
    def to_take(cls, terms: Terms, wait: float, owner_token: str, info: metrics.LockInfo) -> Waiting:
        return cls(terms.persister, terms.name, wait, owner_token, info=info)

    @classmethod
    def until_free(cls, persister: Persister, name: str, wait: float, poll_interval: object = None) -> Waiting:
        return cls(persister, name, wait, None, _record.validate_ttl(poll_interval, "poll_interval"))

    # -- what the metrics hear: the waiting loops call these, once per wait --------------

    def begin(self) -> None:
        self.started = time.monotonic()
        if self.info is not None and (recorder := metrics.active()) is not None:
            measure(recorder.attempted, self.info)

    def ended(self, result: AcquireResult, cancelled: bool = False) -> AcquireResult:
        """The wait ended with ``result`` (``cancelled``: its ``cancel`` event was set); returns it."""
        if self.info is not None:
            self._measure_end(result, "cancelled" if cancelled else None)
        return result

    def failed(self, error: BaseException) -> None:
        """The wait raised: a store error, or a cancellation (``CancelledError``, ``KeyboardInterrupt``)."""
        if self.info is not None:
            self._measure_end(None, "error" if isinstance(error, Exception) else "cancelled")

    def _measure_end(self, result: AcquireResult | None, reason: metrics.Reason | None) -> None:
        recorder, info = metrics.active(), self.info
        if recorder is None:
            return
        if result is not None and result.acquired:
            measure(recorder.acquired, info, takeover=result.expired is not None)
        else:
            measure(recorder.not_acquired, info, reason=reason or self._refusal(result))
        measure(recorder.waited, info, time.monotonic() - self.started)

    def _refusal(self, result: AcquireResult | None) -> metrics.Reason:
        if not self.once:
            return "timeout"
        record = result.record if result is not None else None
        return "slot_ran" if record is not None and record.released else "held"

    def waiting_for(self) -> float | None:
        """``Terms.acquire_call``'s ``waiting_for``: the seconds left while waiting, None for one attempt."""
        return None if self.once else max(self.deadline - time.monotonic(), 0.0)

    def answer(self, result: AcquireResult) -> AcquireResult:
        """Note the store's answer; a refusal that names our own live hold is that hold.

        Stores differ there (some report a retried acquire as acquired, others as a
        conflict with our own record); a lease taken again by its owner must not wait
        for itself until its own lease ends, so every store answers as the first kind.
        """
        if result.acquired:
            self.taken = True
        elif self.owner_token is not None and holds(result.record, self.owner_token):
            return AcquireResult(True, result.record)
        return result

    def over(self, result: AcquireResult) -> bool:
        if result.acquired or (self.owner_token is None and result.record is None):
            return True
        return self.once or time.monotonic() >= self.deadline

    def pause(self, watch: ReleaseWatch, result: AcquireResult, asynchronous: bool) -> float:
        """How long to wait before the next attempt: until woken, the next safety poll, or the holder's known end."""
        persister = self.persister
        notifies = persister.notifies and (not asynchronous or watch.wakes_coroutines)
        # Polls are jittered: waiters that started together would otherwise all wake together,
        # and each round would hand the name to one of them only.
        if notifies:
            poll = NOTIFY_SAFETY_POLL if self.poll_interval is None else self.poll_interval
        else:
            poll = (persister.poll_interval if self.poll_interval is None else self.poll_interval) \
                * random.uniform(0.5, 1.0)
        pause = min(max(self.deadline - time.monotonic(), 0.0), poll)
        if result.retry_after is not None:
            pause = min(pause, max(result.retry_after, 0.0) + 0.001)
        return pause

    def place_to_leave(self) -> str | None:
        """The queue place to give up as the wait ends: a queued waiter's that the store did not
        hand the name to (taking it drops the place)."""
        return None if self.taken else self.queue_token


# -- waiting primitives usable from threads and coroutines --------------------------


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_signals_guard = threading.Lock()  # one for every Signal: its sections are a few instructions


class Signal:
    """A flag that, once set, stays set; threads ``wait`` and coroutines ``await wait_async``.

    Cheap when nobody waits (the common case): the event and futures are made on demand.
    """

    __slots__ = ("_event", "_flag", "_futures")

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None = None

    def set(self) -> None:
        with _signals_guard:
            self._flag = True
            event, futures, self._futures = self._event, self._futures, None
        if event is not None:
            event.set()
        for loop, future in futures or ():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, future)

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        with _signals_guard:
            if self._flag:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        import asyncio  # here, not at the top: a sync lock never loads asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with _signals_guard:
            if self._flag:
                return True
            if self._futures is None:
                self._futures = []
            self._futures.append(entry)
        try:
            await resolved_within(future, timeout)
        finally:
            with _signals_guard:
                if self._futures is not None and entry in self._futures:
                    self._futures.remove(entry)
        return self._flag


class Flight:
    """One store operation in progress on one object; concurrent callers join it instead of repeating it.

    ``answered`` is set after the first store answer of an acquire (joiners that
    will not wait long still report a real answer); ``done`` when it ends.
    ``value`` None with no ``error`` means the owner was cancelled: join again.
    """

    def __init__(self) -> None:
        self.answered = Signal()
        self.done = Signal()
        self.latest: AcquireResult | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def answer(self, result: AcquireResult) -> None:
        self.latest = result
        self.answered.set()

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.answered.set()
        self.done.set()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class RenewTicket:
    """What a renewal needs to report back: which hold it renewed, and when it was sent."""

    owner_token: str
    generation: int
    sent_at: float


# -- the loss watchdog: one thread for every held lock in the process ---------------------


class _Watchdog:
    """Fires ``lost`` when a lease estimate runs out, whatever an in-flight renewal is doing.

    At most one entry per lock object: an entry that fires early (the lease was
    renewed, or a new hold began) re-arms itself at the object's current deadline.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, weakref.ref[LockState]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, state: LockState, deadline: float) -> None:
        if math.isinf(deadline):
            return
        with self._cond:
            armed = state._watchdog_entry
            if armed is not None and armed <= deadline:
                return  # the earlier entry re-arms itself when it fires
            state._watchdog_entry = deadline
            earliest = self._heap[0][0] if self._heap else math.inf
            heapq.heappush(self._heap, (deadline, next(self._seq), weakref.ref(state)))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="singleton-lease-watchdog", daemon=True)
                self._thread.start()
            elif deadline < earliest:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    if not self._cond.wait(60.0) and not self._heap:
                        self._thread = None
                        return
                deadline, _, ref = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                state = ref()
                if state is not None and state._watchdog_entry == deadline:
                    state._watchdog_entry = None
                else:
                    continue  # a superseded entry, or an object that is gone
            later = state.expire_if_due()
            if later is not None:
                self.arm(state, later)

    def _reset_after_fork(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap = []
        self._thread = None


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog._reset_after_fork)


# -- one lock object's state ------------------------------------------------------------


class TermsView:
    """A lock's terms, read-only, on every object built on them: the lock state, both lock faces, both leases."""

    __slots__ = ()

    def _lock_terms(self) -> Terms:
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The lock's name."""
        return self._lock_terms().name

    @property
    def persister(self) -> Persister:
        """The store the lock lives in."""
        return self._lock_terms().persister

    @property
    def lock_expire_seconds(self) -> float | None:
        """The lease length each acquire or renewal asks for (None: never expires)."""
        return self._lock_terms().lock_expire_seconds

    @property
    def metadata(self) -> Mapping[str, str]:
        """Recorded with the hold and shown to contenders in conflict messages."""
        return self._lock_terms().metadata

    @property
    def min_hold_seconds(self) -> float | None:
        """The name stays held at least this long after it is taken, even once released."""
        return self._lock_terms().min_hold_seconds

    @property
    def limit(self) -> int:
        """How many may hold the name at once (1: one holder); each attempt counts every live hold."""
        return self._lock_terms().limit


def validate_lock_options(
    name: object, options: Mapping[str, Any] | None, lock_expire_seconds: object, auto_renew: object,
    renew_interval: object,
) -> tuple[float | None, float | None]:
    """A lock object's own options, before its store is built: the lease (from the seed's ``options`` too) and
    the renewal interval."""
    _record.validate_name(name)
    if options is not None:  # the seed's options object: {"lockExpireSeconds": 300}
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be a mapping, not {type(options).__name__}")
        unknown = set(options) - {"lockExpireSeconds", "lock_expire_seconds"}
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        if lock_expire_seconds is UNSET:
            lock_expire_seconds = options.get("lockExpireSeconds", options.get("lock_expire_seconds", UNSET))
    if lock_expire_seconds is UNSET:
        lock_expire_seconds = DEFAULT_LOCK_EXPIRE_SECONDS
    ttl = _record.validate_ttl(lock_expire_seconds)
    if not isinstance(auto_renew, bool):
        raise TypeError("auto_renew must be a bool")
    if auto_renew and ttl is None:
        raise ValueError("auto_renew needs a lock_expire_seconds: a lock that never expires has nothing to renew")
    interval = _record.validate_ttl(renew_interval, "renew_interval")
    if interval is None and ttl is not None:
        interval = ttl / 3
    return ttl, interval


class LockState(TermsView, EventEmitter):
    """Everything one lock object knows, and every rule for changing it; no store calls.

    Built from validated terms and options (``validate_lock_options``): the faces own the public signature.
    """

    def __init__(self, terms: Terms, *, auto_renew: bool, renew_interval: float | None, release_on_sigterm: bool) -> None:
        super().__init__()
        self.terms = terms
        self.auto_renew = auto_renew
        self.renew_interval = renew_interval
        self.release_on_sigterm = bool(release_on_sigterm)
        self.info = terms.lock_info(follows_hold=True)
        self._measured: int | None = None  # the generation whose end the metrics have yet to hear
        self._guard = threading.Lock()
        self.hold: LockRecord | None = None  # kept after a deadline loss so release() can still clean up
        self._owner_pid = 0
        self._lost = False
        self.last_holder: LockRecord | None = None
        self.last_holders: tuple[LockRecord, ...] = ()  # under limit=N: every hold the refusal saw
        self.queued_behind = False  # the latest conflict: a free name that went to an earlier waiter
        self._generation = 0
        self._acquired_at = 0.0  # monotonic time the acquire that took the hold was sent
        self._deadline = math.inf  # monotonic time after which the lease may have ended on the store
        self._last_confirmed = 0.0
        self._depth = 0
        self._acquiring: Flight | None = None
        self._releasing: Flight | None = None
        self._stop_renewal: Callable[[], None] | None = None
        self._watchdog_entry: float | None = None  # the deadline of this object's watchdog entry

    # -- reading -----------------------------------------------------------------

    def _lock_terms(self) -> Terms:
        return self.terms

    @property
    def margin(self) -> float:
        """How long before the estimated lease end a silent lock is declared lost."""
        ttl = self.lock_expire_seconds
        if ttl is None:
            return 0.0
        return min(max(float(getattr(self.persister, "call_timeout", 10.0)), 0.0), ttl / 4)

    def owned_here(self) -> bool:
        return self._owner_pid == os.getpid()

    @property
    def held(self) -> bool:
        hold = self.hold
        if hold is None or self._lost or not self.owned_here():
            return False
        if time.monotonic() >= self._deadline and self._releasing is None:
            self.expire_if_due(self._generation)
            return not self._lost
        return True

    @property
    def lost(self) -> bool:
        if not self._lost and self.hold is not None and self._releasing is None and time.monotonic() >= self._deadline:
            self.expire_if_due(self._generation)
        return self._lost

    @property
    def depth(self) -> int:
        return self._depth

    def record(self) -> LockRecord | None:
        return self.hold if self.held else None

    def owner(self) -> Owner:
        return self.terms.owner()

    def state_word(self) -> str:
        return "held" if self.held else ("lost" if self._lost else "free")

    # -- acquiring ---------------------------------------------------------------

    def start_acquire(self) -> tuple[Flight, bool] | None:
        """None when already held; else the flight to run (True) or to join (False)."""
        with self._guard:
            if self.hold is not None and not self._lost and self.owned_here() and time.monotonic() < self._deadline:
                return None
            if self._acquiring is not None:
                return self._acquiring, False
            self._acquiring = Flight()
            return self._acquiring, True

    def pending_release(self) -> Flight | None:
        return self._releasing

    def take_stale_hold(self) -> LockRecord | None:
        """A hold declared lost by its lease estimate still has a token: hand it over once, to release."""
        with self._guard:
            hold = self.hold
            if hold is None or not self._lost or self._releasing is not None or not self.owned_here():
                return None
            self.hold = None
        _process.unregister(self)
        return hold

    def settle(self, result: AcquireResult, sent_at: float, waited: float) -> int | None:
        """Record an acquire's outcome; the new hold's generation, or None on conflict."""
        if not result.acquired:
            self.last_holder = result.record
            self.last_holders = result.holders
            self.queued_behind = result.queued_behind
            if result.queued_behind:
                message = lambda: f"{queued_behind_message(self.name)}{_after(waited)}"  # noqa: E731
            else:
                seen = result.record, result.holders, self.terms.limit
                message = lambda: f"{conflict_message(self.name, *seen)}{_after(waited)}"  # noqa: E731
            self.emit("conflict", message, self.name)
            return None
        record = result.record
        assert record is not None
        with self._guard:
            self._generation += 1
            generation = self._generation
            self.hold = record
            self._owner_pid = os.getpid()
            self._lost = False
            self._acquired_at = self._last_confirmed = sent_at
            self._measured = generation
            # Only a renewing lock is the core's to keep: without auto_renew the loss is learned
            # at release() or verify(), as the caller chose a fixed lease.
            self._deadline = self._deadline_after(sent_at) if self.auto_renew else math.inf
            self._stop_renewal = None
            deadline = self._deadline
        _process.register(self, self.release_on_sigterm)
        _watchdog.arm(self, deadline)
        if result.expired is not None:
            expired = result.expired
            self.emit(
                "expired",
                lambda: f"lock {self.name!r} held by {expired.describe()} had expired and was taken over",
                self.name,
            )
        self.emit("locked", lambda: f"locked {self.name!r} with fencing token {record.fencing_token}", self.name)
        return generation

    def end_acquire(self, flight: Flight, value: Any = None, error: BaseException | None = None) -> None:
        with self._guard:
            if self._acquiring is flight:
                self._acquiring = None
        flight.finish(value, error)

    def locking(self) -> None:
        self.emit("locking", lambda: f"locking {self.name!r}", self.name)

    def acquire_failed(self, flight: Flight, error: BaseException, callback: Callable[..., object] | None) -> None:
        """Our acquire raised: joiners see the error, or try for themselves when it was a cancellation."""
        import asyncio  # here, not at the top: a sync lock never loads asyncio

        if isinstance(error, asyncio.CancelledError):
            self.end_acquire(flight)
            return
        self.end_acquire(flight, error=error)
        if isinstance(error, Exception):
            self.emit("error", error, self.name)
            if callback is not None:
                callback(error, None)

    def joined(self, flight: Flight) -> bool | None:
        """What a joiner of another caller's attempt reports: its outcome, or None to try for itself."""
        value = flight.outcome()
        if value is None:
            return None
        return bool(value) or self.held

    def stop_joining(self, flight: Flight) -> bool:
        """A joiner's own deadline (or cancel) came first: report the latest answer as its conflict."""
        self.settle(flight.latest or AcquireResult(False, None), time.monotonic(), 0.0)
        return False

    def stale_release_failed(self, error: BaseException) -> None:
        logger.debug("releasing the lost hold on %r failed: %s", self.name, type(error).__name__)

    def set_renewal(self, generation: int, stop: Callable[[], None]) -> None:
        """Remember how to stop the renewer of ``generation``; stops it at once if that hold is gone."""
        with self._guard:
            current = (
                generation == self._generation and self.hold is not None and not self._lost and self._releasing is None
            )
            if current:
                self._stop_renewal = stop
        if not current:
            stop()

    def _deadline_after(self, sent_at: float) -> float:
        ttl = self.lock_expire_seconds
        if ttl is None:
            return math.inf
        end = sent_at + ttl
        if self.min_hold_seconds is not None:  # the store keeps the name until hold_until whatever the lease
            end = max(end, self._acquired_at + self.min_hold_seconds)
        return end - self.margin

    def _hold_ended(self, generation: int | None, lost: bool) -> None:
        """Tell the metrics a hold ended (released, or lost); only its first end counts."""
        with self._guard:
            if generation is None or generation != self._measured:
                return
            self._measured = None
            held = time.monotonic() - self._acquired_at
        recorder = metrics.active()
        if recorder is not None:
            measure(recorder.lost if lost else recorder.released, self.info, held_seconds=held)

    def seconds_left(self) -> float:
        """Seconds until this hold is declared lost if nothing gets through (inf when it never expires)."""
        return self._deadline - time.monotonic()

    # -- renewing ----------------------------------------------------------------

    def begin_renew(self, generation: int | None = None) -> RenewTicket | None:
        """A ticket for one renewal call, or None when there is nothing (left) to renew."""
        with self._guard:
            hold = self.hold
            if hold is None or self._lost or self._releasing is not None or not self.owned_here():
                return None
            if generation is not None and generation != self._generation:
                return None
            return RenewTicket(hold.owner_token, self._generation, time.monotonic())

    def renewed(self, ticket: RenewTicket, record: LockRecord | None) -> bool:
        """Apply a renewal's answer; False when renewing should stop.

        An answer that arrives after a release began, or for an earlier hold, is
        ignored: a release racing a renewal is never a loss.
        """
        with self._guard:
            current = (
                self.hold is not None
                and not self._lost
                and self._releasing is None
                and ticket.generation == self._generation
            )
            if not current:
                return False
            if record is not None:
                self.hold = record
                self._last_confirmed = max(self._last_confirmed, ticket.sent_at)
                self._deadline = max(self._deadline, self._deadline_after(ticket.sent_at))
        if record is None:
            self._declare_lost(ticket.generation, "renewal refused: the lock expired or was taken over", forget=True)
            return False
        self.emit(
            "renewed",
            lambda: f"renewed {self.name!r} until {record.expires_at.isoformat() if record.expires_at else 'never'}",
            self.name,
        )
        return True

    def renew_answered(
        self, ticket: RenewTicket, record: LockRecord | None = None, error: BaseException | None = None
    ) -> float | None:
        """A renewer's next pause after a renewal's answer or failure; None to stop renewing."""
        if error is not None:
            return self.renew_failed(ticket, error)
        return (self.renew_interval or 1.0) if self.renewed(ticket, record) else None

    def renew_failed(self, ticket: RenewTicket, error: BaseException) -> float | None:
        """A renewal call failed; seconds to wait before the next try, or None to stop."""
        with self._guard:
            if self._lost or self.hold is None or ticket.generation != self._generation or self._releasing is not None:
                return None  # an answer for a hold already given up: not worth an error event
            left = self._deadline - time.monotonic()
        self.emit("error", error, self.name)
        if left <= 0:
            self.expire_if_due(ticket.generation)
            return None
        return min(self.renew_interval or 1.0, max(left / 3, 0.05))

    def expire_if_due(self, generation: int | None = None) -> float | None:
        """Declare the hold lost once its lease estimate ran out; the later deadline if it was renewed meanwhile."""
        with self._guard:
            if generation is None:
                generation = self._generation
            if generation != self._generation or self.hold is None or self._lost:
                return None
            if self._releasing is not None:
                return time.monotonic() + 0.05  # the release decides; look again soon in case it fails
            if time.monotonic() < self._deadline:
                return self._deadline
            silent = time.monotonic() - self._last_confirmed
        self._declare_lost(
            generation,
            f"no renewal got through for {silent:.1f} s, so the lease may have ended on the store "
            f"(declared {self.margin:g} s before the estimated end of the {self.lock_expire_seconds:g} s lease)",
            forget=False,
        )
        return None

    def _declare_lost(self, generation: int, why: str, *, forget: bool) -> None:
        with self._guard:
            if generation != self._generation or self.hold is None or self._lost:
                return
            self._lost = True
            self._depth = 0
            stop, self._stop_renewal = self._stop_renewal, None
            if forget:  # the store said it is not ours: nothing left to release
                self.hold = None
        if stop is not None:
            stop()
        if forget:
            _process.unregister(self)
        self._hold_ended(generation, lost=True)
        self.emit("lost", lambda: f"exclusivity on lock {self.name!r} was lost: {why}", self.name)

    def verified(self, hold: LockRecord, current: LockRecord | None) -> bool:
        """Apply what ``verify`` read from the store."""
        if holds(current, hold.owner_token):
            return True
        with self._guard:
            generation = self._generation if self.hold is hold else -1
        self._declare_lost(generation, "the store no longer shows this owner's lock", forget=True)
        return False

    # -- releasing ---------------------------------------------------------------

    def begin_release(self) -> tuple[Flight, LockRecord | None]:
        """The release flight and the hold to release; no hold: join the flight (a finished one when nothing is held)."""
        with self._guard:
            if self._releasing is not None:
                return self._releasing, None
            hold = self.hold
            if hold is not None and self.owned_here():
                flight = Flight()
                flight.latest = hold  # type: ignore[assignment]
                self._releasing = flight
                self._depth = 0
                stop, self._stop_renewal = self._stop_renewal, None
            else:
                hold = None
        if hold is None:
            self.nothing_to_release()
            nothing = Flight()
            nothing.finish(False)
            return nothing, None
        if stop is not None:
            stop()
        return flight, hold

    def released(self, flight: Flight, hold: LockRecord, confirmed: bool, reason: str) -> bool:
        """Apply the store's answer to our release; returns it."""
        with self._guard:
            was_lost = self._lost
            ending = self._generation if self.hold is hold else None
            if self.hold is hold:
                self.hold = None
                if not confirmed:
                    self._lost = True
            if self._releasing is flight:
                self._releasing = None
        _process.unregister(self)
        if confirmed:
            if hold.hold_until is not None and self.min_hold_seconds is not None:
                until = hold.hold_until.isoformat(timespec="seconds")
                self.emit(
                    "released",
                    lambda: (
                        f"released {self.name!r} ({reason}); the name stays held until {until} for the minimum hold"
                    ),
                    self.name,
                )
            else:
                self.emit("released", lambda: f"released {self.name!r} ({reason})", self.name)
        else:
            if not was_lost:
                self.emit(
                    "lost",
                    lambda: f"exclusivity on lock {self.name!r} was lost: it expired or was taken over before release",
                    self.name,
                )
            self.emit("released", lambda: f"{self.name!r} was no longer ours; left to its new holder", self.name)
        self._hold_ended(ending, lost=not confirmed)
        flight.finish(confirmed)
        return confirmed

    def release_failed(self, flight: Flight, error: BaseException) -> None:
        """The release call failed: keep the token so ``release()`` can be retried."""
        with self._guard:
            if self._releasing is flight:
                self._releasing = None
        self.emit("error", error, self.name)
        flight.finish(error=error)

    def nothing_to_release(self) -> None:
        self.emit("released", lambda: f"{self.name!r} was not held; nothing to release", self.name)

    def exit_snapshot(self) -> LockRecord | None:
        """For exit and SIGTERM: the hold to release, bypassing flights (their thread may be the one interrupted)."""
        with self._guard:
            hold = self.hold
            if hold is None or not self.owned_here():
                return None
            stop, self._stop_renewal = self._stop_renewal, None
        if stop is not None:
            stop()
        return hold

    def exit_released(self, hold: LockRecord, confirmed: bool, reason: str) -> None:
        with self._guard:
            ending = self._generation if self.hold is hold else None
            if self.hold is hold:
                self.hold = None
                self._depth = 0
        _process.unregister(self)
        self._hold_ended(ending, lost=not confirmed)
        if confirmed:
            self.emit("released", lambda: f"released {self.name!r} ({reason})", self.name)

    # -- reentrancy (filelock's model: the outermost exit releases) ---------------

    def enter(self) -> None:
        with self._guard:
            self._depth += 1

    def leave(self) -> bool:
        """One ``with`` block ends; True when it was the outermost and the lock should be released."""
        with self._guard:
            self._depth = max(self._depth - 1, 0)
            return self._depth == 0


def _after(waited: float) -> str:
    return f" after waiting {waited:g} s" if waited else ""
