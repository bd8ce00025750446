"""Wait, without holding a worker slot, until another deployment's job has released its lock."""

from __future__ import annotations

import datetime

from airflow.sdk import dag, task

from airflow_provider import SingletonSensor


@dag(schedule="@daily", start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["singleton"])
def after_the_migration() -> None:
    wait = SingletonSensor(task_id="wait_for_migration", lock_name="schema-migration", deferrable=True,
                           poke_interval=30, timeout=6 * 3600)

    @task
    def refresh() -> None:
        print("the migration is over")

    wait >> refresh()


after_the_migration()
