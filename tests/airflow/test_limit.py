"""``limit=N`` on every Airflow surface: up to N holders of one lock name, and each outcome when all N are held.

The other holders are leases taken in this process on the same store (and, for the
in-memory store, the same persister the tasks get), with another deployment's task
metadata, as tasks elsewhere would hold them. Stores: the in-memory one and every
built-in store that declares the ``limits`` capability.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from airflow.sdk import DAG, task

from airflow_provider import (
    SingletonLockConflict,
    SingletonOperator,
    SingletonSensor,
    SingletonTrigger,
    SingletonWaitTimeout,
)
from airflow_provider.hooks.singleton import SingletonHook, cached_persister
from airflow_provider.plugins import _locks
from singleton_integrations import MAX_LIMIT, Lease, LockRecord, persisters
from tests.airflow._dagrun import history, run_dag
from tests.airflow.conftest import OTHER

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
NEVER = 600.0  # a poll interval and leases no test waits out: only a release lets a waiter in
SEEN: dict[str, list[Any]] = {}


def _limit_stores() -> list[str]:
    """The in-memory store, and the shared-store kinds whose persister keeps several holds of a name."""
    found = persisters.schemes()
    return ["memory"] + [kind for kind in ("sqlite", "redis") if found[kind].limits]


class LimitStore:
    """A store as the tasks see it (``conn_id``) and as this test holds it (the process's shared persister)."""

    def __init__(self, kind: str, url: str, conn_id: str) -> None:
        self.kind, self.url, self.conn_id = kind, url, conn_id

    @property
    def persister(self) -> Any:
        return cached_persister(self.url)

    @property
    def notifies(self) -> bool:
        return bool(self.persister.notifies)

    def holders(self, name: str) -> list[LockRecord]:
        return list(self.persister.holders(name))

    def __repr__(self) -> str:
        return f"LimitStore({self.kind})"


@pytest.fixture(params=_limit_stores())
def limit_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LimitStore:
    from tests.conftest import store_url_for

    url = store_url_for(request.param, tmp_path)
    conn_id = f"limits_{request.param}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "singleton", "password": url}))
    return LimitStore(request.param, url, conn_id)


class Held(NamedTuple):
    """One hold another deployment's task has: its lease, and the fencing token it got."""

    lease: Lease
    token: int


@pytest.fixture
def others() -> Iterator[Callable[..., list[Held]]]:
    """Take holds of a name as other deployments' tasks (map indexes 0, 1, ...); released at the end of the test."""
    taken: list[Held] = []

    def take(store: LimitStore, name: str, count: int, limit: int, ttl: float = NEVER) -> list[Held]:
        holds = []
        for index in range(count):
            lease = Lease(name, store.persister, lock_expire_seconds=ttl, limit=limit,
                          metadata={**OTHER, "map_index": str(index)})
            result = lease.take()
            assert result.acquired and result.record is not None, f"hold {index} of {name!r} was refused"
            holds.append(Held(lease, result.record.fencing_token))
        taken.extend(holds)
        return holds

    yield take
    for held in taken:
        held.lease.release()


def _on_retry(context: Any) -> None:
    SEEN.setdefault("retry", []).append(context.get("exception"))


def _dag(dag_id: str) -> DAG:
    SEEN.clear()
    return DAG(f"{dag_id}_{uuid.uuid4().hex[:6]}", schedule=None, start_date=START, catchup=False,
               default_args={"on_retry_callback": _on_retry})


# -- parse time ------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "error"), [(0, ValueError), (-1, ValueError), (MAX_LIMIT + 1, ValueError),
                                              ("2", TypeError), (True, TypeError), (2.0, TypeError)])
def test_a_bad_limit_is_refused_when_the_dag_is_parsed(limit: Any, error: type[Exception]) -> None:
    with DAG("limit_parse", schedule=None, start_date=START):
        with pytest.raises(error, match="limit"):
            SingletonOperator(task_id="op", lock_name="n", limit=limit)
        with pytest.raises(error, match="limit"):
            SingletonSensor(task_id="sense", lock_name="n", limit=limit)

        with pytest.raises(error, match="limit"):
            task.singleton(lock_name="n", limit=limit)  # before .expand(), which builds no operator
        with pytest.raises(error, match="limit"):
            SingletonOperator.partial(task_id="mapped", lock_name="n", limit=limit)


def test_a_mapped_task_with_a_good_limit_still_maps() -> None:
    with DAG("limit_mapped", schedule=None, start_date=START) as dag:
        @task.singleton(lock_name="n", limit=2)
        def decorated(x: int) -> None:
            pass

        decorated.expand(x=[1, 2])
        SingletonOperator.partial(task_id="partial", lock_name="n", limit=2).expand(op_args=[[1], [2]])
    assert dag.get_task("decorated").partial_kwargs["limit"] == 2
    assert dag.get_task("partial").partial_kwargs["limit"] == 2


def test_the_bound_is_the_cores() -> None:
    with DAG("limit_bound", schedule=None, start_date=START):
        assert SingletonOperator(task_id="op", lock_name="n", limit=MAX_LIMIT).limit == MAX_LIMIT


# -- the operator, the decorator and each on_conflict --------------------------------------


def test_a_task_runs_while_a_slot_is_free_and_holds_one_of_its_own(limit_store, others, lock_name) -> None:
    held = others(limit_store, lock_name, 2, limit=3)
    seen: dict[str, Any] = {}

    with _dag("limit_free") as dag:
        @task.singleton(lock_name=lock_name, singleton_conn_id=limit_store.conn_id, limit=3)
        def third(singleton=None) -> None:
            seen["token"] = singleton.fencing_token
            seen["holders"] = [record.fencing_token for record in singleton.holders()]

        third()
    assert run_dag(dag)["third"].state == "success"
    tokens = [hold.token for hold in held]
    assert seen["holders"] == [*tokens, seen["token"]] and seen["token"] > max(tokens)
    assert [record.fencing_token for record in limit_store.holders(lock_name)] == tokens, "the task released its own"


def test_every_outcome_applies_when_all_are_held_and_names_each_holder(limit_store, others, lock_name,
                                                                      task_log) -> None:
    held = others(limit_store, lock_name, 2, limit=2)
    options = {"lock_name": lock_name, "singleton_conn_id": limit_store.conn_id, "limit": 2}
    with _dag("limit_full") as dag:
        SingletonOperator(task_id="skip", on_conflict="skip", **options)
        SingletonOperator(task_id="fail", on_conflict="fail", **options)
        SingletonOperator(task_id="retry", on_conflict="retry", retries=1, retry_delay=datetime.timedelta(0),
                          **options)
        SingletonOperator(task_id="wait", on_conflict="wait", wait_timeout=0, **options)

        @task.singleton(task_id="decorated", on_conflict="skip", **options)
        def decorated() -> None:
            raise AssertionError("ran while both holds were live")

        decorated()
    tis = run_dag(dag)
    out = task_log()

    assert {task_id: ti.state for task_id, ti in tis.items()} == {
        "skip": "skipped", "fail": "failed", "retry": "failed", "wait": "failed", "decorated": "skipped"}
    assert len(history(tis["retry"])) == 1, "the first try went up_for_retry"
    assert f"lock '{lock_name}' is at its limit, 2 of 2 held: " in out
    for index in ("0", "1"):
        assert f"deployment eu-west (dag nightly_load, run scheduled__other-region, task load, map index {index})" in out
    conflict = SEEN["retry"][0]
    assert isinstance(conflict, SingletonLockConflict) and conflict.limit == 2
    assert [record.fencing_token for record in conflict.holders] == [hold.token for hold in held]
    assert "2 of 2 held" in str(conflict)
    assert "2 of 2 held" in out and "after waiting 0 s" in out  # the wait's SingletonWaitTimeout
    assert len(limit_store.holders(lock_name)) == 2, "a refused task must leave the holds alone"


def _release_when_the_trigger_waits(monkeypatch: pytest.MonkeyPatch, store: LimitStore, name: str,
                                    held: Held) -> list[int]:
    """Release ``held`` (not the first hold) right after a trigger's first look found every hold taken.

    The trigger opened its watch before that look, so only the release's wake-up (or, on a
    store that cannot notify, its next poll) can end the wait; returns how many full looks there were.
    """
    kind = type(store.persister)
    aholders = kind.aholders
    full: list[int] = []

    async def look_then_release(self: Any, lock: str) -> list[LockRecord]:
        records: list[LockRecord] = await aholders(self, lock)
        if lock == name and len(records) >= 2:
            full.append(len(records))
            if len(full) == 1:
                threading.Thread(target=held.lease.release, daemon=True).start()
        return records

    monkeypatch.setattr(kind, "aholders", look_then_release)
    return full


def test_a_deferred_wait_resumes_on_any_holders_release(limit_store, others, lock_name, monkeypatch,
                                                        task_log) -> None:
    first, second = others(limit_store, lock_name, 2, limit=2)
    full = _release_when_the_trigger_waits(monkeypatch, limit_store, lock_name, second)
    # A store that notifies never polls here (only the release can wake the trigger); the others poll.
    poll = NEVER if limit_store.notifies else 0.2
    ran: dict[str, Any] = {}

    with _dag("limit_deferred") as dag:
        @task.singleton(lock_name=lock_name, singleton_conn_id=limit_store.conn_id, limit=2, on_conflict="wait",
                        deferrable=True, poll_interval=poll, wait_timeout=NEVER)
        def after_a_release(singleton=None) -> None:
            ran["holders"] = [record.fencing_token for record in singleton.holders()]
            ran["token"] = singleton.fencing_token

        after_a_release()
    started = time.monotonic()
    assert run_dag(dag)["after_a_release"].state == "success"
    assert full, "the trigger never saw both holds taken"
    assert time.monotonic() - started < NEVER, "the trigger waited for its poll, not the release"
    assert ran["holders"] == [first.token, ran["token"]]
    assert "2 of 2 held" in task_log()


# -- the guarded task group -----------------------------------------------------------------


def test_a_guarded_group_holds_one_slot_and_releases_only_its_own(limit_store, others, lock_name,
                                                                task_log) -> None:
    (other,) = others(limit_store, lock_name, 1, limit=2)
    seen: dict[str, Any] = {}

    with _dag("limit_group") as dag, SingletonOperator(task_id="guard", lock_name=lock_name, limit=2,
                                                        singleton_conn_id=limit_store.conn_id,
                                                        lock_expire_seconds=30):
        @task
        def guarded() -> None:
            seen["holders"] = len(limit_store.holders(lock_name))

        guarded()
    tis = run_dag(dag)
    out = task_log()

    assert {task_id: ti.state for task_id, ti in tis.items()} == {
        "guard": "success", "guarded": "success", "guard_release": "success"}
    assert seen["holders"] == 2
    assert "is no longer the group's" not in out and "Renewing the group's lock" in out
    assert [record.fencing_token for record in limit_store.holders(lock_name)] == [other.token], \
        "the teardown must release the group's hold and leave the other one"


def test_a_guarded_group_skips_when_all_are_held(limit_store, others, lock_name, task_log) -> None:
    others(limit_store, lock_name, 2, limit=2)
    with _dag("limit_group_full") as dag, SingletonOperator(task_id="guard", lock_name=lock_name, limit=2,
                                                             singleton_conn_id=limit_store.conn_id):
        @task
        def guarded() -> None:
            raise AssertionError("ran while both holds were live")

        guarded()
    tis = run_dag(dag)
    assert tis["guard"].state == "skipped" and tis["guarded"].state == "skipped"
    assert "is at its limit, 2 of 2 held" in task_log()


# -- the sensor and the trigger --------------------------------------------------------------


def test_the_sensor_succeeds_while_fewer_than_its_limit_are_held(limit_store, others, lock_name, task_log) -> None:
    others(limit_store, lock_name, 1, limit=2)
    with _dag("limit_sensor") as dag:
        SingletonSensor(task_id="one_free", lock_name=lock_name, singleton_conn_id=limit_store.conn_id, limit=2,
                        poke_interval=0.1, timeout=30)
        SingletonSensor(task_id="one_held", lock_name=lock_name, singleton_conn_id=limit_store.conn_id,
                        poke_interval=0.1, timeout=0.5, soft_fail=True)
    tis = run_dag(dag)
    assert tis["one_free"].state == "success" and tis["one_held"].state == "skipped"
    assert "has a free slot: 1 of 2 held" in task_log()
    assert len(limit_store.holders(lock_name)) == 1, "a sensor only watches"


def test_the_deferred_sensor_resumes_on_any_holders_release(limit_store, others, lock_name, monkeypatch) -> None:
    _, second = others(limit_store, lock_name, 2, limit=2)
    full = _release_when_the_trigger_waits(monkeypatch, limit_store, lock_name, second)
    poll = NEVER if limit_store.notifies else 0.2
    with _dag("limit_sensor_deferred") as dag:
        SingletonSensor(task_id="sense", lock_name=lock_name, singleton_conn_id=limit_store.conn_id, limit=2,
                        deferrable=True, poke_interval=poll, timeout=NEVER)
    assert run_dag(dag)["sense"].state == "success"
    assert full and len(limit_store.holders(lock_name)) == 1


def test_the_trigger_carries_its_limit_and_a_timeout_names_every_holder(limit_store, others, lock_name) -> None:
    trigger = SingletonTrigger(lock_name=lock_name, singleton_conn_id=limit_store.conn_id, poll_interval=0.1,
                               deadline=time.time() + 0.3, limit=2)
    path, kwargs = trigger.serialize()
    assert kwargs["limit"] == 2 and SingletonTrigger(**kwargs).serialize() == (path, kwargs)
    others(limit_store, lock_name, 2, limit=2)

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("no event")

    payload = asyncio.run(asyncio.wait_for(first_event(), 60))
    assert payload["status"] == "timeout" and payload["held"] == 2
    assert "map index 0" in payload["holder"] and "map index 1" in payload["holder"]
    # With a free slot it fires at once.
    trigger = SingletonTrigger(lock_name=lock_name, singleton_conn_id=limit_store.conn_id, deadline=None, limit=3)
    assert asyncio.run(asyncio.wait_for(first_event(), 60))["status"] == "free"


def test_the_operator_reports_a_triggers_timeout_as_at_its_limit() -> None:
    with DAG("limit_timeout", schedule=None, start_date=START):
        operator = SingletonOperator(task_id="op", lock_name="n", limit=2, on_conflict="wait", wait_timeout=5)
    with pytest.raises(SingletonWaitTimeout, match=r"was still at its limit, 2 of 2 held: A; B, after waiting 5 s"):
        operator.execute_complete({}, {"status": "timeout", "holder": "A; B", "held": 2})


# -- the hook and the locks page ----------------------------------------------------------------


def test_the_hook_takes_up_to_its_limit(limit_store, lock_name) -> None:
    hook = SingletonHook(singleton_conn_id=limit_store.conn_id)
    taken = [hook.acquire(lock_name, limit=2, lock_expire_seconds=60) for _ in range(2)]
    refused = hook.acquire(lock_name, limit=2, lock_expire_seconds=60)
    try:
        assert all(result.acquired for result in taken) and not refused.acquired
        tokens = [result.record.fencing_token for result in taken]
        assert [record.fencing_token for record in refused.holders] == tokens
        assert [record.fencing_token for record in hook.holders(lock_name)] == tokens
        assert hook.release(lock_name, taken[1].record.owner_token)
        assert [record.fencing_token for record in hook.holders(lock_name)] == tokens[:1]
    finally:
        for result in taken:
            hook.release(lock_name, result.record.owner_token)


def test_the_locks_page_lists_each_hold_and_releases_one_by_fencing_token(limit_store, others, lock_name) -> None:
    from airflow.models.connection import Connection

    held = others(limit_store, lock_name, 3, limit=3)
    conn = Connection(conn_id=limit_store.conn_id, conn_type="singleton", password=limit_store.url)
    tokens = [hold.token for hold in held]

    rows = [row for row in _locks.list_locks([(limit_store.conn_id, conn)], lock_name) if row["name"] == lock_name]
    assert [row["fencing_token"] for row in rows] == tokens
    assert [row["holder"]["map_index"] for row in rows] == [0, 1, 2]

    previous = _locks.force_release(limit_store.conn_id, conn, lock_name, tokens[1], "stuck export")
    assert previous["fencing_token"] == tokens[1]
    assert [record.fencing_token for record in limit_store.holders(lock_name)] == [tokens[0], tokens[2]]
    with pytest.raises(_locks.ReleaseRefused):
        _locks.force_release(limit_store.conn_id, conn, lock_name, tokens[1], "again")


def test_a_conflict_keeps_its_holders_through_pickling(limit_store, others, lock_name) -> None:
    import pickle

    others(limit_store, lock_name, 2, limit=2)
    holders = tuple(limit_store.holders(lock_name))
    error = SingletonLockConflict(lock_name, "two exports", f"lock {lock_name!r} is at its limit, 2 of 2 held",
                                  holders=holders, limit=2)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.holders, copy.limit, str(copy), copy.holder_description) == (holders, 2, str(error), "two exports")
