"""Lock metrics through Airflow's ``Stats``: a real deployment sends them over StatsD to a UDP listener on loopback.

The deployment (``deployments.Deployment``: scheduler, dag-processor, triggerer,
api-server, LocalExecutor) has ``[metrics] statsd_on`` with InfluxDB-style tags, so
each packet names its lock, DAG and task. A guarded task that takes its lock sends
``singleton.lock.acquired``; one skipped while another process holds the name sends
``singleton.lock.not_acquired`` with ``reason=held``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.airflow.conftest import Holder, Store
from tests.airflow.deployments import Deployment

pytestmark = [pytest.mark.airflow_deployment, pytest.mark.timeout(900)]

TAG = uuid.uuid4().hex[:8]
DAG_FILE = '''
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="metered", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def metered():
    @task.singleton(lock_name="stats-{tag}-{{{{ dag_run.conf['round'] }}}}", on_conflict="skip", lock_expire_seconds=60)
    def guarded():
        pass

    guarded()


metered()
'''


class Listener:
    """A StatsD server's socket: every packet that reaches 127.0.0.1:port, one metric per line."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self.lines: list[str] = []
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="statsd-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self.sock.recv(65535)
            except OSError:
                continue
            with self._guard:
                self.lines.extend(packet.decode(errors="replace").splitlines())

    def matching(self, *parts: str) -> list[str]:
        with self._guard:
            return [line for line in self.lines if all(part in line for part in parts)]

    def wait_for(self, *parts: str, timeout: float = 60) -> list[str]:
        """The lines holding every one of ``parts``; waits until one arrives (UDP: the task sent it before exiting)."""
        deadline = time.monotonic() + timeout
        while not (found := self.matching(*parts)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _redis() -> str:
    from tests.servers import redis_server

    return redis_server.url()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    found.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, listener: Listener) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("stats")
    one = Deployment("stats", root, env_extra={
        "AIRFLOW_CONN_SINGLETON_DEFAULT": json.dumps({"conn_type": "singleton", "password": _redis()}),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(listener.port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
    })
    started = False
    try:
        migration = one.prepare()
        assert migration.wait(600) == 0, (one.home / "db-migrate.log").read_text()[-3000:]
        (one.dags / "metered.py").write_text(DAG_FILE.format(tag=TAG))
        started = True
        one.start()
        one.wait_healthy()
        one.wait_for_dags(["metered"])
        yield one
    finally:
        if started:
            one.stop()


def test_a_task_that_takes_its_lock_sends_acquired(deployment: Deployment, listener: Listener) -> None:
    run_id = f"stats-{TAG}-1"
    deployment.trigger("metered", run_id, conf={"round": 1})
    assert deployment.wait_run("metered", run_id)["state"] == "success"
    assert deployment.task_states("metered", run_id)["guarded"] == "success"
    tags = (f"lock_name=stats-{TAG}-1", "dag_id=metered", "task_id=guarded")
    acquired = listener.wait_for("airflow.singleton.lock.acquired,", *tags)
    assert len(acquired) == 1 and acquired[0].endswith(":1|c"), listener.matching(TAG)
    assert listener.wait_for("airflow.singleton.lock.released,", *tags), listener.matching(TAG)
    assert not listener.matching("singleton.lock.not_acquired", f"stats-{TAG}-1")


def test_a_task_skipped_while_another_process_holds_the_name_sends_not_acquired(
        deployment: Deployment, listener: Listener, hold: Callable[..., Holder], tmp_path: Path) -> None:
    name = f"stats-{TAG}-2"
    hold(Store("redis", _redis(), "singleton_default"), name)
    run_id = f"stats-{TAG}-2"
    deployment.trigger("metered", run_id, conf={"round": 2})
    deployment.wait_run("metered", run_id)
    assert deployment.task_states("metered", run_id)["guarded"] == "skipped"
    refused = listener.wait_for("airflow.singleton.lock.not_acquired,", f"lock_name={name}", "dag_id=metered",
                                "task_id=guarded", "reason=held")
    assert len(refused) == 1 and refused[0].endswith(":1|c"), listener.matching(TAG)
    assert not listener.matching("singleton.lock.acquired,", f"lock_name={name},")
