"""Real Airflow deployments on loopback for the real-path tests.

Each ``Deployment`` has its own AIRFLOW_HOME, its own PostgreSQL metadata database
(created on 127.0.0.1:5432 and dropped afterwards), and its own api-server,
scheduler, dag-processor and triggerer, with the LocalExecutor, or with the
CeleryExecutor and one Celery worker (Redis as broker and result backend, on a Redis
database of its own; needs ``apache-airflow-providers-celery``). Deployments share
only the lock store. Nothing here imports Airflow: every Airflow process is a child.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import free_port

__all__ = ["CELERY_BROKER", "EXECUTORS", "METADATA_SERVER", "Deployment", "celery_missing"]

#: The PostgreSQL server that hosts each deployment's metadata database (trust auth).
METADATA_SERVER = os.environ.get("SINGLETON_TEST_METADATA_PG", "postgresql://postgres@127.0.0.1:5432")
#: The Celery broker: a Redis database the lock tests do not use (they use 0). Results go to the
#: deployment's own metadata database, dropped with it; ``stop()`` removes the deployment's broker keys.
CELERY_BROKER = os.environ.get("SINGLETON_TEST_CELERY_BROKER", "redis://127.0.0.1:6379/13")
EXECUTORS = ("LocalExecutor", "CeleryExecutor")
_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def celery_missing() -> str | None:
    """Why a CeleryExecutor deployment cannot start here, or None (checked in a child, as a deployment runs)."""
    done = subprocess.run([sys.executable, "-c", "import airflow.providers.celery.executors.celery_executor"],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode == 0:
        return None
    return f"the CeleryExecutor needs apache-airflow-providers-celery: {done.stderr.strip().splitlines()[-1:]}"


def _pg(statement: str) -> None:
    import psycopg

    with psycopg.connect(f"{METADATA_SERVER}/postgres", autocommit=True, connect_timeout=10) as db:
        db.execute(statement)


@dataclass
class Deployment:
    """One Airflow deployment; ``start()`` migrates its database and starts its four components."""

    name: str
    root: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    executor: str = "LocalExecutor"
    port: int = field(default_factory=free_port)
    worker_log_port: int = field(default_factory=free_port)
    trigger_log_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / self.name

    @property
    def database(self) -> str:
        return f"singleton_it_{os.getpid()}_{self.name}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dags(self) -> Path:
        return self.home / "dags"

    @property
    def components(self) -> tuple[str, ...]:
        return (*_COMPONENTS, "celery-worker") if self.executor == "CeleryExecutor" else _COMPONENTS

    def _executor_env(self) -> dict[str, str]:
        if self.executor == "LocalExecutor":
            return {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}
        if self.executor != "CeleryExecutor":
            raise ValueError(f"executor must be one of {EXECUTORS}, not {self.executor!r}")
        return {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": CELERY_BROKER,
            "AIRFLOW__CELERY__RESULT_BACKEND":
                f"db+{METADATA_SERVER.replace('postgresql://', 'postgresql+psycopg://')}/{self.database}",
            # One queue per deployment, so two deployments (or a stale worker) never take each other's tasks.
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"singleton-{os.getpid()}-{self.name}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
        }

    def env(self) -> dict[str, str]:
        # PYTHONDONTWRITEBYTECODE (set on some CI machines, and uv installs no .pyc) would make every task
        # process compile Airflow's and our modules from source, which no real install does.
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith("AIRFLOW") and k != "PYTHONDONTWRITEBYTECODE"}
        return {
            **keep,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{METADATA_SERVER.replace('postgresql://', 'postgresql+psycopg://')}/{self.database}",
            # psycopg 3's async dialect, so the deployment needs no asyncpg
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC":
                f"{METADATA_SERVER.replace('postgresql://', 'postgresql+psycopg_async://')}/{self.database}",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API_AUTH__JWT_SECRET": f"jwt-secret-of-{self.name}-{os.getpid()}",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # Each deployment serves its worker and triggerer logs on ports of its own.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.trigger_log_port),
            "PYTHONUNBUFFERED": "1",
            **self._executor_env(),
            **self.env_extra,
        }

    def airflow(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def prepare(self) -> subprocess.Popen[str]:
        """Create the home and database; return the running ``airflow db migrate`` (run both at once)."""
        self.dags.mkdir(parents=True, exist_ok=True)
        _pg(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        _pg(f'CREATE DATABASE "{self.database}"')
        log = open(self.home / "db-migrate.log", "w")  # noqa: SIM115  (closed with the process)
        return subprocess.Popen([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)

    def start(self) -> None:
        for component in self.components:
            args = [component]
            if component == "api-server":
                args = ["api-server", "--workers", "1"]
            elif component == "celery-worker":
                args = ["celery", "worker", "--queues", self._executor_env()["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]]
            log = open(self.home / f"{component}.log", "wb")  # noqa: SIM115  (kept open for the child)
            self.processes[component] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for component, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{self.name}: {component} exited ({process.returncode}):\n{self.log(component)}")
            try:
                last = self.get("/api/v2/monitor/health")
                parts = [last.get(part, {}).get("status") for part in ("metadatabase", "scheduler", "triggerer",
                                                                           "dag_processor")]
                if all(status == "healthy" for status in parts):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not healthy after {timeout} s: {last}\n{self.log('api-server')}")

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        missing = list(dag_ids)
        while time.monotonic() < deadline:
            missing = [dag_id for dag_id in missing if self.get(f"/api/v2/dags/{dag_id}", missing_ok=True) is None]
            if not missing:
                return
            time.sleep(1)
        errors = self.get("/api/v2/importErrors", missing_ok=True)
        raise RuntimeError(f"{self.name}: DAGs {missing} not parsed in {timeout} s; import errors: {errors}\n"
                           f"{self.log('dag-processor')}")

    def log(self, component: str, tail: int = 4000) -> str:
        path = self.home / f"{component}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    # -- REST API ----------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            if missing_ok and error.code == 404:
                return None
            raise RuntimeError(f"{method} {path} -> {error.code}: {error.read()[:2000]!r}") from None
        return json.loads(text) if text else None

    def get(self, path: str, missing_ok: bool = False) -> Any:
        return self.request("GET", path, missing_ok=missing_ok)

    def trigger(self, dag_id: str, run_id: str, logical_date: str | None = None, conf: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf or {}}
        return str(self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: run {dag_id}/{run_id} still {run.get('state')} after {timeout} s; "
                           f"tasks: {self.task_states(dag_id, run_id)}\n{self.log('scheduler')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"])

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]: ti["state"]
                for ti in self.task_instances(dag_id, run_id)}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        path = (f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
                f"?full_content=true&map_index={map_index}")
        content = self.get(path)["content"]
        if isinstance(content, str):
            return content
        # Structured lines: a skip's message is in "reason", not in "event".
        return "\n".join(json.dumps(line) if isinstance(line, dict) else str(line) for line in content)

    # -- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        # A leftover database is named by pid and dropped on the next start.
        with contextlib.suppress(Exception):
            _pg(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        if self.executor == "CeleryExecutor":
            with contextlib.suppress(Exception):
                self._drop_broker_keys()

    def _drop_broker_keys(self) -> None:
        """The broker's keys for this deployment's queue (its list and Kombu's binding set), nothing else."""
        import redis

        queue = self._executor_env()["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]
        with redis.Redis.from_url(CELERY_BROKER) as broker:
            broker.delete(queue, f"_kombu.binding.{queue}")

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
