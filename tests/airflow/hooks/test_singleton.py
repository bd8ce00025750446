"""SingletonHook: every connection type maps to its store, and the hook locks on the real stores."""

from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection

from airflow_provider import SingletonHook
from airflow_provider.hooks.singleton import store_url


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"conn_type": "singleton_redis", "host": "r", "port": 6380, "password": "p@ss/w", "schema": "2"},
         "redis://:p%40ss%2Fw@r:6380/2"),
        ({"conn_type": "singleton_redis", "host": "r", "extra": json.dumps({"ssl": True, "options": "key_prefix=x"})},
         "rediss://r/?key_prefix=x"),
        ({"conn_type": "redis", "host": "r", "port": 6379, "extra": json.dumps({"db": 3, "ssl_cert_reqs": "none"})},
         "redis://r:6379/3"),
        ({"conn_type": "singleton_mongodb", "host": "a:1,b:2", "login": "u", "password": "p", "schema": "locks"},
         "mongodb://u:p@a:1,b:2/locks"),
        ({"conn_type": "mongo", "host": "cluster.example", "schema": "db",
          "extra": json.dumps({"srv": True, "authSource": "admin", "unrelated": 1})},
         "mongodb+srv://cluster.example/db?authSource=admin"),
        ({"conn_type": "postgres", "host": "pg", "port": 5432, "login": "u", "schema": "db",
          "extra": json.dumps({"sslmode": "require", "cursor": "dictcursor"})},
         "postgresql://u@pg:5432/db?sslmode=require"),
        ({"conn_type": "singleton_postgres", "host": "pg", "extra": json.dumps({"application_name": "etl"})},
         "postgresql://pg/?application_name=etl"),
        ({"conn_type": "singleton_sqlite", "extra": json.dumps({"path": "/var/lib/locks.db"})},
         "sqlite:////var/lib/locks.db"),
        ({"conn_type": "singleton", "extra": json.dumps({"url": "redis://h:1/0"})}, "redis://h:1/0"),
        ({"conn_type": "http", "host": "ignored", "extra": json.dumps({"url": "sqlite:////tmp/x.db"})},
         "sqlite:////tmp/x.db"),
    ],
)
def test_connection_types_map_to_store_urls(fields: dict, expected: str) -> None:
    assert store_url(Connection(conn_id="c", **fields)) == expected


def test_uri_connections_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LOCKS_URI", "sqlite:////tmp/locks-from-uri.db")
    monkeypatch.setenv("AIRFLOW_CONN_REDIS_DEFAULT", "redis://:secret@127.0.0.1:6379/1")
    assert store_url(SingletonHook.get_connection("locks_uri")) == "sqlite:////tmp/locks-from-uri.db"
    assert SingletonHook(singleton_conn_id="redis_default").describe_store() == "redis://:***@127.0.0.1:6379/1"


def test_unsupported_connection_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="a lock store needs one of"):
        store_url(Connection(conn_id="c", conn_type="http", host="h"))


def test_hook_locks_on_the_store(store, hold, lock_name) -> None:
    hook = SingletonHook(singleton_conn_id=store.conn_id)
    assert hook.get_conn() is hook.get_conn(), "the persister is built once per hook"
    first = hook.acquire(lock_name, lock_expire_seconds=30, metadata={"task_id": "t"})
    assert first.acquired and hook.exists(lock_name)
    assert hook.holder(lock_name).metadata == {"task_id": "t"}
    assert not hook.acquire(lock_name).acquired
    assert not hook.release(lock_name, "not-the-owner")
    assert hook.release(lock_name, first.record.owner_token) and not hook.exists(lock_name)
    hook.close()


def test_test_connection_reads_without_writing(store) -> None:
    ok, message = SingletonHook(singleton_conn_id=store.conn_id).test_connection()
    assert ok, message
    assert "Connected to the lock store" in message


def test_failed_test_connection_never_shows_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BROKEN", json.dumps(
        {"conn_type": "singleton_postgres", "host": "127.0.0.1", "port": 1, "login": "u", "password": "hunter2-secret",
         "schema": "db", "extra": {"connect_timeout": 2}}))
    ok, message = SingletonHook(singleton_conn_id="broken").test_connection()
    assert not ok and "hunter2-secret" not in message
