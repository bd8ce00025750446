"""Every lock rule on every persister, against real servers, through both APIs."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from singleton_integrations.persisters import Persister
from singleton_integrations.testing.conformance import PersisterConformance, not_per_api


def _memory_state(persister: Persister, name: str) -> bool:
    # Whatever the layout, a store in a dict keeps a name as a key of one of its mappings.
    return any(isinstance(value, dict) and name in value for value in vars(persister).values())


def _sqlite_state(persister: Persister, name: str) -> bool:
    connection = sqlite3.connect(persister.path, timeout=10)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            if any(name in row for row in connection.execute(f"SELECT * FROM {quoted}")):
                return True
        return False
    finally:
        connection.close()


def _redis_state(url: str) -> Callable[[Persister, str], bool]:
    import redis

    def found(persister: Persister, name: str) -> bool:
        client = redis.Redis.from_url(urlunsplit(urlsplit(url)._replace(query="")), socket_timeout=5)
        try:
            return any(True for _ in client.scan_iter(match=f"*{name}*", count=1000))
        finally:
            client.close()

    return found


def _postgres_state(url: str) -> Callable[[Persister, str], bool]:
    import psycopg
    from psycopg import sql

    def found(persister: Persister, name: str) -> bool:
        with psycopg.connect(urlunsplit(urlsplit(url)._replace(query="")), connect_timeout=5, autocommit=True) as connection:
            tables = connection.execute(
                "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                "AND table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
            for schema, table in tables:
                query = sql.SQL("SELECT 1 FROM {}.{} AS row WHERE row::text LIKE %s LIMIT 1").format(
                    sql.Identifier(schema), sql.Identifier(table))
                try:
                    if connection.execute(query, (f"%{name}%",)).fetchone():
                        return True
                except psycopg.Error:  # a table another test dropped meanwhile
                    continue
        return False

    return found


def _mongodb_state(url: str) -> Callable[[Persister, str], bool]:
    import pymongo

    def found(persister: Persister, name: str) -> bool:
        with pymongo.MongoClient(url, serverSelectionTimeoutMS=5000) as client:
            # SecantusDB's TTL monitor runs every 60 s, as mongod's does: run its pass now (a real
            # mongod refuses the command, and its own monitor will come).
            with contextlib.suppress(pymongo.errors.PyMongoError):
                client.admin.command("secantusAdmin.pruneTtl")
            collection = client[persister.database_name][persister.collection_name]
            return collection.find_one({"_id": name}) is not None

    return found


class TestConformance(PersisterConformance):
    """``store_url`` comes from tests/conftest.py, parametrized over the five persisters."""

    @pytest.fixture
    def stored_state(self, store_kind: str, store_url: str) -> Callable[[Persister, str], bool]:
        """Whether the store still keeps anything for a name, read beside the persister, layout-free."""
        finders: dict[str, Any] = {
            "memory": lambda: _memory_state,
            "sqlite": lambda: _sqlite_state,
            "redis": lambda: _redis_state(store_url),
            "postgres": lambda: _postgres_state(store_url),
            "mongodb": lambda: _mongodb_state(store_url),
        }
        return finders[store_kind]()

    @not_per_api
    def test_builtin_persisters_declare_this_rounds_capabilities(self, persister: Persister, store_kind: str) -> None:
        """The suite skips the minimum-hold rules on a persister without them: no built-in may lack them."""
        assert persister.supports_min_hold is True
        assert persister.limits is True, "limit=N: every built-in store keeps several holds of a name"
        if store_kind in ("redis", "postgres", "mongodb"):
            assert persister.native_async is True, f"{store_kind} must use its native async driver"
        assert 0 < persister.call_timeout <= 15
