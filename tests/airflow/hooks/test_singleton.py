"""SingletonHook: every connection type maps to its store, and the hook locks on the real stores."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from airflow.sdk import Connection

from airflow_provider import SingletonHook
from airflow_provider.hooks.singleton import store_url
from singleton_integrations import persisters


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"conn_type": "singletonredis", "host": "r", "port": 6380, "password": "p@ss/w", "schema": "2"},
         "redis://:p%40ss%2Fw@r:6380/2"),
        ({"conn_type": "singleton_redis", "host": "r", "port": 6380}, "redis://r:6380/"),  # the earlier type name
        ({"conn_type": "singletonredis", "host": "r", "extra": json.dumps({"ssl": True, "options": "key_prefix=x"})},
         "rediss://r/?key_prefix=x"),
        ({"conn_type": "redis", "host": "r", "port": 6379, "extra": json.dumps({"db": 3, "ssl_cert_reqs": "none"})},
         "redis://r:6379/3"),
        ({"conn_type": "singletonmongodb", "host": "a:1,b:2", "login": "u", "password": "p", "schema": "locks"},
         "mongodb://u:p@a:1,b:2/locks"),
        ({"conn_type": "mongo", "host": "cluster.example", "schema": "db",
          "extra": json.dumps({"srv": True, "authSource": "admin", "unrelated": 1})},
         "mongodb+srv://cluster.example/db?authSource=admin"),
        ({"conn_type": "postgres", "host": "pg", "port": 5432, "login": "u", "schema": "db",
          "extra": json.dumps({"sslmode": "require", "cursor": "dictcursor"})},
         "postgresql://u@pg:5432/db?sslmode=require"),
        ({"conn_type": "singletonpostgres", "host": "pg", "extra": json.dumps({"application_name": "etl"})},
         "postgresql://pg/?application_name=etl"),
        ({"conn_type": "mysql", "host": "db", "port": 3306, "login": "u", "password": "p", "schema": "locks",
          "extra": json.dumps({"connect_timeout": 5, "charset": "utf8mb4"})},
         "mysql://u:p@db:3306/locks?connect_timeout=5"),
        ({"conn_type": "mysql", "host": "db", "schema": "locks",  # Airflow's MySQL hook keeps TLS as the driver's dict
          "extra": json.dumps({"ssl": {"ca": "/etc/ca.pem", "cert": "/etc/c.pem", "key": "/etc/k.pem",
                                       "check_hostname": False}})},
         "mysql://db/locks?ssl=true&ssl_ca=%2Fetc%2Fca.pem&ssl_cert=%2Fetc%2Fc.pem&ssl_key=%2Fetc%2Fk.pem"
         "&ssl_verify_identity=false"),
        ({"conn_type": "mysql", "host": "db", "extra": json.dumps({"ssl": json.dumps({"ca": "/etc/ca.pem"})})},
         "mysql://db/?ssl=true&ssl_ca=%2Fetc%2Fca.pem"),
        ({"conn_type": "singletonsqlite", "host": "/var/lib/locks.db"}, "sqlite:////var/lib/locks.db"),
        ({"conn_type": "singleton_sqlite", "extra": json.dumps({"path": "/var/lib/locks.db"})},  # earlier form
         "sqlite:////var/lib/locks.db"),
        ({"conn_type": "singleton", "password": "redis://:pw@h:1/0"}, "redis://:pw@h:1/0"),
        ({"conn_type": "singleton", "extra": json.dumps({"url": "redis://h:1/0"})}, "redis://h:1/0"),  # earlier form
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
    assert SingletonHook(singleton_conn_id="redis_default").describe_store() == "connection 'redis_default' (redis://:***@127.0.0.1:6379/1)"


def test_unsupported_connection_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="a lock store needs one of"):
        store_url(Connection(conn_id="c", conn_type="http", host="h"))


def test_hook_locks_on_the_store(store, hold, lock_name) -> None:
    hook = SingletonHook(singleton_conn_id=store.conn_id)
    assert hook.get_conn() is hook.get_conn(), "the persister is built once per hook"
    assert SingletonHook(singleton_conn_id=store.conn_id).get_conn() is hook.get_conn(), "and shared per process"
    first = hook.acquire(lock_name, lock_expire_seconds=30, metadata={"task_id": "t"})
    assert first.acquired and hook.exists(lock_name)
    assert hook.holder(lock_name).metadata == {"task_id": "t"}
    assert not hook.acquire(lock_name).acquired
    assert not hook.release(lock_name, "not-the-owner")
    assert hook.release(lock_name, first.record.owner_token) and not hook.exists(lock_name)
    hook.close()


def test_test_connection_reports_live_locks(store, hold, lock_name) -> None:
    hold(store, lock_name)
    ok, message = SingletonHook(singleton_conn_id=store.conn_id).test_connection()
    assert ok, message
    assert message.startswith("Lock store at "), message
    if store.kind != "redis":  # Redis is only read for one name: counting would SCAN the whole keyspace
        # Shared servers: other tests may hold locks too, so at least ours is counted.
        assert re.search(r"\b[1-9]\d* (live lock|name)", message), message
    assert store.conn_id not in message, "Airflow tests a copy under a random id: the message must not name an id"


def test_test_connection_creates_no_postgres_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    table = f"never_created_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AIRFLOW_CONN_PG_FRESH", json.dumps(
        {"conn_type": "singletonpostgres", "host": "127.0.0.1", "port": 5432, "login": "postgres", "schema": "test",
         "extra": {"options": f"table={table}"}}))
    ok, message = SingletonHook(singleton_conn_id="pg_fresh").test_connection()
    assert ok and "no locks yet" in message, message
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=5) as db:
        assert db.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None, "the Test button wrote a table"


def test_test_connection_creates_no_sqlite_file_or_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_existing_dir = tmp_path / "locks.sqlite3"
    mistyped = tmp_path / "no-such-dir" / "locks.sqlite3"
    for conn_id, path in (("sqlite_fresh", in_existing_dir), ("sqlite_typo", mistyped)):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "singletonsqlite", "host": str(path)}))
    ok, message = SingletonHook(singleton_conn_id="sqlite_fresh").test_connection()
    assert ok and "no such file yet" in message, message
    ok, message = SingletonHook(singleton_conn_id="sqlite_typo").test_connection()
    assert not ok and "no such file or directory" in message, message
    assert list(tmp_path.iterdir()) == [], "the Test button created a file or directory"


def test_test_connection_creates_no_mongodb_collection(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tests.airflow.conftest import store_url

    url = store_url("mongodb", tmp_path)
    collection = f"never_created_{uuid.uuid4().hex[:8]}"
    joined = f"{url}{'&' if '?' in url else '?'}collection={collection}"
    monkeypatch.setenv("AIRFLOW_CONN_MONGO_FRESH", json.dumps({"conn_type": "singleton", "password": joined}))
    ok, message = SingletonHook(singleton_conn_id="mongo_fresh").test_connection()
    assert ok and "no locks yet" in message, message
    hook = SingletonHook(singleton_conn_id="mongo_fresh")
    persister = hook.get_conn()
    import pymongo

    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        assert collection not in client[persister.database_name].list_collection_names()
    finally:
        client.close()


def test_empty_url_connection_fails_the_test_without_naming_the_random_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DSPVW3MX", json.dumps({"conn_type": "singleton"}))
    ok, message = SingletonHook(singleton_conn_id="DspVw3MX").test_connection()
    assert not ok and "this connection" in message and "needs its Store URL" in message, message
    assert "dspvw3mx" not in message.lower()


def test_failed_test_connection_never_shows_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BROKEN", json.dumps(
        {"conn_type": "singleton_postgres", "host": "127.0.0.1", "port": 1, "login": "u", "password": "hunter2-secret",
         "schema": "db", "extra": {"connect_timeout": 2}}))
    ok, message = SingletonHook(singleton_conn_id="broken").test_connection()
    assert not ok and "hunter2-secret" not in message


@pytest.mark.parametrize(
    ("url", "topology"),
    [
        ("redis+sentinel://:TopSecretPw@127.0.0.1:26379,127.0.0.1:26380/mymaster/0", "sentinel"),
        ("rediss+cluster://:TopSecretPw@127.0.0.1:7000,127.0.0.1:7001", "cluster"),
    ],
)
def test_a_store_url_connection_takes_sentinel_and_cluster_stores(url: str, topology: str) -> None:
    """Production Redis topologies go through the Store URL type; the persister never shows the password."""
    connection = Connection(conn_id=f"topology_{uuid.uuid4().hex[:8]}", conn_type="singleton", password=url)
    assert store_url(connection) == url
    persister = persisters.from_url(store_url(connection))
    assert persister.backend == "redis"
    assert topology in str(persister.topology).lower()
    assert "TopSecretPw" not in repr(persister) and "TopSecretPw" not in persister.url


def test_airflows_own_mysql_connection_is_a_lock_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard ``mysql`` connection (MariaDB here): the Test button only reads, the hook takes and releases."""
    table = f"airflow_hook_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AIRFLOW_CONN_MYSQL_LOCKS", json.dumps(
        {"conn_type": "mysql", "host": "127.0.0.1", "port": 3306, "login": "root", "schema": "test"}))
    hook = SingletonHook(singleton_conn_id="mysql_locks")
    ok, message = hook.test_connection()
    assert ok and "reachable" in message, message
    monkeypatch.setattr(hook, "get_conn", lambda: persisters.from_url(f"mysql://root@127.0.0.1:3306/test?table={table}"))
    result = hook.acquire("nightly", lock_expire_seconds=30, metadata={"dag_id": "d"})
    assert result.acquired and hook.holder("nightly").fencing_token == result.record.fencing_token
    assert hook.release("nightly", result.record.owner_token) and hook.holder("nightly") is None
