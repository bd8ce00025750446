"""AsyncSingleton on every persister: native waits and cancellation, renewal on the loop, the shared rules."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from singleton_integrations import AsyncSingleton, LockConflict, LockLost, Singleton, _singleton, persisters
from singleton_integrations.persisters import Persister, ReleaseWatch
from singleton_integrations.persisters._base import BLOCKING_IO_WORKERS


@pytest.fixture
def persister(store_url: str) -> Iterator[Persister]:
    store = persisters.from_url(store_url)
    yield store
    store.close()


@pytest.fixture
def name() -> str:
    return f"core-async-{uuid.uuid4().hex}"


def make(name: str, persister: Persister, **options: Any) -> AsyncSingleton:
    options.setdefault("lock_expire_seconds", 30)
    options.setdefault("release_on_sigterm", False)
    return AsyncSingleton(name, persister, **options)


def gate_async(
    persister: Persister, method: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Hold every call of the coroutine ``method`` until ``opened``; ``entered`` says one is in flight."""
    original = getattr(persister, method)
    entered, opened = threading.Event(), threading.Event()

    async def gated(*args: Any) -> Any:
        entered.set()
        while not opened.is_set():
            await asyncio.sleep(0.01)
        return await original(*args)

    monkeypatch.setattr(persister, method, gated)
    return entered, opened


def test_lock_conflict_release_and_events(persister: Persister, name: str) -> None:
    async def main() -> None:
        first, second = make(name, persister), make(name, persister)
        seen: list[str] = []
        for event in ("locked", "conflict", "released"):
            first.on(event, lambda message, event=event: seen.append(event))
            second.on(event, lambda message, event=event: seen.append(event))
        assert await first.lock() and first.held and first.fencing_token is not None
        assert not await second.lock() and second.last_holder is not None
        assert await second.exists() and (await second.holder()).owner_token == first.record.owner_token
        assert await first.verify()
        assert await first.release() and not first.held
        assert seen == ["locked", "conflict", "released"]
        with pytest.raises(LockConflict):
            async with first, second:
                pass

    asyncio.run(main())


def test_wait_is_woken_by_release_and_holds_no_thread(persister: Persister, name: str) -> None:
    async def main() -> None:
        holder = make(name, persister)
        assert await holder.lock()
        before = threading.active_count()
        waiters = [make(name, persister) for _ in range(40)]
        order: list[int] = []

        async def wait_then_release(index: int, waiter: AsyncSingleton) -> None:
            assert await waiter.lock(wait=60), f"waiter {index} never got the lock"
            order.append(index)
            await waiter.release()

        tasks = [asyncio.create_task(wait_then_release(i, w)) for i, w in enumerate(waiters)]
        await asyncio.sleep(0.5)
        # Forty waiters, yet only the bounded executor (sync-only persisters) and listener threads exist.
        assert threading.active_count() - before <= BLOCKING_IO_WORKERS + 4
        assert await holder.release()
        await asyncio.gather(*tasks)
        assert sorted(order) == list(range(40))

    asyncio.run(main())


def test_cancelled_waiter_returns_at_once_and_holds_nothing(persister: Persister, name: str) -> None:
    async def main() -> None:
        holder, waiter = make(name, persister), make(name, persister)
        assert await holder.lock()
        task = asyncio.create_task(waiter.lock(wait=60))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)  # "at once": well inside its 60 s wait
        assert not waiter.held
        assert await holder.release()
        await asyncio.sleep(0.3)
        assert await persister.aget(name) is None, "the cancelled waiter took the lock after all"
        assert await holder.lock()
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):  # wait_for cancels the wait: same rule
            await asyncio.wait_for(waiter.lock(wait=60), 0.5)
        assert not waiter.held and await holder.release()
        await asyncio.sleep(0.3)
        assert await persister.aget(name) is None

    asyncio.run(main())


def test_acquire_completed_as_cancellation_arrived_is_released(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, opened = gate_async(persister, "aacquire", monkeypatch)
    original, took = persister.aacquire, threading.Event()

    async def noted(*args: Any) -> Any:
        result = await original(*args)
        took.set()
        return result

    monkeypatch.setattr(persister, "aacquire", noted)

    async def main() -> None:
        waiter = make(name, persister)
        task = asyncio.create_task(waiter.lock())
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the acquire is on its way to the store
        with pytest.raises(asyncio.CancelledError):
            await task
        opened.set()  # ... and now takes the lock, for a waiter that is gone
        while not took.is_set():
            await asyncio.sleep(0.01)
        for _ in range(500):  # the background clean-up needs a round trip or two
            if await persister.aget(name) is None:
                break
            await asyncio.sleep(0.01)
        assert await persister.aget(name) is None, "an acquire completed after cancellation leaked the lock"
        assert not waiter.held

    asyncio.run(main())


def test_concurrent_locks_on_one_object_share_one_attempt(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = persister.aacquire
    calls = [0]

    async def counted(*args: Any) -> Any:
        calls[0] += 1
        return await original(*args)

    monkeypatch.setattr(persister, "aacquire", counted)
    original_release = persister.arelease
    releases = [0]

    async def counted_release(*args: Any) -> Any:
        releases[0] += 1
        return await original_release(*args)

    monkeypatch.setattr(persister, "arelease", counted_release)

    async def main() -> None:
        singleton = make(name, persister)
        for trial in range(20):
            answers = await asyncio.gather(*(singleton.lock() for _ in range(5)))
            assert answers == [True] * 5 and calls[0] == trial + 1
            results = await asyncio.gather(*(singleton.release() for _ in range(3)))
            # Each joined the one release in flight (True), or came after it finished (False).
            assert results[0] is True and releases[0] == trial + 1
        assert await persister.aget(name) is None

    asyncio.run(main())


def test_async_with_is_reentrant(persister: Persister, name: str) -> None:
    async def main() -> None:
        singleton, other = make(name, persister), make(name, persister)
        async with singleton:
            async with singleton:
                pass
            assert singleton.held and not await other.lock()
        assert not singleton.held and await other.lock() and await other.release()

    asyncio.run(main())


def test_renewal_is_a_task_on_the_loop(persister: Persister, name: str) -> None:
    async def main() -> None:
        singleton = make(name, persister, lock_expire_seconds=1.0, auto_renew=True, renew_interval=0.2)
        renewed: list[str] = []
        singleton.on("renewed", renewed.append)
        async with singleton:
            assert not any(t.name == f"singleton-renew:{name}" for t in threading.enumerate())  # no thread for this lock
            assert any(t.get_name() == f"singleton-renew:{name}" for t in asyncio.all_tasks())
            await asyncio.sleep(1.6)  # past the 1 s lease: renewals kept it
            assert singleton.held and await singleton.verify() and len(renewed) >= 3
        assert not any(t.get_name().startswith("singleton-renew") for t in asyncio.all_tasks() if not t.done())

    asyncio.run(main())


def test_hung_async_renewal_is_lost_in_time_and_the_block_fails(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        singleton = make(name, persister, lock_expire_seconds=1.0, auto_renew=True, renew_interval=0.2)
        lost: list[str] = []
        singleton.on("lost", lost.append)
        entered, opened = gate_async(persister, "arenew", monkeypatch)
        with pytest.raises(LockLost):
            async with singleton:
                for _ in range(500):
                    if lost:
                        break
                    await asyncio.sleep(0.01)
                assert entered.is_set() and lost and not singleton.held
                assert (await persister.aget(name)) is not None, "lost fired after the store's lease had ended"
        opened.set()
        assert await persister.aget(name) is None  # the exit still released the kept token

    asyncio.run(main())


def test_release_racing_async_renewal_is_not_a_loss(persister: Persister, name: str) -> None:
    async def main() -> None:
        singleton = make(name, persister, auto_renew=True, renew_interval=0.001)
        lost: list[str] = []
        singleton.on("lost", lost.append)
        for _ in range(100):
            assert await singleton.lock()
            await asyncio.sleep(0.002)
            assert await singleton.release()
        assert lost == [] and not singleton.lost

    asyncio.run(main())


def test_sync_face_shares_the_hold(persister: Persister, name: str) -> None:
    async def main() -> None:
        singleton = make(name, persister)
        assert await singleton.lock()
        face = singleton.sync
        assert isinstance(face, Singleton) and face.held and face.fencing_token == singleton.fencing_token
        assert face.lock()  # already held: no second attempt
        assert await singleton.release() and not face.held

    asyncio.run(main())


def test_wait_for_bounds_a_wait_on_a_free_or_held_name(persister: Persister, name: str) -> None:
    async def main() -> None:
        free = make(name, persister)
        assert await asyncio.wait_for(free.lock(wait=10), 5)
        waiter = make(name, persister)
        started = time.monotonic()
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(waiter.lock(wait=30), 0.5)
        assert time.monotonic() - started < 10 and not waiter.held
        assert await free.release()

    asyncio.run(main())


class _WokenAtTheEnd(ReleaseWatch):
    """A watch whose wake-up lands exactly as each slice times out (the lost wake-up of issue 10)."""

    def __init__(self) -> None:
        self.calls = 0

    def wait(self, timeout: float) -> bool:
        self.calls += 1
        time.sleep(timeout)
        return True


def test_cancellable_wait_does_not_mistake_a_late_wake_up_for_a_timeout() -> None:
    watch = _WokenAtTheEnd()
    assert _singleton._wait_cancellable(watch, 5.0, threading.Event()) is True
    assert watch.calls == 1, "a wake-up at the end of a slice must end the wait"
