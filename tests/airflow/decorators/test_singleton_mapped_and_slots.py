"""Mapped instances each get their own default lock; a minimum hold skips a second run of the same slot."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from airflow.sdk import DAG, task

from tests.airflow._dagrun import run_dag, run_dag_instances

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
SEEN: dict[str, Any] = {}


def test_each_map_index_takes_its_own_default_lock(sqlite_store, lock_name) -> None:
    SEEN.clear()
    dag_id = f"mapped_{lock_name[-12:]}"
    with DAG(dag_id, schedule=None, start_date=START) as dag:

        @task.singleton(singleton_conn_id=sqlite_store.conn_id)
        def work(x: int, singleton=None) -> int:
            SEEN[x] = singleton.name
            return x

        work.expand(x=[1, 2, 3])
    run_dag(dag)
    assert {1: f"{dag_id}.work[0]", 2: f"{dag_id}.work[1]", 3: f"{dag_id}.work[2]"} == SEEN


def test_a_named_lock_is_shared_by_every_map_index(sqlite_store, hold, lock_name) -> None:
    hold(sqlite_store, lock_name)
    with DAG(f"mapped_shared_{lock_name[-12:]}", schedule=None, start_date=START) as dag:

        @task.singleton(lock_name=lock_name, singleton_conn_id=sqlite_store.conn_id)
        def work(x: int) -> int:
            return x

        work.expand(x=[1, 2, 3])
    states = sorted(str(ti.state) for ti in run_dag_instances(dag))
    assert states == ["skipped", "skipped", "skipped"], "one named lock: the holder excludes every instance"


@pytest.mark.parametrize("store", ["mongodb"], indirect=True)  # a store with the minimum hold when written
def test_a_second_run_of_the_slot_within_the_minimum_hold_is_skipped(store, lock_name, task_log) -> None:
    """Two runs of the same task a few seconds apart: the first runs and releases, the second skips."""

    def slot_dag(dag_id: str) -> DAG:
        with DAG(dag_id, schedule=None, start_date=START) as dag:

            @task.singleton(lock_name=lock_name + "-{{ ds }}", min_hold_seconds=60,
                            singleton_conn_id=store.conn_id, lock_metadata={"region": dag_id})
            def nightly() -> None:
                pass

            nightly()
        return dag

    first = run_dag(slot_dag("slot_first"))
    assert first["nightly"].state == "success"
    time.sleep(2)
    second = run_dag(slot_dag("slot_second"))
    assert second["nightly"].state == "skipped"
    out = task_log()
    assert "was run by " in out and "(dag slot_first," in out and "which ran this slot at" in out, out[-3000:]
    assert "for the minimum hold" in out
