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
URL option and a ``stored_state`` fixture (see ``test_purge_*``).
"""

from __future__ import annotations

import asyncio
import inspect
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
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from .. import AsyncSingleton, LockConflict, LockLost, Singleton, SingletonError, persisters
from .._record import AcquireResult, LockRecord, Owner
from ..persisters import Persister

__all__ = ["APIS", "PLAIN_NAMES", "WOKEN_WITHIN", "AsyncDriven", "CountingPersister", "EventLoopThread",
           "PersisterConformance", "not_per_api", "read_fact", "spawn_role", "with_query"]

_T = TypeVar("_T")

#: The two faces of the lock every per-API case runs on.
APIS = ("sync", "async")
#: Without a notification, a waiter on a notifying store looks again every 2 s
#: (the core's safety poll); a hand-over faster than half that was a wake-up,
#: whatever the machine's load. A bound on "woken, not polled", not a speed claim.
WOKEN_WITHIN = 1.0

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
    parts = urlsplit(url)
    query = {**dict(parse_qsl(parts.query)), **{key: str(value) for key, value in options.items()}}
    return urlunsplit(parts._replace(query=urlencode(query)))


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
    return json.loads(line)


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

    def __enter__(self) -> AsyncDriven:
        self.runner.run(self.inner.__aenter__())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.runner.run(self.inner.__aexit__(*exc_info))

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
        for attribute in ("backend", "distributed", "multiprocess", "notifies", "clock", "poll_interval",
                          "native_async", "call_timeout"):
            if hasattr(inner, attribute):
                setattr(self, attribute, getattr(inner, attribute))
        self.supports_min_hold = inner.supports_min_hold if supports_min_hold is None else supports_min_hold  # type: ignore[misc]

    def _count(self) -> None:
        with self._count_guard:
            self.acquires += 1

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "inner":
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None) -> AcquireResult:
        self._count()
        if min_hold is None:
            return self.inner.acquire(name, owner, ttl)
        return self.inner.acquire(name, owner, ttl, min_hold)

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None) -> AcquireResult:
        self._count()
        if min_hold is None:
            return await self.inner.aacquire(name, owner, ttl)
        return await self.inner.aacquire(name, owner, ttl, min_hold)

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

    async def alist(self, prefix: str = "") -> list[LockRecord]:
        return await self.inner.alist(prefix)

    def force_release(self, name: str) -> LockRecord | None:
        return self.inner.force_release(name)

    async def aforce_release(self, name: str) -> LockRecord | None:
        return await self.inner.aforce_release(name)

    def watch(self, name: str) -> Any:
        return self.inner.watch(name)

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

    @pytest.fixture
    def api(self, request: pytest.FixtureRequest) -> str:
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
            singleton.on(event, lambda payload, event=event: seen.append((event, payload)))
        return seen

    @staticmethod
    def wait_until_expired(persister: Persister, name: str) -> None:
        assert eventually(lambda: persister.get(name) is None), "the lock never expired by the store's clock"

    def need_processes(self, persister: Persister) -> None:
        if not persister.multiprocess:
            pytest.skip(f"{persister.backend} lives inside one process")

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
            with pytest.raises(LockConflict) as caught:
                with self.singleton(name, persister):
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
        assert persister.get(name).owner_token == new.record.owner_token
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
        overlaps = sum(1 for a, b in zip(holds, holds[1:]) if b["start"] < a["end"])
        assert overlaps == 0
        tokens = [hold["token"] for hold in holds]
        assert tokens == sorted(set(tokens)), "fencing tokens did not rise with the holds"
        assert all(hold["released"] for hold in holds)

    # -- rule 3: the store's clock ---------------------------------------------------------

    @not_per_api
    def test_client_clock_skew_neither_steals_nor_shortens(self, persister: Persister, name: str, store_url: str,
                                                             processes: list[subprocess.Popen[str]]) -> None:
        if not persister.distributed:
            pytest.skip(f"{persister.backend} judges expiry by {persister.clock}, which every client shares")
        faketime = shutil.which("faketime")
        if faketime is None:
            if os.environ.get("CI") == "true":
                pytest.fail("faketime is not installed (apt-get install faketime)")
            pytest.skip("faketime is not installed (apt-get install faketime)")
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
        holder = self.singleton(name, persister, lock_expire_seconds=0.6, auto_renew=True)
        events = self.record_events(holder)
        assert holder.lock()
        time.sleep(2.0)
        assert self.singleton(name, persister).lock() is False
        assert holder.verify()
        renewals = [event for event, _ in events].count("renewed")
        assert renewals >= 2
        assert holder.release()
        time.sleep(0.6)
        assert [event for event, _ in events].count("renewed") == renewals, "renewal went on after release"
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
        with pytest.raises(LockLost):
            with self.singleton(name, persister, lock_expire_seconds=0.3) as held:
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
