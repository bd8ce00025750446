"""Every lock outcome of SingletonOperator as a native task state, on every store, with another process holding the lock."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider import (
    SingletonLockConflict,
    SingletonLockLost,
    SingletonOperator,
    SingletonTrigger,
    SingletonWaitTimeout,
)
from tests.airflow._dagrun import history, run_dag
from tests.airflow.conftest import HOLDER, STORES

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
#: What each task's callbacks saw, by task id: the exception of a failed or retried try.
SEEN: dict[str, Any] = {}


def _on_failure(context: Any) -> None:
    SEEN.setdefault(context["ti"].task_id, []).append(context.get("exception"))


def _on_retry(context: Any) -> None:
    SEEN.setdefault(f"{context['ti'].task_id}:retry", []).append(context.get("exception"))


def _dag(dag_id: str) -> DAG:
    SEEN.clear()
    return DAG(dag_id, schedule=None, start_date=START, catchup=False,
               default_args={"on_failure_callback": _on_failure, "on_retry_callback": _on_retry})


def _wait_until_free(store: Any, name: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while store.holder(name) is not None:
        assert time.monotonic() < deadline, f"{name!r} is still held after {limit} s"
        time.sleep(0.1)


def test_conflicts_become_skipped_failed_and_up_for_retry(store, hold, lock_name, task_log) -> None:
    held = f"{lock_name}-held"
    holder = hold(store, held)
    seen_holder: dict[str, Any] = {}

    def work(singleton=None) -> int:
        seen_holder["record"] = singleton.holder()
        return singleton.fencing_token

    with _dag(f"states_{store.kind}") as dag:
        SingletonOperator(task_id="free", lock_name=f"{lock_name}-free", singleton_conn_id=store.conn_id,
                          python_callable=work)
        SingletonOperator(task_id="skip", lock_name=held, singleton_conn_id=store.conn_id, on_conflict="skip")
        SingletonOperator(task_id="fail", lock_name=held, singleton_conn_id=store.conn_id, on_conflict="fail",
                          retries=3, python_callable=work)
        SingletonOperator(task_id="retry", lock_name=held, singleton_conn_id=store.conn_id, on_conflict="retry",
                          retries=1, retry_delay=datetime.timedelta(0), python_callable=work)
    tis = run_dag(dag)
    out = task_log()

    assert tis["free"].state == "success"
    record = seen_holder["record"]
    assert record.metadata["dag_id"] == f"states_{store.kind}" and record.metadata["task_id"] == "free"
    assert {"run_id", "map_index", "try_number", "host"} <= set(record.metadata)
    assert store.holder(f"{lock_name}-free") is None, "the lock must be released after the work"

    assert tis["skip"].state == "skipped"
    assert "Skipping: lock" in out and "is held by deployment eu-west (dag nightly_load, run scheduled__other-region" in out

    assert tis["fail"].state == "failed" and tis["fail"].try_number == 1, "fail must not use the task's retries"
    assert "Failing without retry" in str(SEEN["fail"][-1])

    # First try up_for_retry (the retry callback ran), the second used up the retries.
    assert tis["retry"].try_number == 2 and len(history(tis["retry"])) == 1
    assert len(SEEN["retry:retry"]) == 1 and isinstance(SEEN["retry:retry"][0], SingletonLockConflict)
    assert "run scheduled__other-region" in str(SEEN["retry:retry"][0])
    assert isinstance(SEEN["retry"][0], SingletonLockConflict)
    assert store.holder(held).fencing_token == holder.fencing_token, "a conflict must leave the holder's lock alone"


# The trigger path on every store; poke and reschedule read the store like acquire does, so two stores suffice.
WAIT_CASES = [(kind, "deferrable") for kind in STORES] + [(kind, mode) for kind in ("sqlite", "redis")
                                                         for mode in ("reschedule", "poke")]


def _release_once_refused(monkeypatch: pytest.MonkeyPatch, store: Any, name: str, holder: Any) -> list[bool]:
    """The holder lets go right after the task's first attempt on ``name`` was refused, whenever that comes.

    Not a delay from the task's start: on a loaded machine the first attempt came 13 s after
    it, past a 2 s timer, so the task took the free name at once and never waited. Returns a
    list that holds True once a refusal let the holder go.
    """
    with store.persister() as persister:
        kind = type(persister)
    acquire = kind.acquire
    refused: list[bool] = []

    def acquire_then_let_go(self: Any, lock: str, *args: Any, **kwargs: Any) -> Any:
        result = acquire(self, lock, *args, **kwargs)
        if lock == name and not result.acquired and not refused:
            refused.append(True)
            holder.release_later(0)  # without waiting: the task's wait must see the release
        return result

    monkeypatch.setattr(kind, "acquire", acquire_then_let_go)
    return refused


@pytest.mark.parametrize(("store", "mode"), WAIT_CASES, indirect=["store"])
def test_wait_runs_once_the_holder_releases(store, hold, lock_name, mode, task_log, monkeypatch) -> None:
    holder = hold(store, lock_name, "--ttl", "600")  # its lease outlasts any slow start: only its release frees the name
    refused = _release_once_refused(monkeypatch, store, lock_name, holder)
    ran: dict[str, Any] = {}

    def work(singleton=None) -> None:
        ran["fencing_token"] = singleton.fencing_token

    with _dag(f"wait_{mode}_{store.kind}") as dag:
        SingletonOperator(task_id="wait", lock_name=lock_name, singleton_conn_id=store.conn_id, on_conflict="wait",
                          wait_timeout=60, poll_interval=0.5, deferrable=mode == "deferrable",
                          mode="reschedule" if mode == "reschedule" else "poke", python_callable=work)
    tis = run_dag(dag)

    assert refused, "the task's first attempt must meet the held lock"
    assert tis["wait"].state == "success"
    assert ran["fencing_token"] > holder.fencing_token, "the task must run after the holder, with a newer token"
    out = task_log()
    if mode == "deferrable":
        assert "deferring" in out
    if mode == "reschedule":
        assert "rescheduling" in out


@pytest.mark.parametrize(("store", "deferrable"), [*((kind, True) for kind in STORES), ("sqlite", False)],
                         indirect=["store"])
def test_wait_timeout_fails_naming_the_holder(store, hold, lock_name, deferrable) -> None:
    hold(store, lock_name)
    with _dag(f"wait_timeout_{store.kind}_{deferrable}") as dag:
        SingletonOperator(task_id="wait", lock_name=lock_name, singleton_conn_id=store.conn_id, on_conflict="wait",
                          wait_timeout=1, poll_interval=0.2, deferrable=deferrable)
    tis = run_dag(dag)
    assert tis["wait"].state == "failed"
    error = SEEN["wait"][-1]
    assert isinstance(error, SingletonWaitTimeout) and "task load" in str(error)


def test_expired_lock_is_taken_over_and_logged(store, hold, lock_name, task_log) -> None:
    hold(store, lock_name, "--ttl", "1", "--crash")
    _wait_until_free(store, lock_name)
    with _dag(f"expired_{store.kind}") as dag:
        SingletonOperator(task_id="take", lock_name=lock_name, singleton_conn_id=store.conn_id, on_conflict="fail",
                          python_callable=lambda: None)
    tis = run_dag(dag)
    assert tis["take"].state == "success"
    out = task_log()
    assert "Expired lock taken over" in out and "dag_id=nightly_load" in out


def test_lock_lost_while_running_fails_the_task(store, lock_name) -> None:
    intruders: list[subprocess.Popen[str]] = []

    def work(singleton=None) -> None:
        # An administrator force-releases the lock and another process takes it; our renewal is then refused.
        intruder = subprocess.Popen([sys.executable, str(HOLDER), store.url, lock_name, "--takeover", "--metadata",
                                     "task_id=intruder"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        intruders.append(intruder)
        assert '"acquired": true' in intruder.stdout.readline()
        deadline = time.monotonic() + 30
        while not singleton.lost and time.monotonic() < deadline:
            time.sleep(0.05)

    try:
        with _dag(f"lost_{store.kind}") as dag:
            SingletonOperator(task_id="work", lock_name=lock_name, singleton_conn_id=store.conn_id,
                              lock_expire_seconds=1.5, auto_renew=True, retries=2, python_callable=work)
        tis = run_dag(dag)
        assert tis["work"].state == "failed" and tis["work"].try_number == 1
        error = SEEN["work"][-1]
        assert isinstance(error, SingletonLockLost) and "exclusivity" in str(error)
        assert store.holder(lock_name).metadata["task_id"] == "intruder", "the new holder's lock must be left alone"
    finally:
        for intruder in intruders:
            intruder.kill()
            intruder.wait(30)


def test_execution_timeout_releases_the_lock(sqlite_store, lock_name) -> None:
    with _dag("timeout_kill") as dag:
        SingletonOperator(task_id="slow", lock_name=lock_name, singleton_conn_id=sqlite_store.conn_id,
                          execution_timeout=datetime.timedelta(seconds=1), python_callable=lambda: time.sleep(120))
    tis = run_dag(dag)
    assert tis["slow"].state == "failed"
    assert sqlite_store.holder(lock_name) is None


_KILLED_DAG = '''
import datetime, time
from airflow.sdk import DAG
from airflow_provider import SingletonOperator
from tests.airflow._dagrun import run_dag

with DAG("sigterm_kill", schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False) as dag:
    SingletonOperator(task_id="slow", lock_name={name!r}, singleton_conn_id={conn_id!r},
                      python_callable=lambda: time.sleep(300))
tis = run_dag(dag)
print("STATE", tis["slow"].state, flush=True)
'''


@pytest.mark.parametrize("store", ["redis"], indirect=True)  # the signal path is the same for every store
def test_sigterm_releases_the_lock_within_the_escalation_window(store, lock_name, tmp_path: Path) -> None:
    script = tmp_path / "killed_dag.py"
    script.write_text(_KILLED_DAG.format(name=lock_name, conn_id=store.conn_id))
    child = subprocess.Popen([sys.executable, str(script)], cwd=str(Path(__file__).parents[3]), env=dict(os.environ),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while (record := store.holder(lock_name)) is None or record.metadata.get("task_id") != "slow":
            assert child.poll() is None and time.monotonic() < deadline, "the task never took the lock"
            time.sleep(0.1)
        child.send_signal(15)
        signalled = time.monotonic()
        while store.holder(lock_name) is not None:
            assert time.monotonic() - signalled < 5.0, "the lock must be free within the supervisor's 5 s window"
            time.sleep(0.02)
        output = child.communicate(timeout=120)[0]
    finally:
        child.kill()
    assert "STATE failed" in output and "SIGTERM" in output


def test_resumed_task_that_loses_the_race_defers_again(sqlite_store, hold, lock_name) -> None:
    hold(sqlite_store, lock_name)  # taken between the trigger's "free" and the resumption
    operator = SingletonOperator(task_id="wait", lock_name=lock_name, singleton_conn_id=sqlite_store.conn_id,
                                 on_conflict="wait", deferrable=True, wait_timeout=60, python_callable=lambda: None)
    ti = SimpleNamespace(dag_id="d", run_id="r", task_id="wait", map_index=-1, try_number=1, hostname="h")
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute_complete({"ti": ti}, {"status": "free", "deadline": 4102444800.0})
    trigger = deferred.value.trigger
    assert isinstance(trigger, SingletonTrigger) and trigger.deadline == 4102444800.0
    assert deferred.value.method_name == "execute_complete"


def test_invalid_arguments_fail_at_parse_time() -> None:
    with pytest.raises(ValueError, match="on_conflict"):
        SingletonOperator(task_id="t", lock_name="x", on_conflict="queue")
    with pytest.raises(ValueError, match="mode"):
        SingletonOperator(task_id="t", lock_name="x", mode="sometimes")
    with pytest.raises(ValueError, match="auto_renew"):
        SingletonOperator(task_id="t", lock_name="x", lock_expire_seconds=None, auto_renew=True)
