"""The persister interface itself: capabilities declared one way, ``from_url`` declared on ``Persister``,
and a third-party persister written against the older interface still serving both faces.

The "third-party" store below is written as plug-ins were before the capabilities
were declared one way: ``acquire`` without ``queue_for``, ``watch(name)`` without
an owner token, no ``from_url``, a watch that overrides ``wait_async`` without
saying it wakes coroutines, a ``leave_queue`` of its own though it is not fair.
Its locks live in a real in-process store (``Memory``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import ClassVar

import pytest

from singleton_integrations import AsyncSingleton, Singleton, persisters
from singleton_integrations._record import AcquireResult, LockRecord, Owner
from singleton_integrations.persisters import CAPABILITIES, HubWatch, Persister, ReleaseWatch, SleepWatch


class _OldWatch(ReleaseWatch):
    def __init__(self, inner: ReleaseWatch) -> None:
        self.inner = inner

    def wait(self, timeout: float) -> bool:
        return self.inner.wait(timeout)

    async def wait_async(self, timeout: float) -> bool:
        return await self.inner.wait_async(timeout)

    def close(self) -> None:
        self.inner.close()


class _OldStylePersister(Persister):
    """A plug-in as written against the older interface (see the module docstring)."""

    backend: ClassVar[str] = "old-style"
    notifies: ClassVar[bool] = True
    multiprocess: ClassVar[bool] = False

    def __init__(self) -> None:
        self.store = persisters.Memory()
        self.left: list[str] = []

    def acquire(self, name: str, owner: Owner, ttl: float | None,  # type: ignore[override]  # the older signature
                min_hold: float | None = None) -> AcquireResult:
        return self.store.acquire(name, owner, ttl)

    def release(self, name: str, owner_token: str) -> bool:
        return self.store.release(name, owner_token)

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return self.store.renew(name, owner_token, ttl)

    def get(self, name: str) -> LockRecord | None:
        return self.store.get(name)

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self.store.list(prefix)

    def force_release(self, name: str) -> LockRecord | None:
        return self.store.force_release(name)

    def leave_queue(self, name: str, owner_token: str) -> None:
        self.left.append(name)  # never called: the store is not fair

    def watch(self, name: str) -> ReleaseWatch:  # type: ignore[override]  # the older signature
        return _OldWatch(self.store.watch(name))


def test_from_url_is_declared_on_persister_and_a_class_without_one_says_so() -> None:
    assert isinstance(Persister.__dict__["from_url"], classmethod)
    assert Persister.from_url.__doc__ is not None and "plug-in must override it" in Persister.from_url.__doc__
    with pytest.raises(NotImplementedError, match="_OldStylePersister cannot be built from a URL"):
        _OldStylePersister.from_url("old-style://x")
    assert isinstance(persisters.Memory.from_url("memory://interface-test"), persisters.Memory)


def test_capabilities_are_the_declared_flags() -> None:
    assert CAPABILITIES == ("distributed", "multiprocess", "notifies", "fair", "supports_min_hold", "native_async",
                            "limits")
    assert persisters.Memory().capabilities() == {
        "distributed": False, "multiprocess": False, "notifies": True, "fair": True,
        "supports_min_hold": True, "native_async": True, "limits": True}
    assert _OldStylePersister().capabilities() == {
        "distributed": False, "multiprocess": False, "notifies": True, "fair": False,
        "supports_min_hold": False, "native_async": False, "limits": False}


def test_a_watch_says_whether_it_wakes_coroutines() -> None:
    assert ReleaseWatch.wakes_coroutines is False and SleepWatch.wakes_coroutines is False
    assert HubWatch.wakes_coroutines is True
    assert _OldWatch.wakes_coroutines is True  # it overrides wait_async: taken to be woken, as before

    class Declared(ReleaseWatch):
        wakes_coroutines: ClassVar[bool] = False

        async def wait_async(self, timeout: float) -> bool:
            await asyncio.sleep(timeout)
            return False

    assert Declared.wakes_coroutines is False  # a declaration wins


def test_only_a_fair_store_is_asked_to_leave_a_queue() -> None:
    old = _OldStylePersister()
    asyncio.run(old.aleave_queue("job", Owner().owner_token))
    assert old.left == []
    fair = persisters.Memory()
    holder, waiter = Owner(), Owner()
    assert fair.acquire("job", holder, 30).acquired
    assert not fair.acquire("job", waiter, 30, queue_for=30).acquired  # queued
    asyncio.run(fair.aleave_queue("job", waiter.owner_token))
    assert fair.release("job", holder.owner_token)
    assert fair.acquire("job", Owner(), 30, queue_for=30).acquired  # nobody queued ahead any more


def test_an_old_style_persister_still_serves_both_faces_and_its_waiters_are_woken() -> None:
    store = _OldStylePersister()
    holder = Singleton("job", store, lock_expire_seconds=30, release_on_sigterm=False)
    assert holder.lock()
    with store.watching("job", Owner().owner_token) as watch:  # a token is not passed to a store that is not fair
        assert isinstance(watch, _OldWatch)
    threading.Timer(0.2, holder.release).start()
    waiter = Singleton("job", store, lock_expire_seconds=30, release_on_sigterm=False)
    assert waiter.lock(wait=30)
    assert waiter.release()

    async def scenario() -> None:
        first = AsyncSingleton("job", store, lock_expire_seconds=30, release_on_sigterm=False)
        second = AsyncSingleton("job", store, lock_expire_seconds=30, release_on_sigterm=False)
        assert await first.lock()
        waiting = asyncio.create_task(second.lock(wait=30))
        await asyncio.sleep(0.1)
        assert await first.release()
        assert await waiting
        assert await second.release()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="supports_min_hold"):
        Singleton("job", store, min_hold_seconds=5)


def test_every_builtin_persister_declares_from_url() -> None:
    for cls in {persisters.schemes()[scheme] for scheme in ("memory", "sqlite", "redis", "postgresql", "mongodb", "mysql")}:
        assert "from_url" in cls.__dict__, f"{cls.__name__} relies on Persister.from_url"
