"""``@task.singleton``: registered through the provider, importable directly, templated lock name by default."""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider import singleton_task
from airflow_provider.decorators.singleton import _SingletonDecoratedOperator
from tests.airflow._dagrun import run_dag

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def test_task_singleton_is_the_providers_decorator() -> None:
    assert task.singleton is singleton_task or task.singleton.__wrapped__ is singleton_task or callable(task.singleton)
    with DAG("decorator_kind", schedule=None, start_date=START):

        @task.singleton(lock_name="x")
        def work() -> None: ...

        operator = work().operator
    assert isinstance(operator, _SingletonDecoratedOperator)
    assert operator.custom_operator_name == "@task.singleton"


def test_decorated_task_runs_under_its_templated_lock(store, hold, lock_name) -> None:
    seen: dict[str, Any] = {}
    dag_id = f"decorated_{store.kind}_{lock_name[-12:]}"  # lock names derive from it: unique per run
    with DAG(dag_id, schedule=None, start_date=START) as dag:

        @task.singleton(singleton_conn_id=store.conn_id, lock_expire_seconds=30)
        def load(rows: int, singleton=None) -> int:
            seen["name"] = singleton.name
            seen["fencing_token"] = singleton.fencing_token
            return rows * 2

        @task.singleton(task_id="busy", lock_name="{{ dag.dag_id }}-busy", singleton_conn_id=store.conn_id)
        def busy() -> None:
            seen["busy_ran"] = True

        @task.singleton(lock_name="{{ dag.dag_id }}-wait", singleton_conn_id=store.conn_id, on_conflict="wait",
                        deferrable=True, wait_timeout=60, poll_interval=0.5,
                        on_execute_callback=lambda context: waited_for.release_later(1.0))
        def after_wait(doubled: int) -> int:
            return doubled + 1

        @task
        def check(doubled: int, plus_one: int) -> None:
            seen["doubled"], seen["plus_one"] = doubled, plus_one

        doubled = load(21)
        check(doubled, after_wait(doubled))
        busy()
    hold(store, f"{dag_id}-busy")
    waited_for = hold(store, f"{dag_id}-wait")
    tis = run_dag(dag)
    assert tis["load"].state == "success" and tis["check"].state == "success"
    assert seen["name"] == f"{dag_id}.load" and seen["doubled"] == 42 and seen["fencing_token"] >= 1
    assert tis["after_wait"].state == "success" and seen["plus_one"] == 43, "the value returned after deferral"
    assert tis["busy"].state == "skipped" and "busy_ran" not in seen
    assert store.holder(f"{dag_id}.load") is None
