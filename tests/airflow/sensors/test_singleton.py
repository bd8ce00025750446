"""SingletonSensor waits for a free lock in poke, reschedule and deferrable modes, and never takes it."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from airflow.sdk import DAG

from airflow_provider import SingletonSensor
from tests.airflow._dagrun import run_dag
from tests.airflow.conftest import STORES

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def _sensor_dag(dag_id: str, store: Any, lock_name: str, **kwargs: Any) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START) as dag:
        SingletonSensor(task_id="sense", lock_name=lock_name, singleton_conn_id=store.conn_id, **kwargs)
    return dag


# Deferrable on every store (the trigger); poke and reschedule read the store the same way on each.
CASES = [(kind, "deferrable") for kind in STORES] + [("redis", "poke"), ("sqlite", "reschedule")]


@pytest.mark.parametrize(("store", "mode"), CASES, indirect=["store"])
def test_sensor_succeeds_once_the_holder_releases(store, hold, lock_name, mode, task_log) -> None:
    holder = hold(store, lock_name)
    options = {"deferrable": True} if mode == "deferrable" else {"mode": mode}
    # The holder lets go 2 s after the sensor starts, so the sensor surely waits first.
    tis = run_dag(_sensor_dag(f"sense_{mode}_{store.kind}", store, lock_name, poke_interval=0.5, timeout=60,
                              on_execute_callback=lambda context: holder.release_later(2.0), **options))
    assert tis["sense"].state == "success"
    out = task_log()
    assert "is held by" in out and "task_id=load" in out, "the log must name the holder while waiting"
    assert store.holder(lock_name) is None, "a sensor only watches: it must not take the lock"


@pytest.mark.parametrize(("soft_fail", "state"), [(False, "failed"), (True, "skipped")])
def test_deferrable_sensor_times_out(sqlite_store, hold, lock_name, soft_fail, state) -> None:
    hold(sqlite_store, lock_name)
    dag = _sensor_dag(f"sense_timeout_{soft_fail}", sqlite_store, lock_name, poke_interval=0.2, timeout=1,
                      deferrable=True, soft_fail=soft_fail)
    assert run_dag(dag)["sense"].state == state


def test_sensor_on_a_free_lock_does_not_defer(sqlite_store, lock_name, task_log) -> None:
    tis = run_dag(_sensor_dag("sense_free", sqlite_store, lock_name, deferrable=True))
    assert tis["sense"].state == "success"
    assert "running trigger in line" not in task_log()
