"""The in-process store: minimum hold, retention, fencing after a purge, wake-ups and async, on the primitives.

The minimum-hold cases run on SQLite too (the ``store`` fixture): both stores
share the rules, and the conformance suite covers the rest on every store.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from singleton_integrations import persisters
from singleton_integrations._record import Owner
from singleton_integrations.persisters.memory import SWEEP_LIMIT


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> persisters.Persister:
    if request.param == "memory":
        return persisters.Memory()
    return persisters.Sqlite(tmp_path / "locks.sqlite3")


def _until(moment: float) -> None:
    """Sleep until the wall clock (the stores' clock) has passed ``moment``."""
    while time.time() <= moment:
        time.sleep(max(moment - time.time(), 0.001))


def test_release_into_the_hold_keeps_the_name_taken_and_marked_released(store: persisters.Persister) -> None:
    first, second = Owner(metadata={"deployment": "a"}), Owner()
    taken = store.acquire("nightly", first, 30, 0.4)
    assert taken.acquired and taken.record is not None and taken.record.hold_until is not None
    hold_until = taken.record.hold_until.timestamp()
    assert store.release("nightly", first.owner_token), "a release into the hold is a clean release"
    refused = store.acquire("nightly", second, 30)
    assert not refused.acquired and refused.record is not None and refused.record.released
    assert refused.record.owner_token == "", "a released record is no capability"
    assert refused.record.fencing_token == taken.record.fencing_token
    assert refused.retry_after is not None and 0 < refused.retry_after <= 0.4
    assert "ran at" in refused.record.describe() and "deployment=a" in refused.record.describe()
    held = store.get("nightly")
    assert held is not None and held.released_at is not None and held.hold_until is not None
    assert [r.name for r in store.list("night")] == ["nightly"], "listed while held for the hold"
    assert store.renew("nightly", first.owner_token, 30) is None, "the old token renews nothing"
    assert not store.release("nightly", first.owner_token), "nor releases it twice"
    _until(hold_until)
    after = store.acquire("nightly", second, 30)
    assert after.acquired and after.expired is None, "the end of a hold is not a takeover"
    assert after.record is not None and after.record.fencing_token > taken.record.fencing_token


def test_release_after_the_hold_frees_at_once(store: persisters.Persister) -> None:
    owner = Owner()
    taken = store.acquire("late", owner, 30, 0.05)
    assert taken.record is not None and taken.record.hold_until is not None
    _until(taken.record.hold_until.timestamp())
    assert store.release("late", owner.owner_token)
    assert store.get("late") is None and store.acquire("late", Owner(), 30).acquired


def test_the_hold_outlasts_a_shorter_lease(store: persisters.Persister) -> None:
    owner = Owner()
    taken = store.acquire("crashy", owner, 0.05, 0.5)  # the holder "crashes": it never renews or releases
    assert taken.record is not None and taken.record.expires_at == taken.record.hold_until
    _until(taken.record.created_at.timestamp() + 0.05)
    refused = store.acquire("crashy", Owner(), 30)
    assert not refused.acquired and refused.record is not None and not refused.record.released
    assert taken.record.hold_until is not None
    _until(taken.record.hold_until.timestamp())
    after = store.acquire("crashy", Owner(), 30)
    assert after.acquired and after.expired is not None, "a crashed holder's lease is a takeover"


def test_renew_never_ends_before_the_hold(store: persisters.Persister) -> None:
    owner = Owner()
    taken = store.acquire("renewed", owner, 1, 60)
    renewed = store.renew("renewed", owner.owner_token, 1)
    assert taken.record is not None and renewed is not None and renewed.expires_at == taken.record.hold_until
    longer = store.renew("renewed", owner.owner_token, 120)
    assert longer is not None and longer.expires_at is not None and renewed.expires_at is not None
    assert longer.expires_at > renewed.expires_at


def test_force_release_ends_a_hold(store: persisters.Persister) -> None:
    owner = Owner()
    store.acquire("forced", owner, 30, 60)
    store.release("forced", owner.owner_token)
    removed = store.force_release("forced")
    assert removed is not None and removed.released
    assert store.acquire("forced", Owner(), 30).acquired


def test_an_in_process_release_wakes_waiters_but_a_release_into_the_hold_does_not(
        store: persisters.Persister) -> None:
    owner = Owner()
    store.acquire("woken", owner, 30, 60)
    watch = store.watch("woken")
    try:
        hub = getattr(getattr(store, "_shared", None), "hub", None)
        if hub is not None and hub.subscribed.wait(30):  # SQLite's inotify listener wakes everyone once subscribed
            assert watch.wait(30)  # that wake-up comes just after ``subscribed`` is set: consume it
        store.release("woken", owner.owner_token)
        assert not watch.wait(0), "the name is not free: no wake-up"
        store.force_release("woken")
        assert watch.wait(0), "a wake-up before wait() is remembered, never lost"
        other = Owner()
        store.acquire("woken", other, 30)
        threading.Timer(0.05, store.release, ("woken", other.owner_token)).start()
        assert watch.wait(30), "woken by a release from another thread"
    finally:
        watch.close()


def test_async_waiters_in_one_loop_take_the_name_in_turn_each_woken_by_a_release(
        store: persisters.Persister) -> None:
    """One release wakes one waiter (the longest waiting); its own release wakes the next: no timeouts."""
    async def main() -> tuple[list[str], int]:
        holder = Owner()
        assert (await store.aacquire("crowd", holder, 30)).acquired
        order: list[str] = []
        timeouts = 0

        async def waiter(label: str) -> None:
            nonlocal timeouts
            owner = Owner()
            watch = store.watch("crowd")
            try:
                while not (await store.aacquire("crowd", owner, 30)).acquired:
                    if not await watch.wait_async(30):
                        timeouts += 1
                order.append(label)
                assert await store.arelease("crowd", owner.owner_token)
            finally:
                watch.close()

        tasks = [asyncio.ensure_future(waiter(f"w{i}")) for i in range(50)]
        await asyncio.sleep(0.05)  # every waiter has tried once and waits
        assert await store.arelease("crowd", holder.owner_token)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return order, timeouts

    order, timeouts = asyncio.run(main())
    assert sorted(order) == sorted(f"w{i}" for i in range(50)) and timeouts == 0


class _RefusingExecutor(ThreadPoolExecutor):
    def submit(self, *args: object, **kwargs: object):  # type: ignore[override]
        raise AssertionError("asyncio's default pool was used")


def test_async_primitives_never_use_the_default_pool(store: persisters.Persister) -> None:
    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(_RefusingExecutor(1))
        owner = Owner()
        taken = await store.aacquire("async", owner, 30, 0.01)
        assert taken.acquired and taken.record is not None
        assert (await store.aget("async")) is not None
        assert [r.name for r in await store.alist("as")] == ["async"]
        assert (await store.arenew("async", owner.owner_token, 30)) is not None
        assert await store.arelease("async", owner.owner_token)
        other = Owner()
        await asyncio.sleep(0.02)  # past the hold
        assert (await store.aacquire("async", other, 30)).acquired
        assert (await store.aforce_release("async")) is not None
        await store.aclose()

    asyncio.run(main())


# -- Memory only -------------------------------------------------------------------------------


def test_fresh_names_start_at_one_and_tokens_rise_after_a_purge() -> None:
    store = persisters.Memory(purge_after_seconds=0.05)
    tokens = []
    for _ in range(3):
        owner = Owner()
        result = store.acquire("recycled", owner, 30)
        assert result.record is not None
        tokens.append(result.record.fencing_token)
        store.release("recycled", owner.owner_token)
    assert tokens == [1, 2, 3]
    _until(time.time() + 0.06)
    assert store.purge() == 1 and "recycled" not in store._names, "its state is gone"
    again = store.acquire("recycled", Owner(), 30)
    assert again.record is not None and again.record.fencing_token > tokens[-1]


def test_sweeps_are_bounded_and_catch_up() -> None:
    store = persisters.Memory(purge_after_seconds=0.05)
    for index in range(SWEEP_LIMIT * 2 + 5):
        owner = Owner()
        store.acquire(f"n{index}", owner, 30)
        store.release(f"n{index}", owner.owner_token)
    held = Owner()
    store.acquire("forever", held, None)
    _until(time.time() + 0.06)
    store.acquire("trigger-1", Owner(), 30)
    assert len(store._names) == SWEEP_LIMIT + 5 + 2, "one sweep forgets at most SWEEP_LIMIT names"
    store.acquire("trigger-2", Owner(), 30)
    store.acquire("trigger-3", Owner(), 30)
    assert set(store._names) == {"forever", "trigger-1", "trigger-2", "trigger-3"}, "a backlog is swept next time"
    assert store.get("forever") is not None, "a live lock is never purged"


def test_purge_none_keeps_every_name() -> None:
    store = persisters.Memory(purge_after_seconds=None)
    owner = Owner()
    store.acquire("kept", owner, 30)
    store.release("kept", owner.owner_token)
    assert store.purge() == 0 and "kept" in store._names


def test_urls_and_options() -> None:
    assert persisters.from_url("memory://test-a") is persisters.from_url("memory://test-a")
    assert persisters.from_url("memory://test-b?purge_after_seconds=none").purge_after_seconds is None
    assert persisters.from_url("memory://test-c?purge_after_seconds=60").purge_after_seconds == 60
    assert persisters.from_url("memory://test-c?purge_after_seconds=60") is persisters.from_url("memory://test-c")
    with pytest.raises(ValueError, match="exists with purge_after_seconds=60"):
        persisters.from_url("memory://test-c", purge_after_seconds=5)
    assert persisters.from_url("memory://test-d?purge_after_seconds=1", purge_after_seconds=5).purge_after_seconds == 5
    assert persisters.Memory().purge_after_seconds == persisters.DEFAULT_PURGE_AFTER_SECONDS
    with pytest.raises(ValueError, match="unknown memory URL option"):
        persisters.from_url("memory://a?nope=1")
    for bad in (0, -1, float("inf"), True, "60"):
        with pytest.raises(ValueError):
            persisters.Memory(purge_after_seconds=bad)  # type: ignore[arg-type]
    for query in ("purge_after_seconds=abc", "purge_after_seconds=-5", "purge_after_seconds=0"):
        with pytest.raises(ValueError, match="purge_after_seconds"):
            persisters.from_url(f"memory://test-bad?{query}")
    assert persisters.from_url("memory://test-e?purge_after_seconds=never").purge_after_seconds is None


def test_a_prefix_that_is_not_text_is_refused() -> None:
    store = persisters.Memory()
    for bad in (42, None, b"job"):
        with pytest.raises(TypeError, match="prefix must be a str"):
            store.list(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="prefix must be a str"):
            asyncio.run(store.alist(bad))  # type: ignore[arg-type]
