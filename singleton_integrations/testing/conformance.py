"""The lock rules as a pytest suite that any persister can run against itself.

Subclass ``PersisterConformance`` in a test module and provide a ``store_url``
fixture whose URL ``persisters.from_url`` understands (register a third-party
scheme through the ``singleton_integrations.persisters`` entry-point group)::

    import pytest
    from singleton_integrations.testing.conformance import PersisterConformance

    class TestMyStore(PersisterConformance):
        @pytest.fixture
        def store_url(self):
            return "mystore://127.0.0.1:1234/test"

Every case that drives a lock runs twice, on ``Singleton`` (``[sync-...]``) and
on ``AsyncSingleton`` (``[async-...]``, through the persister's async twins on
an event loop of its own); cases that drive the store or child processes
directly run once. Rules that need several processes run only when the
persister's ``multiprocess`` is true; the clock-skew rules need ``distributed``
stores and Debian's ``faketime``; the minimum-hold rules need
``supports_min_hold``; the retention rules need a ``purge_after_seconds``
URL option and a ``stored_state`` fixture (see ``test_purge_*``); a store whose
own sweep runs seldom may offer ``purge()``, which the retention case calls.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlencode

import pytest

from .. import AsyncSingleton, LockConflict, LockLost, Singleton, SingletonError, persisters
from .._record import AcquireResult, LockRecord, Owner
from ..persisters import Persister

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["APIS", "PLAIN_NAMES", "WOKEN_WITHIN", "AsyncDriven", "CountingPersister", "EventLoopThread",
           "PersisterConformance", "not_per_api", "read_fact", "spawn_role", "with_query"]

_T = TypeVar("_T")

#: The two faces of the lock every per-API case runs on.
APIS = ("sync", "async")
#: Without a notification, a waiter on a notifying store looks again every 2 s
#: (the core's safety poll); a hand-over faster than half that was a wake-up,
#: whatever the machine's load. A bound on "woken, not polled", not a speed claim.
WOKEN_WITHIN = 1.0
#: The holder's release behind 100 waiters: 159 s when waits held threads; the target is 10 ms.
_NOT_STARVED = 3.0
#: How long an idle name's state may outlive a 1 s retention (a TTL monitor's or sweep's cadence).
_PURGE_WAIT = 30.0
_ONE_MS = timedelta(milliseconds=1)

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


def spawn_role(role: str, args: dict[str, Any], prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a child process playing ``role`` from ``singleton_integrations.testing._child``."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "singleton_integrations.testing._child", role, json.dumps(args)],
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


def _noting(seen: builtins.list[tuple[str, Any]], event: str) -> Callable[[Any], None]:
    """An event handler that notes ``(event, payload)`` in ``seen``."""
    return lambda payload: seen.append((event, payload))


@runtime_checkable
class _Retaining(Protocol):
    """A store with the retention option."""

    purge_after_seconds: float | None


def _tried(counting: CountingPersister) -> Callable[[], bool]:
    """A check for ``eventually``: the waiter behind ``counting`` has made its first attempt."""
    return lambda: counting.acquires >= 1


def _both_at_once(call: Callable[[], bool]) -> list[bool]:
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
    ``AsyncSingleton.lock()`` on the loop, ``with`` enters ``async with``.
    """

    def __init__(self, inner: AsyncSingleton, runner: EventLoopThread) -> None:
        self.inner = inner
        self.runner = runner

    def __getattr__(self, attribute: str) -> Any:
        value = getattr(self.inner, attribute)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self.runner.run(value(*args, **kwargs))
        return value

    def __enter__(self) -> Self:
        self.runner.run(self.inner.__aenter__())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.runner.run(self.inner.__aexit__(exc_type, exc, traceback))

    def __repr__(self) -> str:
        return repr(self.inner)


class CountingPersister(Persister):
    """Wraps a persister and counts the acquire attempts the core makes (sync and async).

    Everything else passes through, so the lock behaves as on the wrapped store.
    ``supports_min_hold`` can be overridden to play a persister without the minimum hold.
    """

    backend = "counting"

    def __init__(self, inner: Persister, supports_min_hold: bool | None = None) -> None:
        self.inner = inner
        self.acquires = 0
        self._count_guard = threading.Lock()
        for attribute in ("backend", "distributed", "multiprocess", "clock", "poll_interval",
                          "native_async", "call_timeout", "fair"):
            if hasattr(inner, attribute):
                setattr(self, attribute, getattr(inner, attribute))
        self.supports_min_hold = inner.supports_min_hold if supports_min_hold is None else supports_min_hold  # type: ignore[misc]

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

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None,
                **queue: Any) -> AcquireResult:
        try:  # counted once the store has answered: a counted waiter is known to the store
            if min_hold is None and not queue:
                return self.inner.acquire(name, owner, ttl)
            return self.inner.acquire(name, owner, ttl, min_hold, **queue)
        finally:
            self._count()

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None,
                       **queue: Any) -> AcquireResult:
        try:
            if min_hold is None and not queue:
                return await self.inner.aacquire(name, owner, ttl)
            return await self.inner.aacquire(name, owner, ttl, min_hold, **queue)
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

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self.inner.list(prefix)

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:  # ``list`` is a method here
        return await self.inner.alist(prefix)

    def force_release(self, name: str) -> LockRecord | None:
        return self.inner.force_release(name)

    async def aforce_release(self, name: str) -> LockRecord | None:
        return await self.inner.aforce_release(name)

    def watch(self, name: str, owner_token: str | None = None) -> Any:
        return self.inner.watch(name, owner_token) if owner_token is not None else self.inner.watch(name)

    def close(self) -> None:
        """The wrapped persister belongs to the test's fixture, which closes it."""

    async def aclose(self) -> None:
        """As ``close``."""


class PersisterConformance:
    """Every lock rule of the core, on one store, through both APIs."""

    api = "sync"
    runner: EventLoopThread | None = None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Each case that drives a lock runs on both APIs; ``not_per_api`` cases run once."""
        if "api" in metafunc.fixturenames:
            apis = getattr(metafunc.function, "_conformance_apis", APIS)
            metafunc.parametrize("api", apis, indirect=True, scope="function")

    # -- fixtures ---------------------------------------------------------------

    @pytest.fixture(name="api")
    def _api(self, request: pytest.FixtureRequest) -> str:
        return str(getattr(request, "param", "sync"))

    @pytest.fixture(autouse=True)
    def _drive(self, api: str) -> Iterator[None]:
        """``singleton()`` builds the API this run is for; async ones run on a loop of their own."""
        self.api = api
        self.runner = EventLoopThread() if api == "async" else None
        yield
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    @pytest.fixture
    def persister(self, store_url: str, _drive: None) -> Iterator[Persister]:
        persister = persisters.from_url(store_url)
        yield persister
        if self.runner is not None:
            self.runner.run(persister.aclose(), timeout=30)
        persister.close()

    @pytest.fixture
    def name(self) -> str:
        return f"conformance-{uuid.uuid4().hex}"

    @pytest.fixture
    def processes(self) -> Iterator[list[subprocess.Popen[str]]]:
        started: list[subprocess.Popen[str]] = []
        yield started
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()

    def singleton(self, name: str, persister: Persister, **options: Any) -> Any:
        """A ``Singleton``, or an ``AsyncSingleton`` behind ``AsyncDriven`` in the async run."""
        options.setdefault("lock_expire_seconds", 30)
        options.setdefault("release_on_sigterm", False)
        if self.runner is None:
            return Singleton(name, persister, **options)
        return AsyncDriven(AsyncSingleton(name, persister, **options), self.runner)

    @staticmethod
    def record_events(singleton: Singleton) -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        for event in ("locking", "locked", "conflict", "expired", "releasing", "released", "error", "renewed", "lost"):
            singleton.on(event, _noting(seen, event))
        return seen

    @staticmethod
    def wait_until_expired(persister: Persister, name: str) -> None:
        assert eventually(lambda: persister.get(name) is None), "the lock never expired by the store's clock"

    def need_processes(self, persister: Persister) -> None:
        if not persister.multiprocess:
            pytest.skip(f"{persister.backend} lives inside one process")

    @staticmethod
    def need_skewable(persister: Persister) -> str:
        """The ``faketime`` binary, for a store whose clock a skewed client does not share."""
        if not persister.distributed:
            pytest.skip(f"{persister.backend} judges expiry by {persister.clock}, which every client shares")
        faketime = shutil.which("faketime")
        if faketime is None:
            if os.environ.get("CI") == "true":
                pytest.fail("faketime is not installed (apt-get install faketime)")
            pytest.skip("faketime is not installed (apt-get install faketime)")
        return faketime

    # -- rule 1: atomic acquire, expiry, takeover ----------------------------------

    def test_lock_conflict_release(self, persister: Persister, name: str) -> None:
        first = self.singleton(name, persister, metadata={"job": "first"})
        second = self.singleton(name, persister)
        events = self.record_events(second)
        assert not first.exists()
        assert first.lock() is True
        assert first.held and first.exists() and second.exists()
        assert second.lock() is False
        assert [event for event, _ in events].count("conflict") == 1
        assert second.last_holder is not None and second.last_holder.fencing_token == first.fencing_token
        holder = second.holder()
        assert holder is not None
        assert (holder.name, holder.pid, holder.metadata) == (name, os.getpid(), {"job": "first"})
        assert holder.fencing_token == first.fencing_token
        assert first.release() is True
        assert not first.held and first.fencing_token is None
        assert not second.exists()
        assert second.lock() is True
        second.release()

    def test_context_manager_conflict_names_the_holder(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, metadata={"run": "r-1"})
        with holder:
            with pytest.raises(LockConflict) as caught, self.singleton(name, persister):
                pytest.fail("entered a held lock")
            assert caught.value.holder is not None
            assert caught.value.holder.metadata == {"run": "r-1"}
            assert str(os.getpid()) in str(caught.value) and "r-1" in str(caught.value)
        assert not holder.exists()

    def test_expired_lock_is_taken_over_in_one_step(self, persister: Persister, name: str) -> None:
        stale = self.singleton(name, persister, lock_expire_seconds=0.3, metadata={"who": "stale"})
        assert stale.lock()
        stale_token = stale.fencing_token
        self.wait_until_expired(persister, name)
        taker = self.singleton(name, persister)
        events = self.record_events(taker)
        assert taker.lock() is True
        names = [event for event, _ in events]
        assert names.index("expired") < names.index("locked")
        expired_message = dict(events)["expired"]
        assert "stale" in expired_message and "expired" in expired_message
        assert taker.fencing_token > stale_token
        taker.release()

    def test_released_lock_is_not_reported_expired(self, persister: Persister, name: str) -> None:
        first = self.singleton(name, persister)
        assert first.lock() and first.release()
        second = self.singleton(name, persister)
        events = self.record_events(second)
        assert second.lock()
        assert "expired" not in [event for event, _ in events]
        second.release()

    @not_per_api
    def test_expired_takeover_race_has_one_winner(self, persister: Persister, name: str, store_url: str,
                                                   processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        for _round in range(3):
            stale = self.singleton(name, persister, lock_expire_seconds=0.2)
            assert stale.lock()
            self.wait_until_expired(persister, name)
            start_at = time.time() + 3.0
            racers = [spawn_role("race", {"name": name, "url": store_url, "start_at": start_at}) for _ in range(8)]
            processes.extend(racers)
            facts = [read_fact(racer, timeout=60) for racer in racers]
            for racer in racers:
                assert racer.stdin is not None
                racer.stdin.close()  # the winner holds until every racer has tried
            winners = [fact for fact in facts if fact["acquired"]]
            assert len(winners) == 1, facts
            assert winners[0]["events"].index("expired") < winners[0]["events"].index("locked")
            assert all("expired" not in fact["events"] for fact in facts if not fact["acquired"])
            for racer in racers:
                assert racer.wait(timeout=30) == 0
            assert not persister.get(name)

    # -- rule 2: owner-checked release ------------------------------------------------

    def test_release_after_takeover_leaves_the_new_holder(self, persister: Persister, name: str) -> None:
        old = self.singleton(name, persister, lock_expire_seconds=0.3)
        old_events = self.record_events(old)
        assert old.lock()
        self.wait_until_expired(persister, name)
        new = self.singleton(name, persister)
        assert new.lock()
        assert old.release() is False
        assert old.lost and "lost" in [event for event, _ in old_events]
        assert new.verify() is True
        current = persister.get(name)
        assert current is not None and new.record is not None and current.owner_token == new.record.owner_token
        assert new.release() is True

    def test_release_after_the_lease_ran_out_reports_the_loss(self, persister: Persister, name: str) -> None:
        """Nobody took it, but the lease ended before release: exclusivity was not kept."""
        holder = self.singleton(name, persister, lock_expire_seconds=0.3)
        events = self.record_events(holder)
        assert holder.lock()
        self.wait_until_expired(persister, name)
        assert holder.release() is False
        assert holder.lost and "lost" in [event for event, _ in events]
        successor = self.singleton(name, persister)
        successor_events = self.record_events(successor)
        assert successor.lock()
        assert "expired" not in [event for event, _ in successor_events], "release left the stale lock behind"
        successor.release()

    def test_release_without_holding_is_a_no_op(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        other = self.singleton(name, persister)
        assert holder.lock()
        assert other.release() is False
        assert persister.release(name, "not-the-owner-token") is False
        assert holder.verify()
        holder.release()

    # -- rule 4: fencing tokens ----------------------------------------------------------

    def test_fencing_tokens_rise_across_release_and_instances(self, persister: Persister, name: str) -> None:
        tokens = []
        for index in range(6):
            singleton = self.singleton(name, persister)
            assert singleton.lock()
            tokens.append(singleton.fencing_token)
            if index % 2:
                singleton.release()
            else:
                persister.force_release(name)
        assert all(isinstance(t, int) for t in tokens)
        assert tokens == sorted(set(tokens)), tokens

    @not_per_api
    def test_fencing_tokens_rise_across_processes(self, persister: Persister, name: str, store_url: str,
                                                   processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        tokens = []
        for _ in range(4):
            child = spawn_role("hold", {"name": name, "url": store_url, "hold_for": 0})
            processes.append(child)
            tokens.append(read_fact(child)["token"])
            assert child.wait(timeout=30) == 0
            local = self.singleton(name, persister)
            assert local.lock()
            tokens.append(local.fencing_token)
            local.release()
        assert tokens == sorted(set(tokens)), tokens

    @not_per_api
    def test_no_overlap_across_processes(self, persister: Persister, name: str, store_url: str, tmp_path: Any,
                                         processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        log = tmp_path / "holds.jsonl"
        workers = [spawn_role("loop", {"name": name, "url": store_url, "seconds": 3, "log": str(log), "work": 0.003})
                   for _ in range(8)]
        processes.extend(workers)
        for worker in workers:
            assert worker.wait(timeout=120) == 0, worker.stderr.read() if worker.stderr else ""
        holds = [json.loads(line) for line in log.read_text().splitlines()]
        holds = [hold for hold in holds if "start" in hold]
        assert len(holds) >= 16, f"only {len(holds)} holds in 3 s"
        assert len({hold["pid"] for hold in holds}) >= 2
        holds.sort(key=lambda hold: hold["start"])
        overlaps = sum(1 for a, b in itertools.pairwise(holds) if b["start"] < a["end"])
        assert overlaps == 0
        tokens = [hold["token"] for hold in holds]
        assert tokens == sorted(set(tokens)), "fencing tokens did not rise with the holds"
        assert all(hold["released"] for hold in holds)

    # -- rule 3: the store's clock ---------------------------------------------------------

    @not_per_api
    def test_client_clock_skew_neither_steals_nor_shortens(self, persister: Persister, name: str, store_url: str,
                                                             processes: list[subprocess.Popen[str]]) -> None:
        faketime = self.need_skewable(persister)
        skew_env = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        holder = self.singleton(name, persister, lock_expire_seconds=30)
        assert holder.lock()
        # A client three hours ahead must not see our 30-second lease as long expired.
        ahead = spawn_role("try_lock", {"name": name, "url": store_url}, prefix=(faketime, "-f", "+3h"), env=skew_env)
        processes.append(ahead)
        fact = read_fact(ahead, timeout=60)
        assert fact["exists_before"] is True and fact["acquired"] is False
        assert holder.verify()
        holder.release()
        # A client three hours behind must not write a lock that others see as expired.
        behind = spawn_role("try_lock", {"name": name, "url": store_url, "ttl": 20},
                            prefix=(faketime, "-f", "-3h"), env=skew_env)
        processes.append(behind)
        fact = read_fact(behind, timeout=60)
        assert fact["acquired"] is True
        assert holder.exists() is True
        assert holder.lock() is False
        record = persister.get(name)
        assert record is not None and record.expires_at is not None
        assert abs(record.expires_at.timestamp() - (time.time() + 20)) < 15
        persister.force_release(name)

    # -- rule 5: renewal ---------------------------------------------------------------------

    def test_auto_renew_keeps_the_lock_past_its_ttl(self, persister: Persister, name: str) -> None:
        # The core declares the lock lost a quarter of the lease before it ends when renewals are
        # late. A 2 s lease renews every 0.67 s and tolerates one renewal stalled by 0.8 s; with
        # 1.2 s (0.5 s of slack) one CI run on a loaded 2-CPU machine saw a stall long enough.
        holder = self.singleton(name, persister, lock_expire_seconds=2.0, auto_renew=True)
        events = self.record_events(holder)
        assert holder.lock()
        time.sleep(4.2)  # more than two leases
        assert self.singleton(name, persister).lock() is False
        assert holder.verify()
        renewals = [event for event, _ in events].count("renewed")
        assert renewals >= 2
        assert holder.release()
        time.sleep(0.8)
        # A renewal may land between the count above and release(); none may follow the release.
        names = [event for event, _ in events]
        assert "released" in names and "renewed" not in names[names.index("released"):], "renewal went on after release"
        assert not holder.exists()

    def test_refused_renewal_emits_lost(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, lock_expire_seconds=0.9, auto_renew=True)
        lost = threading.Event()
        holder.on("lost", lambda message: lost.set())
        assert holder.lock()
        persister.force_release(name)
        thief = self.singleton(name, persister)
        assert thief.lock()
        assert lost.wait(20), "the holder never noticed it lost the lock"
        assert holder.lost and not holder.held and holder.fencing_token is None
        assert holder.verify() is False
        with pytest.raises(LockLost):
            holder.ensure_held()
        assert holder.release() is False
        assert thief.verify()
        thief.release()

    def test_lost_lock_fails_the_with_block(self, persister: Persister, name: str) -> None:
        with pytest.raises(LockLost), self.singleton(name, persister, lock_expire_seconds=0.3) as held:
            self.wait_until_expired(persister, name)
            assert self.singleton(name, persister).lock()
            assert held.verify() is False
        persister.force_release(name)

    @not_per_api
    def test_exit_releases_and_stops_renewal(self, persister: Persister, name: str, store_url: str,
                                             processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        child = spawn_role("exit_holding", {"name": name, "url": store_url, "ttl": 30, "auto_renew": True})
        processes.append(child)
        assert read_fact(child)["acquired"] is True
        assert child.wait(timeout=30) == 0
        assert persister.get(name) is None

    @not_per_api
    def test_forked_child_does_not_own_the_lock(self, persister: Persister, name: str, store_url: str,
                                                processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        child = spawn_role("fork_child", {"name": name, "url": store_url, "ttl": 1, "auto_renew": True, "after": 1.5})
        processes.append(child)
        fact = read_fact(child, timeout=60)
        assert fact["child"] == {"held": False, "token": None, "released": False}
        assert fact["parent_held"] is True, "the parent lost its lock after a fork"
        assert child.wait(timeout=30) == 0

    # -- rule 6: waiting ------------------------------------------------------------------------

    def test_wait_is_woken_by_release(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        assert holder.lock()
        timer = threading.Timer(0.3, holder.release)
        timer.start()
        waiter = self.singleton(name, persister)
        started = time.monotonic()
        assert waiter.lock(wait=60) is True
        assert time.monotonic() - started < 50  # a bound on correctness: the wait did not run out
        timer.join()
        waiter.release()

    def test_wait_gives_up_after_its_timeout(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        assert holder.lock()
        waiter = self.singleton(name, persister)
        events = self.record_events(waiter)
        assert waiter.lock(wait=0.3) is False
        assert [event for event, _ in events].count("conflict") == 1
        holder.release()

    def test_wait_takes_over_at_expiry(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, lock_expire_seconds=0.5)
        assert holder.lock()
        waiter = self.singleton(name, persister)
        events = self.record_events(waiter)
        assert waiter.lock(wait=30) is True
        assert "expired" in [event for event, _ in events]
        waiter.release()

    @not_per_api
    def test_watch_is_notified_by_release(self, persister: Persister, name: str) -> None:
        if not persister.notifies:
            pytest.skip(f"{persister.backend} cannot notify; waiting polls every {persister.poll_interval} s")
        holder = self.singleton(name, persister)
        assert holder.lock()
        with persister.watching(name) as watch:
            timer = threading.Timer(0.2, holder.release)
            timer.start()
            started = time.monotonic()
            watch.wait(30)
            woke_after = time.monotonic() - started
            timer.join()
        assert woke_after < 25, "the release did not wake the watcher"

    def test_hand_overs_lose_no_wake_up(self, persister: Persister, name: str) -> None:
        """Two threads pass the lock back and forth; every wait must succeed."""
        failures: list[str] = []

        def worker() -> None:
            singleton = self.singleton(name, persister)
            for _ in range(15):
                if not singleton.lock(wait=30):
                    failures.append("wait ran out")
                    return
                singleton.release()

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []

    # -- rule 7: SIGTERM ------------------------------------------------------------------------

    @not_per_api
    def test_sigterm_releases_then_ends_the_process(self, persister: Persister, name: str, store_url: str,
                                                    processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        child = spawn_role("hold", {"name": name, "url": store_url})
        processes.append(child)
        assert read_fact(child)["acquired"]
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
        assert persister.get(name) is None

    @not_per_api
    def test_sigterm_chains_the_previous_handler(self, persister: Persister, name: str, store_url: str,
                                                 processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        child = spawn_role("hold", {"name": name, "url": store_url, "previous_handler": True})
        processes.append(child)
        assert read_fact(child)["acquired"]
        child.send_signal(signal.SIGTERM)
        assert read_fact(child) == {"previous_handler": True}
        assert child.wait(timeout=30) == 3
        assert persister.get(name) is None

    @not_per_api
    def test_killed_holder_lock_expires(self, persister: Persister, name: str, store_url: str,
                                        processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        child = spawn_role("hold", {"name": name, "url": store_url, "ttl": 1})
        processes.append(child)
        assert read_fact(child)["acquired"]
        child.kill()
        child.wait(timeout=30)
        assert persister.get(name) is not None
        successor = self.singleton(name, persister)
        assert successor.lock(wait=30) is True
        successor.release()

    # -- rule 8: names ---------------------------------------------------------------------------

    @pytest.mark.parametrize("plain", PLAIN_NAMES, ids=lambda n: repr(n)[:24])
    def test_names_are_plain(self, persister: Persister, plain: str) -> None:
        persister.force_release(plain)
        singleton = self.singleton(plain, persister)
        try:
            assert singleton.lock()
            holder = singleton.holder()
            assert holder is not None and holder.name == plain
            assert [record.name for record in persister.list(plain)] == [plain]
            assert self.singleton(plain, persister).lock() is False
        finally:
            singleton.release()
        assert not singleton.exists()

    def test_list_filters_by_prefix(self, persister: Persister, name: str) -> None:
        held = [self.singleton(f"{name}/{suffix}", persister) for suffix in ("b", "a", "c")]
        other = self.singleton(f"other-{name}", persister)
        for singleton in (*held, other):
            assert singleton.lock()
        held[2].release()
        assert [record.name for record in persister.list(f"{name}/")] == [f"{name}/a", f"{name}/b"]
        for singleton in (*held, other):
            singleton.release()
        assert persister.list(f"{name}/") == []

    def test_force_release_returns_the_holder(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, metadata={"who": "victim"})
        assert holder.lock()
        removed = persister.force_release(name)
        assert removed is not None and removed.metadata == {"who": "victim"}
        assert persister.force_release(name) is None
        assert not holder.verify()

    # -- rules 9, 10: holder record, never-expiring locks -------------------------------------------

    def test_holder_record_names_its_holder(self, persister: Persister, name: str) -> None:
        import socket

        holder = self.singleton(name, persister, lock_expire_seconds=60, metadata={"dag_id": "d", "run_id": "r"})
        assert holder.lock()
        record = persister.get(name)
        assert record is not None
        assert (record.host, record.pid) == (socket.gethostname(), os.getpid())
        assert record.metadata == {"dag_id": "d", "run_id": "r"}
        assert len(record.owner_token) >= 32
        assert record.expires_at is not None
        lease = (record.expires_at - record.created_at).total_seconds()
        assert 59 <= lease <= 61
        assert "owner_token" not in repr(record) and record.owner_token not in repr(record)
        holder.release()

    def test_lock_without_expiry(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, lock_expire_seconds=None)
        assert holder.lock()
        record = persister.get(name)
        assert record is not None and record.expires_at is None
        assert self.singleton(name, persister).lock() is False
        assert holder.release()

    # -- the async API ---------------------------------------------------------------------------------

    @not_per_api
    def test_async_singleton(self, persister: Persister, name: str) -> None:
        async def scenario() -> None:
            first = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
            second = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
            assert await first.lock()
            assert await second.lock() is False
            assert await second.exists()
            waiting = asyncio.ensure_future(second.lock(wait=60))
            await asyncio.sleep(0.2)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert await first.release()
            assert not await second.exists(), "a cancelled wait left a lock behind"
            async with first:
                with pytest.raises(LockConflict):
                    async with second:
                        pass
            assert not await first.exists()

        asyncio.run(scenario())

    # -- rule 11: one object, many callers ----------------------------------------------------------

    def test_release_racing_a_renewal_is_not_a_loss(self, persister: Persister, name: str) -> None:
        """A release the store confirms is never a loss, even with a renewal in flight (1 ms renew interval)."""
        holder = self.singleton(name, persister, auto_renew=True, renew_interval=0.001)
        events = self.record_events(holder)
        for cycle in range(100):
            assert holder.lock(), f"cycle {cycle}: could not take a free name"
            time.sleep(random.uniform(0.0, 0.002))
            assert holder.release() is True, f"cycle {cycle}: the store did not confirm the release"
        assert "lost" not in [event for event, _ in events] and not holder.lost

    def test_two_threads_releasing_one_object_is_not_a_loss(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        events = self.record_events(holder)
        for trial in range(30):
            assert holder.lock(), f"trial {trial}"
            results = _both_at_once(holder.release)
            assert True in results, f"trial {trial}: neither release was confirmed ({results})"
            assert not holder.held and persister.get(name) is None
        assert "lost" not in [event for event, _ in events] and not holder.lost

    def test_two_threads_locking_one_object_make_one_attempt(self, persister: Persister, name: str) -> None:
        """Concurrent ``lock()`` calls on one object share one store attempt and both see that it succeeded."""
        counting = CountingPersister(persister)
        for trial in range(20):
            holder = self.singleton(name, counting)
            results = _both_at_once(holder.lock)
            assert results == [True, True], f"trial {trial}: {results}"
            assert counting.acquires == trial + 1, f"trial {trial}: {counting.acquires - trial} store attempts for one object"
            assert holder.release() is True
            assert persister.get(name) is None

    def test_nested_with_releases_at_the_outermost_exit(self, persister: Persister, name: str, store_url: str,
                                                        processes: list[subprocess.Popen[str]]) -> None:
        holder = self.singleton(name, persister)
        other = self.singleton(name, persister)
        with holder:
            token = holder.fencing_token
            with holder:
                assert holder.fencing_token == token
            assert holder.held, "the inner exit released the lock"
            current = persister.get(name)
            assert current is not None and current.owner_token == holder.record.owner_token
            assert other.lock() is False
            if persister.multiprocess:
                rival = spawn_role("try_lock", {"name": name, "url": store_url})
                processes.append(rival)
                assert read_fact(rival, timeout=60)["acquired"] is False, "another process took it inside the outer block"
        assert not holder.held and persister.get(name) is None
        assert other.lock() is True
        assert other.release() is True

    # -- rule 12: the minimum hold ----------------------------------------------------------------

    def need_min_hold(self, persister: Persister) -> None:
        if not persister.supports_min_hold:
            pytest.skip(f"{persister.backend} does not declare supports_min_hold")

    @not_per_api
    def test_min_hold_primitives(self, persister: Persister, name: str) -> None:
        """acquire(min_hold=) records hold_until; release keeps the record, marked released, until then."""
        self.need_min_hold(persister)
        owner = Owner()
        first = persister.acquire(name, owner, 30, min_hold=2.0)
        assert first.acquired and first.record is not None
        taken = first.record
        assert taken.hold_until is not None and taken.released_at is None
        assert 1.0 <= (taken.hold_until - taken.created_at).total_seconds() <= 3.0
        assert persister.release(name, owner.owner_token) is True
        held = persister.get(name)
        assert held is not None and held.released_at is not None, "the released record must hold the name"
        assert held.fencing_token == taken.fencing_token and held.hold_until is not None
        assert abs((held.hold_until - taken.hold_until).total_seconds()) < 0.5
        assert held.expires_at is not None and abs((held.expires_at - held.hold_until).total_seconds()) < 0.5
        # A repeated release may answer True (a store may make a retried release idempotent), but
        # it must not end the hold; nor may the old token renew it.
        persister.release(name, owner.owner_token)
        assert persister.renew(name, owner.owner_token, 30) is None, "the token renewed a released lock"
        again = persister.get(name)
        assert again is not None and again.released_at is not None, "a repeated release ended the minimum hold"
        refused = persister.acquire(name, Owner(), 30)
        assert not refused.acquired and refused.record is not None and refused.record.released_at is not None
        assert refused.retry_after is not None and 0 < refused.retry_after <= 2.5
        deadline = time.monotonic() + 20
        while not (after := persister.acquire(name, Owner(), 30)).acquired:
            assert time.monotonic() < deadline, "the name never came free after the minimum hold"
            time.sleep(0.1)
        assert after.record is not None and after.record.fencing_token > taken.fencing_token
        assert after.expired is None, "the end of a minimum hold is not an expiry"
        persister.force_release(name)
        # renew never ends the lease before hold_until
        renewing = Owner()
        assert persister.acquire(f"{name}-renew", renewing, 1, min_hold=30).acquired
        renewed = persister.renew(f"{name}-renew", renewing.owner_token, 1)
        assert renewed is not None and renewed.expires_at is not None and renewed.hold_until is not None
        assert renewed.expires_at >= renewed.hold_until - _ONE_MS
        persister.force_release(f"{name}-renew")

    def test_min_hold_keeps_a_released_name_until_it_ends(self, persister: Persister, name: str) -> None:
        self.need_min_hold(persister)
        holder = self.singleton(name, persister, min_hold_seconds=2, metadata={"deployment": "A"})
        events = self.record_events(holder)
        assert holder.lock()
        token = holder.fencing_token
        assert holder.release() is True
        assert not holder.held and not holder.lost and "lost" not in [event for event, _ in events]
        assert holder.exists() is True
        record = holder.holder()
        assert record is not None and record.released_at is not None and record.hold_until is not None
        assert (record.fencing_token, record.metadata) == (token, {"deployment": "A"})
        contender = self.singleton(name, persister)
        contender_events = self.record_events(contender)
        assert contender.lock() is False
        conflict = dict(contender_events)["conflict"]
        assert "ran at" in conflict and "deployment=A" in conflict, conflict
        assert contender.last_holder is not None and contender.last_holder.released_at is not None
        assert holder.lock() is False, "the last holder took its own slot again"
        assert contender.lock(wait=30) is True
        assert "expired" not in [event for event, _ in contender_events]
        assert contender.fencing_token > token
        assert contender.release() is True

    def test_release_after_the_min_hold_frees_at_once(self, persister: Persister, name: str) -> None:
        self.need_min_hold(persister)
        holder = self.singleton(name, persister, min_hold_seconds=0.3)
        assert holder.lock()
        time.sleep(1.0)
        assert holder.release() is True
        assert persister.get(name) is None
        assert holder.exists() is False

    def test_min_hold_outlasts_a_shorter_lease(self, persister: Persister, name: str) -> None:
        """lock_expire_seconds < min_hold: released or crashed, the name stays held until the hold ends."""
        self.need_min_hold(persister)
        released = self.singleton(name, persister, lock_expire_seconds=0.5, min_hold_seconds=2.5)
        crashed = self.singleton(f"{name}-crashed", persister, lock_expire_seconds=0.5, min_hold_seconds=2.5)
        assert released.lock() and crashed.lock()  # ``crashed`` is never released: a holder that died
        tokens = {name: released.fencing_token, f"{name}-crashed": crashed.fencing_token}
        assert released.release() is True
        time.sleep(1.2)  # past both leases, well inside the hold
        contenders = {held_name: self.singleton(held_name, persister) for held_name in tokens}
        for held_name, contender in contenders.items():  # both inside their hold: check before waiting on either
            assert persister.get(held_name) is not None, f"{held_name} was freed by the lease, inside the hold"
            assert contender.lock() is False, f"{held_name} was taken inside the hold"
        for held_name, token in tokens.items():
            contender = contenders[held_name]
            assert contender.lock(wait=30) is True
            assert contender.fencing_token > token
            assert contender.release() is True

    def test_min_hold_refused_without_store_support(self, persister: Persister, name: str) -> None:
        """A persister that does not declare supports_min_hold is refused a minimum hold, before any I/O."""
        self.need_min_hold(persister)
        self.singleton(name, persister, min_hold_seconds=5)  # accepted where the store supports it
        bare = CountingPersister(persister, supports_min_hold=False)
        with pytest.raises((TypeError, ValueError, SingletonError)) as caught:
            self.singleton(name, bare, min_hold_seconds=5).lock()
        assert "min_hold" in str(caught.value), str(caught.value)
        assert bare.acquires == 0 and persister.get(name) is None

    @not_per_api
    def test_min_hold_across_processes(self, persister: Persister, name: str, store_url: str,
                                       processes: list[subprocess.Popen[str]]) -> None:
        """A process holds and releases at once: another process is refused until S has passed, then succeeds."""
        self.need_processes(persister)
        self.need_min_hold(persister)
        hold_seconds = 2.5
        child = spawn_role("hold", {"name": name, "url": store_url, "min_hold": hold_seconds, "hold_for": 0})
        processes.append(child)
        taken = read_fact(child)
        assert taken["acquired"]
        done = read_fact(child)
        assert done["released"] is True and done["lost"] is False
        assert child.wait(timeout=30) == 0
        local = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        assert local.lock() is False
        assert local.last_holder is not None and local.last_holder.released_at is not None
        assert local.last_holder.pid == taken["pid"]
        assert local.lock(wait=30) is True
        assert time.monotonic() >= taken["at"] + hold_seconds - 0.5, "the name was free before the minimum hold ended"
        assert local.fencing_token > taken["token"]
        assert local.release() is True

    @not_per_api
    def test_min_hold_is_judged_by_the_store_clock(self, persister: Persister, name: str, store_url: str,
                                                    processes: list[subprocess.Popen[str]]) -> None:
        """A contender whose clock is 2 h ahead cannot end the hold early."""
        self.need_min_hold(persister)
        faketime = self.need_skewable(persister)
        holder = Singleton(name, persister, lock_expire_seconds=30, min_hold_seconds=120, release_on_sigterm=False)
        assert holder.lock() and holder.release()
        ahead = spawn_role("try_lock", {"name": name, "url": store_url}, prefix=(faketime, "-f", "+2h"),
                           env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        processes.append(ahead)
        fact = read_fact(ahead, timeout=60)
        assert fact["exists_before"] is True and fact["acquired"] is False
        assert fact["holder_released"] is True
        record = persister.get(name)
        assert record is not None and record.released_at is not None
        persister.force_release(name)

    @not_per_api
    def test_sigterm_releases_into_the_min_hold(self, persister: Persister, name: str, store_url: str,
                                                processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        self.need_min_hold(persister)
        child = spawn_role("hold", {"name": name, "url": store_url, "min_hold": 60})
        processes.append(child)
        assert read_fact(child)["acquired"]
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
        record = persister.get(name)
        assert record is not None, "SIGTERM freed the name inside its minimum hold"
        assert record.released_at is not None, "SIGTERM did not release (the record is still the live lease)"
        contender = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        assert contender.lock() is False
        persister.force_release(name)

    # -- rule 13: async waiting -------------------------------------------------------------------

    @not_per_api
    def test_async_primitives(self, persister: Persister, name: str) -> None:
        """The async twins keep the sync primitives' rules (native, or through the bounded executor)."""

        async def scenario() -> None:
            owner = Owner()
            first = await persister.aacquire(name, owner, 30)
            assert first.acquired and first.record is not None
            second = await persister.aacquire(name, Owner(), 30)
            assert not second.acquired and second.record is not None
            assert second.record.fencing_token == first.record.fencing_token
            current = await persister.aget(name)
            assert current is not None and current.owner_token == owner.owner_token
            assert [record.name for record in await persister.alist(name)] == [name]
            renewed = await persister.arenew(name, owner.owner_token, 60)
            assert renewed is not None and renewed.expires_at is not None and first.record.expires_at is not None
            assert renewed.expires_at > first.record.expires_at
            assert await persister.arenew(name, "not-the-owner-token", 60) is None
            assert await persister.arelease(name, owner.owner_token) is True
            await persister.arelease(name, owner.owner_token)  # a retry may answer True again; it changes nothing
            assert await persister.aget(name) is None
            third = await persister.aacquire(name, Owner(), 30)
            assert third.acquired and third.record is not None
            assert third.record.fencing_token > first.record.fencing_token
            await persister.arelease(name, owner.owner_token)  # the old token again: the new holder must stay
            current = await persister.aget(name)
            assert current is not None and current.fencing_token == third.record.fencing_token, "an old token freed a new holder"
            removed = await persister.aforce_release(name)
            assert removed is not None and removed.fencing_token == third.record.fencing_token
            assert await persister.aget(name) is None
            await persister.aclose()

        asyncio.run(scenario())
        assert persister.get(name) is None, "the persister did not reconnect after aclose()"

    @not_per_api
    def test_async_api_serves_successive_event_loops(self, persister: Persister, name: str, store_url: str) -> None:
        """``asyncio.run`` twice in a process, on one persister and on another from the same URL."""

        async def cycle(store: Persister) -> None:
            singleton = AsyncSingleton(name, store, lock_expire_seconds=30, release_on_sigterm=False)
            assert await singleton.lock()
            assert await singleton.exists()
            assert await singleton.release()

        for _ in range(3):
            asyncio.run(cycle(persister))
        other = persisters.from_url(store_url)
        try:
            for _ in range(2):
                asyncio.run(cycle(other))
        finally:
            other.close()

    @not_per_api
    def test_many_async_waiters_take_turns(self, persister: Persister, name: str) -> None:
        """100 waiters in one event loop: the holder's release is not held up, and each waiter holds in turn."""
        waiters = 100

        async def scenario() -> tuple[float, list[bool], int, list[int], int]:
            holder = AsyncSingleton(name, persister, lock_expire_seconds=120, release_on_sigterm=False)
            assert await holder.lock()
            inside = overlaps = 0
            tokens: list[int] = []

            async def waiter() -> bool:
                nonlocal inside, overlaps
                singleton = AsyncSingleton(name, persister, lock_expire_seconds=120, release_on_sigterm=False)
                if not await singleton.lock(wait=60):
                    return False
                inside += 1
                overlaps += inside > 1
                assert singleton.fencing_token is not None
                tokens.append(singleton.fencing_token)
                await asyncio.sleep(0)
                inside -= 1
                return await singleton.release()

            tasks = [asyncio.create_task(waiter()) for _ in range(waiters)]
            await asyncio.sleep(0.5)  # every waiter has tried once and waits
            threads = threading.active_count()
            started = time.monotonic()
            assert await holder.release()
            release_took = time.monotonic() - started
            results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
            return release_took, results, overlaps, tokens, threads

        threads_before = threading.active_count()
        release_took, results, overlaps, tokens, threads = asyncio.run(scenario())
        assert results.count(True) == waiters, f"{results.count(True)} of {waiters} waiters held the lock"
        assert overlaps == 0
        assert tokens == sorted(set(tokens)), "fencing tokens did not rise with the holds"
        # A wait holds no thread: 100 waiters may add a listener and an executor's few workers, not one each.
        assert threads - threads_before < waiters // 4, f"{threads - threads_before} more threads while {waiters} waited"
        assert release_took < _NOT_STARVED, f"the holder's release took {release_took:.1f} s behind {waiters} waiters"
        assert persister.get(name) is None

    @not_per_api
    def test_cancelled_async_waiter_returns_at_once_and_holds_nothing(self, persister: Persister, name: str) -> None:
        async def scenario() -> tuple[float, float, float]:
            holder = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
            waiter = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
            assert await holder.lock()
            task = asyncio.create_task(waiter.lock(wait=60))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            cancel_took = time.monotonic() - started
            assert not waiter.held
            assert await holder.release()
            await asyncio.sleep(0.3)  # a waiter left behind would have taken the name by now
            assert await waiter.exists() is False, "the cancelled waiter took the lock after all"
            free = AsyncSingleton(f"{name}-free", persister, lock_expire_seconds=30, release_on_sigterm=False)
            started = time.monotonic()
            assert await asyncio.wait_for(free.lock(wait=10), 5.0)
            free_took = time.monotonic() - started
            assert await free.release()
            assert await holder.lock()
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.lock(wait=30), 0.5)
            timeout_took = time.monotonic() - started
            assert not waiter.held
            assert await holder.release()
            return cancel_took, free_took, timeout_took

        cancel_took, free_took, timeout_took = asyncio.run(scenario())
        assert cancel_took < WOKEN_WITHIN, f"a cancelled wait took {cancel_took:.2f} s to end"
        assert free_took < WOKEN_WITHIN, f"lock() on a free name took {free_took:.2f} s"
        assert timeout_took < 0.5 + WOKEN_WITHIN, f"wait_for(0.5) ended after {timeout_took:.2f} s"
        assert persister.get(name) is None

    @not_per_api
    def test_hand_over_wakes_cancellable_waiters(self, persister: Persister, name: str) -> None:
        """A ``lock(wait, cancel=)`` waiter and an async waiter are woken by a release wherever it lands in their wait."""
        holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        runner = EventLoopThread()
        handovers: list[tuple[str, float, int]] = []
        try:
            for trial in range(8):
                for kind in ("sync, cancellable", "async"):
                    assert holder.lock()
                    counting = CountingPersister(persister)
                    finish = self.start_waiter(kind, name, counting, runner)
                    assert eventually(_tried(counting), 20), "the waiter never tried"
                    time.sleep(0.15 + trial * 0.0125)  # the release lands at a different point of a wait slice each time
                    released_at = time.monotonic()
                    assert holder.release()
                    acquired_at = finish()
                    handovers.append((kind, acquired_at - released_at, counting.acquires))
        finally:
            runner.close()
        self.assert_woken(persister, handovers)

    @not_per_api
    def test_hand_over_across_processes_is_woken(self, persister: Persister, name: str, store_url: str,
                                                 processes: list[subprocess.Popen[str]]) -> None:
        """A release in another process wakes a cancellable sync waiter and an async waiter here (one subscription)."""
        self.need_processes(persister)
        if not persister.notifies:
            pytest.skip(f"{persister.backend} cannot notify across processes; waiting polls every {persister.poll_interval} s")
        child = spawn_role("handover", {"name": name, "url": store_url})
        processes.append(child)
        runner = EventLoopThread()
        handovers: list[tuple[str, float, int]] = []
        try:
            for trial in range(4):
                for kind in ("sync, cancellable", "async"):
                    tell(child, "lock")
                    assert read_fact(child)["acquired"]
                    counting = CountingPersister(persister)
                    finish = self.start_waiter(kind, name, counting, runner)
                    assert eventually(_tried(counting), 20), "the waiter never tried"
                    time.sleep(0.15 + trial * 0.025)
                    tell(child, "release")
                    released = read_fact(child)
                    assert released["released"] is True
                    acquired_at = finish()
                    handovers.append((kind, acquired_at - released["released_at"], counting.acquires))
        finally:
            runner.close()
        self.assert_woken(persister, handovers)

    @staticmethod
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

    @staticmethod
    def assert_woken(persister: Persister, handovers: list[tuple[str, float, int]]) -> None:
        slow = [(kind, round(latency, 3)) for kind, latency, _ in handovers if latency >= WOKEN_WITHIN]
        assert slow == [], f"hand-overs that waited for a poll instead of a wake-up: {slow}"
        if persister.notifies:
            busy = [(kind, attempts) for kind, _, attempts in handovers if attempts > 4]
            assert busy == [], f"waiters that polled the store instead of waiting for the release: {busy}"

    # -- fair waiting: a free name goes to the longest waiter ----------------------------

    @staticmethod
    def need_fair(persister: Persister) -> None:
        if not persister.fair:
            pytest.skip(f"{persister.backend} does not queue waiters: a free name goes to whoever asks first")

    @not_per_api
    def test_fair_queue_primitives(self, persister: Persister, name: str) -> None:
        """Places are kept in arrival order, a waiter behind the head is refused, a non-waiting caller
        is not, and a place ends when its waiter leaves or stops renewing it."""
        self.need_fair(persister)
        holder, first, second, third = Owner(), Owner(), Owner(), Owner()
        assert persister.acquire(name, holder, 30).acquired
        assert not persister.acquire(name, first, 30, queue_for=30).acquired  # queued 1st
        assert not persister.acquire(name, second, 30, queue_for=30).acquired  # queued 2nd
        assert persister.release(name, holder.owner_token)
        refused = persister.acquire(name, second, 30, queue_for=30)
        assert not refused.acquired and refused.queued_behind, "the second waiter took the name from the first"
        assert refused.retry_after is not None and 0 < refused.retry_after <= 30
        barging = persister.acquire(name, third, 30)  # no queue_for: it does not wait, so it is not made to
        assert barging.acquired
        assert persister.release(name, third.owner_token)
        taken = persister.acquire(name, first, 30, queue_for=30)
        assert taken.acquired, "the head of the queue was refused a free name"
        assert persister.release(name, first.owner_token)
        assert persister.acquire(name, second, 30, queue_for=30).acquired, "the next waiter was not next"
        assert persister.release(name, second.owner_token)
        # A waiter that leaves, or whose place runs out, holds nobody up.
        assert persister.acquire(name, holder, 30).acquired
        assert not persister.acquire(name, first, 30, queue_for=30).acquired
        assert not persister.acquire(name, second, 30, queue_for=0.5).acquired
        assert not persister.acquire(name, third, 30, queue_for=30).acquired
        persister.leave_queue(name, first.owner_token)
        assert persister.release(name, holder.owner_token)
        assert eventually(lambda: persister.acquire(name, third, 30, queue_for=30).acquired, 10), \
            "a place that ran out kept holding the name"
        assert persister.release(name, third.owner_token)
        assert persister.get(name) is None

    def test_waiters_take_the_name_in_arrival_order(self, persister: Persister, name: str) -> None:
        self.need_fair(persister)
        holder = self.singleton(name, persister)
        assert holder.lock()
        order: list[int] = []
        threads = []
        for index in range(4):
            counting = CountingPersister(persister)
            waiter = self.singleton(name, counting)

            def wait(index: int = index, waiter: Any = waiter) -> None:
                assert waiter.lock(wait=60)
                order.append(index)
                time.sleep(0.05)
                assert waiter.release()

            threads.append(threading.Thread(target=wait, daemon=True))
            threads[-1].start()
            assert eventually(lambda counting=counting: counting.acquires >= 1, 20), "a waiter never tried"
        assert holder.release()
        for thread in threads:
            thread.join(90)
        assert order == [0, 1, 2, 3], f"waiters held the name in the order {order}"

    def test_releaser_asking_again_queues_behind_a_waiter(self, persister: Persister, name: str) -> None:
        """The classic unfair hand-over: the releaser asks again at once and takes the name back."""
        self.need_fair(persister)
        releaser = self.singleton(name, persister)
        waiter = self.singleton(name, CountingPersister(persister))
        assert releaser.lock()
        got: list[str] = []
        taken = threading.Event()

        def wait() -> None:
            assert waiter.lock(wait=60)
            got.append("waiter")
            taken.set()

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        assert eventually(lambda: waiter.persister.acquires >= 1, 20)
        assert releaser.release()
        assert releaser.lock(wait=0.3) is False, "the releaser took the name back from its waiter"
        assert taken.wait(30) and got == ["waiter"]
        thread.join(30)
        assert waiter.release()
        assert releaser.lock(wait=10)
        assert releaser.release()

    @not_per_api
    def test_waiter_in_another_process_is_not_overtaken(self, persister: Persister, name: str, store_url: str,
                                                       processes: list[subprocess.Popen[str]]) -> None:
        """Across processes: a release goes to the waiter of another process, not back to the releaser."""
        self.need_fair(persister)
        self.need_processes(persister)
        child = spawn_role("handover", {"name": name, "url": store_url, "wait": 60, "announce": True})
        processes.append(child)
        releaser = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        for _ in range(3):
            assert releaser.lock(wait=30)
            tell(child, "lock")
            assert read_fact(child)["waiting"], "the child did not wait"  # its place is in the queue
            asked_again = threading.Thread(target=lambda: releaser.lock(wait=60), daemon=True)
            assert releaser.release()
            asked_again.start()
            fact = read_fact(child, timeout=20)
            assert fact["acquired"], "the other process's waiter did not get the name"
            assert not releaser.held, "the releaser took the name back before the waiter held it"
            tell(child, "release")
            assert read_fact(child)["released"] is True
            asked_again.join(30)
            assert releaser.held, "the releaser, queued behind, never got the name"
            assert releaser.release()

    @not_per_api
    def test_watch_remembers_a_release_before_its_wait(self, persister: Persister, name: str) -> None:
        """A release between opening a watch and waiting on it wakes the wait at once (sync and async)."""
        if not persister.notifies:
            pytest.skip(f"{persister.backend} cannot notify; waiting polls every {persister.poll_interval} s")
        for mode in ("sync", "async"):
            holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
            assert holder.lock()
            with persister.watching(name) as watch:
                assert holder.release()
                started = time.monotonic()
                woken = watch.wait(10) if mode == "sync" else asyncio.run(watch.wait_async(10))
                took = time.monotonic() - started
            assert woken is True, f"{mode}: the wait did not report the release"
            assert took < WOKEN_WITHIN, f"{mode}: the remembered release took {took:.2f} s to wake the wait"

    @not_per_api
    def test_async_holder_is_released_at_exit_and_on_sigterm(self, persister: Persister, name: str, store_url: str,
                                                             processes: list[subprocess.Popen[str]]) -> None:
        self.need_processes(persister)
        child = spawn_role("async_hold", {"name": name, "url": store_url, "ttl": 300, "auto_renew": True})
        processes.append(child)
        assert read_fact(child)["acquired"]
        assert child.wait(timeout=30) == 0
        assert persister.get(name) is None, "exit did not release an AsyncSingleton's lock"
        child = spawn_role("async_hold", {"name": name, "url": store_url, "ttl": 300, "then": "sleep"})
        processes.append(child)
        assert read_fact(child)["acquired"]
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
        assert persister.get(name) is None, "SIGTERM did not release an AsyncSingleton's lock"

    # -- rule 14: retention ---------------------------------------------------------------------------

    @pytest.fixture
    def stored_state(self) -> Callable[[Persister, str], bool]:
        """Override: ``stored_state(persister, name)`` is True while the store keeps anything for ``name``.

        It may match ``name`` as a substring: the retention case gives its other names no such overlap.
        """
        pytest.skip("no stored_state fixture: override it to say whether the store keeps state for a name")

    @not_per_api
    def test_purge_after_seconds_option(self, store_url: str) -> None:
        """The retention option: 30 days by default, set by URL query or keyword, ``none`` keeps all state."""
        from ..persisters import DEFAULT_PURGE_AFTER_SECONDS

        def fresh(url: str) -> str:  # a memory:// name is one store per process, made with its first options
            return f"memory://{uuid.uuid4().hex}" + url.partition("?")[1] + url.partition("?")[2] \
                if url.startswith("memory://") else url

        for url, options, expected in (
            (store_url, {}, DEFAULT_PURGE_AFTER_SECONDS),
            (with_query(store_url, purge_after_seconds=5), {}, 5.0),
            (store_url, {"purge_after_seconds": 7}, 7.0),
            (with_query(store_url, purge_after_seconds="none"), {}, None),
            (store_url, {"purge_after_seconds": None}, None),
        ):
            store = persisters.from_url(fresh(url), **options)
            try:
                assert isinstance(store, _Retaining), f"{type(store).__name__} has no purge_after_seconds"
                assert store.purge_after_seconds == expected, (url, options)
            finally:
                store.close()
        for bad in ("-1", "soon"):
            with pytest.raises((TypeError, ValueError)):
                persisters.from_url(fresh(with_query(store_url, purge_after_seconds=bad)))

    @not_per_api
    def test_purge_removes_idle_state_and_tokens_still_rise(self, store_url: str, name: str,
                                                            stored_state: Callable[[Persister, str], bool]) -> None:
        purging = persisters.from_url(with_query(store_url, purge_after_seconds=1))
        try:
            # A short lease: a store may count the idle period from the lease's end, not the release.
            idle = Singleton(name, purging, lock_expire_seconds=2, release_on_sigterm=False)
            assert idle.lock()
            token = idle.fencing_token
            assert token is not None
            assert idle.release()
            # Other names must not contain ``name``: stored_state may look for it as a substring.
            kept = Singleton(f"held-{uuid.uuid4().hex}", purging, lock_expire_seconds=None, release_on_sigterm=False)
            assert kept.lock()
            assert stored_state(purging, name), "stored_state found nothing for a name just used"
            time.sleep(2.5)
            churn = Singleton(f"churn-{uuid.uuid4().hex}", purging, lock_expire_seconds=30, release_on_sigterm=False)

            sweep = getattr(purging, "purge", None)  # a store whose own sweep runs seldom may offer it on demand

            def purged() -> bool:
                # Other names come and go, giving an opportunistic sweep its chance.
                assert churn.lock() and churn.release()
                if callable(sweep):
                    sweep()
                return not stored_state(purging, name)

            assert eventually(purged, timeout=_PURGE_WAIT, interval=0.5), "an idle, free name's state was kept"
            assert kept.verify(), "a held name's state was purged"
            again = Singleton(name, purging, lock_expire_seconds=30, release_on_sigterm=False)
            assert again.lock()
            assert again.fencing_token is not None and again.fencing_token > token, \
                "the fencing token went back after the purge"
            assert again.release() and kept.release()
        finally:
            purging.close()
