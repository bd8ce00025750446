"""What the rule mixins share: the child processes, the event loop behind the async face, a counting store."""

from __future__ import annotations

import asyncio
import builtins
import inspect
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlencode

import pytest

from ... import AsyncLease, AsyncSingleton, Singleton
from ..._record import AcquireResult, LockRecord, Owner
from ...persisters import Persister

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["APIS", "NOT_STARVED", "ONE_MS", "PLAIN_NAMES", "PURGE_WAIT", "WOKEN_WITHIN", "AsyncDriven",
           "CountingPersister", "EventLoopThread", "Retaining", "assert_woken", "both_at_once", "eventually",
           "not_per_api", "noting", "read_fact", "spawn_role", "start_waiter", "tell", "tried", "with_query"]

_T = TypeVar("_T")

#: The two faces of the lock every per-API case runs on.
APIS = ("sync", "async")
#: Without a notification, a waiter on a notifying store looks again every 2 s
#: (the core's safety poll); a hand-over faster than half that was a wake-up,
#: whatever the machine's load. A bound on "woken, not polled", not a speed claim.
WOKEN_WITHIN = 1.0
#: The holder's release behind 100 waiters: 159 s when waits held threads; the target is 10 ms.
NOT_STARVED = 3.0
#: How long an idle name's state may outlive a 1 s retention (a TTL monitor's or sweep's cadence).
PURGE_WAIT = 30.0
ONE_MS = timedelta(milliseconds=1)

#: Names that look like operators, paths, patterns or SQL: each must be a plain name.
PLAIN_NAMES = (
    "$where",
    "a.b",
    "../x",
    "'; DROP TABLE singleton_locks; --",
    '{"$gt": ""}',
    "a*b?[c]\\",
    "100%_done",
    "ünïcødé ✓ 名前",
    "{braces}",
    "x" * 255,
)


def not_per_api(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``test`` once: it drives the API itself, or only the store and child processes."""
    test._conformance_apis = ("sync",)  # type: ignore[attr-defined]
    return test


def with_query(url: str, **options: object) -> str:
    """``url`` with ``options`` added to (or replacing those in) its query string."""
    base, _, query = url.partition("?")  # not urlsplit: it would fold sqlite:////abs into sqlite://abs
    merged = {**dict(parse_qsl(query)), **{key: str(value) for key, value in options.items()}}
    return f"{base}?{urlencode(merged)}"


def spawn_role(role: str, args: dict[str, Any], prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
               program: tuple[str, ...] = ("-m", "singleton_integrations.testing._child")) -> subprocess.Popen[str]:
    """Start a child process playing ``role``; ``program``, the interpreter's arguments that name the roles'
    module, is ``singleton_integrations.testing._child`` unless told."""
    return subprocess.Popen(
        [*prefix, sys.executable, *program, role, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def read_fact(process: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The child's next JSON line, or a failure that shows its stderr."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            pytest.fail(f"child said nothing within {timeout} s; stderr: {process.communicate()[1][-2000:]}")
    line = process.stdout.readline()
    if not line:
        pytest.fail(f"child ended (code {process.wait()}) without a fact; stderr: {process.stderr.read()[-2000:] if process.stderr else ''}")
    fact: dict[str, Any] = json.loads(line)
    return fact


def tell(process: subprocess.Popen[str], command: str) -> None:
    """Send one line to a child's stdin."""
    assert process.stdin is not None
    process.stdin.write(command + "\n")
    process.stdin.flush()


def eventually(check: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``check`` until true or ``timeout``; a bound for correctness, not a speed claim."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())


def noting(seen: builtins.list[tuple[str, Any]], event: str) -> Callable[[Any], None]:
    """An event handler that notes ``(event, payload)`` in ``seen``."""
    return lambda payload: seen.append((event, payload))


@runtime_checkable
class Retaining(Protocol):
    """A store with the retention option."""

    purge_after_seconds: float | None


def tried(counting: CountingPersister) -> Callable[[], bool]:
    """A check for ``eventually``: the waiter behind ``counting`` has made its first attempt."""
    return lambda: counting.acquires >= 1


def both_at_once(call: Callable[[], bool]) -> list[bool]:
    """Run ``call`` in two threads let go by one barrier; their results, in the order they came."""
    start = threading.Barrier(2)
    results: list[bool] = []

    def run() -> None:
        start.wait(10)
        results.append(call())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


class EventLoopThread:
    """An event loop running in a daemon thread, for driving coroutines from sync test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="conformance-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = 300.0) -> _T:
        """Run ``coroutine`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        try:
            self.run(drain(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()


class AsyncDriven:
    """A sync face over an ``AsyncSingleton``: every coroutine method runs on an ``EventLoopThread``.

    It lets one case body check both APIs: ``lock()`` here awaits
    ``AsyncSingleton.lock()`` on the loop, ``with`` enters ``async with``; over an
    ``AsyncLease``, ``take()`` awaits ``AsyncLease.take()``.
    """

    def __init__(self, inner: AsyncSingleton | AsyncLease, runner: EventLoopThread) -> None:
        self.inner = inner
        self.runner = runner

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self.inner, attribute)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self.runner.run(value(*args, **kwargs))
        return value

    def __enter__(self) -> Self:
        assert isinstance(self.inner, AsyncSingleton), "a lease has no with block"
        self.runner.run(self.inner.__aenter__())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        assert isinstance(self.inner, AsyncSingleton)
        self.runner.run(self.inner.__aexit__(exc_type, exc, traceback))

    def __repr__(self) -> str:
        return repr(self.inner)


class CountingPersister(Persister):
    """Wraps a persister and counts the acquire attempts the core makes (sync and async).

    Everything else passes through, so the lock behaves as on the wrapped store.
    ``supports_min_hold`` and ``limits`` can be overridden to play a persister without
    the minimum hold or without several holds of a name.
    """

    backend = "counting"

    def __init__(self, inner: Persister, supports_min_hold: bool | None = None, limits: bool | None = None) -> None:
        self.inner = inner
        self.acquires = 0
        self._count_guard = threading.Lock()
        for attribute in ("backend", "distributed", "multiprocess", "clock", "poll_interval",
                          "native_async", "call_timeout", "fair"):
            if hasattr(inner, attribute):
                setattr(self, attribute, getattr(inner, attribute))
        self.supports_min_hold = inner.supports_min_hold if supports_min_hold is None else supports_min_hold  # type: ignore[misc]
        self.limits = inner.limits if limits is None else limits  # type: ignore[misc]

    @property
    def notifies(self) -> bool:  # type: ignore[override]  # a class attribute in Persister, asked of the inner store here
        """Asked each time: a store may learn only on first use that it cannot notify (a pooler in front)."""
        return bool(self.inner.notifies)

    def _count(self) -> None:
        with self._count_guard:
            self.acquires += 1

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "inner":
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    @staticmethod
    def _keywords(queue_for: float | None, limit: int) -> dict[str, Any]:
        """Only the keywords the core gave: a third-party store may take neither ``queue_for`` nor ``limit``."""
        keywords: dict[str, Any] = {} if queue_for is None else {"queue_for": queue_for}
        if limit != 1:
            keywords["limit"] = limit
        return keywords

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        keywords = self._keywords(queue_for, limit)
        try:  # counted once the store has answered: a counted waiter is known to the store
            if min_hold is None and not keywords:
                return self.inner.acquire(name, owner, ttl)
            return self.inner.acquire(name, owner, ttl, min_hold, **keywords)
        finally:
            self._count()

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        keywords = self._keywords(queue_for, limit)
        try:
            if min_hold is None and not keywords:
                return await self.inner.aacquire(name, owner, ttl)
            return await self.inner.aacquire(name, owner, ttl, min_hold, **keywords)
        finally:
            self._count()

    def leave_queue(self, name: str, owner_token: str) -> None:
        self.inner.leave_queue(name, owner_token)

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        await self.inner.aleave_queue(name, owner_token)

    def release(self, name: str, owner_token: str) -> bool:
        return self.inner.release(name, owner_token)

    async def arelease(self, name: str, owner_token: str) -> bool:
        return await self.inner.arelease(name, owner_token)

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return self.inner.renew(name, owner_token, ttl)

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return await self.inner.arenew(name, owner_token, ttl)

    def get(self, name: str) -> LockRecord | None:
        return self.inner.get(name)

    async def aget(self, name: str) -> LockRecord | None:
        return await self.inner.aget(name)

    def holders(self, name: str) -> builtins.list[LockRecord]:
        return self.inner.holders(name)

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        return await self.inner.aholders(name)

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self.inner.list(prefix)

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:  # ``list`` is a method here
        return await self.inner.alist(prefix)

    def force_release(self, name: str) -> LockRecord | None:
        return self.inner.force_release(name)

    async def aforce_release(self, name: str) -> LockRecord | None:
        return await self.inner.aforce_release(name)

    def watch(self, name: str, owner_token: str | None = None) -> Any:
        return self.inner.watch(name, owner_token) if self.inner.fair else self.inner.watch(name)

    def close(self) -> None:
        """The wrapped persister belongs to the test's fixture, which closes it."""

    async def aclose(self) -> None:
        """As ``close``."""


def start_waiter(kind: str, name: str, persister: Persister, runner: EventLoopThread) -> Callable[[], float]:
    """Start one waiter (a thread with ``cancel=`` or a task on ``runner``); the callable joins it, releases and
    returns the monotonic time it acquired."""
    if kind == "async":
        waiter = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)

        async def wait() -> float:
            assert await waiter.lock(wait=60)
            return time.monotonic()

        future = asyncio.run_coroutine_threadsafe(wait(), runner.loop)

        def finish_async() -> float:
            acquired_at = future.result(90)
            assert runner.run(waiter.release())
            return acquired_at

        return finish_async
    sync_waiter = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    cancel = threading.Event()  # never set: the point is the cancellable wait path
    outcome: dict[str, Any] = {}

    def wait_sync() -> None:
        outcome["acquired"] = sync_waiter.lock(wait=60, cancel=cancel)
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=wait_sync, daemon=True)
    thread.start()

    def finish_sync() -> float:
        thread.join(90)
        assert outcome.get("acquired") is True, "the cancellable waiter did not get the lock"
        assert sync_waiter.release()
        return float(outcome["at"])

    return finish_sync


def assert_woken(persister: Persister, handovers: list[tuple[str, float, int]]) -> None:
    """Every hand-over ``(kind, latency, attempts)`` was a wake-up, not a poll, and on a notifying store cost few attempts."""
    slow = [(kind, round(latency, 3)) for kind, latency, _ in handovers if latency >= WOKEN_WITHIN]
    assert slow == [], f"hand-overs that waited for a poll instead of a wake-up: {slow}"
    if persister.notifies:
        busy = [(kind, attempts) for kind, _, attempts in handovers if attempts > 4]
        assert busy == [], f"waiters that polled the store instead of waiting for the release: {busy}"
