"""PostgreSQL-specific behaviour; the lock rules themselves run in the conformance suite."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timezone
from typing import Any
from urllib.parse import urlsplit

import pytest

if os.environ.get("CI") == "true":  # CI must fail, not skip, without the driver
    import psycopg
else:
    psycopg = pytest.importorskip("psycopg")
from psycopg import sql

from singleton_integrations import PersisterError, Singleton, persisters
from singleton_integrations._record import Owner
from singleton_integrations.persisters._base import SweepSchedule
from singleton_integrations.persisters.postgres import Postgres
from singleton_integrations.testing.conformance import PersisterConformance
from tests.servers import pgbouncer, postgres_server


@pytest.fixture
def server_url() -> str:
    return postgres_server.url()


@pytest.fixture
def admin(server_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as connection:
        yield connection


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A table name of this test alone, dropped afterwards, so parallel runs never meet."""
    name = f"singleton_test_{uuid.uuid4().hex[:12]}"
    yield name
    admin.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(sql.Identifier(name), sql.Identifier(f"{name}_waiters")))


@pytest.fixture
def schema(admin: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"singleton_schema_{uuid.uuid4().hex[:12]}"
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def persister(server_url: str, table: str) -> Iterator[Postgres]:
    store = Postgres(server_url, table=table)
    yield store
    store.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pool_of(store: Postgres) -> Any:
    """The shared pool behind ``store`` (opened if need be)."""
    store.get("warm-up")
    return store._pool(store._shared())


def backend_pids(store: Postgres) -> set[int]:
    """Server process ids behind the store's pool, seen from the server side."""
    with pool_of(store).connection() as connection:
        row = connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return {int(row[0])}


def sessions_named(admin: psycopg.Connection[Any], application_name: str) -> list[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)).fetchall()
    return sorted(int(row[0]) for row in rows)


# -- tables and schemas -------------------------------------------------------------


def test_table_is_created_with_the_documented_columns(persister: Postgres, admin: psycopg.Connection[Any], table: str) -> None:
    assert persister.acquire("job", Owner(), 30).acquired
    rows = admin.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    assert rows == [
        ("name", "text", "NO"),
        ("owner_token", "text", "YES"),
        ("fencing_token", "bigint", "NO"),
        ("host", "text", "NO"),
        ("pid", "integer", "NO"),
        ("created_at", "timestamp with time zone", "NO"),
        ("expires_at", "timestamp with time zone", "YES"),
        ("metadata", "jsonb", "NO"),
        ("hold_until", "timestamp with time zone", "YES"),
        ("released_at", "timestamp with time zone", "YES"),
        ("waiters_until", "timestamp with time zone", "YES"),
    ]


def queue_rows(admin: psycopg.Connection[Any], queue: str) -> list[tuple[str, str]]:
    """The waiter queue's places (name, owner token), first place first."""
    rows = admin.execute(sql.SQL("SELECT name, owner_token FROM {} ORDER BY place").format(sql.Identifier(queue))).fetchall()
    return [(row[0], row[1]) for row in rows]


def test_waiters_queue_in_a_table_of_their_own(persister: Postgres, admin: psycopg.Connection[Any], table: str) -> None:
    """The lock table keeps its columns (older clients' statements run unchanged); places live beside it."""
    holder, waiter = Owner(), Owner()
    assert persister.acquire("job", holder, 60).acquired
    assert not persister.acquire("job", waiter, 60, queue_for=30).acquired
    assert queue_rows(admin, f"{table}_waiters") == [("job", waiter.owner_token)]
    assert persister.release("job", holder.owner_token)
    assert persister.acquire("job", waiter, 60, queue_for=30).acquired
    assert queue_rows(admin, f"{table}_waiters") == []  # taking the name drops the place
    assert persister.release("job", waiter.owner_token)


def test_a_table_made_before_the_queue_gains_it_without_an_alter(
        server_url: str, admin: psycopg.Connection[Any], table: str) -> None:
    """An older version's table (every column, no queue): the queue is created beside it, and the lock
    table is not altered, which would wait for an ACCESS EXCLUSIVE lock behind every reader of it."""
    from singleton_integrations.persisters import _postgres_sql as q

    admin.execute(q.CREATE_TABLE.format(table=sql.Identifier(table).as_string(admin)))
    store = Postgres(server_url, table=table, statement_timeout_ms=2000)
    holder, waiter = Owner(), Owner()
    with psycopg.connect(server_url, connect_timeout=5) as reader:  # a transaction that keeps reading the table
        reader.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        try:
            assert store.acquire("job", holder, 60).acquired
            assert not store.acquire("job", waiter, 60, queue_for=30).acquired
            assert queue_rows(admin, f"{table}_waiters") == [("job", waiter.owner_token)]
        finally:
            store.close()
            reader.rollback()


def test_a_caller_that_does_not_wait_writes_no_place(persister: Postgres, admin: psycopg.Connection[Any], table: str) -> None:
    assert persister.acquire("job", Owner(), 60).acquired
    assert not persister.acquire("job", Owner(), 60).acquired
    assert queue_rows(admin, f"{table}_waiters") == []


def test_a_long_table_name_gets_a_queue_name_that_fits(server_url: str, admin: psycopg.Connection[Any]) -> None:
    long_name = f"singleton_{uuid.uuid4().hex}_{'x' * 20}"  # 63 bytes: '<name>_waiters' would not fit
    assert len(long_name) == 63
    store = Postgres(server_url, table=long_name)
    holder, waiter = Owner(), Owner()
    try:
        assert store.acquire("job", holder, 60).acquired
        assert not store.acquire("job", waiter, 60, queue_for=30).acquired
        assert store.release("job", holder.owner_token)
        assert not store.acquire("job", Owner(), 60, queue_for=30).acquired  # behind the first waiter
        assert store.acquire("job", waiter, 60, queue_for=30).acquired
    finally:
        store.close()
        queue = f"singleton_waiters_{hashlib.sha256(long_name.encode()).hexdigest()[:32]}"
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(sql.Identifier(long_name), sql.Identifier(queue)))


def test_schema_qualified_table_keeps_its_locks_apart(server_url: str, schema: str, admin: psycopg.Connection[Any], table: str) -> None:
    qualified = Postgres(server_url, table=f"{schema}.locks")
    plain = Postgres(server_url, table=table)
    try:
        assert qualified.acquire("job", Owner(), 30).acquired
        assert plain.acquire("job", Owner(), 30).acquired  # another table: another lock of the same name
        found = admin.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = 'locks'", (schema,)
        ).fetchone()
        assert found == (1,)
        assert [record.name for record in qualified.list()] == ["job"]
    finally:
        qualified.close()
        plain.close()


def test_awkward_table_names_are_quoted(server_url: str, admin: psycopg.Connection[Any]) -> None:
    awkward = f'Locks "{uuid.uuid4().hex[:8]}"; DROP TABLE x; --'
    store = Postgres(server_url, table=awkward)
    try:
        assert store.acquire("job", Owner(), 30).acquired
        assert store.get("job") is not None
        assert admin.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(awkward).as_string(admin),)).fetchone() == (True,)
    finally:
        store.close()
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(sql.Identifier(awkward), sql.Identifier(f"{awkward}_waiters")))


def test_table_names_are_validated_before_any_io() -> None:
    with pytest.raises(ValueError):
        Postgres(f"postgresql://127.0.0.1:{closed_port()}/x", table="a.b.c")
    with pytest.raises(ValueError):
        Postgres(f"postgresql://127.0.0.1:{closed_port()}/x", table="x" * 64)
    with pytest.raises(TypeError):
        Postgres(f"postgresql://127.0.0.1:{closed_port()}/x", table=3)  # type: ignore[arg-type]


_CREATOR = textwrap.dedent(
    """
    import json, sys, time
    from singleton_integrations.persisters.postgres import Postgres
    from singleton_integrations._record import Owner
    url, table, start_at, name = sys.argv[1:5]
    store = Postgres(url, table=table)
    time.sleep(max(0.0, float(start_at) - time.time()))
    result = store.acquire(name, Owner(), 60)
    print(json.dumps({"acquired": result.acquired, "fence": result.record.fencing_token}))
    store.close()
    """
)


def test_racing_processes_create_the_table_once(server_url: str, table: str) -> None:
    start_at = time.time() + 2.0
    racers = [
        subprocess.Popen([sys.executable, "-c", _CREATOR, server_url, table, str(start_at), f"job-{index}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(6)
    ]
    outcomes = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 6, [err[-1500:] for _, err in outcomes]
    assert all('"acquired": true, "fence": ' in out for out, _ in outcomes), outcomes
    store = Postgres(server_url, table=table)
    try:
        assert sorted(record.name for record in store.list("job-")) == [f"job-{index}" for index in range(6)]
    finally:
        store.close()


# -- statements ----------------------------------------------------------------------


def test_list_prefixes_are_literal_not_like_patterns(persister: Postgres) -> None:
    names = ["100%_done", "100x_done", "1000", "a_b", "axb", "a\\b", "a\\\\b", "ab"]
    for name in names:
        assert persister.acquire(name, Owner(), 30).acquired
    assert [r.name for r in persister.list("100%")] == ["100%_done"]
    assert [r.name for r in persister.list("a_")] == ["a_b"]
    assert [r.name for r in persister.list("a\\")] == ["a\\\\b", "a\\b"]
    assert [r.name for r in persister.list("%")] == []
    assert [r.name for r in persister.list("")] == sorted(names)


def test_list_orders_by_code_point_like_python(persister: Postgres) -> None:
    names = ["b", "B", "a", "é", "Z", "ä", "名前", "_x"]
    for name in names:
        assert persister.acquire(name, Owner(), 30).acquired
    assert [r.name for r in persister.list()] == sorted(names)


def test_times_are_utc_whatever_the_session_time_zone(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    url = f"{server_url}?options=-c%20TimeZone%3DAsia/Tokyo&statement_timeout_ms=4321"
    store = persisters.from_url(url, table=table)
    try:
        result = store.acquire("job", Owner(), 60)
        assert result.acquired and result.record is not None
        assert result.record.created_at.tzinfo == timezone.utc
        assert result.record.expires_at is not None and result.record.expires_at.tzinfo == timezone.utc
        server_now = admin.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        assert abs((result.record.created_at - server_now).total_seconds()) < 60
        # The user's options apply; a direct connection also carries our statement timeout
        # (behind a pooler it lives per transaction: see the PgBouncer tests).
        with pool_of(store).connection() as connection:
            assert connection.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            assert connection.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
    finally:
        store.close()


def test_ttl_is_judged_by_the_server_clock(persister: Postgres, admin: psycopg.Connection[Any]) -> None:
    result = persister.acquire("job", Owner(), 120)
    assert result.record is not None and result.record.expires_at is not None
    lease = (result.record.expires_at - result.record.created_at).total_seconds()
    assert lease == pytest.approx(120, abs=0.01)
    conflict = persister.acquire("job", Owner(), 120)
    assert not conflict.acquired and conflict.retry_after is not None and 0 < conflict.retry_after <= 120


def test_expired_takeover_has_one_winner_among_racing_connections(server_url: str, table: str) -> None:
    """Eight connections race for an expired lock; winners keep it, so a late racer cannot win afresh."""
    stores = [Postgres(server_url, table=table) for _ in range(8)]
    try:
        for store in stores:
            store.get("warm-up")  # connect first, so the race is on the acquire itself
        for round_ in range(5):
            name = f"race-{round_}"
            stale = stores[0].acquire(name, Owner(), 0.05)
            assert stale.acquired
            assert wait_for(lambda name=name: stores[0].get(name) is None)
            barrier = threading.Barrier(len(stores))
            results: list[Any] = [None] * len(stores)

            def race(index: int, name: str = name, barrier: threading.Barrier = barrier, results: list[Any] = results) -> None:
                barrier.wait(timeout=30)
                results[index] = stores[index].acquire(name, Owner(), 60)

            threads = [threading.Thread(target=race, args=(index,)) for index in range(len(stores))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            winners = [result for result in results if result.acquired]
            assert len(winners) == 1, results
            assert winners[0].expired is not None and winners[0].expired.owner_token == stale.record.owner_token
            assert winners[0].record.fencing_token > stale.record.fencing_token
            losers = [result for result in results if not result.acquired]
            assert all(result.record.owner_token == winners[0].record.owner_token for result in losers)
    finally:
        for store in stores:
            store.close()


def wait_for(check: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


# -- URLs, options, redaction ---------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_from_url_reads_both_schemes_and_query_options(scheme: str, server_url: str, table: str) -> None:
    rest = server_url.split("://", 1)[1]
    store = persisters.from_url(f"{scheme}://{rest}?table={table}&statement_timeout_ms=2500&max_size=2&min_size=0")
    try:
        assert isinstance(store, Postgres)
        assert (store.table, store.statement_timeout_ms, store.max_size, store.min_size) == (table, 2500, 2, 0)
        assert store.acquire("job", Owner(), 30).acquired
    finally:
        store.close()


def test_durable_release_is_an_option(server_url: str, table: str) -> None:
    """By default a lease with an end is released without waiting for the WAL flush; the option waits."""
    store = persisters.from_url(f"{server_url}?durable_release=true", table=table)
    try:
        assert isinstance(store, Postgres) and store.durable_release is True
        assert Postgres(server_url).durable_release is False
        owner = Owner()
        assert store.acquire("job", owner, 60).acquired
        assert store.release("job", owner.owner_token) is True
        assert store.get("job") is None
    finally:
        store.close()
    with pytest.raises(ValueError, match="durable_release"):
        persisters.from_url(f"{server_url}?durable_release=maybe")
    with pytest.raises(TypeError, match="durable_release"):
        Postgres(server_url, durable_release=1)  # type: ignore[arg-type]


def test_a_release_reports_whether_the_lease_was_still_live(persister: Postgres) -> None:
    """One UPDATE judges the row it frees: a lease that ran out untaken is cleared but not reported released."""
    live, ran_out = Owner(), Owner()
    assert persister.acquire("live", live, 60).acquired
    assert persister.acquire("ran-out", ran_out, 0.05).acquired
    time.sleep(0.3)
    assert persister.release("live", live.owner_token) is True
    assert persister.release("ran-out", ran_out.owner_token) is False
    assert persister.release("live", live.owner_token) is False
    assert persister.acquire("ran-out", Owner(), 60).acquired


def test_keyword_options_override_the_url(server_url: str, table: str) -> None:
    store = persisters.from_url(f"{server_url}?table=not_this_one&connect_timeout=9", table=table, connect_timeout=3)
    assert (store.table, store.connect_timeout) == (table, 3.0)


def test_libpq_settings_pass_through(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    application = f"si-test+{uuid.uuid4().hex[:8]}"  # a '+' stays a plus, as libpq reads URLs
    store = persisters.from_url(f"{server_url}?application_name={application}&sslmode=disable", table=table)
    try:
        assert store.acquire("job", Owner(), 30).acquired
        assert len(sessions_named(admin, application)) >= 1
        with pool_of(store).connection() as connection:
            assert connection.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
    finally:
        store.close()


def test_sslmode_require_reaches_libpq(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    store = persisters.from_url(f"{server_url}?sslmode=require", table=table, connect_timeout=3)
    try:
        if admin.execute("SHOW ssl").fetchone() == ("on",):
            assert store.acquire("job", Owner(), 30).acquired
            with pool_of(store).connection() as connection:
                assert connection.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        else:
            with pytest.raises(PersisterError, match="SSL"):
                store.get("job")
    finally:
        store.close()


def test_invalid_options_fail_at_construction() -> None:
    url = f"postgresql://u:hunter2@127.0.0.1:{closed_port()}/db"
    with pytest.raises(ValueError) as bad_number:
        persisters.from_url(f"{url}?statement_timeout_ms=soon")
    assert "hunter2" not in str(bad_number.value)
    with pytest.raises(ValueError) as bad_libpq:
        persisters.from_url(f"{url}?no_such_libpq_option=1")
    assert "hunter2" not in str(bad_libpq.value)
    with pytest.raises(ValueError):
        Postgres(url, statement_timeout_ms=0)
    with pytest.raises(ValueError):
        Postgres(url, min_size=3, max_size=2)
    with pytest.raises(ValueError):
        Postgres(url, connect_timeout=float("nan"))


@pytest.mark.parametrize("option, value", [
    ("statement_timeout_ms", "5000"), ("statement_timeout_ms", 2.5), ("statement_timeout_ms", True),
    ("pool_timeout", "5"), ("pool_timeout", 0), ("timeout", -1.0), ("connect_timeout", float("inf")),
    ("min_size", -1), ("min_size", 1.0), ("max_size", 0), ("max_size", "4"), ("prepare_threshold", "x"),
    ("purge_after_seconds", 0), ("purge_after_seconds", "30"), ("poll_interval", False), ("poll_interval", None),
])
def test_every_bad_number_raises_value_error(option: str, value: object) -> None:
    """One error type for a bad number, whatever is wrong with it (its type too), before any I/O."""
    with pytest.raises(ValueError, match=option):
        Postgres(f"postgresql://127.0.0.1:{closed_port()}/x", **{option: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("query", ["max_size=many", "min_size=-2", "timeout=soon", "purge_after_seconds=-5",
                                   "poll_interval=0", "statement_timeout_ms=1.5"])
def test_every_bad_number_in_a_url_raises_value_error_naming_it(query: str) -> None:
    option = query.split("=", 1)[0]
    with pytest.raises(ValueError, match=f"invalid {option}="):
        persisters.from_url(f"postgresql://u:hunter2@127.0.0.1:{closed_port()}/db?{query}")


def test_a_failed_call_names_what_it_was_doing() -> None:
    store = Postgres(f"postgresql://postgres:hunter2@127.0.0.1:{closed_port()}/test", connect_timeout=2)
    with pytest.raises(PersisterError, match=r"^postgres: connecting failed: OperationalError on ") as failure:
        store.acquire("job", Owner(), 30)
    assert "hunter2" not in str(failure.value)
    assert isinstance(failure.value.__cause__, psycopg.OperationalError)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://admin:hunter2@127.0.0.1:{port}/db?sslmode=disable",
        "host=127.0.0.1 port={port} user=admin password=hunter2 dbname=db",
        "host=127.0.0.1 port={port} user=admin password='hunter2' dbname=db",
        "postgresql://admin@127.0.0.1:{port}/db?password=hunter2",
    ],
)
def test_password_never_shows(dsn: str) -> None:
    store = Postgres(dsn.format(port=closed_port()), connect_timeout=2)
    assert "hunter2" not in repr(store) and "***" in repr(store)
    with pytest.raises(PersisterError) as failure:
        store.get("job")
    assert "hunter2" not in str(failure.value)
    assert "hunter2" not in repr(Singleton("job", store))


# -- connections ------------------------------------------------------------------------


def test_construction_touches_no_network() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    try:
        Postgres(f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/test")
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_unreachable_server_fails_fast_with_persister_error() -> None:
    store = Postgres(f"postgresql://postgres@127.0.0.1:{closed_port()}/test")
    started = time.monotonic()
    with pytest.raises(PersisterError) as failure:
        store.acquire("job", Owner(), 30)
    assert time.monotonic() - started < 15
    assert failure.value.backend == "postgres"
    assert isinstance(failure.value.__cause__, psycopg.Error)


def test_silent_server_is_bounded_by_connect_timeout() -> None:
    """A port that accepts TCP but never speaks: connect_timeout must end the wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        store = Postgres(f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/test", connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(PersisterError):
            store.get("job")
        assert time.monotonic() - started < 15
    finally:
        listener.close()


def test_a_peer_that_swallows_traffic_fails_the_call_within_its_timeout(server_url: str, table: str) -> None:
    """A proxy that keeps sockets open but moves no bytes: TCP never notices, the client deadline must.

    The call fails with PersisterError, and once the proxy forwards again the same store works.
    """
    from tests.reliability._proxy import TcpProxy, through

    parts = urlsplit(server_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    store = Postgres(through(server_url, proxy.port), table=table, timeout=1.5, connect_timeout=2)
    owner = Owner()
    try:
        assert store.acquire("job", owner, 60).acquired
        proxy.partition()
        time.sleep(0.5)  # the proxy's pumps notice within 0.2 s; from then on bytes vanish
        # The first call is stuck on its pooled connection; the next finds the pool
        # unable to reconnect. Both must end with PersisterError, never hang.
        for call, reason in ((lambda: store.acquire("other", Owner(), 60), "no answer within"),
                             (lambda: store.get("job"), "no answer within|PoolTimeout")):
            started = time.monotonic()
            with pytest.raises(PersisterError, match=reason):
                call()
            assert time.monotonic() - started < 10  # bound 1.5 s; generous for a loaded machine
        proxy.heal()
        deadline = time.monotonic() + 30
        while True:  # the pool replaces the abandoned connections in the background
            try:
                record = store.get("job")
                break
            except PersisterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert record is not None and record.owner_token == owner.owner_token
        assert store.release("job", owner.owner_token) is True
    finally:
        store.close()
        proxy.stop()


def test_more_threads_than_connections_all_get_served(server_url: str, table: str) -> None:
    """Connections kept between calls are shared with threads waiting on the pool, never starve them."""
    store = Postgres(server_url, table=table, max_size=2, pool_timeout=5)
    failures: list[BaseException] = []

    def work(index: int) -> None:
        owner = Owner()
        try:
            for _ in range(30):
                assert store.acquire(f"job-{index}", owner, 30).acquired
                assert store.release(f"job-{index}", owner.owner_token)
        except (AssertionError, PersisterError) as error:  # reported below: a thread's failure fails the test
            failures.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
    finally:
        store.close()


def test_pool_is_created_once_and_reused(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    application = f"si-pool-{uuid.uuid4().hex[:8]}"
    store = Postgres(f"{server_url}?application_name={application}", table=table)
    try:
        owner = Owner()
        assert store.acquire("job", owner, 30).acquired
        first = backend_pids(store)
        for _ in range(20):
            store.get("job")
            store.renew("job", owner.owner_token, 30)
            store.list("jo")
        assert backend_pids(store) == first
        assert sessions_named(admin, application) == sorted(first)  # one session: no connection per call
        store.close()
        assert wait_for(lambda: sessions_named(admin, application) == [])
        assert store.get("job") is not None  # a closed store reconnects when used again
    finally:
        store.close()


def test_missing_driver_fails_at_construction_naming_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None
        from singleton_integrations import persisters
        from singleton_integrations._errors import MissingDependency
        cls = persisters.Postgres
        try:
            cls("postgresql://127.0.0.1/x")
        except MissingDependency as error:
            assert error.extra == "postgres" and isinstance(error, ImportError), error
            print("ok", error)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok") and "singleton-integrations[postgres]" in done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_forked_child_builds_its_own_pool(persister: Postgres) -> None:
    assert persister.acquire("parent", Owner(), 60).acquired
    parent_pids = backend_pids(persister)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(reader)
            result = persister.acquire("child", Owner(), 60)
            pids = backend_pids(persister)
            os.write(writer, f"{int(result.acquired)} {','.join(map(str, pids))}".encode())
            persister.close()
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0, reported
    acquired, pids = reported.split()
    assert acquired == "1"
    assert {int(pid) for pid in pids.split(",")}.isdisjoint(parent_pids)
    # The child's close() left the parent's sessions alone (the pool may hand out another of its own).
    assert backend_pids(persister).isdisjoint({int(pid) for pid in pids.split(",")})
    assert persister.acquire("parent-again", Owner(), 60).acquired
    assert persister.get("parent") is not None and persister.get("child") is not None


# -- notification -----------------------------------------------------------------------------


def elsewhere(server_url: str, tag: str = "other") -> str:
    """The same server under another application name: another store, as another process would have."""
    return f"{server_url}{'&' if '?' in server_url else '?'}application_name=si-{tag}-{uuid.uuid4().hex[:8]}"


def subscribed(store: Postgres, watch: Any = None) -> bool:
    """Wait until the store's listener has run LISTEN (after that, no release is missed).

    With ``watch`` (the first of its hub, so registered before the LISTEN), its wake-up for
    the subscription itself is consumed too. ``ready()`` sets ``subscribed`` before that
    wake-up, so it is the wake-up that is waited for.
    """
    done = store._hub().subscribed.wait(20)
    if watch is not None:
        assert watch.wait(20), "the listener woke the watch registered before its LISTEN"
    return done


def test_release_in_another_store_wakes_a_watcher_through_listen(server_url: str, table: str, persister: Postgres) -> None:
    other = Postgres(elsewhere(server_url), table=table)
    owner = Owner()
    try:
        assert other.acquire("job", owner, 60).acquired
        with persister.watching("job") as watch:
            assert subscribed(persister, watch)
            assert not persister.acquire("job", Owner(), 60).acquired  # leaves the waiter's hint on the row
            threading.Timer(0.2, other.release, args=("job", owner.owner_token)).start()
            assert watch.wait(30) is True  # woken, not timed out
        assert persister.acquire("job", Owner(), 60).acquired
    finally:
        other.close()


def test_release_before_wait_is_not_lost(persister: Postgres) -> None:
    owner = Owner()
    assert persister.acquire("job", owner, 60).acquired
    with persister.watching("job") as watch:
        assert persister.release("job", owner.owner_token)  # between the attempt and the wait
        assert watch.wait(30) is True


def test_force_release_notifies(persister: Postgres) -> None:
    assert persister.acquire("job", Owner(), 60).acquired
    with persister.watching("job") as watch:
        assert persister.force_release("job") is not None
        assert watch.wait(30) is True


def test_other_names_do_not_wake_a_watcher(persister: Postgres) -> None:
    owner = Owner()
    assert persister.acquire("other", owner, 60).acquired
    with persister.watching("job") as watch:
        assert subscribed(persister, watch)  # and its own wake-up consumed (a gap may have hidden a release)
        assert persister.release("other", owner.owner_token)
        assert watch.wait(0.5) is False


def test_tables_do_not_share_wake_ups(server_url: str, persister: Postgres, table: str, admin: psycopg.Connection[Any]) -> None:
    other_table = Postgres(server_url, table=f"{table}_other")
    owner = Owner()
    try:
        assert other_table.acquire("job", owner, 60).acquired
        with persister.watching("job") as watch:
            assert subscribed(persister, watch)
            assert other_table.release("job", owner.owner_token)
            assert watch.wait(0.5) is False
    finally:
        other_table.close()
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(sql.Identifier(f"{table}_other"),
                                                                      sql.Identifier(f"{table}_other_waiters")))


def test_singleton_wait_is_woken_by_release(persister: Postgres) -> None:
    holder = Singleton("job", persister, lock_expire_seconds=60, release_on_sigterm=False)
    waiter = Singleton("job", persister, lock_expire_seconds=60, release_on_sigterm=False)
    assert holder.lock()
    first = holder.fencing_token
    assert first is not None
    threading.Timer(0.3, holder.release).start()
    started = time.monotonic()
    assert waiter.lock(wait=30)
    assert time.monotonic() - started < 20
    assert waiter.fencing_token is not None and waiter.fencing_token > first
    assert waiter.release()


def test_release_notifies_only_while_someone_waits(persister: Postgres, server_url: str, table: str) -> None:
    """NOTIFY serializes commits cluster-wide, so a release sends one only after a listening waiter's failed attempt."""
    owner = Owner()
    assert persister.acquire("job", owner, 60).acquired
    channel = f"singleton:public.{table}"
    with psycopg.connect(server_url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        assert persister.release("job", owner.owner_token)
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
        owner = Owner()
        assert persister.acquire("job", owner, 60).acquired
        with persister.watching("job"):
            assert subscribed(persister)
            assert not persister.acquire("job", Owner(), 60).acquired  # the waiter's attempt leaves the hint
            assert persister.release("job", owner.owner_token)
            assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["job"]


def test_many_waiters_share_one_listen_connection_and_leave_no_session_state(
        server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    """Twenty waiting threads: one LISTEN session for the process, and no advisory lock left behind."""
    url = elsewhere(server_url, "listen")
    application = url.rsplit("=", 1)[1]
    store = Postgres(url, table=table)
    holder = Owner()
    try:
        assert store.acquire("job", holder, 60).acquired
        results: list[bool] = []

        def take_a_turn() -> None:
            waiter = Singleton("job", store, lock_expire_seconds=60, release_on_sigterm=False)
            results.append(waiter.lock(wait=30))
            waiter.release()

        waiters = [threading.Thread(target=take_a_turn) for _ in range(20)]
        for thread in waiters:
            thread.start()
        assert subscribed(store)
        listening = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN%%'",
                                  (application,)).fetchone()
        assert listening == (1,)
        assert store.release("job", holder.owner_token)
        for thread in waiters:
            thread.join(60)
        assert results == [True] * 20  # each woken in turn by the previous one's release
        advisory = admin.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                                 "WHERE l.locktype = 'advisory' AND a.application_name = %s", (application,)).fetchone()
        assert advisory == (0,)
    finally:
        store.force_release("job")
        store.close()


def test_a_dropped_connection_is_replaced_without_failing_the_call(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    application = f"si-drop-{uuid.uuid4().hex[:8]}"
    store = Postgres(f"{server_url}?application_name={application}", table=table)
    owner = Owner()
    try:
        assert store.acquire("job", owner, 60).acquired
        for operation in (lambda: store.get("job"), lambda: store.renew("job", owner.owner_token, 60),
                          lambda: store.list("jo"), lambda: store.release("job", owner.owner_token),
                          lambda: store.acquire("job", owner, 60).acquired):
            before = sessions_named(admin, application)
            assert before
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (before,))
            # pg_terminate_backend only signals: as after a restart, the old sessions are gone before
            # the call. (One still exiting could pass the pool's check and die under the retry.)
            deadline = time.monotonic() + 30
            while set(sessions_named(admin, application)) & set(before) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not set(sessions_named(admin, application)) & set(before), "the terminated sessions never ended"
            assert operation()  # as after a server restart: the call succeeds on a fresh connection
            assert set(sessions_named(admin, application)).isdisjoint(before)
    finally:
        store.close()


def test_statement_timeout_bounds_a_blocked_statement(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    # A store on the same DSN with the default timeout connects first: on a direct connection the
    # timeout is session state, so the two must not share connections.
    other = Postgres(server_url, table=table)
    other.get("warm-up")
    store = Postgres(server_url, table=table, statement_timeout_ms=300)
    try:
        holder = Owner()
        assert store.acquire("job", holder, 60).acquired
        with psycopg.connect(server_url) as blocker:  # a transaction that keeps the row locked
            blocker.execute(sql.SQL("SELECT 1 FROM {} WHERE name = 'job' FOR UPDATE").format(sql.Identifier(table)))
            with pytest.raises(PersisterError, match=r"QueryCanceled|statement timeout"):
                store.release("job", holder.owner_token)
            # A contender of a held name reads without row locks: its conflict does not queue behind them.
            refused = store.acquire("job", Owner(), 60)
            assert not refused.acquired and refused.record is not None and refused.record.owner_token == holder.owner_token
            blocker.rollback()
    finally:
        store.close()
        other.close()


def test_statement_timeout_bounds_a_blocked_statement_on_async_connections(
        server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    """A direct async connection carries the statement timeout too: its statements are prepared, without SET LOCAL."""
    store = Postgres(server_url, table=table, statement_timeout_ms=300)

    async def scenario() -> None:
        holder = Owner()
        assert (await store.aacquire("job", holder, 60)).acquired
        with psycopg.connect(server_url) as blocker:
            blocker.execute(sql.SQL("SELECT 1 FROM {} WHERE name = 'job' FOR UPDATE").format(sql.Identifier(table)))
            with pytest.raises(PersisterError, match=r"QueryCanceled|statement timeout"):
                await store.arelease("job", holder.owner_token)
            blocker.rollback()
        assert await store.arelease("job", holder.owner_token)

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_direct_connections_prepare_the_hot_statements(server_url: str, table: str) -> None:
    store = Postgres(server_url, table=table, max_size=1)
    try:
        owner = Owner()
        for _ in range(3):
            assert store.acquire("job", owner, 60).acquired
            assert store.release("job", owner.owner_token)
        with pool_of(store).connection() as connection:
            prepared = [row[0] for row in connection.execute("SELECT statement FROM pg_prepared_statements")]
        assert any("UPDATE" in text and "fencing_token" in text for text in prepared)
        assert not any("SET LOCAL" in text for text in prepared)
    finally:
        store.close()


def test_a_missing_schema_is_reported_not_created(server_url: str) -> None:
    schema = f"singleton_absent_{uuid.uuid4().hex[:8]}"
    store = Postgres(server_url, table=f"{schema}.locks")
    with pytest.raises(PersisterError, match=f"{schema}.*does not exist"):
        store.get("job")


def test_racing_for_a_name_never_seen_has_one_winner_and_named_losers(server_url: str, table: str) -> None:
    """Losers of a first-ever insert race conflict on a row their snapshot cannot see; they still name the winner."""
    stores = [Postgres(server_url, table=table) for _ in range(6)]
    try:
        for store in stores:
            store.get("warm-up")
        for round_ in range(5):
            name = f"fresh-{round_}-{uuid.uuid4().hex[:6]}"
            barrier = threading.Barrier(len(stores))
            results: list[Any] = [None] * len(stores)

            def race(index: int, name: str = name, barrier: threading.Barrier = barrier, results: list[Any] = results) -> None:
                barrier.wait(timeout=30)
                results[index] = stores[index].acquire(name, Owner(), 60)

            threads = [threading.Thread(target=race, args=(index,)) for index in range(len(stores))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            winners = [result for result in results if result.acquired]
            assert len(winners) == 1, results
            assert winners[0].record.fencing_token > 0 and winners[0].expired is None
            for loser in (result for result in results if not result.acquired):
                assert loser.record is not None and loser.record.owner_token == winners[0].record.owner_token
    finally:
        for store in stores:
            store.close()


# -- minimum hold ------------------------------------------------------------------------------


def test_a_release_inside_the_minimum_hold_keeps_the_name_held(persister: Postgres) -> None:
    owner = Owner()
    taken = persister.acquire("job", owner, 30, min_hold=3)
    assert taken.acquired and taken.record is not None and taken.record.hold_until is not None
    assert persister.release("job", owner.owner_token) is True  # a clean release, into the hold
    held = persister.get("job")
    assert held is not None and held.released and held.released_at is not None
    assert held.hold_until == taken.record.hold_until and held.expires_at == held.hold_until
    assert held.owner_token == ""  # no token can renew or release it now
    assert held.fencing_token == taken.record.fencing_token
    conflict = persister.acquire("job", Owner(), 30)
    assert not conflict.acquired and conflict.record is not None and conflict.record.released
    assert conflict.retry_after is not None and 0 < conflict.retry_after <= 3
    assert persister.renew("job", owner.owner_token, 30) is None
    assert persister.release("job", owner.owner_token) is False
    assert [record.name for record in persister.list()] == ["job"]
    assert wait_for(lambda: persister.get("job") is None)
    after = persister.acquire("job", Owner(), 30)
    assert after.acquired and after.expired is None  # a hold that ran out is a normal acquire
    assert after.record is not None and after.record.fencing_token > taken.record.fencing_token
    assert after.record.hold_until is None and after.record.released_at is None


def test_a_lease_shorter_than_the_hold_still_holds_until_the_hold_ends(persister: Postgres) -> None:
    """A crashed holder (no release) frees the name at the later of its lease and its hold."""
    crashed = persister.acquire("job", Owner(), 0.2, min_hold=1.5)
    assert crashed.record is not None and crashed.record.hold_until is not None
    assert crashed.record.expires_at is not None and crashed.record.expires_at >= crashed.record.hold_until
    time.sleep(0.4)  # the lease alone would have ended by now
    conflict = persister.acquire("job", Owner(), 30)
    assert not conflict.acquired and conflict.record is not None and not conflict.record.released
    assert wait_for(lambda: persister.get("job") is None)
    taker = persister.acquire("job", Owner(), 30)
    assert taker.acquired and taker.expired is not None  # never released: a takeover
    assert taker.record is not None and taker.record.fencing_token > crashed.record.fencing_token


def test_renew_never_ends_the_lease_before_the_hold(persister: Postgres) -> None:
    owner = Owner()
    taken = persister.acquire("job", owner, 30, min_hold=120)
    renewed = persister.renew("job", owner.owner_token, 1)
    assert taken.record is not None and renewed is not None and renewed.expires_at is not None
    assert renewed.expires_at >= taken.record.hold_until  # type: ignore[operator]


def test_a_release_after_the_hold_frees_the_name_at_once(persister: Postgres) -> None:
    owner = Owner()
    assert persister.acquire("job", owner, 30, min_hold=0.2).acquired
    time.sleep(0.3)
    assert persister.release("job", owner.owner_token) is True
    assert persister.get("job") is None
    assert persister.acquire("job", Owner(), 30).acquired


def test_a_release_into_the_hold_wakes_nobody(persister: Postgres, server_url: str, table: str) -> None:
    owner = Owner()
    assert persister.acquire("job", owner, 60, min_hold=30).acquired
    with psycopg.connect(server_url, autocommit=True) as listener, persister.watching("job") as watch:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"singleton:public.{table}")))
        assert subscribed(persister, watch)
        assert not persister.acquire("job", Owner(), 60).acquired  # a listening waiter's hint
        assert persister.release("job", owner.owner_token) is True
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
        assert watch.wait(0.3) is False


def test_force_release_ends_a_minimum_hold(persister: Postgres) -> None:
    owner = Owner()
    assert persister.acquire("job", owner, 60, min_hold=60).acquired
    assert persister.release("job", owner.owner_token)
    removed = persister.force_release("job")
    assert removed is not None and removed.released
    assert persister.acquire("job", Owner(), 60).acquired


# -- retention -----------------------------------------------------------------------------


def table_names(admin: psycopg.Connection[Any], table: str) -> list[str]:
    rows = admin.execute(sql.SQL("SELECT name FROM {} ORDER BY name").format(sql.Identifier(table))).fetchall()
    return [row[0] for row in rows]


def test_purge_removes_long_idle_names_only_and_tokens_still_rise(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    store = Postgres(server_url, table=table, purge_after_seconds=0.3)
    try:
        old = Owner()
        first = store.acquire("old", old, 60)
        assert store.release("old", old.owner_token)
        assert store.acquire("held", Owner(), 60).acquired
        holding = Owner()
        assert store.acquire("holding", holding, 60, min_hold=60).acquired
        assert store.release("holding", holding.owner_token)
        assert store.acquire("crashed", Owner(), 0.05).acquired
        time.sleep(0.5)
        assert store.purge() == 2  # the free one and the lease that ran out untaken
        assert table_names(admin, table) == ["held", "holding"]
        again = store.acquire("old", Owner(), 60)
        assert again.acquired and again.record is not None and first.record is not None
        assert again.record.fencing_token > first.record.fencing_token  # a new row starts at the server's clock
    finally:
        store.close()


def test_releases_sweep_at_most_once_per_period(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    store = Postgres(elsewhere(server_url, "sweep"), table=table, purge_after_seconds=0.2)
    try:
        for name in ("a", "b"):
            owner = Owner()
            assert store.acquire(name, owner, 60).acquired
            assert store.release(name, owner.owner_token)  # the first release sweeps (nothing is idle yet)
            time.sleep(0.3)
        assert table_names(admin, table) == ["a", "b"]  # the second release was inside the sweep period
        store._shared().sweeps = SweepSchedule()  # as when the period has passed: no sweep done yet
        owner = Owner()
        assert store.acquire("c", owner, 60).acquired
        assert store.release("c", owner.owner_token)
        assert table_names(admin, table) == ["c"]
    finally:
        store.close()


def test_purge_after_none_keeps_every_name(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    store = persisters.from_url(f"{elsewhere(server_url, 'keep')}&purge_after_seconds=none", table=table)
    try:
        assert isinstance(store, Postgres) and store.purge_after_seconds is None
        owner = Owner()
        assert store.acquire("job", owner, 60).acquired
        assert store.release("job", owner.owner_token)
        assert table_names(admin, table) == ["job"]
        with pytest.raises(ValueError, match="keeps every name"):
            store.purge()
    finally:
        store.close()


def test_an_existing_table_gains_the_new_columns_and_keeps_its_counters(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    admin.execute(sql.SQL(
        "CREATE TABLE {} (name text PRIMARY KEY, owner_token text, fencing_token bigint NOT NULL, host text NOT NULL, "
        "pid integer NOT NULL, created_at timestamptz NOT NULL, expires_at timestamptz, metadata jsonb NOT NULL)"
    ).format(sql.Identifier(table)))
    admin.execute(sql.SQL("INSERT INTO {} VALUES ('free', NULL, 41, 'h', 1, now(), NULL, '{{}}'), "
                          "('held', 'someone', 7, 'h', 1, now(), now() + interval '1 hour', '{{}}')").format(sql.Identifier(table)))
    store = Postgres(server_url, table=table)
    try:
        taken = store.acquire("free", Owner(), 30)
        assert taken.acquired and taken.record is not None and taken.record.fencing_token > 41
        holder = store.get("held")
        assert holder is not None and holder.owner_token == "someone" and not holder.released
        columns = admin.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = %s", (table,)).fetchone()
        assert columns == (11,)
    finally:
        store.close()


# -- options, pools, async -------------------------------------------------------------------------


def test_pooler_listen_dsn_poll_interval_and_purge_from_the_url(server_url: str) -> None:
    from urllib.parse import quote

    listen = quote("postgresql://admin:hunter2@127.0.0.1:5432/test", safe="")
    store = persisters.from_url(f"{server_url}?pooler=pgbouncer-transaction&listen_dsn={listen}"
                                "&poll_interval=0.1&purge_after_seconds=3600")
    assert isinstance(store, Postgres)
    assert (store.pooler, store.poll_interval, store.purge_after_seconds) == ("transaction", 0.1, 3600.0)
    assert store.listen_dsn is not None and "hunter2" not in store.listen_dsn and "hunter2" not in repr(store)
    assert Postgres(server_url).pooler == "auto" and Postgres(server_url).purge_after_seconds == 30 * 86400
    with pytest.raises(ValueError, match="pooler"):
        Postgres(server_url, pooler="statement")
    with pytest.raises(ValueError):
        Postgres(server_url, purge_after_seconds=0)


def test_a_hundred_singletons_from_one_url_share_one_bounded_pool(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    url = f"{elsewhere(server_url, 'hundred')}&table={table}"
    application = url.split("application_name=", 1)[1].split("&", 1)[0]
    singletons = [Singleton(f"job-{index}", url, lock_expire_seconds=60, release_on_sigterm=False) for index in range(100)]
    try:
        assert all(singleton.lock() for singleton in singletons)
        assert 1 <= len(sessions_named(admin, application)) <= 4  # max_size, not one per object
    finally:
        for singleton in singletons:
            singleton.release()
            singleton.persister.close()
    assert wait_for(lambda: sessions_named(admin, application) == [])  # the last close closed the shared pool


def test_150_threads_on_150_objects_wait_for_a_connection_instead_of_failing(
        server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    url = elsewhere(server_url, "hundred-fifty")
    application = url.rsplit("=", 1)[1]
    stores = [persisters.from_url(url, table=table) for _ in range(150)]
    failures: list[BaseException] = []
    most = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal most
        with psycopg.connect(server_url, autocommit=True) as watcher:
            while not done.is_set():
                most = max(most, len(sessions_named(watcher, application)))
                time.sleep(0.01)

    barrier = threading.Barrier(150)

    def work(store: Any, index: int) -> None:
        try:
            barrier.wait(30)
            for _ in range(3):
                owner = Owner()
                assert store.acquire(f"job-{index}", owner, 30).acquired
                assert store.release(f"job-{index}", owner.owner_token)
        except (AssertionError, PersisterError) as error:  # reported below: a thread's failure fails the test
            failures.append(error)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=work, args=(store, index)) for index, store in enumerate(stores)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        assert 1 <= most <= 5, most  # the shared pool's max_size (4), and the table check's connection as it closes
    finally:
        done.set()
        sampler.join(10)
        for store in stores:
            store.close()
    assert wait_for(lambda: sessions_named(admin, application) == [])  # the last close closed the pool


def test_async_primitives_are_native_and_keep_the_rules(persister: Postgres) -> None:
    import asyncio

    assert Postgres.native_async and Postgres.supports_min_hold

    async def scenario() -> None:
        owner = Owner()
        taken = await persister.aacquire("job", owner, 30)
        assert taken.acquired and taken.record is not None
        conflict = await persister.aacquire("job", Owner(), 30)
        assert not conflict.acquired and conflict.retry_after is not None
        assert (await persister.aget("job")) is not None
        assert [record.name for record in await persister.alist("jo")] == ["job"]
        renewed = await persister.arenew("job", owner.owner_token, 60)
        assert renewed is not None and renewed.fencing_token == taken.record.fencing_token
        assert await persister.arelease("job", owner.owner_token) is True
        assert await persister.arelease("job", owner.owner_token) is False
        holder = Owner()
        assert (await persister.aacquire("job", holder, 30, min_hold=30)).acquired
        assert await persister.arelease("job", holder.owner_token) is True
        released = await persister.aget("job")
        assert released is not None and released.released
        assert (await persister.aforce_release("job")) is not None
        assert (await persister.aacquire("job", Owner(), 30)).acquired
        assert await persister.apurge(after=3600) == 0

    asyncio.run(scenario())


def test_async_calls_survive_event_loops_that_come_and_go(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    """Each asyncio.run() has its own loop; connections of a closed loop are dropped, not reused or piled up."""
    import asyncio

    url = elsewhere(server_url, "loops")
    application = url.rsplit("=", 1)[1]
    store = Postgres(url, table=table)

    async def once(index: int) -> None:
        owner = Owner()
        assert (await store.aacquire(f"job-{index}", owner, 30)).acquired
        assert await store.arelease(f"job-{index}", owner.owner_token)

    try:
        for index in range(6):
            asyncio.run(once(index))
        assert len(sessions_named(admin, application)) <= 2  # this loop's and at most one left from the last
    finally:
        store.close()
    assert wait_for(lambda: sessions_named(admin, application) == [])


def test_many_async_waiters_in_one_loop_hold_no_thread(persister: Postgres) -> None:
    import asyncio

    async def waiter(results: list[bool]) -> None:
        async with persister.awatching("job") as watch:
            owner = Owner()
            while not (await persister.aacquire("job", owner, 30)).acquired:
                await watch.wait_async(10)
            results.append(await persister.arelease("job", owner.owner_token))

    async def scenario() -> None:
        holder = Owner()
        assert (await persister.aacquire("job", holder, 30)).acquired
        results: list[bool] = []
        before = threading.active_count()
        tasks = [asyncio.create_task(waiter(results)) for _ in range(50)]
        await asyncio.sleep(0.5)
        assert threading.active_count() <= before + 2  # the one listener thread (and a pool worker), not one per waiter
        assert await persister.arelease("job", holder.owner_token)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert results == [True] * 50

    asyncio.run(scenario())


def test_an_async_call_is_bounded_against_a_peer_that_swallows_traffic(server_url: str, table: str) -> None:
    import asyncio

    from tests.reliability._proxy import TcpProxy, through

    parts = urlsplit(server_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    store = Postgres(through(server_url, proxy.port), table=table, timeout=1.5, connect_timeout=2)

    async def scenario() -> None:
        assert (await store.aacquire("job", Owner(), 60)).acquired
        proxy.partition()
        await asyncio.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(PersisterError, match="no answer"):
            await store.aget("job")
        assert time.monotonic() - started < 10  # bound 1.5 s; generous for a loaded machine

    try:
        asyncio.run(scenario())
    finally:
        proxy.heal()
        store.close()
        proxy.stop()


# -- PgBouncer (a throwaway one per pool mode, default configuration) -------------------------------



def with_listen_dsn(url: str, listen: str) -> str:
    from urllib.parse import quote

    return f"{url}{'&' if '?' in url else '?'}listen_dsn={quote(listen, safe='')}"


@pytest.fixture(params=pgbouncer.MODES)
def bouncer_url(request: pytest.FixtureRequest) -> str:
    return pgbouncer.url(request.param)


class TestConformanceBehindPgBouncer(PersisterConformance):
    """Every lock rule through PgBouncer: transaction pooling (polling, and LISTEN via listen_dsn) and session pooling."""

    @pytest.fixture(params=["transaction", "transaction+listen_dsn", "session"])
    def store_url(self, request: pytest.FixtureRequest) -> str:
        mode, _, listen = request.param.partition("+")
        url = pgbouncer.url(mode)
        return with_listen_dsn(url, postgres_server.url()) if listen else url

    @pytest.fixture
    def stored_state(self) -> Callable[[persisters.Persister, str], bool]:
        """Whether the persister's table still has a row for the name, read on the server itself, not through PgBouncer."""

        def found(persister: persisters.Persister, name: str) -> bool:
            assert isinstance(persister, Postgres)
            with psycopg.connect(postgres_server.url(), autocommit=True, connect_timeout=5) as connection:
                query = sql.SQL("SELECT 1 FROM {} WHERE name = %s").format(sql.Identifier(*persister.table.split(".")))
                return connection.execute(query, (name,)).fetchone() is not None

        return found


def test_a_pooler_is_detected_and_a_direct_server_is_not(bouncer_url: str, server_url: str, table: str) -> None:
    behind, direct = Postgres(bouncer_url, table=table), Postgres(elsewhere(server_url, "direct"), table=table)
    try:
        assert behind.acquire("job", Owner(), 30).acquired  # PgBouncer's default config: no startup options sent
        assert direct.get("job") is not None
        assert behind._shared().mode == "session"  # detected; the mode is unknown, so keep nothing between calls
        assert direct._shared().mode == "direct"
    finally:
        behind.close()
        direct.close()


def test_declared_transaction_pooling_keeps_client_connections(server_url: str, table: str) -> None:
    store = Postgres(pgbouncer.url("transaction"), table=table, pooler="transaction")
    try:
        owner = Owner()
        assert store.acquire("job", owner, 30).acquired
        assert store._shared().mode == "transaction" and store._shared().pool is not None
        assert store.release("job", owner.owner_token)
    finally:
        store.close()


def test_waiters_behind_a_pooler_poll_without_listen_dsn(bouncer_url: str, server_url: str, table: str) -> None:
    holder_store = Postgres(elsewhere(server_url, "holder"), table=table)
    waiting_store = Postgres(bouncer_url, table=table)
    holder = Owner()
    try:
        assert holder_store.acquire("job", holder, 60).acquired
        waiter = Singleton("job", waiting_store, lock_expire_seconds=60, release_on_sigterm=False)
        threading.Timer(0.5, holder_store.release, args=("job", holder.owner_token)).start()
        assert waiter.lock(wait=30)
        assert not waiting_store._hub().subscribed.is_set()  # nothing LISTENs through the pooler: it polled
        assert waiter.release()
    finally:
        holder_store.close()
        waiting_store.close()


def test_listen_dsn_wakes_waiters_behind_a_pooler(bouncer_url: str, server_url: str, table: str) -> None:
    other = Postgres(elsewhere(server_url, "releaser"), table=table)
    store = Postgres.from_url(with_listen_dsn(bouncer_url, server_url), table=table)
    owner = Owner()
    try:
        assert other.acquire("job", owner, 60).acquired
        with store.watching("job") as watch:
            assert subscribed(store, watch)
            assert not store.acquire("job", Owner(), 60).acquired
            threading.Timer(0.2, other.release, args=("job", owner.owner_token)).start()
            assert watch.wait(30) is True
        assert store.acquire("job", Owner(), 60).acquired
    finally:
        other.close()
        store.close()


def test_more_waiting_stores_than_pooled_server_connections_all_get_their_turn(
        bouncer_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    """Eight stores (as eight processes would be) wait on one name through a pool of 5 server connections.

    Waiting pins no server connection, and nothing session-scoped (the old waiter-hint
    advisory locks) stays behind in PgBouncer's server connections.
    """
    stores = [Postgres(bouncer_url, table=table) for _ in range(8)]
    for index, store in enumerate(stores):  # distinct configurations: one store each, like processes
        store._store_key = (*store._store_key, index)
    holder, failures, results = Owner(), [], []
    assert stores[0].acquire("job", holder, 60).acquired

    def take_a_turn(store: Postgres) -> None:
        try:
            waiter = Singleton("job", store, lock_expire_seconds=60, release_on_sigterm=False)
            results.append(waiter.lock(wait=60))
            time.sleep(0.05)
            waiter.release()
        except (AssertionError, PersisterError) as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=take_a_turn, args=(store,)) for store in stores[1:]]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert stores[0].release("job", holder.owner_token)
        for thread in threads:
            thread.join(120)
        assert failures == [] and results == [True] * 7
        advisory = admin.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
        assert advisory == (0,)
    finally:
        for store in stores:
            store.close()


def test_the_listener_resubscribes_after_its_connection_is_killed(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    """A server restart or a proxy drop kills the LISTEN session: the hub reconnects, wakes everyone, and hears releases again."""
    url = elsewhere(server_url, "relisten")
    application = url.rsplit("=", 1)[1]
    store, other = Postgres(url, table=table), Postgres(elsewhere(server_url, "releaser"), table=table)
    owner = Owner()
    try:
        assert other.acquire("job", owner, 60).acquired
        with store.watching("job") as watch:
            assert subscribed(store, watch)
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE application_name = %s AND query LIKE 'LISTEN%%'", (application,)).fetchall()
            assert killed == [(True,)]
            # The resubscription's wake-up (a release may have fallen in the gap). Until the listener is
            # back, a wait is bounded by the poll interval and may end unwoken, so wait in rounds.
            deadline = time.monotonic() + 30
            while not watch.wait(1) and time.monotonic() < deadline:
                pass
            assert time.monotonic() < deadline, "the listener never resubscribed"
            assert subscribed(store)  # the wake-up above came after ``subscribed`` was set
            assert not store.acquire("job", Owner(), 60).acquired
            threading.Timer(0.2, other.release, args=("job", owner.owner_token)).start()
            assert watch.wait(30) is True
        assert store.acquire("job", Owner(), 60).acquired
    finally:
        store.close()
        other.close()
