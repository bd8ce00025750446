"""The example DAGs in examples/airflow load without import errors."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples" / "airflow"


def test_example_dags_load() -> None:
    from airflow.dag_processing.dagbag import DagBag

    from airflow_provider.operators.singleton import DEFAULT_LOCK_NAME

    bag = DagBag(dag_folder=str(EXAMPLES))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"nightly_load", "warehouse_sync", "after_the_migration", "daily_export",
                                "warehouse_exports"}
    sync = bag.get_dag("warehouse_sync")
    assert sync.get_task("warehouse_lock").is_setup and sync.get_task("warehouse_lock_release").is_teardown
    assert sync.get_task("extract").upstream_task_ids == {"warehouse_lock"}
    load = bag.get_dag("nightly_load").get_task("load")
    assert load.lock_name == DEFAULT_LOCK_NAME and load.auto_renew
    export = bag.get_dag("daily_export").get_task("export")
    assert export.min_hold_seconds == 3600 and "{{ ds }}" in export.lock_name
    limited = bag.get_dag("warehouse_exports").get_task("export")  # mapped: its arguments are partial_kwargs
    assert limited.partial_kwargs["limit"] == 2 and limited.partial_kwargs["lock_name"] == "warehouse-export"
