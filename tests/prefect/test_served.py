"""The paths users deploy by, on a real ``prefect server start``: served deployments and process pools.

The runs execute in other processes, which get the flow or task by cloudpickle,
so a ``@singleton`` wrapper that does not pickle fails here (issue 9, item 1).
What a run says about its lock is read back from the server's ``/logs/filter``,
where the run's page reads it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, Log, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from prefect_blocks import SingletonBlock
from singleton_integrations import persisters

from .conftest import held_elsewhere
from .real_server import ROOT, PrefectServer

HERE = Path(__file__).parent
RUN_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def lock_store() -> str:
    from tests.servers import redis_server

    return redis_server.url()


@pytest.fixture(scope="module")
def names(real_server: PrefectServer, lock_store: str) -> dict[str, str]:
    from tests.servers import mongodb_server

    block = f"served-{uuid.uuid4().hex[:8]}"
    with temporary_settings(updates={PREFECT_API_URL: real_server.api_url}):
        SingletonBlock(url=lock_store, lock_expire_seconds=60).save(block)
        # The minimum hold needs a persister that keeps one (supports_min_hold).
        SingletonBlock(url=mongodb_server.url(), lock_expire_seconds=60).save(f"{block}-slot")
        # Renewed every second: a broken lock is learned within a second, on the renewal thread.
        SingletonBlock(url=lock_store, lock_expire_seconds=3).save(f"{block}-short")
    return {"SERVED_BLOCK": block, "SERVED_SLOT_BLOCK": f"{block}-slot", "SERVED_SHORT_BLOCK": f"{block}-short",
            "SERVED_LOCK": f"served-{uuid.uuid4().hex[:10]}"}


@pytest.fixture(scope="module")
def two_servers(real_server: PrefectServer, names: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[subprocess.Popen[str]]]:
    """``served_flow.py`` in two processes serving the same deployments, polling every second."""
    env = real_server.env(**names, PREFECT_RUNNER_POLL_FREQUENCY="1", SERVED_WAIT_LOG_INTERVAL="1")
    logs = tmp_path_factory.mktemp("served-logs")
    processes = []
    try:
        for number in (1, 2):
            log = open(logs / f"serve-{number}.log", "w")  # noqa: SIM115 - closed with the process
            processes.append(subprocess.Popen([sys.executable, str(HERE / "served_flow.py")], env=env, cwd=ROOT,
                                              stdout=log, stderr=subprocess.STDOUT, text=True))
        with temporary_settings(updates={PREFECT_API_URL: real_server.api_url}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                for process in processes:
                    assert process.poll() is None, (logs / "serve-1.log").read_text()[-3000:] + (logs / "serve-2.log").read_text()[-3000:]
                served = [log.read_text() for log in sorted(logs.iterdir())]
                if all("served-singleton/served" in text for text in served):
                    break
                assert time.monotonic() < deadline, served
                time.sleep(0.25)
            client.read_deployment_by_name("served-singleton/served")
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def wait_final(run_ids: list, until: int | None = None) -> list[FlowRun]:
    """Poll the API until ``until`` of the runs (default all) are in a final state."""
    deadline = time.monotonic() + RUN_TIMEOUT
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
            final = [run for run in runs if run.state is not None and run.state.is_final()]
            if len(final) >= (until or len(run_ids)):
                return runs
            assert time.monotonic() < deadline, [(run.name, run.state) for run in runs]
            time.sleep(0.25)


def logs_until(run_id, enough: Callable[[list[str]], bool]) -> list[Log]:
    """The flow run's log lines (its task runs' included), read until ``enough`` of their messages arrived.

    Logs reach the server in batches, after the events and states they follow.
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            if enough([log.message for log in logs]):
                return logs
            assert time.monotonic() < deadline, [log.message for log in logs]
            time.sleep(0.25)


def start(deployment: str, **parameters: object) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(client.read_deployment_by_name(deployment).id, parameters=parameters)


def test_two_served_runs_at_once_one_completes_one_skips(server: PrefectServer, two_servers: list, tmp_path: Path, names: dict[str, str]) -> None:
    marker = tmp_path / "release"
    parameters = {"slot": "a", "release_when": str(marker)}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("served-singleton/served")
        runs = [client.create_flow_run_from_deployment(deployment.id, parameters=parameters) for _ in range(2)]
    ids = [run.id for run in runs]
    wait_final(ids, until=1)  # the one that found the lock held ends at once
    marker.touch()
    final = {run.state.name: run for run in wait_final(ids)}
    assert set(final) == {"Completed", "Skipped"}, [(r.name, r.state) for r in final.values()]
    ran, skipped = final["Completed"], final["Skipped"]
    assert ran.state.type is StateType.COMPLETED and skipped.state.type is StateType.COMPLETED
    # One sentence, the holder first: its flow run name, deployment, host, since when.
    message = skipped.state.message
    assert message.startswith(f"lock '{names['SERVED_LOCK']}-a' is held by flow run '{ran.name}' "
                              "of deployment 'served-singleton/served' on "), message
    assert " since 20" in message and str(ran.id) not in message and str(ran.deployment_id) not in message
    logs = logs_until(skipped.id, lambda messages: any("Finished in state" in m for m in messages))
    assert sum("is held by" in log.message for log in logs) == 1, [log.message for log in logs]


def test_the_slot_recipe_skips_a_second_deployment_run_of_the_same_slot(server: PrefectServer, two_servers: list, names: dict[str, str]) -> None:
    """Two schedulers firing the same slot seconds apart: the second run is Completed "Skipped"."""
    slot = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(minutes=1)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("slot-once/served")
        first = client.create_flow_run_from_deployment(deployment.id, state=Scheduled(scheduled_time=slot))
        [done] = wait_final([first.id])
        assert done.state.name == "Completed", done.state
        second = client.create_flow_run_from_deployment(deployment.id, state=Scheduled(scheduled_time=slot))
    [late] = wait_final([second.id])
    assert (late.state.type, late.state.name) == (StateType.COMPLETED, "Skipped"), late.state
    assert f"flow run '{done.name}'" in late.state.message and "already ran" in late.state.message
    assert "for the minimum hold" in late.state.message


def test_tasks_under_a_process_pool_pickle_and_lock(server: PrefectServer, names: dict[str, str], tmp_path: Path) -> None:
    env = server.env(**{**names, "SERVED_LOCK": names["SERVED_LOCK"] + "-pool"})
    ran = subprocess.run([sys.executable, str(HERE / "pool_flow.py"), str(tmp_path / "release")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert report["state"] == "Completed", report
    skipped, ran = report["tasks"]
    assert skipped is None and ran["fencing_token"] >= 1, report
    assert ran["pid"] != report["flow_pid"], "the task ran in a pool process, not the flow's"
    deadline = time.monotonic() + RUN_TIMEOUT  # task run states arrive as events, recorded by a service
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[report["flow_run_id"]])))
            states = {run.state.name: run.state for run in task_runs if run.state is not None}
            if (len(states) == 2 and all(state.is_final() for state in states.values())) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    assert set(states) == {"Completed", "Skipped"}, states
    assert states["Skipped"].type is StateType.COMPLETED
    assert f"lock '{env['SERVED_LOCK']}' is held by task run " in states["Skipped"].message


def holder_of(store: persisters.Persister, name: str, run: FlowRun):
    """``run``'s record on ``name``, once the run holds it."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        record = store.get(name)
        if record is not None and record.metadata.get("prefect_flow_run_id") == str(run.id):
            return record
        assert time.monotonic() < deadline, (name, record)
        time.sleep(0.1)


def test_a_lost_lock_is_said_in_the_run_log(server: PrefectServer, two_servers: list, names: dict[str, str],
                                             lock_store: str, tmp_path: Path) -> None:
    """The loss is learned on the renewal thread, where Prefect has no run context: its line still reaches the run."""
    slot, marker = uuid.uuid4().hex[:8], tmp_path / "release"
    name = f"{names['SERVED_LOCK']}-short-{slot}"
    run = start("held-short/served", slot=slot, release_when=str(marker))
    store = persisters.from_url(lock_store)
    holder_of(store, name, run)
    assert store.force_release(name) is not None  # an admin breaks the lock while the run holds it
    logs = logs_until(run.id, lambda messages: any(" was lost: " in m for m in messages))
    marker.touch()
    [final] = wait_final([run.id])
    assert final.state.type is StateType.FAILED and "was lost" in final.state.message, final.state
    [lost] = [log for log in logs if " was lost: " in log.message]
    assert lost.message.startswith(f"exclusivity on lock {name!r} was lost: ") and lost.level == logging.WARNING
    assert lost.flow_run_id == run.id


def test_an_expired_takeover_is_said_in_the_run_log(server: PrefectServer, two_servers: list, names: dict[str, str],
                                                    lock_store: str) -> None:
    slot = uuid.uuid4().hex[:8]
    name = f"{names['SERVED_LOCK']}-wait-{slot}"
    with held_elsewhere(lock_store, name, "--ttl", "2", "--crash") as crashed:
        crashed.process.wait(timeout=30)  # it died holding the lock: the run waits for the lease to end, then takes it over
    [final] = wait_final([start("waits/served", slot=slot).id])
    assert final.state.name == "Completed", final.state
    logs = logs_until(final.id, lambda messages: any("had expired and was taken over" in m for m in messages))
    [expired] = [log for log in logs if "had expired and was taken over" in log.message]
    assert expired.message.startswith(f"lock {name!r} held by ") and f"pid {crashed.pid}" in expired.message
    assert expired.level == logging.WARNING


def test_a_waiting_run_says_so_in_its_log(server: PrefectServer, two_servers: list, names: dict[str, str],
                                         lock_store: str) -> None:
    """When the wait starts, then every WAIT_LOG_INTERVAL (1 s in the served processes, 60 s by default)."""
    slot = uuid.uuid4().hex[:8]
    name = f"{names['SERVED_LOCK']}-wait-{slot}"
    with held_elsewhere(lock_store, name, "--ttl", "60") as other:
        run = start("waits/served", slot=slot)
        logs_until(run.id, lambda messages: sum("waiting for lock" in m for m in messages) >= 2)
    [final] = wait_final([run.id])
    assert final.state.name == "Completed", final.state
    logs = logs_until(run.id, lambda messages: any(m.startswith("acquired lock") for m in messages))
    first, again, *_ = [log for log in logs if "waiting for lock" in log.message]
    assert first.message.startswith(f"waiting for lock {name!r} held by ") and f"(pid {other.pid})" in first.message
    assert again.message.startswith(f"still waiting for lock {name!r} after ") and f"(pid {other.pid})" in again.message
    assert first.level == again.level == logging.INFO


def test_fan_out_on_one_lock_name_warns_in_the_run_log(server: PrefectServer, two_servers: list,
                                                      names: dict[str, str], tmp_path: Path) -> None:
    """``.map()`` over a ``@singleton`` task whose lock name names no parameter: 5 of 6 items skip, and say why."""
    run = start("fan-out/served", release_when=str(tmp_path / "release"), items=6)
    [final] = wait_final([run.id])
    assert final.state.name == "Completed", final.state
    logs = logs_until(run.id, lambda messages: sum(" was skipped: lock " in m for m in messages) >= 5)
    warnings = [log for log in logs if " was skipped: lock " in log.message]
    assert len(warnings) == 5 and all(log.level == logging.WARNING for log in warnings), [log.message for log in warnings]
    for log in warnings:
        assert f"lock '{names['SERVED_LOCK']}-fan-out' is held by task run 'fan_out_item-" in log.message
        assert "of this same flow run" in log.message and 'lock_name="fan_out_item-{item}"' in log.message
        assert log.task_run_id is not None


def test_a_paused_run_keeps_and_renews_its_lock(server: PrefectServer, two_servers: list, names: dict[str, str],
                                               lock_store: str) -> None:
    """``pause_flow_run()`` keeps the process: the lock stays held and renewed until the run resumes."""
    slot = uuid.uuid4().hex[:8]
    name = f"{names['SERVED_LOCK']}-pause-{slot}"
    run = start("pauses/served", slot=slot)
    deadline = time.monotonic() + RUN_TIMEOUT
    with get_client(sync_client=True) as client:
        while not (client.read_flow_run(run.id).state or Scheduled()).is_paused():
            assert time.monotonic() < deadline, client.read_flow_run(run.id).state
            time.sleep(0.25)
        store = persisters.from_url(lock_store)
        paused = holder_of(store, name, run)
        while True:  # a 3 s lease, renewed every second
            renewed = store.get(name)
            if renewed is None or renewed.expires_at > paused.expires_at:
                break
            assert time.monotonic() < deadline, paused
            time.sleep(0.1)
        assert renewed is not None and renewed.fencing_token == paused.fencing_token, (paused, renewed)
        client.resume_flow_run(run.id)
    [final] = wait_final([run.id])
    assert final.state.name == "Completed", final.state
    assert store.get(name) is None


def test_a_suspended_run_gives_its_lock_back_and_runs_again_from_the_top(
        server: PrefectServer, two_servers: list, names: dict[str, str], lock_store: str, tmp_path: Path) -> None:
    """``suspend_flow_run()`` ends the run's process: the lock is released while suspended, and the
    resumed run starts over, taking the lock again (docs/prefect.md, "Pausing and suspending")."""
    slot, starts = uuid.uuid4().hex[:8], tmp_path / "starts"
    name = f"{names['SERVED_LOCK']}-suspend-{slot}"
    run = start("suspends/served", slot=slot, starts=str(starts))
    deadline = time.monotonic() + RUN_TIMEOUT
    store = persisters.from_url(lock_store)
    with get_client(sync_client=True) as client:
        while (state := client.read_flow_run(run.id).state) is None or state.name != "Suspended":
            assert time.monotonic() < deadline, state
            time.sleep(0.25)
        while store.get(name) is not None:  # the process ends after the state is set
            assert time.monotonic() < deadline, store.get(name)
            time.sleep(0.1)
        assert starts.read_text().splitlines() == ["started"]
        logs_until(run.id, lambda messages: f"released lock {name!r}" in messages)  # given back, not left to expire
        client.resume_flow_run(run.id)
    [final] = wait_final([run.id])
    assert final.state.name == "Completed", final.state
    assert starts.read_text().splitlines() == ["started", "started"], "the resumed run ran again from the top"
