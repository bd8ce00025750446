"""``singleton_integrations.admin`` on every store: the rows an operator sees, and the token-guarded release.

The guard is tested where it matters, in the gap between the operator's read and
the release: a store wrapper hands the lock to a new holder right after the read
(on the real store), and the release must then free nothing.
"""

from __future__ import annotations

import doctest
import json
import pickle
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from singleton_integrations import AsyncSingleton, LockRecord, Singleton, SingletonError, admin, persisters
from singleton_integrations.admin import (
    Holder,
    LockRow,
    NotHeld,
    TokenChanged,
    aforce_release,
    alock_rows,
    force_release,
    lock_rows,
)
from singleton_integrations.persisters import Persister
from singleton_integrations.testing.conformance import CountingPersister
from tests.conftest import ALL_STORES, store_url_for

AIRFLOW_TASK = {"deployment": "blue", "dag_id": "etl", "run_id": "manual__2026-12-01", "task_id": "load",
                "map_index": "3", "try_number": "1", "host": "worker-7"}
PREFECT_RUN = {"prefect_flow_run_id": "0b1c", "prefect_flow_run_name": "brave-fox", "prefect_flow_name": "nightly",
               "prefect_deployment_name": "prod"}


@pytest.fixture(params=(*ALL_STORES, "mysql"))
def persister(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Persister]:
    if request.param == "mysql":
        yield from _mysql()
        return
    store = persisters.from_url(store_url_for(request.param, tmp_path))
    yield store
    store.close()


def _mysql() -> Iterator[Persister]:
    """MariaDB with a table of this test's own, dropped afterwards (skips as test_mysql does without a server)."""
    pytest.importorskip("pymysql")
    from singleton_integrations.persisters.mysql import MySql
    from tests.core import test_mysql

    store = MySql(test_mysql.server_url(), table=test_mysql.run_table("admin"))
    try:
        yield store
    finally:
        store.close()
        connection = test_mysql._admin_connect(test_mysql.server_url())
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP TABLE IF EXISTS `{store.table}`")
                cursor.execute(f"DROP TABLE IF EXISTS `{store.table}_waiters`")
        finally:
            connection.close()


@pytest.fixture
def name() -> str:
    return f"core-admin-{uuid.uuid4().hex}"


def hold(name: str, persister: Persister, **options: object) -> Singleton:
    lock = Singleton(name, persister, lock_expire_seconds=300, auto_renew=False, release_on_sigterm=False,
                     **options)  # type: ignore[arg-type]
    assert lock.lock()
    return lock


def still_holds(lock: Singleton, persister: Persister) -> bool:
    record = persister.get(lock.name)
    return record is not None and record.fencing_token == lock.fencing_token and not record.released


# -- rows --------------------------------------------------------------------------------------


def test_rows_name_the_holder_in_its_own_terms(persister: Persister, name: str) -> None:
    airflow = hold(f"{name}-a", persister, metadata=AIRFLOW_TASK)
    prefect = hold(f"{name}-b", persister, metadata=PREFECT_RUN)
    plain = hold(f"{name}-c", persister, metadata={"command": "export.sh"})
    try:
        rows = lock_rows(persister, prefix=name)
        assert [row.name for row in rows] == [f"{name}-a", f"{name}-b", f"{name}-c"], "sorted by name"
        by_name = {row.name: row for row in rows}

        task = by_name[f"{name}-a"]
        assert task.holder == Holder(host=plain.record.host, pid=plain.record.pid, deployment="blue", dag_id="etl",  # type: ignore[union-attr]
                                     run_id="manual__2026-12-01", task_id="load", map_index=3)
        assert task.holder.is_airflow_task and task.fencing_token == airflow.fencing_token
        assert task.metadata == AIRFLOW_TASK, "the whole metadata stays in the row"
        assert "deployment blue" in task.holder.describe() and "map index 3" in task.holder.describe()

        flow = by_name[f"{name}-b"].holder
        assert flow.deployment == "nightly/prod" and not flow.is_airflow_task
        assert (flow.dag_id, flow.run_id, flow.task_id, flow.map_index) == (None, None, None, None)

        other = by_name[f"{name}-c"]
        assert other.holder.deployment is None and other.fencing_token == plain.fencing_token
        for row, lock in ((task, airflow), (by_name[f"{name}-b"], prefect), (other, plain)):
            assert lock.record is not None
            assert row.since == lock.record.created_at and row.since.tzinfo is not None
            assert row.expires is not None and row.expires > row.since
            assert row.min_hold_until is None and row.released_at is None
        assert lock_rows(persister, prefix=f"{name}-b") == [by_name[f"{name}-b"]]
        assert lock_rows(persister, prefix=f"{name}-z") == []
    finally:
        for lock in (airflow, prefect, plain):
            lock.release()


def test_a_rows_json_is_iso_utc_and_has_no_owner_token(persister: Persister, name: str) -> None:
    lock = hold(name, persister, metadata=AIRFLOW_TASK)
    try:
        (row,) = lock_rows(persister, prefix=name)
        data = json.loads(json.dumps(row.to_json()))
        assert set(data) == {"name", "holder", "since", "expires", "fencing_token", "min_hold_until", "released_at",
                             "metadata"}
        assert data["holder"] == {"host": row.holder.host, "pid": row.holder.pid, "deployment": "blue", "dag_id": "etl",
                                  "run_id": "manual__2026-12-01", "task_id": "load", "map_index": 3}
        since = datetime.fromisoformat(data["since"])
        assert since.utcoffset() == timezone.utc.utcoffset(None) and since == row.since
        assert datetime.fromisoformat(data["expires"]) == row.expires
        assert data["min_hold_until"] is None and data["released_at"] is None
        assert data["fencing_token"] == lock.fencing_token and data["metadata"] == AIRFLOW_TASK
        assert lock.record is not None and lock.record.owner_token not in json.dumps(data)
        assert "owner_token" not in repr(row)
    finally:
        lock.release()


def test_a_minimum_hold_shows_until_when(persister: Persister, name: str) -> None:
    if not persister.supports_min_hold:
        pytest.skip(f"{persister.backend} has no minimum hold")
    lock = hold(name, persister, min_hold_seconds=600)
    (row,) = lock_rows(persister, prefix=name)
    assert row.min_hold_until is not None and row.released_at is None
    assert lock.release()
    (ran,) = lock_rows(persister, prefix=name)
    assert ran.released_at is not None and ran.min_hold_until == row.min_hold_until
    data = ran.to_json()
    assert datetime.fromisoformat(data["min_hold_until"]) == row.min_hold_until
    assert datetime.fromisoformat(data["released_at"]) == ran.released_at
    persister.force_release(name)


async def test_async_rows_are_the_same(persister: Persister, name: str) -> None:
    lock = AsyncSingleton(name, persister, lock_expire_seconds=300, auto_renew=False, release_on_sigterm=False,
                          metadata=AIRFLOW_TASK)
    assert await lock.lock()
    try:
        (row,) = await alock_rows(persister, prefix=name)
        assert row == LockRow.from_record(persister.get(name))  # type: ignore[arg-type]
        assert row.holder.dag_id == "etl"
    finally:
        await lock.release()
        await persister.aclose()


# -- force_release ---------------------------------------------------------------------------------


def test_force_release_frees_the_hold_it_names(persister: Persister, name: str, caplog: pytest.LogCaptureFixture) -> None:
    lock = hold(name, persister, metadata=AIRFLOW_TASK)
    token = lock.fencing_token
    with caplog.at_level("WARNING", logger="singleton_integrations"):
        released = force_release(persister, name, token, reason="worker-7 was decommissioned")
    assert isinstance(released, LockRecord) and released.fencing_token == token
    assert dict(released.metadata) == AIRFLOW_TASK
    assert persister.get(name) is None, "the name is free"
    assert lock.verify() is False, "the old holder finds its hold gone"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "singleton_integrations.admin"]
    assert repr(name) in line and f"fencing token {token}" in line and "worker-7 was decommissioned" in line
    assert released.owner_token not in line

    with pytest.raises(NotHeld) as free:
        force_release(persister, name, token)
    assert free.value.name == name and free.value.record is None
    assert str(free.value) == f"lock {name!r} is not held (fencing token {token}); nothing was released"
    again = hold(name, persister)
    assert again.fencing_token > token, "the fencing counter survives an admin release"
    again.release()


def test_another_token_releases_nothing(persister: Persister, name: str) -> None:
    lock = hold(name, persister)
    stale = lock.fencing_token - 1
    with pytest.raises(TokenChanged) as changed:
        force_release(persister, name, stale)
    assert changed.value.holder is not None and changed.value.holder.fencing_token == lock.fencing_token
    assert changed.value.fencing_token == stale and isinstance(changed.value, SingletonError)
    assert f"no longer held with fencing token {stale}" in str(changed.value)
    assert f"fencing token {lock.fencing_token}" in str(changed.value) and "nothing was released" in str(changed.value)
    assert changed.value.holder.owner_token not in str(changed.value)
    assert still_holds(lock, persister) and lock.verify()
    lock.release()


class HandsOverAfterRead(CountingPersister):
    """The real store, but right after the next read of the holder, ``hand_over`` runs: the lock changes hands
    (its holder is broken and another one takes it) between the admin's read and its release."""

    def __init__(self, inner: Persister, hand_over: Callable[[], None]) -> None:
        super().__init__(inner)
        self.hand_over: Callable[[], None] | None = hand_over

    def _after_read(self) -> None:
        if self.hand_over is not None:
            hand_over, self.hand_over = self.hand_over, None
            hand_over()

    def get(self, name: str) -> LockRecord | None:
        record = self.inner.get(name)
        self._after_read()
        return record

    async def aget(self, name: str) -> LockRecord | None:
        record = await self.inner.aget(name)
        self._after_read()
        return record

    def holders(self, name: str) -> list[LockRecord]:
        records = self.inner.holders(name)
        self._after_read()
        return records

    async def aholders(self, name: str) -> list[LockRecord]:
        records = await self.inner.aholders(name)
        self._after_read()
        return records


def test_a_lock_that_changes_hands_after_the_read_is_left_to_its_new_holder(persister: Persister, name: str) -> None:
    first = hold(name, persister)
    successors: list[Singleton] = []

    def hand_over() -> None:  # another operator breaks it, and a new run takes the name
        assert persister.force_release(name) is not None
        successors.append(hold(name, persister))

    with pytest.raises(TokenChanged) as changed:
        force_release(HandsOverAfterRead(persister, hand_over), name, first.fencing_token)
    (successor,) = successors
    assert changed.value.holder is not None and changed.value.holder.fencing_token == successor.fencing_token
    assert still_holds(successor, persister) and successor.verify(), "the new holder's lock was freed"
    successor.release()


def test_a_lock_its_holder_hands_on_after_the_read_is_left_to_its_new_holder(persister: Persister, name: str) -> None:
    """The holder releases, a new run takes the name: the new hold is never freed.

    The call may still answer with the old hold's record: a store that makes a retried
    release idempotent (Redis remembers the last cleanly released owner token) answers
    the old token's release as done; that hold is indeed over, and nothing else was touched.
    """
    first = hold(name, persister)
    token = first.fencing_token
    successors: list[Singleton] = []

    def hand_over() -> None:
        assert first.release()
        successors.append(hold(name, persister))

    try:
        answer: object = force_release(HandsOverAfterRead(persister, hand_over), name, token)
    except TokenChanged as changed:
        answer = changed
    (successor,) = successors
    assert still_holds(successor, persister) and successor.verify(), "the new holder's lock was freed"
    if isinstance(answer, TokenChanged):
        assert answer.holder is not None and answer.holder.fencing_token == successor.fencing_token
    else:
        assert isinstance(answer, LockRecord) and answer.fencing_token == token
    successor.release()


def test_a_hold_that_ends_after_the_read_frees_nothing_else(persister: Persister, name: str) -> None:
    """Released by its holder between the read and the release: ``NotHeld``, or the record on a store whose
    repeated release answers done (see above); the name is free either way."""
    first = hold(name, persister)
    token = first.fencing_token
    try:
        answer: object = force_release(HandsOverAfterRead(persister, first.release), name, token)
    except NotHeld as free:
        answer = free
        assert free.record is None
    assert isinstance(answer, NotHeld) or (isinstance(answer, LockRecord) and answer.fencing_token == token)
    assert persister.get(name) is None


async def test_async_force_release_and_its_guard(persister: Persister, name: str) -> None:
    try:
        first = hold(name, persister)
        with pytest.raises(TokenChanged):
            await aforce_release(persister, name, first.fencing_token + 1)
        assert still_holds(first, persister)
        released = await aforce_release(persister, name, first.fencing_token)
        assert released.fencing_token == first.fencing_token and await persister.aget(name) is None
        with pytest.raises(NotHeld):
            await aforce_release(persister, name, first.fencing_token)

        second = hold(name, persister)
        successors: list[Singleton] = []

        def hand_over() -> None:
            assert persister.force_release(name) is not None
            successors.append(hold(name, persister))

        with pytest.raises(TokenChanged):
            await aforce_release(HandsOverAfterRead(persister, hand_over), name, second.fencing_token)
        (successor,) = successors
        assert still_holds(successor, persister), "the new holder's lock was freed"
        successor.release()
    finally:
        await persister.aclose()


def test_a_hold_inside_its_minimum_hold_is_released_into_it(persister: Persister, name: str) -> None:
    if not persister.supports_min_hold:
        pytest.skip(f"{persister.backend} has no minimum hold")
    lock = hold(name, persister, min_hold_seconds=600)
    released = force_release(persister, name, lock.fencing_token)
    assert released.released_at is None and released.hold_until is not None
    kept = persister.get(name)
    assert kept is not None and kept.released and kept.fencing_token == lock.fencing_token, \
        "as the holder's own release: the slot ran, the name is kept until the hold ends"
    with pytest.raises(NotHeld) as ran:
        force_release(persister, name, lock.fencing_token)
    assert ran.value.record is not None and ran.value.record.fencing_token == lock.fencing_token
    assert "already released by its holder and is kept only for its minimum hold" in str(ran.value)
    assert persister.get(name) is not None, "nothing more was released"
    persister.force_release(name)


# -- input, errors, docs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "error"), [(True, TypeError), ("7", TypeError), (7.0, TypeError), (-1, ValueError)])
def test_a_bad_token_fails_before_any_io(token: object, error: type[Exception]) -> None:
    store = persisters.Memory()
    with pytest.raises(error, match="fencing token"):
        force_release(store, "job", token)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        force_release(store, "", 1)
    with pytest.raises(TypeError, match="prefix"):
        lock_rows(store, prefix=None)  # type: ignore[arg-type]


def test_the_errors_pickle_with_their_fields() -> None:
    record = LockRecord(name="job", owner_token="x" * 32, fencing_token=5, host="web-2", pid=42,
                        created_at=datetime.now(timezone.utc), expires_at=None)
    for error in (NotHeld("job", 4), NotHeld("job", 5, record), TokenChanged("job", 4, record), TokenChanged("job", 4)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.name == "job"
        assert copy.fencing_token == error.fencing_token


def test_the_module_docstring_runs() -> None:
    assert doctest.testmod(admin, optionflags=doctest.ELLIPSIS).failed == 0
    assert sorted(admin.__all__) == admin.__all__

