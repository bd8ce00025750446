"""Fixtures that run the real ``singleton`` console script in subprocesses against a real store."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import store_url_for

CHILD = str(Path(__file__).with_name("_child.py"))
SCRIPT = Path(sys.executable).with_name("singleton")
#: Stores the CLI tests run on: SQLite always; networked stores once their persister exists.
STORES = ("sqlite", "redis", "postgres")


class Cli:
    """Starts ``singleton`` (or ``python -m singleton_integrations``) with one store URL and work directory."""

    def __init__(self, url: str, workdir: Path, state_dir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.name = f"job-{uuid.uuid4().hex[:8]}"  # unique per test: networked stores are shared
        self.env = {**os.environ, "SINGLETON_URL": url, "XDG_STATE_HOME": str(state_dir), "PYTHONUNBUFFERED": "1"}
        self.env.pop("SINGLETON_DEBUG", None)
        self._started: list[subprocess.Popen[str]] = []

    def argv(self, *args: str, module: bool = False) -> list[str]:
        head = [sys.executable, "-m", "singleton_integrations"] if module else [str(SCRIPT)]
        return [*head, *args]

    def start(self, *args: str, module: bool = False, env: dict[str, str] | None = None,
              ignoring: tuple[signal.Signals, ...] = ()) -> subprocess.Popen[str]:
        """``singleton ARGS`` in the background, with the forwarded signals at their defaults except ``ignoring``.

        A test runner started as a background job or under ``nohup`` hands its children SIGINT
        or SIGHUP ignored, and the command leaves an ignored signal ignored, as a shell does;
        the signal tests must not depend on how the runner was started.
        """

        def signals() -> None:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN if signum in ignoring else signal.SIG_DFL)

        process = subprocess.Popen(self.argv(*args, module=module), env=env or self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=signals)
        self._started.append(process)
        return process

    def run(self, *args: str, module: bool = False, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, module=module), env=env or self.env, text=True,
                              capture_output=True, timeout=timeout)

    def child(self, label: str, *extra: str) -> list[str]:
        """The test command: reports ready, waits for ``go()``, exits as told."""
        return [sys.executable, CHILD, str(self.workdir), label, *extra]

    def wait_ready(self, label: str, timeout: float = 30) -> tuple[int, int]:
        """The child's pid and fencing token once it runs."""
        path = self.workdir / f"{label}.ready"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{label} did not start within {timeout} s")
            time.sleep(0.02)
        pid, token = path.read_text().split()
        return int(pid), int(token)

    def go(self) -> None:
        (self.workdir / "go").touch()

    def ran(self, label: str) -> bool:
        return (self.workdir / f"{label}.ready").exists()

    def cleanup(self) -> None:
        self.go()
        for process in self._started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)


def finish(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """Wait for a started ``singleton``: its exit code, stdout and stderr."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _url(kind: str, tmp_path: Path) -> str:
    if kind != "sqlite" and importlib.util.find_spec(f"singleton_integrations.persisters.{kind}") is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"the {kind} persister is missing")
        pytest.skip(f"the {kind} persister is not in this checkout yet")
    return store_url_for(kind, tmp_path)


@pytest.fixture(params=STORES)
def any_cli(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    """The CLI on each store."""
    yield from _cli(_url(request.param, tmp_path), tmp_path)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """The CLI on a SQLite file in ``tmp_path`` (``sqlite:////abs/path``)."""
    yield from _cli(store_url_for("sqlite", tmp_path), tmp_path)


def _cli(url: str, tmp_path: Path) -> Iterator[Cli]:
    if not SCRIPT.exists():
        raise AssertionError(f"{SCRIPT} is missing: install the package (pip install -e .) to get the console script")
    workdir = tmp_path / "work"
    workdir.mkdir()
    runner = Cli(url, workdir, tmp_path / "state")
    try:
        yield runner
    finally:
        runner.cleanup()
