"""Real Airflow for the provider's tests: a temporary AIRFLOW_HOME with a SQLite metadata DB, migrated once.

DAGs run with ``dag.test()`` (tasks and triggers in this process) against the same
Redis, PostgreSQL and MongoDB-wire servers as the core suite; the other deployment
holding a lock is a second process (``holder.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Airflow reads its configuration once, at import: set it before anything imports airflow.
_HOME = Path(tempfile.mkdtemp(prefix="singleton-airflow-home-"))
atexit.register(shutil.rmtree, _HOME, True)
(_HOME / "dags").mkdir()
os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(_HOME / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__SENSORS__DEFAULT_TIMEOUT": "600",
    }
)

try:
    import airflow  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    collect_ignore_glob = ["*"]  # this env has no Airflow; the tests_airflow nox session has it

HOLDER = Path(__file__).parents[1] / "holder.py"
STORES = ("sqlite", "redis", "postgres", "mongodb")
# Another deployment, as its lock metadata names it in conflict messages.
OTHER = {"dag_id": "nightly_load", "run_id": "scheduled__other-region", "task_id": "load", "deployment": "eu-west"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "airflow_deployment: starts two real Airflow deployments (about 5 minutes); "
                                       "deselect with -m 'not airflow_deployment'")


@pytest.fixture(scope="session", autouse=True)
def airflow_db() -> Path:
    """``airflow db migrate`` once per session, in a child so this process's Airflow import stays cheap."""
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return _HOME


def store_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    from tests.conftest import store_url_for

    return store_url_for(kind, tmp_path)


def connection_for(kind: str, url: str) -> dict[str, Any]:
    """An Airflow connection (JSON form) of a different type per store, so each mapping is exercised."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if kind == "sqlite":
        return {"conn_type": "singletonsqlite", "host": url.split("sqlite:///", 1)[1]}
    if kind == "redis":
        return {"conn_type": "singletonredis", "host": parts.hostname, "port": parts.port,
                "schema": parts.path.lstrip("/") or "0", "password": unquote(parts.password or "") or None}
    if kind == "postgres":  # the standard type, as a user with an existing postgres_default would
        return {"conn_type": "postgres", "host": parts.hostname, "port": parts.port, "login": parts.username,
                "password": unquote(parts.password or "") or None, "schema": parts.path.lstrip("/"),
                "extra": dict(pair.split("=", 1) for pair in parts.query.split("&") if pair)}
    return {"conn_type": "singleton", "password": url}  # mongodb: a whole store URL, in the redacted field


class Store:
    """One lock store reachable both directly (``url``) and as an Airflow connection (``conn_id``)."""

    def __init__(self, kind: str, url: str, conn_id: str) -> None:
        self.kind, self.url, self.conn_id = kind, url, conn_id

    def persister(self) -> Any:
        from singleton_integrations import persisters

        return persisters.from_url(self.url)

    def holder(self, name: str) -> Any:
        with self.persister() as store:
            return store.get(name)

    def __repr__(self) -> str:
        return f"Store({self.kind})"


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    kind = request.param
    url = store_url(kind, tmp_path)
    conn_id = f"locks_{kind}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection_for(kind, url)))
    return Store(kind, url, conn_id)


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    url = store_url("sqlite", tmp_path)
    monkeypatch.setenv("AIRFLOW_CONN_LOCKS_SQLITE", json.dumps(connection_for("sqlite", url)))
    return Store("sqlite", url, "locks_sqlite")


class Holder:
    """A second process holding a lock; ``release()`` makes it let go."""

    def __init__(self, process: subprocess.Popen[str], fencing_token: int) -> None:
        self.process = process
        self.fencing_token = fencing_token

    def release(self) -> None:
        if self.process.poll() is None and self.process.stdin:
            self.process.stdin.write("release\n")
            self.process.stdin.flush()
            self.process.wait(30)

    def release_later(self, seconds: float) -> None:
        """Let go ``seconds`` from now, without waiting; a task's ``on_execute_callback`` calls this."""
        if self.process.poll() is None and self.process.stdin:
            try:
                self.process.stdin.write(f"later {seconds}\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass

    def stop(self) -> None:
        """Release (so shared servers keep no stale locks), or kill a holder that does not answer."""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.release()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture
def hold() -> Iterator[Callable[..., Holder]]:
    """Start a holder process on ``(store, name)``; it is stopped at the end of the test."""
    started: list[Holder] = []

    def start(store: Store, name: str, *args: str, metadata: dict[str, str] | None = None) -> Holder:
        pairs = [f"{k}={v}" for k, v in (metadata or OTHER).items()]
        process = subprocess.Popen(
            [sys.executable, str(HOLDER), store.url, name, *args, "--metadata", *pairs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[2]),
        )
        line = process.stdout.readline() if process.stdout else ""
        reply = json.loads(line or '{"acquired": false}')
        assert reply["acquired"], f"the holder process could not take {name!r}"
        holder = Holder(process, reply["fencing_token"])
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.stop()


@pytest.fixture
def task_log(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """Everything the tasks logged so far: Airflow's task logs reach stdout or the logging module."""
    caplog.set_level(logging.INFO)
    seen: list[str] = []

    def read() -> str:
        seen.append(capfd.readouterr().out)
        return "".join(seen) + caplog.text

    return read


@pytest.fixture
def lock_name() -> str:
    return f"airflow-test-{uuid.uuid4().hex[:12]}"
