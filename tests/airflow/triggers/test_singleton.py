"""SingletonTrigger observes only: it reports free or timeout and never takes the lock, even run twice at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from airflow_provider import SingletonTrigger


async def _first_event(trigger: SingletonTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def test_serialize_round_trips() -> None:
    trigger = SingletonTrigger(lock_name="n", singleton_conn_id="c", poll_interval=2.5, deadline=123.0)
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider.triggers.singleton.SingletonTrigger"
    assert SingletonTrigger(**kwargs).serialize() == (path, kwargs)


def test_reports_free_when_the_holder_releases(store, hold, lock_name) -> None:
    hold(store, lock_name).release_later(1.0)
    trigger = SingletonTrigger(lock_name=lock_name, singleton_conn_id=store.conn_id, poll_interval=0.2,
                               deadline=time.time() + 60)
    payload = asyncio.run(asyncio.wait_for(_first_event(trigger), 60))
    assert payload["status"] == "free" and payload["lock_name"] == lock_name
    assert store.holder(lock_name) is None, "the trigger must not acquire"


def test_reports_timeout_naming_the_holder(store, hold, lock_name) -> None:
    hold(store, lock_name)
    trigger = SingletonTrigger(lock_name=lock_name, singleton_conn_id=store.conn_id, poll_interval=0.2,
                               deadline=time.time() + 0.5)
    payload = asyncio.run(asyncio.wait_for(_first_event(trigger), 60))
    assert payload["status"] == "timeout" and "deployment eu-west" in payload["holder"]


def test_two_copies_at_once_both_observe_and_neither_acquires(sqlite_store, lock_name) -> None:
    async def both() -> list[dict[str, Any]]:
        triggers = [SingletonTrigger(lock_name=lock_name, singleton_conn_id=sqlite_store.conn_id, poll_interval=0.1)
                    for _ in range(2)]
        return await asyncio.gather(*(_first_event(t) for t in triggers))

    assert [p["status"] for p in asyncio.run(asyncio.wait_for(both(), 60))] == ["free", "free"]
    # A trigger never releases, so one that had acquired would have left the lock held.
    assert sqlite_store.holder(lock_name) is None, "a trigger acquired the lock"


def test_an_unknown_connection_is_reported_not_raised() -> None:
    trigger = SingletonTrigger(lock_name="n", singleton_conn_id="does_not_exist", poll_interval=0.1)
    payload = asyncio.run(asyncio.wait_for(_first_event(trigger), 60))
    assert payload["status"] == "error" and "does_not_exist" in payload["message"]
