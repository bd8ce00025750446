"""Prefect fixtures: one test harness (real API server) per session, real stores, a second holder process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

prefect = pytest.importorskip("prefect") if os.environ.get("CI") != "true" else __import__("prefect")

# After the check above: without Prefect (outside CI) the module is skipped, not broken.
from prefect.events.clients import AssertingEventsClient  # noqa: E402
from prefect.events.schemas.events import Event  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from tests.conftest import store_url_for  # noqa: E402

from .real_server import PrefectServer, prefect_server  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
#: The states table runs on every store; the rest of the suite on one, to stay fast.
STORES = ("sqlite", "redis", "postgres", "mongodb")


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> Iterator[str]:
    """A real Prefect API server on a throwaway database, shared by the session."""
    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` on loopback, started once for the modules that ask for it."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running


@pytest.fixture
def server(real_server: PrefectServer) -> Iterator[PrefectServer]:
    """Point this test's Prefect client at the real server (the rest of the suite keeps the harness)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: real_server.api_url}):
        yield real_server


@pytest.fixture
def child_env(prefect_api: str) -> dict[str, str]:
    """The environment for child processes: the same API server, the same test stores."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return env


@pytest.fixture(params=STORES)
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url_for(request.param, tmp_path)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite: shared by every process on this host, the embedded default."""
    return store_url_for("sqlite", tmp_path)


@pytest.fixture
def lock_name() -> str:
    return f"prefect-test-{uuid.uuid4().hex[:12]}"


@dataclass
class HeldLock:
    process: subprocess.Popen[str]
    fencing_token: int
    pid: int

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("release\n")
            self.process.stdin.flush()
            assert self.process.wait(timeout=60) == 0


@contextmanager
def held_elsewhere(url: str, name: str, *extra: str, env: dict[str, str] | None = None) -> Iterator[HeldLock]:
    """Hold ``name`` in a second process until the block ends (or ``release()``)."""
    process = subprocess.Popen(
        [sys.executable, str(HERE.parent / "holder.py"), url, name, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, f"holder process exited with {process.wait(timeout=30)} before holding {name!r}"
        status = json.loads(line)
        assert status["acquired"], f"holder process could not take {name!r}"
        held = HeldLock(process, status["fencing_token"], status["pid"])
        yield held
        held.release()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def events() -> Iterator[EventsRecorder]:
    """Prefect's asserting events client behind the events worker, as Prefect's own tests use it."""
    worker = EventsWorker.instance(AssertingEventsClient)
    patcher = pytest.MonkeyPatch()
    patcher.setattr(EventsWorker, "instance", lambda *_: worker)
    try:
        yield EventsRecorder(worker)
    finally:
        patcher.undo()
        worker.drain()


class EventsRecorder:
    def __init__(self, worker: EventsWorker) -> None:
        self.worker = worker

    def lock_events(self, name: str) -> list[Event]:
        """Every ``singleton.lock.*`` event for lock ``name``, in the order sent."""
        self.worker.wait_until_empty()
        client = self.worker._client
        assert isinstance(client, AssertingEventsClient)
        return [e for e in client.events if e.event.startswith("singleton.lock.") and e.resource.id == f"singleton.lock.{name}"]

    def names(self, name: str) -> list[str]:
        return [e.event for e in self.lock_events(name)]
