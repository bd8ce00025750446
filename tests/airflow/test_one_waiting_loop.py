"""The hook and the guarded group wait through the core's loop: in the store's queue, woken by the release.

On a fair store (Redis) a waiter that queued first holds first, and the Airflow waiter
behind it is woken by that waiter's release. The core's safety poll is pushed to
``NEVER`` seconds for the test, so a waiter that gets in within its wait was woken:
no poll could have let it in.
"""

from __future__ import annotations

import datetime
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from airflow.sdk import DAG, task

from airflow_provider import SingletonOperator
from airflow_provider.hooks.singleton import SingletonHook
from singleton_integrations import Singleton, _lockstate
from singleton_integrations.testing.conformance import CountingPersister
from singleton_integrations.testing.observing import ObservedPersister
from tests.airflow._dagrun import run_dag

NEVER = 1000.0  # no safety poll: only a release's wake-up ends a pause
WAIT = 300.0  # each waiter's own wait: far longer than the test, so no deadline lets anyone in
TTL = 600.0  # the holders' leases: their end must not be what lets a waiter in

pytestmark = pytest.mark.parametrize("store", ["redis"], indirect=True)  # a store that queues waiters


@pytest.fixture(autouse=True)
def woken_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lockstate, "NOTIFY_SAFETY_POLL", NEVER)
    # A queue place is kept alive by the waiter's next look, which never comes here: it lasts the test.
    monkeypatch.setattr(_lockstate, "QUEUE_PLACE_SECONDS", NEVER)


@pytest.fixture
def observed(store: Any, monkeypatch: pytest.MonkeyPatch) -> ObservedPersister:
    """What every hook of the test's connection gets from ``get_conn()``."""
    seen = ObservedPersister(store.persister())
    monkeypatch.setattr(SingletonHook, "get_conn", lambda self: seen)
    return seen


def _eventually(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _queued_first(store: Any, name: str, order: list[str]) -> tuple[Singleton, threading.Thread, CountingPersister]:
    """A holder of ``name``, and a Singleton waiter queued behind it that holds 0.3 s once its turn comes."""
    persister = store.persister()
    holder = Singleton(name, persister, lock_expire_seconds=TTL, release_on_sigterm=False)
    assert holder.lock()
    counted = CountingPersister(persister)
    first = Singleton(name, counted, lock_expire_seconds=TTL, release_on_sigterm=False)

    def turn() -> None:
        assert first.lock(wait=WAIT)
        order.append("first")
        time.sleep(0.3)  # the Airflow waiter, queued behind, keeps waiting meanwhile
        assert first.release()

    thread = threading.Thread(target=turn, daemon=True)
    thread.start()
    assert _eventually(lambda: counted.acquires >= 1), "the first waiter never tried"
    return holder, thread, counted


def test_the_hook_waits_its_turn_behind_a_waiter_that_queued_first(store: Any, observed: ObservedPersister) -> None:
    name = f"airflow-loop-{uuid.uuid4().hex[:12]}"
    order: list[str] = []
    holder, first, _ = _queued_first(store, name, order)
    hook = SingletonHook(singleton_conn_id=store.conn_id)
    results: list[Any] = []
    second = threading.Thread(target=lambda: results.append(hook.acquire(name, lock_expire_seconds=TTL, wait=WAIT)),
                              daemon=True)
    second.start()
    time.sleep(0.5)  # the hook's waiter has queued (behind the first): the release goes to the first
    assert holder.release()
    first.join(60)
    second.join(60)
    assert results and results[0].acquired, f"the hook's waiter was not woken by the release: {results}"
    order.append("hook")
    assert order == ["first", "hook"]
    assert observed.waits and observed.waits[-1] is True, f"the hook's last wait was not woken: {observed.waits}"
    assert hook.release(name, results[0].record.owner_token)


def test_the_guarded_group_waits_its_turn_behind_a_waiter_that_queued_first(store: Any, observed: ObservedPersister) -> None:
    name = f"airflow-loop-{uuid.uuid4().hex[:12]}"
    order: list[str] = []
    holder, first, _ = _queued_first(store, name, order)
    with (
        DAG(f"group_loop_{uuid.uuid4().hex[:8]}", schedule=None, catchup=False,
            start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)) as dag,
        SingletonOperator(task_id="guard", lock_name=name, singleton_conn_id=store.conn_id, on_conflict="wait",
                          wait_timeout=WAIT, poll_interval=NEVER, lock_expire_seconds=TTL),
    ):

        @task
        def guarded() -> None:
            order.append("group")

        guarded()
    # dag.test() runs in this (main) thread; the holder lets go once the setup task is waiting (its
    # one attempt and its first waiting attempt were made), queued behind the first waiter.
    def release_once_the_setup_waits() -> None:
        assert _eventually(lambda: observed.acquires >= 2, 120), "the setup task never waited"
        holder.release()

    threading.Thread(target=release_once_the_setup_waits, daemon=True).start()
    tis = run_dag(dag)
    first.join(60)
    states = {task_id: ti.state for task_id, ti in tis.items()}
    assert states.get("guard") == "success" and states.get("guard_release") == "success", states
    assert order == ["first", "group"], order
    assert observed.waits and observed.waits[-1] is True, f"the setup's last wait was not woken: {observed.waits}"
    assert store.holder(name) is None
