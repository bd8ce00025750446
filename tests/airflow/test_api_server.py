"""The connection form: a real ``airflow api-server`` serves our connection types and fields to the UI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except OSError:
        return 0, b""


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("api") / "api-server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get(f"{base}/api/v2/monitor/health")[0] != 200:
            assert server.poll() is None, Path(log).read_text()[-3000:]
            assert time.monotonic() < deadline, "api-server did not start in 180 s"
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)


def test_ui_lists_our_connection_types_with_their_fields(api_server: str) -> None:
    status, body = _get(f"{api_server}/ui/connections/hook_meta")
    assert status == 200
    types = {entry["connection_type"]: entry for entry in json.loads(body)}

    generic = types["singleton"]
    assert generic["hook_name"] == "Singleton lock store (URL)"
    # The URL (and its password) lives in the password field: visible, masked, redacted by the API.
    assert generic["standard_fields"]["password"] == {
        "hidden": False, "title": "Store URL (required)",
        "placeholder": "redis://:password@redis:6379/0, postgresql://, mongodb://, sqlite:////abs/path.db"}
    assert generic["standard_fields"]["host"]["hidden"] is True
    assert not generic["extra_fields"]

    redis = types["singletonredis"]
    assert redis["standard_fields"]["url_schema"]["title"] == "Database number"
    assert redis["standard_fields"]["port"]["placeholder"] == "6379"
    assert set(redis["extra_fields"]) == {"ssl", "options"}

    assert types["singletonpostgres"]["extra_fields"]["sslmode"]["schema"]["enum"][-1] == "verify-full"
    assert types["singletonmongodb"]["standard_fields"]["url_schema"]["title"] == "Database"
    sqlite = types["singletonsqlite"]
    assert sqlite["standard_fields"]["host"]["title"] == "Database file (required)" and not sqlite["extra_fields"]
    assert not any("_" in conn_type for conn_type in types if conn_type.startswith("singleton"))
