"""SingletonOperator as a context manager: acquire (setup) and release (teardown) around a group of tasks."""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import pytest
from airflow.sdk import DAG, task

from airflow_provider import SingletonLockLost, SingletonOperator, SingletonReleaseOperator
from airflow_provider.operators.singleton import XCOM_KEY
from singleton_integrations import Owner, Singleton
from tests.airflow._dagrun import run_dag

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
SEEN: dict[str, Any] = {}


def _on_failure(context: Any) -> None:
    SEEN[context["ti"].task_id] = context.get("exception")


def _group_dag(dag_id: str, store: Any, lock_name: str, *, first_fails: bool = False,
               lock_expire_seconds: float = 300.0, hold_for: float = 0.0, taken_over: bool = False,
               force_released: bool = False, ghost_for: float = 0.0, late_teardown: float = 0.0) -> DAG:
    SEEN.clear()
    with (
        DAG(dag_id, schedule=None, start_date=START, catchup=False,
            default_args={"on_failure_callback": _on_failure}) as dag,
        SingletonOperator(task_id="guard", lock_name=lock_name, singleton_conn_id=store.conn_id,
                          lock_expire_seconds=lock_expire_seconds, auto_renew=False),
    ):

        @task
        def extract(ti: Any = None) -> None:
            record = store.holder(lock_name)
            SEEN["holder_during_group"] = record
            SEEN["xcom"] = ti.xcom_pull(task_ids="guard", key=XCOM_KEY)
            time.sleep(hold_for)
            SEEN["holder_after_sleep"] = store.holder(lock_name)
            if taken_over:  # another deployment takes the lock from under the group
                with store.persister() as other:
                    other.force_release(lock_name)
                    SEEN["taker"] = other.acquire(lock_name, Owner(metadata={"deployment": "elsewhere"}), 60).record
            if force_released:  # an operator frees it by hand
                with store.persister() as other:
                    other.force_release(lock_name)
            if ghost_for:  # a guarded task of this run whose process still runs (Airflow marked it failed)
                _hold_a_ghost_marker(store, lock_name, ti, ghost_for)
            if first_fails:
                raise RuntimeError("extract failed")

        @task
        def load() -> None:
            SEEN["load_ran"] = True

        extract() >> load()
    if late_teardown:  # outside the group: delays the teardown past the lease's end

        @task
        def unguarded_slow() -> None:
            time.sleep(late_teardown)

        dag.get_task("load") >> unguarded_slow() >> dag.get_task("guard_release")
    return dag


def _hold_a_ghost_marker(store: Any, lock_name: str, ti: Any, seconds: float) -> None:
    """Hold a guarded task's marker for ``seconds`` from another thread, as a still-running process would."""
    from airflow_provider.operators._guarded_group import _marker_name, guarded_prefix

    marker = Singleton(_marker_name(guarded_prefix(lock_name, ti.dag_id, ti.run_id), "ghost", -1), store.persister(),
                       lock_expire_seconds=60, release_on_sigterm=False)
    assert marker.lock()

    def stop() -> None:
        SEEN["ghost_stopped_at"] = time.monotonic()
        marker.release()

    threading.Timer(seconds, stop).start()


def _watch_until_free(store: Any, lock_name: str) -> threading.Thread:
    """Record in SEEN when the group's lock is first seen free (polling: only ever late, never early)."""
    def watch() -> None:
        with store.persister() as persister:
            while persister.get(lock_name) is None:
                time.sleep(0.02)
            while persister.get(lock_name) is not None:
                time.sleep(0.02)
            SEEN["group_freed_at"] = time.monotonic()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


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


def test_guarded_tasks_renew_the_group_lease(sqlite_store, lock_name) -> None:
    """A task longer than the lease keeps the group's lock: the guarded task renews it while it runs."""
    # A 5 s lease (longer than a loaded machine's gap between two tasks) and a task of 12 s.
    tis = run_dag(_group_dag("group_renewed", sqlite_store, lock_name, lock_expire_seconds=5, hold_for=12))
    assert tis["load"].state == "success" and tis["guard_release"].state == "success"
    during, after = SEEN["holder_during_group"], SEEN["holder_after_sleep"]
    assert after is not None and after.fencing_token == during.fencing_token, "the lease ran out mid-task"
    assert after.expires_at > during.created_at + datetime.timedelta(seconds=10), "the lease was not renewed"
    assert sqlite_store.holder(lock_name) is None


def test_release_fails_when_another_holder_took_the_lock(sqlite_store, lock_name) -> None:
    tis = run_dag(_group_dag("group_taken", sqlite_store, lock_name, taken_over=True))
    assert tis["guard_release"].state == "failed"
    assert isinstance(SEEN["guard_release"], SingletonLockLost) and "deployment=elsewhere" in str(SEEN["guard_release"])
    assert "now held by" in str(SEEN["guard_release"])
    assert sqlite_store.holder(lock_name).fencing_token == SEEN["taker"].fencing_token, "the taker's lock must stay"


def test_teardown_waits_for_every_guarded_task_to_stop(sqlite_store, lock_name, task_log) -> None:
    """A guarded task whose process still runs (marked failed, cleared) keeps the group's lock held."""
    watcher = _watch_until_free(sqlite_store, lock_name)
    tis = run_dag(_group_dag("group_ghost", sqlite_store, lock_name, ghost_for=3.0))
    watcher.join(30)
    assert tis["guard_release"].state == "success"
    assert SEEN["group_freed_at"] >= SEEN["ghost_stopped_at"], "the group's lock was freed while a guarded task ran"
    assert "Waiting for 1 guarded task(s) to stop before releasing lock" in task_log()


def test_teardown_names_a_force_release_as_the_cause(sqlite_store, lock_name) -> None:
    tis = run_dag(_group_dag("group_forced", sqlite_store, lock_name, force_released=True))
    assert tis["guard_release"].state == "failed"
    message = str(SEEN["guard_release"])
    assert "removed before its lease could end" in message and "force-released" in message, message
    assert "expired" not in message


def test_teardown_only_warns_when_the_lease_ended_after_the_guarded_work(sqlite_store, lock_name, task_log) -> None:
    """A teardown that runs after the lease's end (a worker's warm shutdown) broke nobody's exclusivity."""
    tis = run_dag(_group_dag("group_late", sqlite_store, lock_name, lock_expire_seconds=2, late_teardown=6))
    assert tis["load"].state == "success" and tis["guard_release"].state == "success"
    out = task_log()
    assert "had already expired at" in out and "after the guarded tasks stopped" in out, out[-3000:]


def test_fail_on_conflict_with_retries_warns_that_retries_are_unused() -> None:
    with DAG("fail_with_retries", schedule=None, start_date=START), \
            pytest.warns(UserWarning, match="on_conflict='fail' fails the task without retrying") as seen:
        SingletonOperator(task_id="strict", lock_name="x", python_callable=lambda: None, on_conflict="fail",
                          retries=2)
    assert seen[0].filename == __file__, "the warning must point at the DAG file's line, not Airflow's"


def test_xcom_carries_no_owner_token(sqlite_store, lock_name) -> None:
    run_dag(_group_dag("group_xcom", sqlite_store, lock_name))
    hold, record = SEEN["xcom"], SEEN["holder_during_group"]
    assert set(hold) == {"lock_name", "fencing_token"} and hold["fencing_token"] == record.fencing_token
    assert record.owner_token not in repr(hold)


def test_owner_token_never_reaches_the_log(sqlite_store, lock_name, task_log) -> None:
    tokens: list[str] = []
    persister = sqlite_store.persister()
    original = type(persister).acquire

    def spy(self: Any, name: str, owner: Any, ttl: Any, *args: Any) -> Any:
        tokens.append(owner.owner_token)
        return original(self, name, owner, ttl, *args)

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


@pytest.mark.parametrize("store", ["mongodb"], indirect=True)  # a store with the minimum hold today
def test_a_guarded_group_runs_its_slot_once_under_a_minimum_hold(store, lock_name, task_log) -> None:
    def slot(dag_id: str) -> DAG:
        with (
            DAG(dag_id, schedule=None, start_date=START, catchup=False) as dag,
            SingletonOperator(task_id="guard", lock_name=lock_name, singleton_conn_id=store.conn_id,
                              min_hold_seconds=120, auto_renew=False),
        ):

            @task
            def work() -> None:
                SEEN[dag_id] = True

            work()
        return dag

    SEEN.clear()
    first = run_dag(slot("slot_group_first"))
    assert first["guard_release"].state == "success" and SEEN == {"slot_group_first": True}
    held = store.holder(lock_name)
    assert held is not None and held.released_at is not None, "released into the minimum hold, still held"
    second = run_dag(slot("slot_group_second"))
    assert second["guard"].state == "skipped" and "slot_group_second" not in SEEN
    out = task_log()
    assert "was run by" in out and "(dag slot_group_first, run" in out and "which ran this slot at" in out, out[-3000:]


def test_a_resumed_try_takes_over_the_marker_its_earlier_process_left(sqlite_store, lock_name, monkeypatch) -> None:
    """A deferral or reschedule resumes the same try in a new process: it does not wait for its own old marker."""
    from airflow_provider._holders import holder_metadata
    from airflow_provider.operators import _guarded_group

    monkeypatch.setattr(_guarded_group, "MARKER_SECONDS", 1000.0)  # waiting it out would hang the test
    ghosts: list[Singleton] = []

    def leave_a_marker(context: Any) -> None:  # runs before the group's own start callback
        ti = context["ti"]
        name = _guarded_group._marker_name(_guarded_group.guarded_prefix(lock_name, ti.dag_id, ti.run_id),
                                           ti.task_id, -1)
        ghost = Singleton(name, sqlite_store.persister(), lock_expire_seconds=1000, release_on_sigterm=False,
                          metadata=holder_metadata(context))
        assert ghost.lock()
        ghosts.append(ghost)

    with (
        DAG("group_resumed", schedule=None, start_date=START, catchup=False) as dag,
        SingletonOperator(task_id="guard", lock_name=lock_name, singleton_conn_id=sqlite_store.conn_id),
    ):

        @task(on_execute_callback=leave_a_marker)
        def resumed() -> None:
            SEEN["resumed_ran"] = True

        resumed()
    SEEN.clear()
    tis = run_dag(dag)
    assert tis["resumed"].state == "success" and tis["guard_release"].state == "success"
    assert SEEN.get("resumed_ran") and ghosts and not ghosts[0].verify(), "the old marker was not taken over"
    assert sqlite_store.holder(lock_name) is None
