"""``@singleton(limit=2)`` on served deployments (issue 21): 4 runs, at most 2 at a time, and every one runs.

Two processes serve ``limited/served`` (``limit_flow.py``) from a real ``prefect server start``, as two
workers would; each run executes in a process of its own. The runs write ``start`` and ``end`` to a
shared log from inside their holds: that log, not the lock, is the checker.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_blocks import SingletonBlock
from singleton_integrations import persisters
from tests.conftest import store_url_for

from .real_server import ROOT, PrefectServer
from .test_served import RUN_TIMEOUT, wait_final

HERE = Path(__file__).parent
RUNS = 4
LIMIT = 2


@pytest.fixture(scope="module")
def limit_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Redis, or SQLite (every run is on this host) while Redis cannot keep several holds."""
    from tests.servers import redis_server

    for url in (redis_server.url(), store_url_for("sqlite", tmp_path_factory.mktemp("limit-store"))):
        if persisters.from_url(url).limits:
            return url
    pytest.skip("neither Redis nor SQLite keeps several holds of a name yet (Persister.limits)")


@pytest.fixture(scope="module")
def limit_servers(real_server: PrefectServer, limit_store: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``limit_flow.py`` in two processes serving the same deployment, polling every second."""
    names = {"LIMIT_BLOCK": f"limit-{uuid.uuid4().hex[:8]}", "LIMIT_LOCK": f"limited-{uuid.uuid4().hex[:10]}"}
    with temporary_settings(updates={PREFECT_API_URL: real_server.api_url}):
        SingletonBlock(url=limit_store, lock_expire_seconds=60).save(names["LIMIT_BLOCK"])
    env = real_server.env(**names, PREFECT_RUNNER_POLL_FREQUENCY="1")
    logs = tmp_path_factory.mktemp("limit-serve-logs")
    processes = []
    try:
        for number in (1, 2):
            log = open(logs / f"serve-{number}.log", "w")  # noqa: SIM115 - closed with the process
            processes.append(subprocess.Popen([sys.executable, str(HERE / "limit_flow.py")], env=env, cwd=ROOT,
                                              stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            served = [path.read_text() for path in sorted(logs.iterdir())]
            assert all(process.poll() is None for process in processes), "\n".join(text[-3000:] for text in served)
            if all("limited/served" in text for text in served):
                break
            assert time.monotonic() < deadline, served
            time.sleep(0.25)
        yield names
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def most_at_once(lines: list[str]) -> int:
    """The most runs between their ``start`` and ``end`` at one point of the log."""
    running, most = 0, 0
    for line in lines:
        running += 1 if line.startswith("start ") else -1
        most = max(most, running)
    return most


def rising_after_each_end(lines: list[str]) -> bool:
    """A run that starts after another run's ``end`` took its hold later, so its fencing token is larger."""
    ended: list[int] = []
    for kind, _, token in (line.split() for line in lines):
        if kind == "end":
            ended.append(int(token))
        elif any(int(token) <= earlier for earlier in ended):
            return False
    return True


def test_four_served_runs_with_limit_2_run_two_at_a_time(server: PrefectServer, limit_servers: dict[str, str],
                                                          limit_store: str, tmp_path: Path) -> None:
    log = tmp_path / "holds.log"
    log.touch()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("limited/served")
        runs = [client.create_flow_run_from_deployment(deployment.id, parameters={"log": str(log)})
                for _ in range(RUNS)]
    final = wait_final([run.id for run in runs])
    assert all(run.state.type is StateType.COMPLETED and run.state.name == "Completed" for run in final), \
        [(run.name, run.state) for run in final]
    lines = log.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["end"] * RUNS + ["start"] * RUNS, lines
    assert {line.split()[1] for line in lines} == {str(run.id) for run in runs}, "every run ran once"
    assert most_at_once(lines) == LIMIT, lines
    assert rising_after_each_end(lines), f"a hold taken after another ended has a larger fencing token: {lines}"
    assert persisters.from_url(limit_store).holders(limit_servers["LIMIT_LOCK"]) == [], "every hold released"
