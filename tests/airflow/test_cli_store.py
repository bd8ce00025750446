"""``singleton --airflow-conn ID``: the real console script finds a real Airflow connection and uses its store.

Connections come from the three places Airflow looks: an ``AIRFLOW_CONN_<ID>``
variable, the metadata database (``airflow connections add``) and a secrets
backend (``LocalFilesystemBackend``). The stores are real and need the password
the connection carries, which no output may show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from airflow.sdk import Connection

from airflow_provider._store_url import connection_from_uri, store_url_from_uri
from airflow_provider.hooks.singleton import store_url
from singleton_integrations.cli import EXIT_FREE, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.cli._secret_store import PASSWORD, redis_requiring_password, singleton
from tests.conftest import store_url_for

from .conftest import Store

AIRFLOW = Path(sys.executable).with_name("airflow")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_requiring_password() as url:
        yield url


@pytest.fixture
def postgres_url(tmp_path: Path) -> str:
    """The test PostgreSQL with a password in the URL (it trusts loopback, so the password is carried, not checked)."""
    parts = urlsplit(store_url_for("postgres", tmp_path))
    return f"postgresql://{parts.username}:{quote(PASSWORD, safe='')}@{parts.hostname}:{parts.port}{parts.path}"


def _redis_fields(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    return {"conn_type": "singletonredis", "host": parts.hostname, "port": parts.port, "schema": "0",
            "password": PASSWORD}


def _postgres_fields(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    return {"conn_type": "singletonpostgres", "host": parts.hostname, "port": parts.port, "login": parts.username,
            "password": PASSWORD, "schema": parts.path.lstrip("/")}


@pytest.fixture
def conn_id() -> str:
    return f"cli_locks_{uuid.uuid4().hex[:8]}"


def _check_admin_commands(store: Store, conn_id: str, hold: Callable[..., object], lock_name: str,
                          env: dict[str, str] | None = None) -> None:
    """status, list, release --force and status again, through ``--airflow-conn``, on a lock held elsewhere."""
    holder = hold(store, lock_name)
    status = singleton("status", lock_name, "--airflow-conn", conn_id, env=env)
    assert status.returncode == 0, status.stderr
    assert f"fencing token {holder.fencing_token}" in status.stdout and "deployment=eu-west" in status.stdout

    listed = singleton("list", "--prefix", lock_name, "--json", "--airflow-conn", conn_id, env=env)
    assert listed.returncode == 0, listed.stderr
    assert [(e["name"], e["fencing_token"]) for e in json.loads(listed.stdout)] == [(lock_name, holder.fencing_token)]

    released = singleton("release", lock_name, "--force", "--airflow-conn", conn_id, env=env)
    assert released.returncode == 0, released.stderr
    assert "force-released" in released.stderr
    assert store.holder(lock_name) is None, "the lock is gone from the real store"
    assert singleton("status", lock_name, "--airflow-conn", conn_id, env=env).returncode == EXIT_FREE


def test_a_connection_from_an_environment_variable(redis_url: str, conn_id: str, hold, lock_name: str) -> None:
    env = {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(_redis_fields(redis_url))}
    _check_admin_commands(Store("redis", redis_url, conn_id), conn_id, hold, lock_name, env)

    code = "import os; print(os.environ['SINGLETON_NAME'], os.environ['SINGLETON_FENCING_TOKEN'])"
    ran = singleton("run", lock_name, "--airflow-conn", conn_id, "-v", "--", sys.executable, "-c", code, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split()[0] == lock_name
    port = urlsplit(redis_url).port
    assert f"the store of Airflow connection '{conn_id}': redis://:***@127.0.0.1:{port}/0" in ran.stderr


def test_a_connection_in_the_metadata_database(postgres_url: str, conn_id: str, hold, lock_name: str) -> None:
    added = subprocess.run([str(AIRFLOW), "connections", "add", conn_id, "--conn-json",
                            json.dumps(_postgres_fields(postgres_url))],
                           capture_output=True, text=True, timeout=180, check=False)
    assert added.returncode == 0, added.stdout + added.stderr
    try:
        assert f"AIRFLOW_CONN_{conn_id.upper()}" not in os.environ
        _check_admin_commands(Store("postgres", postgres_url, conn_id), conn_id, hold, lock_name)
    finally:
        subprocess.run([str(AIRFLOW), "connections", "delete", conn_id], capture_output=True, timeout=180,
                       check=False)


def test_a_connection_from_a_secrets_backend(redis_url: str, conn_id: str, hold, lock_name: str,
                                             tmp_path: Path) -> None:
    secrets = tmp_path / "connections.json"
    # The ``singleton`` type: the whole store URL in the password field.
    secrets.write_text(json.dumps({conn_id: {"conn_type": "singleton", "password": redis_url}}))
    env = {"AIRFLOW__SECRETS__BACKEND": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
           "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({"connections_file_path": str(secrets)})}
    _check_admin_commands(Store("redis", redis_url, conn_id), conn_id, hold, lock_name, env)


def test_a_missing_or_unsuitable_connection_is_one_clear_line(conn_id: str) -> None:
    missing = singleton("list", "--airflow-conn", conn_id)
    assert missing.returncode == EXIT_USAGE
    assert missing.stderr.strip() == (f"singleton: --airflow-conn '{conn_id}': Airflow has no such connection "
                                      f"(looked in its secrets backend, AIRFLOW_CONN_{conn_id.upper()} and its "
                                      "metadata database)")
    env = {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps({"conn_type": "http", "host": "h", "password": PASSWORD})}
    http = singleton("list", "--airflow-conn", conn_id, env=env)
    assert http.returncode == EXIT_USAGE and "the connection has type 'http'" in http.stderr


def test_an_unreachable_store_names_the_connection_and_hides_the_password(conn_id: str) -> None:
    fields = {**_redis_fields("redis://127.0.0.1:1/0")}
    result = singleton("status", "x", "--airflow-conn", conn_id,
                       env={f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(fields)})
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stderr.startswith(f"singleton: store unavailable at redis://:***@127.0.0.1:1/0 "
                                    f"(Airflow connection '{conn_id}'): "), result.stderr


CONNECTIONS = [
    {"conn_type": "singletonredis", "host": "r", "port": 6380, "password": PASSWORD, "schema": "2"},
    {"conn_type": "singletonredis", "host": "r", "login": "acl-user", "password": PASSWORD,
     "extra": json.dumps({"ssl": True, "options": "key_prefix=x&timeout=5"})},
    {"conn_type": "singletonredis", "host": "r", "extra": json.dumps({"db": "3", "key_prefix": "team"})},
    {"conn_type": "singleton_redis", "host": "r", "port": 6380},
    {"conn_type": "singletonmongodb", "host": "a:1,b:2", "login": "u", "password": PASSWORD, "schema": "locks"},
    {"conn_type": "singletonmongodb", "host": "cluster.example", "schema": "db",
     "extra": json.dumps({"srv": True, "authSource": "admin"})},
    {"conn_type": "singletonpostgres", "host": "pg", "port": 5432, "login": "u", "password": PASSWORD,
     "schema": "db", "extra": json.dumps({"sslmode": "require", "application_name": "etl"})},
    {"conn_type": "singleton_postgres", "host": "pg"},
    {"conn_type": "singletonsqlite", "host": "/var/lib/Airflow/Locks.sqlite3"},
    {"conn_type": "singleton", "password": f"redis://:{quote(PASSWORD, safe='')}@h:1/0"},
    {"conn_type": "singleton", "password": "postgresql://u@pg/db?sslmode=require&connect_timeout=3"},
]


@pytest.mark.parametrize("fields", CONNECTIONS, ids=lambda fields: str(fields["conn_type"]))
def test_a_connection_uri_maps_as_the_connection_does(fields: dict) -> None:
    """What Airflow writes for a connection (``get_uri()``) names the store the connection names."""
    for conn in (Connection(conn_id="c", **fields), _core_connection(fields)):
        uri = conn.get_uri()
        assert store_url_from_uri(uri) == store_url(conn), uri
        read = connection_from_uri(uri, "c")
        fields_read = (read.conn_type, read.host, read.login, read.password, read.port, read.schema)
        fields_meant = (conn.conn_type, conn.host, conn.login, conn.password, conn.port, conn.schema)
        assert [value or None for value in fields_read] == [value or None for value in fields_meant], uri


def _core_connection(fields: dict) -> object:
    from airflow.models.connection import Connection as CoreConnection

    return CoreConnection(conn_id="c", **fields)


def test_the_uri_airflow_writes_works_as_url(redis_url: str, hold, lock_name: str) -> None:
    uri = Connection(conn_id="c", **_redis_fields(redis_url)).get_uri()
    assert uri.startswith("singletonredis://")
    holder = hold(Store("redis", redis_url, "c"), lock_name)
    status = singleton("status", lock_name, "--url", uri)
    assert status.returncode == 0, status.stderr
    assert f"fencing token {holder.fencing_token}" in status.stdout
