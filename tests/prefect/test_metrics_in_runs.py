"""The lock's metrics in served flow runs, with OpenTelemetry configured as an operator would (issue 20).

``metered_flow.py`` is served by ``flow.serve()`` against a real ``prefect server
start``; each run executes in a process of its own, which inherits the serving
process's environment. ``otel_site/sitecustomize.py`` on its PYTHONPATH installs
the SDK's ``MeterProvider`` with a ``PeriodicExportingMetricReader`` in each
process, exporting to one JSON-lines file per process; the test reads the runs'
files back. Nothing in the flow knows of OpenTelemetry: the core's default
recorder finds the global provider.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_blocks import SingletonBlock
from tests.servers import stop_process

from .conftest import held_elsewhere
from .real_server import ROOT, PrefectServer
from .test_served import RUN_TIMEOUT, start, wait_final

pytest.importorskip("opentelemetry.sdk.metrics", reason="the operator's configuration needs opentelemetry-sdk")

HERE = Path(__file__).parent
#: The block's name prefix: the metrics name the lock as stored, prefix included.
PREFIX = "ops-"


@dataclass
class Served:
    process: subprocess.Popen[str]
    metrics_dir: Path
    lock: str  # the flow's lock name, before the block's prefix and the slot

    def stored_name(self, slot: str) -> str:
        return f"{PREFIX}{self.lock}-{slot}"


@pytest.fixture(scope="module")
def served(real_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``metered_flow.py`` served in one process, with the operator's OpenTelemetry set-up on its PYTHONPATH."""
    from tests.servers import redis_server

    block, lock = f"metered-{uuid.uuid4().hex[:8]}", f"metered-{uuid.uuid4().hex[:10]}"
    with temporary_settings(updates={PREFECT_API_URL: real_server.api_url}):
        SingletonBlock(url=redis_server.url(), lock_expire_seconds=60, name_prefix=PREFIX).save(block)
    metrics_dir = tmp_path_factory.mktemp("otel-metrics")
    log_path = metrics_dir.parent / f"{metrics_dir.name}-serve.log"
    env = real_server.env(
        METERED_BLOCK=block, METERED_LOCK=lock, PREFECT_RUNNER_POLL_FREQUENCY="1",
        METRICS_DIR=str(metrics_dir), OTEL_METRIC_EXPORT_INTERVAL="1000", OTEL_SERVICE_NAME="prefect-served-flows",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE / "otel_site"), str(ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(HERE / "metered_flow.py")], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while "metered/served" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.25)
        yield Served(process, metrics_dir, lock)
    finally:
        stop_process(process)


def points(metrics_dir: Path, lock_name: str) -> dict[int, dict[tuple[str, tuple[tuple[str, object], ...]], float]]:
    """Per exporting process (pid): the last value of each ``singleton.lock.*`` sum for ``lock_name``, by attributes.

    The reader's temporality is cumulative, so each process's last export holds its totals.
    """
    found: dict[int, dict[tuple[str, tuple[tuple[str, object], ...]], float]] = {}
    for path in sorted(metrics_dir.glob("metrics-*.jsonl")):
        pid = int(path.stem.removeprefix("metrics-"))
        for line in path.read_text().split("\n")[:-1]:  # whole lines only: the last may be an export being written
            for resource in json.loads(line)["resource_metrics"]:
                for scope in resource["scope_metrics"]:
                    if scope["scope"]["name"] != "singleton_integrations":
                        continue
                    for metric in scope["metrics"]:
                        for point in metric["data"]["data_points"]:
                            attributes = point["attributes"]
                            if attributes.get("lock.name") == lock_name and "value" in point:
                                key = (metric["name"], tuple(sorted(attributes.items())))
                                found.setdefault(pid, {})[key] = point["value"]
    return found


def exported(served: Served, lock_name: str, wanted: set[str]) -> tuple[int, dict[tuple[str, tuple[tuple[str, object], ...]], float]]:
    """The one run process that exported metrics for ``lock_name``, and its totals, once all of ``wanted`` are in.

    A run's process exports every second and once more at exit, after its final state reaches the API.
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        found = points(served.metrics_dir, lock_name)
        names = {name for totals in found.values() for name, _ in totals}
        if wanted <= names:
            assert len(found) == 1, found  # one run, one process
            [(pid, totals)] = found.items()
            return pid, totals
        assert time.monotonic() < deadline, (wanted, found)
        time.sleep(0.25)


def test_a_served_run_records_its_lock_through_the_operators_meter_provider(server: PrefectServer, served: Served) -> None:
    slot = uuid.uuid4().hex[:8]
    [final] = wait_final([start("metered/served", slot=slot).id])
    assert final.state is not None and final.state.name == "Completed", final.state
    name = served.stored_name(slot)
    lock = (("lock.name", name), ("lock.store", "redis"))
    pid, totals = exported(served, name, {"singleton.lock.released"})
    assert pid != served.process.pid, "recorded in the run's own process, not the serving one"
    assert totals[("singleton.lock.attempts", lock)] == 1, totals
    assert totals[("singleton.lock.acquired", (*lock, ("takeover", False)))] == 1, totals
    assert totals[("singleton.lock.released", lock)] == 1, totals
    assert totals[("singleton.lock.active", lock)] == 0, totals  # the hold ended in the run
    assert not any(metric == "singleton.lock.not_acquired" for metric, _ in totals), totals


def test_a_run_that_finds_the_lock_held_records_not_acquired_held(server: PrefectServer, served: Served) -> None:
    from tests.servers import redis_server

    slot = uuid.uuid4().hex[:8]
    name = served.stored_name(slot)
    with held_elsewhere(redis_server.url(), name):
        [final] = wait_final([start("metered/served", slot=slot).id])
    assert final.state is not None and final.state.name == "Skipped", final.state
    lock = (("lock.name", name), ("lock.store", "redis"))
    pid, totals = exported(served, name, {"singleton.lock.not_acquired"})
    assert pid != served.process.pid
    assert totals[("singleton.lock.attempts", lock)] == 1, totals
    assert totals[("singleton.lock.not_acquired", (*lock, ("reason", "held")))] == 1, totals
    assert not any(metric in ("singleton.lock.acquired", "singleton.lock.released") for metric, _ in totals), totals
    with get_client(sync_client=True) as client:  # the run says the same as its metrics
        assert "is held by" in (client.read_flow_run(final.id).state.message or "")
