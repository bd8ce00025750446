"""Issue 6's states table, row by row, on every store, with another process holding the lock."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.objects import StateType
from prefect.states import State

from prefect_blocks import LockConflict, LockLost, SingletonBlock, current_lock, singleton

from .conftest import held_elsewhere


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def api_state(state: State) -> State:
    """The run's final state as the Prefect API (and the UI) sees it."""
    with get_client(sync_client=True) as client:
        if state.state_details.task_run_id is not None:
            return client.read_task_run(state.state_details.task_run_id).state
        return client.read_flow_run(state.state_details.flow_run_id).state


def guarded_flow(block: SingletonBlock | str, lock_name: str, **options):
    @flow(name=f"guarded-{uuid.uuid4().hex[:6]}")
    @singleton(block=block, lock_name=lock_name, **options)
    def job(value: int) -> int:
        lock = current_lock()
        assert lock is not None and lock.held
        return value * 2

    return job


# -- every row, on every store -----------------------------------------------------


def test_acquired_work_done_is_completed(any_store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=any_store_url, lock_expire_seconds=30)
    state = guarded_flow(block, lock_name)(21, return_state=True)
    assert state.type is StateType.COMPLETED and state.name == "Completed"
    assert state.result() == 42
    assert api_state(state).name == "Completed"
    assert block.holder(lock_name) is None, "released after the run"


def test_held_elsewhere_skip_is_completed_named_skipped(any_store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=any_store_url, lock_expire_seconds=30)
    with held_elsewhere(any_store_url, lock_name, "--metadata", "deployment=nightly-b") as held:
        state = guarded_flow(block, lock_name)(21, return_state=True)
        assert block.holder(lock_name).pid == held.pid, "the other process still holds it"
    assert state.type is StateType.COMPLETED and state.name == "Skipped"
    # Said once, the holder first; the fencing token is in the event and LockConflict.holder, not the message.
    assert state.message.startswith(f"lock '{lock_name}' is held by ")
    assert f"pid {held.pid}" in state.message and "deployment=nightly-b" in state.message
    seen = api_state(state)
    assert (seen.type, seen.name) == (StateType.COMPLETED, "Skipped") and f"pid {held.pid}" in seen.message


def test_held_elsewhere_fail_is_failed_with_lock_conflict(any_store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=any_store_url, lock_expire_seconds=30)
    with held_elsewhere(any_store_url, lock_name) as held:
        state = guarded_flow(block, lock_name, on_conflict="fail")(21, return_state=True)
    assert state.type is StateType.FAILED
    with pytest.raises(LockConflict, match=f"pid {held.pid}") as raised:
        state.result()
    assert raised.value.name == lock_name and raised.value.holder.pid == held.pid
    assert "LockConflict" in api_state(state).message


class LockAttempts(logging.Handler):
    """Sees the core's ``locking`` log line: the moment a run starts asking for a lock."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.name_wanted = name
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "singleton_event", None) == "locking" and getattr(record, "singleton_name", None) == self.name_wanted:
            self.seen.set()


def test_wait_runs_once_the_lock_is_free(any_store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=any_store_url, lock_expire_seconds=30)

    @flow
    @singleton(block=block, lock_name=lock_name, on_conflict="wait", wait_timeout=120)
    def job() -> int:
        return current_lock().fencing_token

    attempts = LockAttempts(lock_name)
    core_logger = logging.getLogger("singleton_integrations")
    level = core_logger.level
    core_logger.addHandler(attempts)
    core_logger.setLevel(logging.DEBUG)
    try:
        with held_elsewhere(any_store_url, lock_name) as held:
            # Free the lock only once the run is already waiting on it.
            releaser = threading.Thread(target=lambda: attempts.seen.wait(60) and held.release())
            releaser.start()
            state = job(return_state=True)
            releaser.join(60)
    finally:
        core_logger.removeHandler(attempts)
        core_logger.setLevel(level)
    assert attempts.seen.is_set()
    assert state.type is StateType.COMPLETED and state.name == "Completed"
    assert state.result() > held.fencing_token, "acquired after the other holder, with a larger fencing token"
    assert block.holder(lock_name) is None


def test_wait_times_out_as_failed(any_store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=any_store_url, lock_expire_seconds=30)
    with held_elsewhere(any_store_url, lock_name) as held:
        state = guarded_flow(block, lock_name, on_conflict="wait", wait_timeout=0.5)(1, return_state=True)
    assert state.type is StateType.FAILED
    with pytest.raises(LockConflict, match=r"after waiting 0\.5 s") as raised:
        state.result()
    assert raised.value.holder.pid == held.pid


def test_lock_lost_while_running_is_failed(any_store_url: str, lock_name: str, child_env: dict[str, str]) -> None:
    # Renewal every 0.5 s notices within a second that another process took the lock.
    block = SingletonBlock(url=any_store_url, lock_expire_seconds=1.5, auto_renew=True)

    @flow
    @singleton(block=block, lock_name=lock_name)
    def long_job() -> str:
        lock = current_lock()
        with held_elsewhere(any_store_url, lock_name, "--takeover", env=child_env):
            wait_until(lambda: lock.lost)
        return "side effects done without exclusivity"

    state = long_job(return_state=True)
    assert state.type is StateType.FAILED
    assert "exclusivity on lock" in state.message and "was lost" in state.message
    with pytest.raises(LockLost):
        state.result()
    assert "was lost" in api_state(state).message


# -- flows and tasks, sync and async -------------------------------------------------


def make_shape(shape: str, block: SingletonBlock | str, lock_name: str):
    """A flow whose guarded unit is a sync/async flow/task; returns (flow, is_task)."""
    kind, mode = shape.split("-")
    if mode == "sync":
        def unit(value: int) -> int:
            return value + 1
    else:
        async def unit(value: int) -> int:
            return value + 1
    guarded = singleton(block=block, lock_name=lock_name + "-{value}")(unit)
    if kind == "flow":
        return flow(name=f"unit-{shape}")(guarded)
    unit_task = task(name=f"unit-{shape}")(guarded)
    if mode == "sync":
        @flow(name=f"parent-{shape}")
        def parent(value: int):
            return unit_task(value, return_state=True)
    else:
        @flow(name=f"parent-{shape}")
        async def parent(value: int):
            return await unit_task(value, return_state=True)
    return parent


SHAPES = ("flow-sync", "flow-async", "task-sync", "task-async")


def run_shape(shape: str, runner, value: int) -> State:
    import asyncio
    import inspect

    outcome = runner(value, return_state=True)
    if inspect.isawaitable(outcome):
        outcome = asyncio.run(outcome)
    if shape.startswith("task"):
        assert outcome.is_completed(), outcome
        return outcome.result()  # the parent returned the task's final state
    return outcome


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_completes_then_skips(shape: str, store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=30)
    runner = make_shape(shape, block, lock_name)
    done = run_shape(shape, runner, 7)
    assert (done.type, done.name) == (StateType.COMPLETED, "Completed") and done.result() == 8
    with held_elsewhere(store_url, f"{lock_name}-7") as held:
        skipped = run_shape(shape, make_shape(shape, block, lock_name), 7)
        # Another parameter is another lock name: it runs.
        other = run_shape(shape, make_shape(shape, block, lock_name), 8)
    assert (skipped.type, skipped.name) == (StateType.COMPLETED, "Skipped")
    assert f"pid {held.pid}" in skipped.message and f"{lock_name}-7" in skipped.message
    assert api_state(skipped).name == "Skipped"
    assert other.name == "Completed" and other.result() == 9


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_block_by_saved_name(mode: str, store_url: str, lock_name: str) -> None:
    block_name = f"states-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=store_url, lock_expire_seconds=30).save(block_name)
    runner = make_shape(f"flow-{mode}", block_name, lock_name)
    done = run_shape(f"flow-{mode}", runner, 2)
    assert done.name == "Completed" and done.result() == 3
    with held_elsewhere(store_url, f"{lock_name}-2"):
        skipped = run_shape(f"flow-{mode}", runner, 2)
    assert skipped.name == "Skipped"
