"""The persister interface: the few atomic primitives a store must provide.

``Singleton`` owns everything else (waiting, events, renewal, signals), so a new
backend is a handful of methods. Each primitive is one atomic step on the store
and judges expiry by the store's clock. Run
``singleton_integrations.testing.conformance`` against a new persister to prove it.

Every primitive has an async twin (``aacquire`` for ``acquire`` and so on). A
persister that only writes the sync ones still serves ``AsyncSingleton``: the
defaults here run them in this project's own bounded executor, never in
asyncio's default pool. Built-in persisters override them with native async
drivers and say so with ``native_async = True``.

Waiting: a persister that can hear releases (pub/sub, LISTEN, change streams)
keeps ONE subscription per process in a ``ReleaseHub``, shared by every waiter,
sync or async; ``watch(name)`` hands out a ``ReleaseWatch`` on it.

Fair waiting (``fair = True``): waiters queue in the store, so a free name goes to
whoever has waited longest, across processes and hosts, and a releaser that asks
again at once does not take it back from them. The queue only orders waiters; the
lock's exclusivity never depends on it.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import secrets
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar
from urllib.parse import parse_qsl

from .._errors import PersisterError
from .._record import AcquireResult, LockRecord, Owner

if TYPE_CHECKING:
    # Imported where used: a sync lock in a fresh process (an orchestrator's task) never pays for them.
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from typing_extensions import Self

__all__ = [
    "BLOCKING_IO_WORKERS",
    "CAPABILITIES",
    "DEFAULT_PURGE_AFTER_SECONDS",
    "ClientRegistry",
    "ErrorTranslation",
    "HubWatch",
    "Persister",
    "ReleaseHub",
    "ReleaseWatch",
    "SleepWatch",
    "SweepSchedule",
    "name_prefix",
    "option_retention",
    "option_seconds",
    "option_whole_number",
    "positive_seconds",
    "purge_period",
    "retention_seconds",
    "run_blocking",
    "url_options",
    "whole_number",
]

_logger = logging.getLogger("singleton_integrations")
_T = TypeVar("_T")
_K = TypeVar("_K")

#: A name's stored state (its fencing counter) is purged after it has been free
#: this long: 30 days. ``None`` keeps every name's state for good.
DEFAULT_PURGE_AFTER_SECONDS: float = 30 * 86400.0
#: Threads in the executor that serves sync-only persisters to async callers.
BLOCKING_IO_WORKERS = 16

_executor: ThreadPoolExecutor | None = None
_executor_guard = threading.Lock()


def _blocking_executor() -> ThreadPoolExecutor:
    from concurrent.futures import ThreadPoolExecutor

    global _executor
    with _executor_guard:
        if _executor is None:
            _executor = ThreadPoolExecutor(BLOCKING_IO_WORKERS, thread_name_prefix="singleton-io")
        return _executor


async def run_blocking(func: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking store call in this project's bounded executor, off the event loop.

    Never asyncio's default pool: a busy default pool is what starved waiters before.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_blocking_executor(), functools.partial(func, *args))


def _log_force_release(persister: Persister, name: str, removed: LockRecord | None) -> LockRecord | None:
    if removed is not None:
        _logger.warning("force-released lock %r held by %s (%s)", name, removed.describe(), persister.backend)
    else:
        _logger.info("force release of lock %r found no live holder (%s)", name, persister.backend)
    return removed


def _logged_force_release(method: Callable[[Persister, str], LockRecord | None]) -> Callable[[Persister, str], LockRecord | None]:
    """Every forced release leaves a warning naming the lock and whom it was taken from."""

    @functools.wraps(method)
    def force_release(self: Persister, name: str) -> LockRecord | None:
        return _log_force_release(self, name, method(self, name))

    force_release.__logged__ = True  # type: ignore[attr-defined]
    return force_release


def _logged_aforce_release(
    method: Callable[[Persister, str], Coroutine[Any, Any, LockRecord | None]],
) -> Callable[[Persister, str], Coroutine[Any, Any, LockRecord | None]]:
    """The async twin of ``_logged_force_release``."""

    @functools.wraps(method)
    async def aforce_release(self: Persister, name: str) -> LockRecord | None:
        return _log_force_release(self, name, await method(self, name))

    aforce_release.__logged__ = True  # type: ignore[attr-defined]
    return aforce_release


class ReleaseWatch:
    """A subscription to releases of one name, opened before the acquire attempt.

    Opening it first is what makes waiting lose no wake-up: a release that
    happens between a failed attempt and ``wait()`` is remembered, and the next
    ``wait`` returns at once.
    """

    #: True when ``wait_async`` is woken by releases (the default only sleeps, a poll).
    #: A subclass that overrides ``wait_async`` without declaring it is taken to be woken
    #: (what the core inferred from the override before this flag existed).
    wakes_coroutines: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "wait_async" in cls.__dict__ and "wakes_coroutines" not in cls.__dict__:
            cls.wakes_coroutines = True

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True when woken because the name may be free.

        True is a hint, never a promise: the caller tries the store again. A watch is
        woken by a release of its name, and once after each (re)subscription that may
        have missed one (see ``ReleaseHub.ready``); a release of another name never wakes it.
        """
        raise NotImplementedError

    async def wait_async(self, timeout: float) -> bool:
        """``wait`` for coroutines: holds no thread. The default sleeps (a poll)."""
        import asyncio

        await asyncio.sleep(max(timeout, 0.0))
        return False

    def close(self) -> None:
        """Drop the subscription."""


class SleepWatch(ReleaseWatch):
    """The fallback for stores that cannot notify: a bounded, interruptible sleep."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(max(timeout, 0.0))
        self._event.clear()
        return woken

    def notify(self) -> None:
        self._event.set()


class HubWatch(ReleaseWatch):
    """One waiter's view of a ``ReleaseHub``: a remembered wake-up, for threads and coroutines alike."""

    wakes_coroutines: ClassVar[bool] = True

    def __init__(self, hub: ReleaseHub, name: str, owner_token: str | None = None) -> None:
        self.hub = hub
        self.name = name
        self.owner_token = owner_token  # a queued waiter's: a release names the queue's head
        self._event = threading.Event()
        self._guard = threading.Lock()
        self._futures: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._closed = False

    def wake(self) -> None:
        """Called by the hub (any thread): remember the wake-up and rouse whoever waits."""
        with self._guard:
            self._event.set()
            futures = list(self._futures)
        for loop, future in futures:
            with suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, future)

    def _consume(self) -> bool:
        with self._guard:
            woken = self._event.is_set()
            self._event.clear()
            return woken

    def wait(self, timeout: float) -> bool:
        if self._event.wait(max(timeout, 0.0)):
            return self._consume() or True
        return self._consume()

    async def wait_async(self, timeout: float) -> bool:
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._guard:
            if self._event.is_set():
                self._event.clear()
                return True
            self._futures.add(entry)
        try:
            await resolved_within(future, timeout)
        finally:
            with self._guard:
                self._futures.discard(entry)
        return self._consume()

    @property
    def pending(self) -> bool:
        """A wake-up arrived that no ``wait`` has taken yet."""
        return self._event.is_set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hub.discard(self)
            if self._event.is_set():  # woken but leaving without trying: hand the wake-up on
                self.hub.notify(self.name)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def resolved_within(future: asyncio.Future[None], timeout: float | None) -> None:
    """Wait until ``future`` is resolved or ``timeout`` seconds pass (None: no limit); a cancel always raises.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the result, swallowing the
    cancel, when the future is resolved (a wake-up) in the same loop turn as the task
    is cancelled, and a cancelled wait then went on waiting.
    """
    import asyncio

    timer = None if timeout is None else asyncio.get_running_loop().call_later(max(timeout, 0.0), _resolve, future)
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()


#: ``listen(hub, stop)``: subscribe, call ``hub.ready()``, then ``hub.notify(name)`` per
#: release heard, until ``stop`` is set; return or raise to be restarted.
Listener = Callable[["ReleaseHub", threading.Event], None]

_hubs: weakref.WeakSet[ReleaseHub] = weakref.WeakSet()


class ReleaseHub:
    """One release subscription per persister and process, fanned out to every waiter.

    With a ``listen`` function, the hub runs it in one daemon thread while anyone
    watches (and ``idle_seconds`` after, so back-to-back waits reuse it). Without
    one, only in-process releases wake waiters (``notify`` from the releasing
    call); waiters still poll for the rest. Each (re)subscription is followed by
    ``ready()``, which wakes every waiter: a release in the gap is never lost,
    only answered by one extra attempt.

    A release wakes ONE waiter of the name in this process, the longest waiting:
    only one can take the name, and waking all of them made every release cost
    a round trip per waiter (100 async waiters: a 48-277 ms release, loop lag
    p99 above 80 ms). A woken waiter that leaves without trying hands the
    wake-up on, so none is lost.
    """

    def __init__(self, listen: Listener | None = None, *, thread_name: str = "singleton-release-listener",
                 idle_seconds: float = 30.0, retry_seconds: float = 0.5) -> None:
        self._listen = listen
        self._thread_name = thread_name
        self._idle_seconds = idle_seconds
        self._retry_seconds = retry_seconds
        self._guard = threading.Lock()
        self._watches: dict[str, dict[HubWatch, None]] = {}  # insertion order: longest waiting first
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle_since: float | None = None  # when the last waiter left, while the listener runs on
        self._unqueued = 0  # watches without an owner token: they need every release of their name
        self.subscribed = threading.Event()
        #: This hub's address in its store: a release names it when its head waits here.
        self.id = secrets.token_hex(16)
        _hubs.add(self)

    def watch(self, name: str, owner_token: str | None = None) -> HubWatch:
        """Register a waiter for ``name`` (queued as ``owner_token``, if given); starts the listener."""
        watch = HubWatch(self, name, owner_token)
        with self._guard:
            self._watches.setdefault(name, {})[watch] = None
            self._unqueued += owner_token is None
            self._idle_since = None
            if self._listen is not None and (self._thread is None or not self._thread.is_alive()):
                self._stop = threading.Event()
                self.subscribed.clear()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name=self._thread_name, daemon=True)
                self._thread.start()
        return watch

    def discard(self, watch: HubWatch) -> None:
        with self._guard:
            waiting = self._watches.get(watch.name)
            if waiting is not None and watch in waiting:
                del waiting[watch]
                self._unqueued -= watch.owner_token is None
                if not waiting:
                    del self._watches[watch.name]
            if not self._watches and self._thread is not None and self._idle_since is None:
                # Not a timer thread per wait: one reaper serves every hub (a wait cycle stays cheap).
                self._idle_since = time.monotonic()
                _reaper.remind(self._idle_seconds)

    def names(self) -> frozenset[str]:
        """The names someone in this process waits for now."""
        with self._guard:
            return frozenset(self._watches)

    @property
    def wants_every_release(self) -> bool:
        """True while a waiter here is not queued (it watches for a free name, or its store call
        cannot queue), so the listener must hear every release, not only those naming this hub."""
        return self._unqueued > 0

    def notify(self, name: str, head: str | None = None, *, unqueued: bool = True) -> None:
        """A release of ``name``: wake whoever should try next (thread-safe; cheap when nobody waits).

        Without ``head``, that is the longest-waiting waiter not woken yet. With
        ``head`` (the owner token first in the store's queue), it is that waiter if
        it waits here and, with ``unqueued``, the longest-waiting unqueued one: the
        other queued waiters would only be refused.
        """
        with self._guard:
            group = self._watches.get(name, ())
            if head:
                targets = [watch for watch in group if watch.owner_token == head]
                if unqueued:
                    other = next((watch for watch in group if watch.owner_token is None and not watch.pending), None)
                    if other is not None:
                        targets.append(other)
            else:
                targets = [watch for watch in group if not watch.pending][:1]
        for watch in targets:
            watch.wake()

    def notify_all(self, *, queued: bool = True) -> None:
        """Wake every waiter: the subscription had a gap and may have missed releases.

        ``queued=False`` wakes only the unqueued ones, for a gap that only they could fall
        into (a queued waiter's release names it on a channel that stayed subscribed).
        """
        with self._guard:
            targets = [watch for group in self._watches.values() for watch in group
                       if queued or watch.owner_token is None]
        for watch in targets:
            watch.wake()

    def ready(self) -> None:
        """The listener calls this once subscribed (again after each reconnect).

        ``subscribed`` is set before the waiters are woken, so a woken waiter's next
        attempt already sees the subscription (PostgreSQL leaves its waiter's hint only
        then). So ``subscribed`` being set does not mean that wake-up has reached every
        waiter yet: whoever must see it waits for the wake-up itself.
        """
        self.subscribed.set()
        self.notify_all()

    def close(self) -> None:
        """Stop the listener thread; waiters fall back to their safety polls."""
        with self._guard:
            self._stop.set()
            self._idle_since = None
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def stop_if_idle(self, now: float) -> float | None:
        """Stop the listener if nobody has waited for ``idle_seconds``; else when to look again."""
        with self._guard:
            if self._watches or self._idle_since is None:
                return None
            due = self._idle_since + self._idle_seconds
            if now < due:
                return due
            self._idle_since = None
            self._stop.set()
            self._thread = None
            return None

    def _run(self, stop: threading.Event) -> None:
        assert self._listen is not None
        while not stop.is_set():
            try:
                self._listen(self, stop)
            except Exception as error:  # noqa: BLE001 - a dropped connection, whatever the driver calls it: resubscribe after a pause
                _logger.debug("release listener %s failed, resubscribing: %s", self._thread_name, type(error).__name__)
            self.subscribed.clear()
            stop.wait(self._retry_seconds)

    def _reset_after_fork(self) -> None:
        # The listener thread did not survive the fork; the parent's waiters are not ours.
        self._guard = threading.Lock()
        self._watches = {}
        self._thread = None
        self._idle_since = None
        self._unqueued = 0
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self.id = secrets.token_hex(16)  # releases naming the parent's hub are not ours



# -- what every store shares: checked numbers, URL options, error translation, one client per configuration --

#: The words a URL option takes for "no value" (``purge_after_seconds=none`` keeps every name's state).
_NONE_WORDS = frozenset(("none", "null", "never", ""))


def positive_seconds(value: object, what: str) -> float:
    """``value`` as a positive, finite number of seconds (an int or a float, not a bool).

    Every store checks its numeric options here, so a bad one raises the same
    error everywhere: ``ValueError``, whatever is wrong with it (its type too).
    Text is refused: a URL's query goes through ``option_seconds``.

    >>> positive_seconds(2, "timeout")
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a positive number of seconds, not {type(value).__name__} {value!r}")
    number = float(value)
    if not 0 < number < float("inf"):  # also refuses NaN
        raise ValueError(f"{what} must be a positive, finite number of seconds, not {value!r}")
    return number


def retention_seconds(value: object, what: str = "purge_after_seconds") -> float | None:
    """``purge_after_seconds``: None keeps every name's state for good, else ``positive_seconds``."""
    return None if value is None else positive_seconds(value, what)


def name_prefix(prefix: object) -> str:
    """``list(prefix)``'s argument, checked before any I/O: plain text (never a pattern), else ``TypeError``."""
    if not isinstance(prefix, str):
        raise TypeError(f"a name prefix must be a str, not {type(prefix).__name__}")
    return prefix


def purge_period(after: object, purge_after_seconds: float | None) -> float:
    """``purge(after=)``'s period: ``after`` (checked as ``positive_seconds``), else the store's own.

    A store built with ``purge_after_seconds=None`` keeps every name's state, so
    ``purge()`` without ``after`` is refused there (``ValueError``).
    """
    period = purge_after_seconds if after is None else positive_seconds(after, "after")
    if period is None:
        raise ValueError("purge_after_seconds is None: this store keeps every name's state")
    return period


class SweepSchedule:
    """When a release runs the retention sweep of a table: at most once every ``every`` seconds per process.

    One per shared client (every persister object of one configuration), so a
    hundred objects sweep as one. Thread-safe.
    """

    def __init__(self, every: float = 600.0) -> None:
        self.every = every
        self._guard = threading.Lock()
        self._due: dict[str, float] = {}

    def due(self, where: str) -> bool:
        """True when a sweep of ``where`` is due, and the next one is then put off by ``every``."""
        now = time.monotonic()
        with self._guard:
            if self._due.get(where, 0.0) > now:
                return False
            self._due[where] = now + self.every
        return True


def _read(text: str, convert: Callable[[str], _T], what: str, kind: str) -> _T:
    """A URL query's text read by ``convert``; text it cannot read says what was wanted."""
    try:
        return convert(text)
    except ValueError:
        raise ValueError(f"{what} must be {kind}, not {text!r}") from None


def option_seconds(text: str, what: str) -> float:
    """A URL query's number of seconds (``timeout=2.5``), checked as ``positive_seconds``."""
    return positive_seconds(_read(text, float, what, "a number of seconds"), what)


def option_retention(text: str, what: str = "purge_after_seconds") -> float | None:
    """A URL query's retention: a number of seconds, or ``none`` to keep every name's state."""
    return None if text.strip().lower() in _NONE_WORDS else option_seconds(text, what)


def whole_number(value: object, what: str, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum`` (a pool size, milliseconds), not a bool or a float.

    Bad ones raise ``ValueError``, as ``positive_seconds`` does, whatever is wrong with them.

    >>> whole_number(4, "max_size")
    4
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, not {value!r}")
    return value


def option_whole_number(text: str, what: str) -> int:
    """A URL query's int (``max_size=8``), at least 0; the store's constructor checks its own minimum."""
    return whole_number(_read(text, int, what, "an int"), what, 0)


def url_options(query: str, readers: Mapping[str, Callable[[str, str], Any]], where: str) -> dict[str, Any]:
    """A URL's query options, each read by ``readers[key](text, key)``; an unknown one raises ``ValueError``.

    ``where`` names the store in the message (``unknown SQLite URL option 'x'``).
    Keyword options override these: ``{**url_options(...), **keywords}``.

    >>> url_options("timeout=2&purge_after_seconds=none",
    ...             {"timeout": option_seconds, "purge_after_seconds": option_retention}, "SQLite")
    {'timeout': 2.0, 'purge_after_seconds': None}
    """
    options: dict[str, Any] = {}
    for key, text in parse_qsl(query, keep_blank_values=True):
        reader = readers.get(key)
        if reader is None:
            raise ValueError(f"unknown {where} URL option {key!r}; known: {', '.join(sorted(readers))}")
        options[key] = reader(text, key)
    return options


class ErrorTranslation:
    """A store's driver errors raised as ``PersisterError`` (the driver's error its cause), in one place.

    One instance per persister, used as ``with self._errors:`` around each call
    (no allocation per call). ``describe`` makes the message from the driver's
    error and must leave out any password. A ``PersisterError`` passes through.
    """

    __slots__ = ("backend", "describe", "errors")

    def __init__(self, backend: str, errors: type[BaseException] | tuple[type[BaseException], ...],
                 describe: Callable[[BaseException], str]) -> None:
        self.backend, self.errors, self.describe = backend, errors, describe

    def error(self, error: BaseException) -> PersisterError:
        """The ``PersisterError`` for ``error`` (raise it ``from error``)."""
        return PersisterError(self.backend, self.describe(error))

    def failed(self, action: str, error: BaseException) -> PersisterError:
        """The ``PersisterError`` for ``error`` met doing ``action`` (``release 'job'``), which the message names."""
        return PersisterError(self.backend, f"{action} failed: {self.describe(error)}")

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is not None and isinstance(error, self.errors) and not isinstance(error, PersisterError):
            raise self.error(error) from error


_registries: weakref.WeakSet[ClientRegistry[Any, Any]] = weakref.WeakSet()


class ClientRegistry(Generic[_K, _T]):
    """One shared client (connection, pool, hub) per configuration and process, for every persister object.

    Many ``Singleton`` objects built from one URL then cost one client. Thread-safe.
    In a forked child the parent's clients are not the child's to use: by default
    the child starts empty; with ``after_fork``, each kept entry is reset by it
    instead (for entries the persister objects of the parent keep references to).
    """

    def __init__(self, after_fork: Callable[[_T], None] | None = None) -> None:
        self._guard = threading.Lock()
        self._entries: dict[_K, _T] = {}
        self._after_fork = after_fork
        _registries.add(self)

    def get(self, key: _K, make: Callable[[], _T]) -> _T:
        """The entry for ``key``, made by ``make()`` (under the registry's lock) the first time."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = make()
            return entry

    def pop(self, key: _K) -> _T | None:
        """Forget the entry for ``key`` (its owner closes it); None when there was none."""
        with self._guard:
            return self._entries.pop(key, None)

    def values(self) -> list[_T]:
        with self._guard:
            return list(self._entries.values())

    def _reset_after_fork(self) -> None:
        self._guard = threading.Lock()  # another thread may have held it at the fork
        if self._after_fork is None:
            self._entries = {}
        else:
            for entry in self._entries.values():
                self._after_fork(entry)


class _Reaper:
    """One daemon thread that stops the listeners of hubs nobody has waited on for a while."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._due: float | None = None
        self._thread: threading.Thread | None = None

    def remind(self, after: float) -> None:
        with self._wake:
            due = time.monotonic() + after
            if self._due is None or due < self._due:
                self._due = due
                self._wake.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="singleton-hub-reaper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._due is None or (left := self._due - time.monotonic()) > 0:
                    self._wake.wait(None if self._due is None else left)
                self._due = None
            now = time.monotonic()
            later = [due for hub in list(_hubs) if (due := hub.stop_if_idle(now)) is not None]
            if later:
                self.remind(max(min(later) - time.monotonic(), 0.0))

    def _reset_after_fork(self) -> None:
        self._wake = threading.Condition()
        self._due = None
        self._thread = None


_reaper = _Reaper()


def _after_fork_in_child() -> None:
    global _executor, _executor_guard
    _executor = None
    _executor_guard = threading.Lock()
    _reaper._reset_after_fork()
    for hub in list(_hubs):
        hub._reset_after_fork()
    for registry in list(_registries):
        registry._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: The capability flags of ``Persister``: the one way a store says what it can do.
CAPABILITIES = ("distributed", "multiprocess", "notifies", "fair", "supports_min_hold", "native_async", "limits")


class Persister(ABC):
    """Stores locks; every method is one atomic operation judged by the store's clock.

    What a store can do is declared one way: the flags in ``CAPABILITIES``, class
    attributes read on the instance (``persister.fair``). A flag may be a property
    where the answer depends on the configuration (PostgreSQL behind a pooler
    without a LISTEN connection does not notify). The core decides from these flags
    alone, never from which methods a store overrides or what they accept: it
    passes ``min_hold`` only to a store that ``supports_min_hold`` (and only when a
    minimum hold is asked), and ``queue_for``, ``watch(name, owner_token)`` and
    ``leave_queue`` only to a ``fair`` one. A store built from a URL (every plug-in)
    overrides ``from_url``.
    """

    backend: ClassVar[str] = "persister"
    #: True when several hosts can share the store (False for in-memory and SQLite).
    distributed: ClassVar[bool] = False
    #: True when separate processes can share the store (False only for in-memory).
    multiprocess: ClassVar[bool] = True
    #: True when ``watch`` is woken by releases rather than polling.
    notifies: ClassVar[bool] = False
    #: Where expiry is judged, for docs and errors.
    clock: ClassVar[str] = "the store's clock"
    #: Longest pause between polls while waiting when notification is unavailable.
    poll_interval: float = 0.5
    #: True when ``acquire`` honours ``min_hold`` (see ``acquire``); the core refuses
    #: ``min_hold_seconds`` on a persister without it.
    supports_min_hold: ClassVar[bool] = False
    #: True when ``acquire`` takes ``queue_for`` and the store keeps waiters in order (see
    #: ``acquire``), and ``leave_queue`` drops a place; the core passes neither otherwise.
    fair: ClassVar[bool] = False
    #: True when the ``a*`` primitives use a native async driver rather than ``run_blocking``.
    native_async: ClassVar[bool] = False
    #: True when ``acquire`` takes ``limit`` and keeps up to that many holds of a name (see
    #: ``acquire``); the core refuses ``limit > 1`` on a store without it.
    limits: ClassVar[bool] = False
    #: The longest one store call can take (its client-side deadline), in seconds. The
    #: core declares a lock lost this long (at most a quarter of the lease) before the
    #: lease would end when renewals cannot get through.
    call_timeout: float = 10.0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Persister:
        """The persister for ``url``, with keyword ``options`` overriding the URL's query options.

        ``persisters.from_url(url)`` (hence ``Singleton(name, url)``, the command line and
        the Airflow and Prefect integrations) calls this on the class registered for the
        URL's scheme under the ``singleton_integrations.persisters`` entry point group,
        with the whole URL, scheme included. A plug-in must override it, and its version
        must: accept every scheme it is registered under; read its options from the query
        and let a keyword of the same name win; refuse anything it does not know or cannot
        use with ``ValueError`` (``TypeError`` for a wrong type), before any I/O and without
        a password in the message (``redact_url``); and connect to nothing, since the first
        lock operation does. The default refuses: this class was not made to be named by a URL.
        """
        raise NotImplementedError(
            f"{cls.__qualname__} cannot be built from a URL: a persister named by a URL scheme "
            f"must override Persister.from_url(url, **options)")

    def capabilities(self) -> dict[str, bool]:
        """What this store declares it can do: each flag of ``CAPABILITIES`` and its value here."""
        return {flag: bool(getattr(self, flag)) for flag in CAPABILITIES}

    @classmethod  # noqa: B027 - optional: a store with no driver to import keeps this no-op
    def preload(cls) -> None:
        """Import this store's driver now rather than at first use (the default has none).

        For processes that fork short-lived children, such as an Airflow worker:
        each child then inherits the driver instead of paying its import again.
        """

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("force_release")
        if method is not None and not getattr(method, "__logged__", False) and not getattr(method, "__isabstractmethod__", False):
            cls.force_release = _logged_force_release(method)  # type: ignore[method-assign,assignment]  # the subclass's own method, wrapped in place
        amethod = cls.__dict__.get("aforce_release")
        if amethod is not None and not getattr(amethod, "__logged__", False):
            cls.aforce_release = _logged_aforce_release(amethod)  # type: ignore[method-assign,assignment]  # likewise

    @abstractmethod
    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        """Take ``name`` if it is free or expired (replacing the expired lock in the same step).

        A successful acquire mints a fencing token strictly greater than every earlier
        one for ``name``. On conflict, return the live holder's record and, when the
        store knows it, ``retry_after`` (seconds until the name can be free).

        ``min_hold`` (only passed when ``supports_min_hold``): record
        ``hold_until = store now + min_hold``. The name is then free for others only
        once the lease is over or released AND the store's clock has passed
        ``hold_until``, so a crashed holder frees it at the later of the two.

        ``queue_for`` (a keyword, only passed when ``fair``): the caller is waiting for
        the name. If the name is held, keep the caller's place in the name's queue
        (by ``owner.owner_token``, in arrival order) for ``queue_for`` seconds; a later
        attempt with the same token refreshes it. If the name is free, the caller takes
        it only when no earlier live place is queued; otherwise the result is a conflict
        with ``queued_behind=True`` and ``retry_after`` up to the head's place's end.
        Taking the name drops the caller's place. Without ``queue_for`` (a caller that
        does not wait) a free name is taken whatever the queue holds. A release that
        frees the name wakes the queue's head first.

        ``limit`` (a keyword, only passed when ``limits`` and N > 1): the name may have up
        to N live holds, each with its own owner token, all drawing fencing tokens from the
        name's one rising sequence. The step counts every live hold of the name, whatever
        N its holder gave (a hold released into its minimum hold counts until it ends), and
        adds one when fewer than N are live and, with ``queue_for``, the caller is among
        the first (N - live) live places. A refusal reads every live hold into ``holders``
        in the same round trip. An owner token that already holds one gets that hold back.
        A call without ``limit`` refuses while any hold of the name is live.
        """

    @abstractmethod
    def release(self, name: str, owner_token: str) -> bool:
        """Give up ``name`` only if ``owner_token`` still holds it; True when it did.

        Before ``hold_until`` (a minimum hold), a release keeps the record as the
        name's holder, marked ``released_at`` with ``expires_at = hold_until``; the
        token can no longer renew or release it, and no wake-up is sent yet.
        """

    @abstractmethod
    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        """Extend our live lease to ``ttl`` from now (never before ``hold_until``); None when not ours."""

    @abstractmethod
    def get(self, name: str) -> LockRecord | None:
        """The live (unexpired) lock on ``name``, if any, including one released into its minimum hold."""

    def holders(self, name: str) -> builtins.list[LockRecord]:
        """Every live hold of ``name``, by fencing token: one at most unless the store ``limits``."""
        record = self.get(name)
        return [] if record is None else [record]

    @abstractmethod
    def list(self, prefix: str = "") -> list[LockRecord]:
        """Every live lock whose name starts with ``prefix``, sorted by name (a name's holds by fencing token)."""

    @abstractmethod
    def force_release(self, name: str) -> LockRecord | None:
        """Administrative release regardless of owner: every live hold of ``name``; returns the one
        with the lowest fencing token it removed."""

    def leave_queue(self, name: str, owner_token: str) -> None:  # noqa: B027 - optional: only fair stores keep a queue
        """A fair waiter gave up: drop its place, waking the next one if the name is free."""

    # -- async twins: native in built-in persisters, the bounded executor otherwise --

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        if limit > 1 or (queue_for is not None and self.fair):
            extra: dict[str, Any] = {"queue_for": queue_for} if queue_for is not None and self.fair else {}
            if limit > 1:
                extra["limit"] = limit
            return await run_blocking(functools.partial(self.acquire, **extra), name, owner, ttl, min_hold)
        if min_hold is None:
            return await run_blocking(self.acquire, name, owner, ttl)
        return await run_blocking(self.acquire, name, owner, ttl, min_hold)

    async def arelease(self, name: str, owner_token: str) -> bool:
        return await run_blocking(self.release, name, owner_token)

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return await run_blocking(self.renew, name, owner_token, ttl)

    async def aget(self, name: str) -> LockRecord | None:
        return await run_blocking(self.get, name)

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        record = await self.aget(name)
        return [] if record is None else [record]

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:  # ``list`` is a method here
        return await run_blocking(self.list, prefix)

    async def aforce_release(self, name: str) -> LockRecord | None:
        return await run_blocking(self.force_release, name)

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        if self.fair:  # only a fair store keeps places
            await run_blocking(self.leave_queue, name, owner_token)

    aforce_release.__logged__ = True  # type: ignore[attr-defined]  # the sync one it runs logs

    async def aclose(self) -> None:
        """Close async clients too; the default closes the sync ones."""
        await run_blocking(self.close)

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        """Subscribe to releases of ``name``; the default polls.

        ``owner_token`` (only passed when ``fair``): the waiter's place in the queue,
        so a release that names the queue's head wakes that waiter.
        """
        return SleepWatch()

    @contextmanager
    def watching(self, name: str, owner_token: str | None = None) -> Iterator[ReleaseWatch]:
        watch = self.watch(name, owner_token) if self.fair else self.watch(name)
        try:
            yield watch
        finally:
            watch.close()

    @asynccontextmanager
    async def awatching(self, name: str, owner_token: str | None = None) -> AsyncIterator[ReleaseWatch]:
        """``watching`` for coroutines; ``watch()`` must not block (hubs only register)."""
        watch = self.watch(name, owner_token) if self.fair else self.watch(name)
        try:
            yield watch
        finally:
            watch.close()

    def close(self) -> None:  # noqa: B027 - optional: a store that pools nothing has nothing to close
        """Release pooled connections; the persister reconnects if used again."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
