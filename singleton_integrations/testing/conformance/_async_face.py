"""The async face: the ``a*`` twins keep the sync primitives' rules, on any event loop, for many waiters."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ... import AsyncSingleton, LockConflict, persisters
from ..._record import Owner
from ...persisters import Persister
from ._helpers import (
    NOT_STARVED,
    WOKEN_WITHIN,
    not_per_api,
)
from ._kit import ConformanceKit

__all__ = ["AsyncFace"]


class AsyncFace(ConformanceKit):
    """The async face: the async twins (``aacquire``, ``arelease``, ...) keep the primitives' rules, native or
    through the bounded executor; successive event loops are served; 100 waiters in one loop hold no thread
    each and take turns; a cancelled waiter returns at once and holds nothing.

    Asks of the store: nothing to declare; the defaults run the sync primitives in the executor, and
    ``native_async`` twins must keep the same rules.
    """

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
        assert release_took < NOT_STARVED, f"the holder's release took {release_took:.1f} s behind {waiters} waiters"
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
