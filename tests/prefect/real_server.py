"""A real Prefect server (``prefect server start``) on loopback, with its own PREFECT_HOME and SQLite database.

The test harness in ``conftest.py`` runs flows in the test process; this one is
what users deploy against: served deployments, runs in other processes, the UI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, stop_process, unavailable

ROOT = Path(__file__).resolve().parent.parent.parent
STARTUP_TIMEOUT = 120.0


@dataclass
class PrefectServer:
    url: str  # the UI's address
    api_url: str
    home: Path
    process: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a process that talks to this server (and imports this checkout)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home / "client"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="INFO",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
        )
        env.update(extra)
        return env


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(home: Path) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` on 127.0.0.1 and a free port; stop it at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prefect = Path(sys.executable).with_name("prefect")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_API_URL=f"{url}/api",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    # The services stay on: task run states reach the API as events, through the task run recorder.
    process = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                "--no-scheduler", "--no-late-runs"],
                               env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _healthy(f"{url}/api"):
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                unavailable("prefect server", (home / "server.log").read_text(errors="replace")[-2000:])
            time.sleep(0.25)
        yield PrefectServer(url=url, api_url=f"{url}/api", home=home, process=process)
    finally:
        stop_process(process)
        log.close()
