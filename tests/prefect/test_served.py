"""The paths users deploy by, on a real ``prefect server start``: served deployments and process pools.

The runs execute in other processes, which get the flow or task by cloudpickle,
so a ``@singleton`` wrapper that does not pickle fails here (issue 9, item 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from prefect_blocks import SingletonBlock

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
    return {"SERVED_BLOCK": block, "SERVED_SLOT_BLOCK": f"{block}-slot", "SERVED_LOCK": f"served-{uuid.uuid4().hex[:10]}"}


@pytest.fixture(scope="module")
def two_servers(real_server: PrefectServer, names: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[subprocess.Popen[str]]]:
    """``served_flow.py`` in two processes serving the same deployments, polling every second."""
    env = real_server.env(**names, PREFECT_RUNNER_POLL_FREQUENCY="1")
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
    deadline = time.monotonic() + RUN_TIMEOUT  # logs arrive in batches, after the state
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[skipped.id])))
            if any("Finished in state" in log.message for log in logs) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
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
            if len(states) == 2 and all(state.is_final() for state in states.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    assert set(states) == {"Completed", "Skipped"}, states
    assert states["Skipped"].type is StateType.COMPLETED
    assert f"lock '{env['SERVED_LOCK']}' is held by task run " in states["Skipped"].message
