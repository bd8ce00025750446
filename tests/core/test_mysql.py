"""MySQL/MariaDB: every lock rule of the conformance kit, then what is this store's own.

The server: ``SINGLETON_TEST_MYSQL_URL``, else MariaDB at 127.0.0.1:3306 (root, no
password, database ``test``). Each test process uses tables of its own, so
parallel xdist workers never meet. Under ``CI=true`` a missing driver or server
fails the run instead of skipping it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

if os.environ.get("CI") == "true":  # CI must fail, not skip, without the driver
    import pymysql
else:
    pymysql = pytest.importorskip("pymysql")

from singleton_integrations import PersisterError, Singleton, persisters
from singleton_integrations._record import Owner
from singleton_integrations.persisters import Persister
from singleton_integrations.persisters._mysql_steps import Op
from singleton_integrations.persisters.mysql import MySql, TableNotCreated
from singleton_integrations.testing.conformance import PersisterConformance, with_query
from tests.servers import unavailable

ENV = "SINGLETON_TEST_MYSQL_URL"
DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"
#: This test process's tables start with this: parallel workers never share one.
RUN_PREFIX = f"singleton_test_{uuid.uuid4().hex[:10]}"


def _admin_connect(url: str) -> Any:
    store = MySql(url)
    args = store._connect_args
    return pymysql.connect(host=args["host"], port=args["port"], user=args["user"], password=store._password,
                           database=args["database"], autocommit=True, connect_timeout=5, charset="utf8mb4")


_found: str | None = None


def server_url() -> str:
    global _found
    if _found is None:
        candidate = os.environ.get(ENV, DEFAULT_URL)
        try:
            _admin_connect(candidate).close()
        except pymysql.err.MySQLError as error:
            unavailable("MySQL/MariaDB", f"{MySql(candidate).url}: {error}")
        _found = candidate
    return _found


@pytest.fixture(scope="module")
def base_url() -> str:
    return server_url()


@pytest.fixture(scope="module")
def admin(base_url: str) -> Iterator[Any]:
    connection = _admin_connect(base_url)
    yield connection
    with connection.cursor() as cursor:  # this process's tables, whatever their test
        cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() "
                       "AND table_name LIKE %s", (RUN_PREFIX.replace("_", "\\_") + "%",))
        for (table,) in cursor.fetchall():
            cursor.execute(f"DROP TABLE IF EXISTS `{table}`")
    connection.close()


def run_table(suffix: str = "") -> str:
    return f"{RUN_PREFIX}_{suffix or uuid.uuid4().hex[:8]}"


def row_exists(admin: Any, table: str, name: str) -> bool:
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM `{table}` WHERE name = UNHEX(%s)", (name.encode().hex(),))
        return bool(cursor.fetchone()[0])


class TestConformance(PersisterConformance):
    """Every rule of the kit on MySQL/MariaDB, sync and async."""

    @pytest.fixture
    def store_url(self, base_url: str, admin: Any) -> str:
        return with_query(base_url, table=run_table("conformance"))

    @pytest.fixture
    def stored_state(self, admin: Any) -> Callable[[Persister, str], bool]:
        def stored(persister: Persister, name: str) -> bool:
            assert isinstance(persister, MySql)
            return row_exists(admin, persister.table, name)

        return stored


# -- this store's own ------------------------------------------------------------------


@pytest.fixture
def table(admin: Any) -> str:
    return run_table()


@pytest.fixture
def store(base_url: str, table: str) -> Iterator[MySql]:
    persister = MySql(base_url, table=table)
    yield persister
    persister.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_schemes_are_registered(base_url: str) -> None:
    assert isinstance(persisters.from_url(base_url), MySql)
    assert isinstance(persisters.from_url(base_url.replace("mysql://", "mariadb://", 1)), MySql)
    assert persisters.schemes()["mariadb"] is MySql


def test_the_table_is_innodb_with_the_documented_columns(store: MySql, admin: Any, table: str) -> None:
    assert store.acquire("job", Owner(), 30).acquired
    with admin.cursor() as cursor:
        cursor.execute("SELECT engine FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = %s",
                       (table,))
        assert cursor.fetchone() == ("InnoDB",)
        cursor.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = DATABASE() "
                       "AND table_name = %s ORDER BY ordinal_position", (table,))
        assert [row[0] for row in cursor.fetchall()] == [
            "name", "owner_token", "fencing_token", "host", "pid", "created_at", "expires_at", "metadata",
            "hold_until", "released_at"]


def test_a_dead_waiters_place_holds_nobody_up_and_is_swept(store: MySql, admin: Any, table: str) -> None:
    """A waiter that died leaves a place that ends on its own; the retention sweep drops it later."""
    holder, dead, alive = Owner(), Owner(), Owner()
    assert store.acquire("queued", holder, 30).acquired
    assert not store.acquire("queued", dead, 30, queue_for=0.2).acquired  # queued, then never seen again
    assert store.release("queued", holder.owner_token)
    with admin.cursor() as cursor:
        cursor.execute(f"UPDATE `{table}_waiters` SET ends_at = UTC_TIMESTAMP(6) - INTERVAL 2 MINUTE")
    assert store.acquire("queued", alive, 30, queue_for=30).acquired  # the ended place is nobody's turn
    assert store.release("queued", alive.owner_token)
    store.purge()
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM `{table}_waiters`")
        assert cursor.fetchone() == (0,)
        cursor.execute("SELECT engine FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = %s",
                       (f"{table}_waiters",))
        assert cursor.fetchone() == ("InnoDB",)


def test_names_differing_by_trailing_spaces_or_case_are_different_locks(store: MySql) -> None:
    for name in ("a", "a ", "A", "ä", "a\u0308"):
        assert store.acquire(name, Owner(), 30).acquired, name
    assert [record.name for record in store.list("a")] == sorted(["a", "a ", "a\u0308"])


def test_list_prefixes_are_literal_and_sorted_by_code_point(store: MySql) -> None:
    names = ["100%_done", "100x_done", "1000", "a_b", "axb", "a\\b", "b", "B", "é", "名前", "_x"]
    for name in names:
        assert store.acquire(name, Owner(), 30).acquired
    assert [r.name for r in store.list("100%")] == ["100%_done"]
    assert [r.name for r in store.list("a_")] == ["a_b"]
    assert [r.name for r in store.list("a\\")] == ["a\\b"]
    assert [r.name for r in store.list("%")] == []
    assert [r.name for r in store.list()] == sorted(names)


def test_times_come_from_the_server_clock_in_utc(store: MySql, admin: Any) -> None:
    result = store.acquire("job", Owner(), 120)
    assert result.record is not None and result.record.expires_at is not None
    assert (result.record.expires_at - result.record.created_at).total_seconds() == pytest.approx(120, abs=0.001)
    with admin.cursor() as cursor:
        cursor.execute("SELECT UTC_TIMESTAMP(6)")
        server_now = cursor.fetchone()[0]
    assert abs((result.record.created_at.replace(tzinfo=None) - server_now).total_seconds()) < 5


def test_a_user_who_may_not_create_the_table_is_told_the_ddl(base_url: str, admin: Any, table: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    user, password = f"si_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    hosts = ("localhost", "127.0.0.1", "%")
    with admin.cursor() as cursor:
        for host in hosts:
            cursor.execute(f"CREATE USER '{user}'@'{host.replace('%', '%%')}' IDENTIFIED BY %s", (password,))
            cursor.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `test`.* TO '{user}'@'{host}'")
    limited = MySql(base_url.replace("root@", f"{user}:{password}@", 1), table=table)
    try:
        caplog.set_level(logging.DEBUG, logger="singleton_integrations")
        with pytest.raises(TableNotCreated) as caught:
            limited.acquire("job", Owner(), 30)
        message = str(caught.value)
        assert isinstance(caught.value, PersisterError)
        assert "CREATE TABLE IF NOT EXISTS" in message and table in message and "GRANT" in message
        assert password not in message and password not in repr(limited) and password not in caplog.text
        # An administrator runs the DDL from the message: the same user now works without CREATE.
        statements = message.split("in that database:\n", 1)[1].split(";\n")[:3]
        assert all(statement.startswith("CREATE TABLE IF NOT EXISTS") for statement in statements)
        with admin.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        owner = Owner()
        assert limited.acquire("job", owner, 30).acquired
        assert limited.release("job", owner.owner_token)
    finally:
        limited.close()
        with admin.cursor() as cursor:
            for host in hosts:
                cursor.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")


def test_the_password_is_never_shown(base_url: str, table: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = f"hunter2-{secrets.token_hex(6)}"
    wrong = MySql(base_url.replace("root@", f"root:{secret}@", 1), table=table)
    unreachable = MySql(f"mysql://app:{secret}@127.0.0.1:{closed_port()}/test", table=table, connect_timeout=1)
    caplog.set_level(logging.DEBUG, logger="singleton_integrations")
    try:
        for persister in (wrong, unreachable):
            assert secret not in repr(persister) and secret not in persister.url and ":***@" in persister.url
            with pytest.raises(PersisterError) as caught:
                persister.acquire("job", Owner(), 30)
            assert secret not in str(caught.value)
            assert isinstance(caught.value.__cause__, pymysql.err.MySQLError)
            with pytest.raises(PersisterError) as acaught:
                asyncio.run(persister.aacquire("job", Owner(), 30))
            assert secret not in str(acaught.value)
        assert secret not in caplog.text
    finally:
        wrong.close()
        unreachable.close()


def test_an_unreachable_server_raises_persister_error(table: str) -> None:
    store = MySql(f"mysql://root@127.0.0.1:{closed_port()}/test", table=table, connect_timeout=1)
    with pytest.raises(PersisterError) as caught:
        store.get("job")
    assert isinstance(caught.value.__cause__, pymysql.err.OperationalError)  # refused: the driver's error, translated
    store.close()


def _hold_row_lock(admin_url: str, table: str, name: str, ready: threading.Event, done: threading.Event) -> None:
    connection = _admin_connect(admin_url)
    try:
        connection.autocommit(False)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT * FROM `{table}` WHERE name = UNHEX(%s) FOR UPDATE", (name.encode().hex(),))
            ready.set()
            done.wait(60)
        connection.rollback()
    finally:
        connection.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_the_statement_timeout_bounds_a_blocked_statement(base_url: str, table: str, api: str) -> None:
    store = MySql(base_url, table=table, statement_timeout_ms=1000)
    try:
        holder = Owner()
        assert store.acquire("blocked", holder, 60).acquired
        ready, done = threading.Event(), threading.Event()
        locker = threading.Thread(target=_hold_row_lock, args=(base_url, table, "blocked", ready, done), daemon=True)
        locker.start()
        assert ready.wait(10)
        with pytest.raises(PersisterError) as caught:
            if api == "sync":
                store.release("blocked", holder.owner_token)
            else:
                asyncio.run(store.arelease("blocked", holder.owner_token))
        done.set()
        locker.join(10)
        # The server ended it (a lock wait timeout, or MariaDB's max_statement_time), not the
        # client's deadline (6.5 s here): the statement bound is what stopped the wait.
        cause = caught.value.__cause__
        assert isinstance(cause, pymysql.err.MySQLError) and cause.args[0] in (1205, 1969, 3024), cause
        # The pool is still good, and the lock is still ours to release.
        assert store.release("blocked", holder.owner_token)
    finally:
        store.close()


def test_persisters_of_one_url_share_one_bounded_pool(base_url: str, table: str) -> None:
    stores = [MySql(base_url, table=table, max_size=2) for _ in range(6)]
    try:
        errors: list[BaseException] = []

        def work(index: int) -> None:
            try:
                owner = Owner()
                store = stores[index % len(stores)]
                assert store.acquire(f"pool-{index}", owner, 30).acquired
                assert store.release(f"pool-{index}", owner.owner_token)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=(index,)) for index in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        pool = stores[0]._pool()
        assert all(store._pool() is pool for store in stores)
        assert len(pool.idle) <= 2
    finally:
        for store in stores:
            store.close()


def test_url_options_and_keywords(base_url: str) -> None:
    store = persisters.from_url(with_query(base_url, table="t1", statement_timeout_ms=1500, max_size=3), max_size=5)
    assert isinstance(store, MySql)
    assert (store.table, store.statement_timeout_ms, store.max_size) == ("t1", 1500, 5)
    with pytest.raises(ValueError, match="unknown option"):
        persisters.from_url(with_query(base_url, tabel="x"))
    with pytest.raises(ValueError):
        MySql("mysql://root@127.0.0.1:3306/", table="x")
    with pytest.raises(ValueError):
        MySql(base_url, table="x" * 57)  # 64 with "_waiters"


def test_a_singleton_waits_by_polling_across_persisters(base_url: str, table: str) -> None:
    """No notifications: a waiter on another pool (another process, in effect) sees the release by polling."""
    first = MySql(base_url, table=table)
    second = MySql(base_url, table=table, max_size=3)  # another configuration: another pool, no shared hub
    try:
        holder = Singleton("polled", first, lock_expire_seconds=30, release_on_sigterm=False)
        waiter = Singleton("polled", second, lock_expire_seconds=30, release_on_sigterm=False)
        assert holder.lock()
        timer = threading.Timer(0.5, holder.release)
        timer.start()
        assert waiter.lock(wait=10)  # within 10 s of a 30 s lease: the release was found by a poll
        assert waiter.release()
        timer.join()
    finally:
        first.close()
        second.close()


def test_importing_does_not_import_the_drivers_but_preload_does() -> None:
    probe = (
        "import json, sys\n"
        "from singleton_integrations import persisters\n"
        "import singleton_integrations.persisters.mysql\n"
        "before = [m in sys.modules for m in ('pymysql', 'aiomysql')]\n"
        "persisters.preload('mariadb')\n"
        "print(json.dumps([before, [m in sys.modules for m in ('pymysql', 'aiomysql')]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out) == [[False, False], [True, True]]


def test_a_pickled_persister_keeps_its_configuration_not_its_connections(base_url: str, table: str) -> None:
    secret = "s3cret-pickle"
    store = MySql(base_url.replace("root@", f"root:{secret}@", 1), table=table, max_size=2, purge_after_seconds=None)
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, MySql) and repr(copy) == repr(store) and secret not in repr(copy)
    assert (copy.table, copy.max_size, copy.purge_after_seconds) == (table, 2, None)
    assert copy._pool_ is None


def test_the_docstring_examples_run() -> None:
    import doctest

    from singleton_integrations.persisters import mysql

    assert doctest.testmod(mysql).failed == 0


# -- TLS ----------------------------------------------------------------------------------


def test_tls_options_are_read_from_the_url_and_checked(tmp_path: Any) -> None:
    from tests.servers.mysql_server import _make_certificates

    _make_certificates(tmp_path)
    ca, cert, key = (str(tmp_path / f) for f in ("ca.pem", "client.pem", "client-key.pem"))
    base = "mysql://root@127.0.0.1:3306/test"
    store = persisters.from_url(with_query(base, ssl_ca=ca, ssl_cert=cert, ssl_key=key, ssl_verify_identity="false"))
    assert isinstance(store, MySql)
    assert (store.tls.ca, store.tls.cert, store.tls.key, store.tls.verify_identity) == (ca, cert, key, False)
    assert store.tls.required and not store.tls.refused
    assert MySql(base, ssl=True).tls.required and MySql(base, ssl="off").tls.refused
    assert not MySql(base).tls.required and not MySql(base).tls.refused
    assert MySql(base, ssl=True)._key() != MySql(base)._key(), "TLS and plain connections never share a pool"
    for query, error, words in [
        ({"ssl": "maybe"}, ValueError, "ssl must be true or false"),
        ({"ssl_verify_cert": "2"}, ValueError, "ssl_verify_cert must be true or false"),
        ({"ssl": "false", "ssl_ca": ca}, ValueError, "ssl=false contradicts ssl_ca"),
        ({"ssl_key": key}, ValueError, "ssl_key needs ssl_cert"),
        ({"ssl_verify_identity": "true", "ssl_verify_cert": "false"}, ValueError, "needs the certificate checked"),
        ({"ssl_ca": str(tmp_path / "missing.pem")}, ValueError, "ssl_ca: the TLS files cannot be used"),
        ({"ssl_cert": ca}, ValueError, "ssl_cert/ssl_key: the TLS files cannot be used"),  # a certificate, no key
        ({"ssl_ca": ""}, ValueError, "ssl_ca must name a file"),
        ({"sslmode": "require"}, ValueError, "unknown option 'sslmode'"),
    ]:
        with pytest.raises(error, match=words):
            persisters.from_url(with_query(base, **query))
    with pytest.raises(TypeError, match="ssl must be a bool"):
        MySql(base, ssl=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ssl_ca must be a file path"):
        MySql(base, ssl_ca=3)  # type: ignore[arg-type]


def test_one_tls_context_is_handed_to_both_drivers(tmp_path: Any) -> None:
    import ssl

    from tests.servers.mysql_server import _make_certificates

    _make_certificates(tmp_path)
    base = "mysql://root@127.0.0.1:3306/test"
    checked = persisters.from_url(with_query(base, ssl_ca=str(tmp_path / "ca.pem")))
    assert isinstance(checked, MySql)
    context = checked._ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True), "checked unless told not to"
    assert checked._driver_options(5)["ssl"] is context  # PyMySQL's connect and aiomysql's take the same context
    with pytest.raises(ValueError, match="takes options as keywords"):
        MySql(with_query(base, ssl="true"))  # never a plain connection for an option it did not read
    no_name = MySql(base, ssl_ca=str(tmp_path / "ca.pem"), ssl_verify_identity=False)._ssl_context
    assert no_name is not None and (no_name.verify_mode, no_name.check_hostname) == (ssl.CERT_REQUIRED, False)
    unchecked = MySql(base, ssl_verify_cert=False)._ssl_context
    assert unchecked is not None and (unchecked.verify_mode, unchecked.check_hostname) == (ssl.CERT_NONE, False)
    assert "ssl" not in MySql(base)._driver_options(5)
    copy = pickle.loads(pickle.dumps(checked))  # the context is rebuilt, not pickled
    assert copy.tls == checked.tls and isinstance(copy._ssl_context, ssl.SSLContext)


@pytest.fixture(scope="module")
def tls_server() -> Any:
    from tests.servers import mysql_server

    server_url()  # the driver is there
    try:
        return mysql_server.start_throwaway_tls()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        unavailable("a MariaDB with TLS", f"{type(error).__name__}: {error}")


def _cipher(store: MySql, api: str) -> str:
    """The TLS cipher of the pooled session the store's calls run on ('' without TLS), as the server reports it."""

    def steps() -> Any:
        row = yield Op("one", "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        return row[1]

    if api == "sync":
        return str(store._run("read the cipher", steps))
    return str(asyncio.run(store._arun("read the cipher", steps)))


def _cycle(store: MySql, api: str) -> None:
    owner = Owner()

    async def acycle() -> None:
        assert (await store.aacquire("tls", owner, 30)).acquired
        assert await store.arelease("tls", owner.owner_token)

    if api == "sync":
        assert store.acquire("tls", owner, 30).acquired
        assert store.release("tls", owner.owner_token)
    else:
        asyncio.run(acycle())


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_tls_connection_checks_the_server_certificate_and_name(tls_server: Any, api: str) -> None:
    port = urlsplit(tls_server.url).port
    by_name = f"mysql://root@localhost:{port}/test"  # the certificate names localhost only
    by_address = f"mysql://root@127.0.0.1:{port}/test"
    good = [MySql(by_name, ssl_ca=str(tls_server.ca)), MySql(by_address, ssl_ca=str(tls_server.ca), ssl_verify_identity=False),
            MySql(by_address, ssl_ca=str(tls_server.other_ca), ssl_verify_cert=False)]
    bad = [(MySql(by_address, ssl_ca=str(tls_server.ca)), "hostname|IP address mismatch|doesn't match"),
           (MySql(by_name, ssl_ca=str(tls_server.other_ca)), "certificate verify failed"),
           (MySql(by_name, ssl=True), "certificate verify failed")]  # the system's CAs did not sign it
    try:
        for store in good:
            _cycle(store, api)
            assert _cipher(store, api), f"{store.tls.describe()}: the session is not encrypted"
        for store, why in bad:
            with pytest.raises(PersisterError, match=why) as caught:
                _cycle(store, api)
            assert isinstance(caught.value.__cause__, pymysql.err.MySQLError)
    finally:
        for store in good + [store for store, _ in bad]:
            store.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_client_certificate_is_presented(tls_server: Any, api: str) -> None:
    user = f"x509_{secrets.token_hex(4)}"
    admin = pymysql.connect(host="127.0.0.1", port=urlsplit(tls_server.url).port, user="root", database="test",
                            autocommit=True, connect_timeout=5, ssl_ca=str(tls_server.ca), ssl_verify_identity=False)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE USER '{user}'@'%' REQUIRE X509")
        cursor.execute(f"GRANT ALL ON test.* TO '{user}'@'%'")
    base = tls_server.url.replace("root@", f"{user}@", 1).replace("127.0.0.1", "localhost", 1)
    table = run_table("x509")
    with_cert = MySql(base, table=table, ssl_ca=str(tls_server.ca), ssl_cert=str(tls_server.client_cert),
                      ssl_key=str(tls_server.client_key))
    without = MySql(base, table=table, ssl_ca=str(tls_server.ca))
    try:
        _cycle(with_cert, api)
        with pytest.raises(PersisterError, match="Access denied"):
            _cycle(without, api)
    finally:
        with_cert.close()
        without.close()
        with admin.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS `{table}`, `{table}_waiters`")
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        admin.close()


@pytest.mark.parametrize("api", ["sync", "async"])
def test_required_tls_is_refused_by_a_server_without_it_before_logging_in(base_url: str, admin: Any, api: str) -> None:
    with admin.cursor() as cursor:
        cursor.execute("SHOW GLOBAL VARIABLES LIKE 'have_ssl'")
        if cursor.fetchone()[1] == "YES":
            pytest.skip("this server offers TLS")
    store = MySql(base_url, table=run_table(), ssl=True, ssl_verify_cert=False)
    try:
        with pytest.raises(PersisterError) as caught:
            _cycle(store, api)
        cause = caught.value.__cause__
        # 2026 (CR_SSL_CONNECTION_ERROR) is raised on the server's greeting, before the login is sent.
        assert isinstance(cause, pymysql.err.OperationalError) and cause.args[0] == 2026, cause
    finally:
        store.close()


def test_ssl_false_keeps_pymysql_from_using_tls(tls_server: Any) -> None:
    plain = MySql(tls_server.url, ssl=False)
    try:
        assert _cipher(plain, "sync") == "" and _cipher(plain, "async") == ""
    finally:
        plain.close()


def test_the_record_an_acquire_returns_is_the_row_it_wrote(store: MySql) -> None:
    """The one-round-trip acquire computes its record from the values the server wrote (clock, token)."""
    first = Owner(metadata={"team": "data"})
    new_name = store.acquire("written", first, 30, 5)  # no row yet: the step-by-step INSERT
    assert new_name.acquired and new_name.record == store.get("written")
    assert store.release("written", first.owner_token)  # into its minimum hold
    store.force_release("written")
    again = Owner()
    free_row = store.acquire("written", again, 30.0000015, 0.5)  # a free row: the one-round-trip UPDATE
    assert free_row.acquired and free_row.record == store.get("written")
    assert free_row.record is not None and new_name.record is not None
    assert free_row.record.fencing_token > new_name.record.fencing_token
    assert free_row.expired is None, "a free name had no holder whose lease ran out"


def test_a_lock_and_release_of_a_free_name_make_two_round_trips(store: MySql) -> None:
    calls: list[str] = []
    call = store._call

    def counted(connection: Any, op: Op) -> Any:
        calls.append(op.kind)
        return call(connection, op)

    owner = Owner()
    assert store.acquire("trips", owner, 30).acquired and store.release("trips", owner.owner_token)  # the row exists
    store._call = counted  # type: ignore[method-assign]
    assert store.acquire("trips", owner, 30).acquired
    assert store.release("trips", owner.owner_token)
    assert calls == ["results", "counts"], calls
