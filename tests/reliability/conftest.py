"""Fixtures for the reliability suite: stores, child processes and the figures each test reports.

Tests marked ``slow`` are deselected unless the run asks for them (``-m slow``,
or ``SINGLETON_SLOW=1``). Each test may fill the ``figures`` dict; when
``SINGLETON_RELIABILITY_RESULTS`` names a directory, the figures are written
there as JSON for ``scripts/reliability_report.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from singleton_integrations.testing.conformance import read_fact
from tests.conftest import store_url_for

__all__ = ["read_fact"]  # re-exported for the reliability tests

WORKER = str(Path(__file__).with_name("_worker.py"))
RESULTS_ENV = "SINGLETON_RELIABILITY_RESULTS"
#: The stores every reliability check runs on; SQLite too where the check makes sense on one host.
STORES = ("redis", "postgres", "mongodb", "sqlite")
NETWORKED = ("redis", "postgres", "mongodb")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SINGLETON_SLOW") == "1" or "slow" in (config.getoption("markexpr") or ""):
        return
    here = Path(__file__).parent
    slow = [item for item in items if item.get_closest_marker("slow") and here in Path(str(item.fspath)).parents]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


@pytest.fixture(params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=NETWORKED)
def networked_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def url(kind: str, tmp_path: Path) -> str:
    return store_url_for(kind, tmp_path)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with what it measured; saved for the reliability report."""
    found: dict[str, Any] = {}
    yield found
    directory = os.environ.get(RESULTS_ENV)
    if directory and found:
        Path(directory).mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-180:]
        record = {"nodeid": request.node.nodeid, "doc": (request.function.__doc__ or "").strip(), "figures": found}
        (Path(directory) / f"{safe}.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


def spawn(mode: str, config: dict[str, Any], stdin: bool = False) -> subprocess.Popen[str]:
    """Start ``_worker.py MODE`` as its own process."""
    return subprocess.Popen(
        [sys.executable, WORKER, mode, json.dumps(config)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )




def stop(process: subprocess.Popen[str]) -> None:
    """Make sure a child is gone (it may already be)."""
    if process.poll() is None:
        process.kill()
    process.wait(10)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
