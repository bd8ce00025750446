"""The lock manager waits through the core's loop: in the store's queue, woken by the release.

On a fair store (Redis) a transaction whose lock is busy waits behind a waiter that
queued first, and is woken by that waiter's release. The core's safety poll is pushed
to ``NEVER`` seconds for the test, so a waiter that gets in within its wait was woken.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_blocks import SingletonLockManager
from singleton_integrations import Singleton, _lockstate, persisters
from singleton_integrations.testing.conformance import CountingPersister
from singleton_integrations.testing.observing import ObservedPersister
from tests.conftest import store_url_for

NEVER = 1000.0
WAIT = 300.0
TTL = 600.0


@pytest.fixture(autouse=True)
def woken_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lockstate, "NOTIFY_SAFETY_POLL", NEVER)
    # A queue place is kept alive by the waiter's next look, which never comes here: it lasts the test.
    monkeypatch.setattr(_lockstate, "QUEUE_PLACE_SECONDS", NEVER)


def _eventually(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_transaction_waits_its_turn_behind_a_waiter_that_queued_first(
    tmp_path: Path, face: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = store_url_for("redis", tmp_path)
    manager = SingletonLockManager(url)
    key = f"record-{uuid.uuid4().hex[:12]}"
    name = manager.lock_name(key)
    store = persisters.from_url(url)
    observed = ObservedPersister(store)
    monkeypatch.setattr(SingletonLockManager, "persister", property(lambda self: observed))
    holder = Singleton(name, store, lock_expire_seconds=TTL, release_on_sigterm=False)
    assert holder.lock()
    counted = CountingPersister(store)
    first = Singleton(name, counted, lock_expire_seconds=TTL, release_on_sigterm=False)
    order: list[str] = []

    def first_turn() -> None:
        assert first.lock(wait=WAIT)
        order.append("first")
        time.sleep(0.3)  # the transaction, queued behind, keeps waiting meanwhile
        assert first.release()

    waiter = threading.Thread(target=first_turn, daemon=True)
    waiter.start()
    assert _eventually(lambda: counted.acquires >= 1), "the first waiter never tried"
    got: list[bool] = []

    def transaction() -> None:
        if face == "sync":
            got.append(manager.acquire_lock(key, "txn-b", acquire_timeout=WAIT, hold_timeout=TTL))
        else:
            got.append(asyncio.run(manager.aacquire_lock(key, "txn-b", acquire_timeout=WAIT, hold_timeout=TTL)))
        order.append("transaction")

    second = threading.Thread(target=transaction, daemon=True)
    second.start()
    time.sleep(0.5)  # the transaction has queued behind the first waiter (if not, it queues on its first look)
    assert holder.release()
    waiter.join(60)
    second.join(60)
    assert got == [True], "the transaction was not woken by the release"
    assert order == ["first", "transaction"], order
    assert observed.waits and observed.waits[-1] is True, f"the transaction's last wait was not woken: {observed.waits}"
    assert manager.is_lock_holder(key, "txn-b")
    manager.release_lock(key, "txn-b")
    assert not manager.is_locked(key)
    store.close()
