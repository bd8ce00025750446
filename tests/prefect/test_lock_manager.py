"""``SingletonLockManager``: Prefect's LockManager protocol on every store, pickling, SERIALIZABLE across processes."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.client.schemas.objects import StateType
from prefect.filesystems import LocalFileSystem
from prefect.locking.protocol import LockManager

from prefect_blocks import SingletonBlock, SingletonLockManager

from .conftest import HERE, ROOT


@pytest.fixture
def key() -> str:
    return f"record-{uuid.uuid4().hex}"


def test_satisfies_the_protocol(store_url: str) -> None:
    assert isinstance(SingletonLockManager(store_url), LockManager)


def test_acquire_check_release(any_store_url: str, key: str) -> None:
    manager = SingletonLockManager(any_store_url)
    assert not manager.is_locked(key)
    assert manager.acquire_lock(key, holder="run-a", acquire_timeout=0)
    assert manager.is_locked(key)
    assert manager.is_lock_holder(key, "run-a") and not manager.is_lock_holder(key, "run-b")
    assert manager.acquire_lock(key, holder="run-a", acquire_timeout=0), "re-entrant for the same holder"
    assert not manager.acquire_lock(key, holder="run-b", acquire_timeout=0)
    assert not manager.acquire_lock(key, holder="run-b", acquire_timeout=0.2)
    assert not manager.wait_for_lock(key, timeout=0.2)
    with pytest.raises(ValueError, match=f"^No lock held by run-b for transaction with key {key}$"):
        manager.release_lock(key, holder="run-b")
    # Another instance (another worker, another host) releases by holder.
    SingletonLockManager(any_store_url).release_lock(key, holder="run-a")
    assert not manager.is_locked(key)
    assert manager.wait_for_lock(key, timeout=0)
    record = manager.persister.get(manager.lock_name(key))
    assert record is None
    assert manager.lock_name(key) == f"prefect-record:{key}"


def test_release_by_holder_as_prefect_redis_does(any_store_url: str, key: str) -> None:
    """A lock nobody holds releases quietly (a transaction retried after a rollback, PrefectHQ/prefect#17676);
    one another holder has raises, even when this holder released it before (a store answers a repeated
    release as done)."""
    manager = SingletonLockManager(any_store_url)
    manager.release_lock(key, holder="never-held")
    assert manager.acquire_lock(key, holder="run-a")
    manager.release_lock(key, holder="run-a")
    manager.release_lock(key, holder="run-a")
    assert manager.acquire_lock(key, holder="run-b", acquire_timeout=0)
    with pytest.raises(ValueError, match=f"^No lock held by run-a for transaction with key {key}$"):
        manager.release_lock(key, holder="run-a")
    assert manager.is_lock_holder(key, "run-b"), "the refused release left run-b's lock alone"
    manager.release_lock(key, holder="run-b")
    assert manager.acquire_lock(key, holder="run-c", hold_timeout=0.2)
    assert manager.wait_for_lock(key, timeout=30)
    manager.release_lock(key, holder="run-c")  # its hold timeout ran out: nothing to give back
    assert not manager.is_locked(key)


def test_hold_timeout_expires(any_store_url: str, key: str) -> None:
    manager = SingletonLockManager(any_store_url)
    assert manager.acquire_lock(key, holder="run-a", hold_timeout=0.3)
    assert manager.wait_for_lock(key, timeout=30), "free once the hold timeout passes, without a release"
    assert manager.acquire_lock(key, holder="run-b", acquire_timeout=0)
    manager.release_lock(key, holder="run-b")


def test_default_hold_timeout_applies_when_prefect_passes_none(store_url: str, key: str) -> None:
    manager = SingletonLockManager(store_url, default_hold_timeout=60)
    assert manager.acquire_lock(key, holder="run-a")
    record = manager.persister.get(manager.lock_name(key))
    assert 50 < (record.expires_at - record.created_at).total_seconds() <= 60
    assert SingletonLockManager(store_url).acquire_lock(f"{key}-forever", holder="run-a")
    assert manager.persister.get(manager.lock_name(f"{key}-forever")).expires_at is None


async def test_async_methods(any_store_url: str, key: str) -> None:
    manager = SingletonLockManager(any_store_url)
    assert await manager.aacquire_lock(key, holder="run-a", acquire_timeout=0)
    assert not await manager.aacquire_lock(key, holder="run-b", acquire_timeout=0.2)
    waiter = asyncio.create_task(manager.await_for_lock(key, timeout=30))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    manager.release_lock(key, holder="run-a")
    assert await waiter
    assert await manager.aacquire_lock(key, holder="run-c", acquire_timeout=0)
    blocked = asyncio.create_task(manager.aacquire_lock(key, holder="run-b", acquire_timeout=30))
    await asyncio.sleep(0.2)
    assert not blocked.done()
    await asyncio.to_thread(manager.release_lock, key, "run-c")
    assert await blocked
    assert manager.is_lock_holder(key, "run-b")
    manager.release_lock(key, holder="run-b")


async def test_cancelled_acquire_leaks_nothing(store_url: str, key: str) -> None:
    manager = SingletonLockManager(store_url)
    assert manager.acquire_lock(key, holder="run-a")
    attempt = asyncio.create_task(manager.aacquire_lock(key, holder="run-b"))
    await asyncio.sleep(0.2)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    manager.release_lock(key, holder="run-a")
    assert not manager.is_locked(key), "the cancelled waiter did not take the lock afterwards"


def test_pickles_configuration_not_clients(store_url: str, key: str) -> None:
    manager = SingletonLockManager(store_url, name_prefix="cache:", default_hold_timeout=120, metadata={"team": "etl"})
    assert manager.acquire_lock(key, holder="run-a")  # opens the store's connection in this process
    state = manager.__getstate__()
    assert state == {"url": store_url, "name_prefix": "cache:", "default_hold_timeout": 120.0, "metadata": {"team": "etl"}}
    clone = pickle.loads(pickle.dumps(manager))
    assert clone == manager and clone.is_lock_holder(key, "run-a")
    clone.release_lock(key, holder="run-a")
    assert not manager.is_locked(key)
    assert "s3cret" not in repr(SingletonLockManager("redis://:s3cret@127.0.0.1:6379/0"))


def test_block_hands_out_a_lock_manager(store_url: str) -> None:
    block = SingletonBlock(url=store_url, name_prefix="team-a/")
    manager = block.get_lock_manager()
    assert manager == SingletonLockManager(store_url, name_prefix="team-a/prefect-record:")


def test_serializable_transactions_across_two_processes(any_store_url: str, key: str, tmp_path: Path, child_env) -> None:
    results = tmp_path / "results"
    go = tmp_path / "go"
    command = [sys.executable, str(HERE / "txn_worker.py"), any_store_url, key, str(results)]
    first = subprocess.Popen([*command, "--hold-until", str(go)], stdout=subprocess.PIPE, text=True, env=child_env, cwd=ROOT)
    second = None
    try:
        assert json.loads(first.stdout.readline()) == {"event": "acquiring", "was_locked": False}
        assert json.loads(first.stdout.readline()) == {"event": "entered", "committed": False}
        observer = SingletonLockManager(any_store_url)
        assert observer.is_locked(key), "a third process sees the record locked in the shared store"
        second = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env, cwd=ROOT)
        # The second process found the record locked and is now blocked on it.
        assert json.loads(second.stdout.readline()) == {"event": "acquiring", "was_locked": True}
        go.touch()
        done_first = json.loads(first.stdout.readline())
        entered_second = json.loads(second.stdout.readline())
        done_second = json.loads(second.stdout.readline())
        assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert done_first == {"event": "done", "computed": True, "value": {"computed_by": first.pid}}
    # It waited for the lock, then read the committed record instead of computing again.
    assert entered_second == {"event": "entered", "committed": True}
    assert done_second == {"event": "done", "computed": False, "value": {"computed_by": first.pid}}
    assert not SingletonLockManager(any_store_url).is_locked(key)


def test_task_cache_policy_uses_the_lock_manager(store_url: str, tmp_path: Path) -> None:
    manager = SingletonLockManager(store_url)
    seen_locked: list[bool] = []
    policy = INPUTS.configure(isolation_level="SERIALIZABLE", lock_manager=manager)
    storage = LocalFileSystem(basepath=str(tmp_path))
    storage.save(f"results-{uuid.uuid4().hex[:8]}")

    @task(cache_policy=policy, persist_result=True, result_storage=storage)
    def expensive(x: int) -> int:
        seen_locked.append(bool(manager.persister.list("prefect-record:")))
        return x * 10

    @flow
    def twice(x: int):
        return expensive(x, return_state=True), expensive(x, return_state=True)

    first, second = twice(4)
    assert first.type is StateType.COMPLETED and first.result() == 40
    assert second.name == "Cached" and second.result() == 40
    assert seen_locked == [True], "computed once, under a lock in the store"
    assert manager.persister.list("prefect-record:") == []
