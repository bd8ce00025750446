"""Shared fixtures: one store URL per persister, on real servers.

Under CI=true a store that cannot be reached fails the run instead of skipping.
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path

import pytest

NETWORKED = ("redis", "postgres", "mongodb")
ALL_STORES = ("memory", "sqlite", *NETWORKED)


def store_url_for(kind: str, tmp_path: Path) -> str:
    """A URL for ``kind``: a fresh SQLite file or in-memory store, or the shared test server."""
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'locks.sqlite3'}"
    server = importlib.import_module(f"tests.servers.{kind}_server")
    return server.url()


@pytest.fixture(params=ALL_STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=NETWORKED)
def networked_store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_url(store_kind: str, tmp_path: Path) -> str:
    return store_url_for(store_kind, tmp_path)


def pytest_report_header(config: pytest.Config) -> str:
    return f"CI={os.environ.get('CI', '')!r}: a missing server {'fails' if os.environ.get('CI') == 'true' else 'skips'}"
