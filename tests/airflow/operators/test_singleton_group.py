"""SingletonOperator as a context manager: acquire (setup) and release (teardown) around a group of tasks."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from airflow.sdk import DAG, task

from airflow_provider import SingletonLockLost, SingletonOperator, SingletonReleaseOperator
from tests.airflow._dagrun import run_dag

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
SEEN: dict[str, Any] = {}


def _on_failure(context: Any) -> None:
    SEEN[context["ti"].task_id] = context.get("exception")


def _group_dag(dag_id: str, store: Any, lock_name: str, *, first_fails: bool = False,
               lock_expire_seconds: float = 300.0, hold_for: float = 0.0) -> DAG:
    SEEN.clear()
    with (
        DAG(dag_id, schedule=None, start_date=START, catchup=False,
            default_args={"on_failure_callback": _on_failure}) as dag,
        SingletonOperator(task_id="guard", lock_name=lock_name, singleton_conn_id=store.conn_id,
                          lock_expire_seconds=lock_expire_seconds, auto_renew=False),
    ):

        @task
        def extract() -> None:
            record = store.holder(lock_name)
            SEEN["holder_during_group"] = record
            time.sleep(hold_for)
            if first_fails:
                raise RuntimeError("extract failed")

        @task
        def load() -> None:
            SEEN["load_ran"] = True

        extract() >> load()
    return dag


def test_group_is_guarded_between_setup_and_teardown(store, lock_name) -> None:
    dag = _group_dag(f"group_{store.kind}", store, lock_name)
    guard, release = dag.get_task("guard"), dag.get_task("guard_release")
    assert guard.is_setup and isinstance(release, SingletonReleaseOperator) and release.is_teardown
    assert dag.get_task("extract").upstream_task_ids == {"guard"}
    assert dag.get_task("guard_release").upstream_task_ids == {"guard", "load"}

    tis = run_dag(dag)
    assert {task_id: ti.state for task_id, ti in tis.items()} == {
        "guard": "success", "extract": "success", "load": "success", "guard_release": "success"}
    assert SEEN["holder_during_group"].metadata["task_id"] == "guard"
    assert store.holder(lock_name) is None


def test_release_runs_when_a_guarded_task_fails(sqlite_store, lock_name) -> None:
    tis = run_dag(_group_dag("group_fails", sqlite_store, lock_name, first_fails=True))
    assert tis["extract"].state == "failed" and tis["load"].state == "upstream_failed"
    assert tis["guard_release"].state == "success"
    assert sqlite_store.holder(lock_name) is None


def test_group_skips_when_another_deployment_holds_the_lock(sqlite_store, hold, lock_name) -> None:
    holder = hold(sqlite_store, lock_name)
    tis = run_dag(_group_dag("group_conflict", sqlite_store, lock_name))
    assert {task_id: ti.state for task_id, ti in tis.items()} == {
        "guard": "skipped", "extract": "skipped", "load": "skipped", "guard_release": "skipped"}
    assert sqlite_store.holder(lock_name).fencing_token == holder.fencing_token


def test_release_fails_when_the_lease_ran_out_during_the_group(sqlite_store, lock_name) -> None:
    tis = run_dag(_group_dag("group_expired", sqlite_store, lock_name, lock_expire_seconds=1, hold_for=1.5))
    assert tis["load"].state == "success"
    assert tis["guard_release"].state == "failed"
    assert isinstance(SEEN["guard_release"], SingletonLockLost) and "had expired" in str(SEEN["guard_release"])


def test_owner_token_never_reaches_the_log(sqlite_store, lock_name, task_log) -> None:
    tokens: list[str] = []
    persister = sqlite_store.persister()
    original = type(persister).acquire

    def spy(self: Any, name: str, owner: Any, ttl: Any) -> Any:
        tokens.append(owner.owner_token)
        return original(self, name, owner, ttl)

    type(persister).acquire = spy
    try:
        run_dag(_group_dag("group_token", sqlite_store, lock_name))
    finally:
        type(persister).acquire = original
    assert tokens and all(token not in task_log() for token in tokens)


def test_with_a_callable_is_refused() -> None:
    with DAG("group_refused", schedule=None, start_date=START):
        operator = SingletonOperator(task_id="guard", lock_name="x", python_callable=lambda: None)
        with pytest.raises(ValueError, match="guards the tasks inside it"), operator:
            pass
