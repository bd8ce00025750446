"""Prefect events for the lock's life, as Prefect's asserting events client receives them."""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.context import FlowRunContext

from prefect_blocks import EVENT_NAMES, SingletonBlock, current_lock, lock_resource_id, singleton

from .conftest import EventsRecorder, held_elsewhere


def related_ids(event) -> dict[str, str]:
    return {resource.role: resource.id for resource in event.related}


def test_acquired_and_released_with_the_flow_run(events: EventsRecorder, store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=30)

    @flow
    @singleton(block=block, lock_name=lock_name)
    def job() -> tuple[str, int]:
        return str(FlowRunContext.get().flow_run.id), current_lock().fencing_token

    flow_run_id, fencing_token = job()
    acquired, released = events.lock_events(lock_name)
    assert (acquired.event, released.event) == ("singleton.lock.acquired", "singleton.lock.released")
    for event in (acquired, released):
        assert event.resource.id == lock_resource_id(lock_name) == f"singleton.lock.{lock_name}"
        assert event.resource.name == lock_name and event.resource["singleton.store"] == "sqlite"
        assert related_ids(event)["flow-run"] == f"prefect.flow-run.{flow_run_id}"
    assert acquired.payload["holder"]["fencing_token"] == fencing_token
    assert acquired.payload["holder"]["metadata"]["prefect_flow_run_id"] == flow_run_id


def test_conflict_with_the_task_run(events: EventsRecorder, store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=30)

    @task
    @singleton(block=block, lock_name=lock_name)
    def unit() -> None:
        raise AssertionError("the other process holds the lock")

    @flow
    def parent():
        state = unit(return_state=True)
        return state, str(state.state_details.task_run_id), str(FlowRunContext.get().flow_run.id)

    with held_elsewhere(store_url, lock_name) as other:
        state, task_run_id, flow_run_id = parent()
    assert state.name == "Skipped"
    (conflict,) = events.lock_events(lock_name)
    assert conflict.event == "singleton.lock.conflict"
    assert conflict.payload["holder"]["pid"] == other.pid
    assert f"pid {other.pid}" in conflict.payload["message"]
    related = related_ids(conflict)
    assert related["task-run"] == f"prefect.task-run.{task_run_id}"
    assert related["flow-run"] == f"prefect.flow-run.{flow_run_id}"


def test_expired_takeover(events: EventsRecorder, store_url: str, lock_name: str) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=30)
    with held_elsewhere(store_url, lock_name, "--ttl", "0.3") as crashed:
        deadline = time.monotonic() + 30
        while block.holder(lock_name) is not None:  # its lease runs out by the store's clock
            assert time.monotonic() < deadline
            time.sleep(0.05)

        @flow
        def takes_over() -> None:
            with block.lock(lock_name):
                pass

        takes_over()
    names = events.names(lock_name)
    assert names == ["singleton.lock.expired", "singleton.lock.acquired", "singleton.lock.released"]
    expired = events.lock_events(lock_name)[0]
    assert f"pid {crashed.pid}" in expired.payload["message"]


def test_lost(events: EventsRecorder, store_url: str, lock_name: str, child_env) -> None:
    block = SingletonBlock(url=store_url, lock_expire_seconds=1.5, auto_renew=True)

    @flow
    @singleton(block=block, lock_name=lock_name)
    def long_job() -> None:
        lock = current_lock()
        with held_elsewhere(store_url, lock_name, "--takeover", env=child_env):
            deadline = time.monotonic() + 30
            while not lock.lost:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    state = long_job(return_state=True)
    assert state.is_failed()
    names = events.names(lock_name)
    assert names[0] == "singleton.lock.acquired" and "singleton.lock.lost" in names
    assert "singleton.lock.released" not in names, "a lock taken over is not ours to release"
    lost = events.lock_events(lock_name)[names.index("singleton.lock.lost")]
    assert "exclusivity" in lost.payload["message"]
    assert "flow-run" in related_ids(lost), "sent from the renewal thread, still tied to the run"
    assert set(names) <= set(EVENT_NAMES)
