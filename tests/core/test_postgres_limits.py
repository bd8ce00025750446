"""``limit=N`` on PostgreSQL, at the persister level: up to N holds of a name kept in its one row.

The core's rules for N > 1 run in the conformance kit; these tests call the store
directly, on the real server and behind PgBouncer, and read the table itself
where the stored format is the point.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

if os.environ.get("CI") == "true":  # CI must fail, not skip, without the driver
    import psycopg
else:
    psycopg = pytest.importorskip("psycopg")
from psycopg import sql

from singleton_integrations import persisters
from singleton_integrations._record import Owner
from singleton_integrations.persisters import _postgres_sql as q
from singleton_integrations.persisters.postgres import Postgres
from tests.core import test_postgres
from tests.servers import pgbouncer

server_url, admin, table = test_postgres.server_url, test_postgres.admin, test_postgres.table  # shared fixtures


@pytest.fixture
def persister(server_url: str, table: str) -> Iterator[Postgres]:
    store = Postgres(server_url, table=table)
    yield store
    store.close()


def elsewhere(server_url: str, tag: str = "other") -> str:
    """The same server under another application name: another store (its own pool), as another process has."""
    return f"{server_url}{'&' if '?' in server_url else '?'}application_name=si-{tag}-{uuid.uuid4().hex[:8]}"


def stored_row(admin: psycopg.Connection[Any], table: str, name: str) -> dict[str, Any] | None:
    cursor = admin.execute(sql.SQL("SELECT * FROM {} WHERE name = %s").format(sql.Identifier(table)), (name,))
    row = cursor.fetchone()
    return None if row is None else dict(zip([column.name for column in cursor.description or ()], row, strict=True))


def tokens(records: Any) -> list[int]:
    return [record.fencing_token for record in records]


def take(store: Postgres, count: int, limit: int = 3, ttl: float | None = 60, **options: Any) -> list[Owner]:
    owners = [Owner() for _ in range(count)]
    for owner in owners:
        assert store.acquire("job", owner, ttl, limit=limit, **options).acquired
    return owners


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


# -- capability -------------------------------------------------------------------------


def test_the_store_declares_limits() -> None:
    assert "limits" in persisters.CAPABILITIES
    assert Postgres.limits is True


def test_the_limit_statement_fits_psycopgs_placeholder_cache() -> None:
    """psycopg re-parses the placeholders of a statement longer than 4 kB on every call (about 70 µs of CPU)."""
    from psycopg import _queries

    _, prepared = q.statements(sql.Identifier("singleton_locks").as_string(None), 10_000)
    assert len(prepared["acquire_limited"].encode()) <= _queries.MAX_CACHED_STATEMENT_LENGTH


# -- N holds, then a refusal that names them ------------------------------------------------


def test_n_holds_are_granted_then_a_refusal_names_every_holder(persister: Postgres) -> None:
    owners = take(persister, 3)
    refused = persister.acquire("job", Owner(), 60, limit=3)
    assert not refused.acquired
    held = persister.holders("job")
    assert [hold.owner_token for hold in held] == [owner.owner_token for owner in owners]
    assert refused.holders == tuple(held)
    assert refused.record == held[0]
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    assert tokens(held) == sorted(tokens(held)) and len(set(tokens(held))) == 3


def test_a_refusal_costs_one_statement(persister: Postgres) -> None:
    take(persister, 3)
    store = persister._shared()
    sent: list[str] = []
    original = persister._caller

    def counting(store_: Any, connection: Any, deadline: float) -> Callable[[Any], Any]:
        call = original(store_, connection, deadline)

        def counted(op: Any) -> Any:
            sent.append(op.key)
            return call(op)

        return counted

    persister._caller = counting  # type: ignore[method-assign]
    try:
        assert not persister.acquire("job", Owner(), 60, limit=3).acquired
    finally:
        del persister._caller
    assert store.mode == "direct" and sent == ["acquire_limited"]


def test_a_full_set_is_refused_without_waiting_for_the_row_lock(server_url: str, table: str) -> None:
    """A refusal read on the snapshot takes no row lock (no commit to flush), so a locked row does not delay it."""
    store = Postgres(server_url, table=table, statement_timeout_ms=3000)
    try:
        take(store, 3)
        with psycopg.connect(server_url, connect_timeout=5) as blocker:  # a transaction holding the row
            blocker.execute(sql.SQL("SELECT 1 FROM {} WHERE name = 'job' FOR UPDATE").format(sql.Identifier(table)))
            refused = store.acquire("job", Owner(), 60, limit=3)  # a lock wait would end in the statement timeout
            assert not refused.acquired and len(refused.holders) == 3
            blocker.rollback()
    finally:
        store.close()


def test_an_owner_that_already_holds_gets_its_hold_back(persister: Postgres) -> None:
    owners = take(persister, 2)
    again = persister.acquire("job", owners[1], 60, limit=3)
    assert again.acquired and again.record is not None
    assert again.record.fencing_token == persister.holders("job")[1].fencing_token
    assert len(persister.holders("job")) == 2


def test_holds_without_an_end_never_expire_and_give_no_retry_after(persister: Postgres) -> None:
    take(persister, 2, limit=2, ttl=None)
    refused = persister.acquire("job", Owner(), None, limit=2)
    assert not refused.acquired and refused.retry_after is None and len(refused.holders) == 2


# -- fencing: one rising sequence per name ---------------------------------------------------


def test_fencing_tokens_rise_across_every_hold_and_across_n_equal_1(persister: Postgres) -> None:
    seen: list[int] = []
    single = Owner()
    first = persister.acquire("job", single, 60)
    assert first.acquired and first.record is not None
    seen.append(first.record.fencing_token)
    assert persister.release("job", single.owner_token)
    for _ in range(2):
        owners = [Owner() for _ in range(4)]
        for owner in owners:
            result = persister.acquire("job", owner, 60, limit=4)
            assert result.acquired and result.record is not None
            seen.append(result.record.fencing_token)
        for owner in owners:
            assert persister.release("job", owner.owner_token)
        after = persister.acquire("job", single, 60)
        assert after.acquired and after.record is not None
        seen.append(after.record.fencing_token)
        assert persister.release("job", single.owner_token)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


# -- mixed N ---------------------------------------------------------------------------


def test_each_attempt_counts_every_live_hold_against_its_own_n(persister: Postgres) -> None:
    single = Owner()
    assert persister.acquire("job", single, 60).acquired  # N = 1 holds the name
    assert not persister.acquire("job", Owner(), 60).acquired
    assert persister.acquire("job", Owner(), 60, limit=2).acquired  # 1 live < 2
    assert not persister.acquire("job", Owner(), 60, limit=2).acquired
    assert persister.acquire("job", Owner(), 60, limit=3).acquired  # 2 live < 3
    assert not persister.acquire("job", Owner(), 60, limit=3).acquired
    refused_single = persister.acquire("job", Owner(), 60)
    assert not refused_single.acquired and refused_single.record is not None
    assert refused_single.record.owner_token == single.owner_token  # a real hold, never the shared row itself
    assert persister.acquire("job", Owner(), 60, limit=5).acquired  # 4 live < 5
    assert not persister.acquire("job", Owner(), 60, limit=4).acquired
    assert len(persister.holders("job")) == 4
    assert persister.release("job", single.owner_token)  # the N = 1 hold, now listed in the shared row
    assert len(persister.holders("job")) == 3


def test_n_equal_1_takes_the_name_again_once_every_hold_is_gone(persister: Postgres, admin: psycopg.Connection[Any],
                                                               table: str) -> None:
    owners = take(persister, 3)
    for owner in owners[:2]:
        assert persister.release("job", owner.owner_token)
        assert not persister.acquire("job", Owner(), 60).acquired
    assert persister.release("job", owners[2].owner_token)
    single = Owner()
    assert persister.acquire("job", single, 60).acquired
    row = stored_row(admin, table, "job")
    assert row is not None and row["owner_token"] == single.owner_token and row["metadata"] == {}


# -- stored format --------------------------------------------------------------------------


def test_a_lone_hold_is_stored_as_today_and_a_second_makes_the_row_shared(persister: Postgres, admin: psycopg.Connection[Any],
                                                                         table: str) -> None:
    first = Owner(metadata={"job": "export"})
    assert persister.acquire("job", first, 60, limit=3).acquired
    row = stored_row(admin, table, "job")
    assert row is not None and row["owner_token"] == first.owner_token and row["metadata"] == {"job": "export"}
    second = Owner()
    assert persister.acquire("job", second, 60, limit=3).acquired
    row = stored_row(admin, table, "job")
    assert row is not None and row["owner_token"] == q.SHARED
    listed = row["metadata"][q.HOLDS_KEY]
    assert [hold["owner_token"] for hold in listed] == [first.owner_token, second.owner_token]
    assert listed[0]["metadata"] == {"job": "export"}
    assert row["fencing_token"] == listed[1]["fencing_token"]  # the counter
    assert row["expires_at"] >= max(hold.expires_at for hold in persister.holders("job"))


def test_older_clients_statements_see_a_shared_name_held_until_its_last_hold_ends(
        persister: Postgres, admin: psycopg.Connection[Any], table: str) -> None:
    """Today's N = 1 statements (an older client runs the same ones) judge the shared row as one held lock."""
    take(persister, 2, ttl=0.5)
    later = Owner()
    assert persister.acquire("job", later, 60, limit=3).acquired
    params = {"name": "job", "owner_token": Owner().owner_token, "host": "old", "pid": 1, "ttl": 60.0,
              "min_hold": None, "metadata": "{}"}
    quoted = sql.Identifier(table).as_string(admin)
    with psycopg.ClientCursor(admin) as cursor:
        cursor.execute(q.ACQUIRE_FREE.format(table=quoted), params)
        assert cursor.fetchone() is None
        cursor.execute(q.ACQUIRE.format(table=quoted), params)
        answer = cursor.fetchone()
        assert answer is not None and answer[0] is None and answer[14]  # not taken: live
    assert wait_for(lambda: len(persister.holders("job")) == 1)
    with psycopg.ClientCursor(admin) as cursor:
        cursor.execute(q.ACQUIRE.format(table=quoted), params)
        answer = cursor.fetchone()
        assert answer is not None and answer[0] is None  # still held by the hold that lives on


# -- release and renew, per owner token ----------------------------------------------------------


def test_release_and_renew_act_on_their_own_hold_only(persister: Postgres) -> None:
    owners = take(persister, 3)
    before = {hold.owner_token: hold for hold in persister.holders("job")}
    renewed = persister.renew("job", owners[1].owner_token, 600)
    assert renewed is not None and renewed.fencing_token == before[owners[1].owner_token].fencing_token
    assert renewed.expires_at is not None and renewed.expires_at > before[owners[1].owner_token].expires_at  # type: ignore[operator]
    after = {hold.owner_token: hold for hold in persister.holders("job")}
    assert after[owners[0].owner_token] == before[owners[0].owner_token]
    assert after[owners[2].owner_token] == before[owners[2].owner_token]
    assert persister.release("job", owners[0].owner_token)
    assert not persister.release("job", owners[0].owner_token)
    assert persister.renew("job", owners[0].owner_token, 60) is None
    assert [hold.owner_token for hold in persister.holders("job")] == [owners[1].owner_token, owners[2].owner_token]
    assert not persister.release("job", Owner().owner_token)
    assert persister.renew("job", Owner().owner_token, 60) is None


def test_an_expired_hold_is_taken_over_and_the_others_stay(persister: Postgres) -> None:
    lasting = take(persister, 2)
    short = Owner()
    assert persister.acquire("job", short, 0.3, limit=3).acquired
    kept = [hold for hold in persister.holders("job") if hold.owner_token != short.owner_token]
    assert not persister.acquire("job", Owner(), 60, limit=3).acquired
    assert wait_for(lambda: len(persister.holders("job")) == 2)
    assert persister.renew("job", short.owner_token, 60) is None  # an expired hold is not renewed
    newcomer = Owner()
    taken = persister.acquire("job", newcomer, 60, limit=3)
    assert taken.acquired and taken.record is not None
    now_held = persister.holders("job")
    assert now_held[:2] == kept and now_held[2].owner_token == newcomer.owner_token
    assert not persister.release("job", short.owner_token)  # the caller lost it
    assert all(persister.release("job", owner.owner_token) for owner in lasting)


def test_the_minimum_hold_applies_to_each_hold(persister: Postgres) -> None:
    owners = take(persister, 2, limit=2, min_hold=1.0)
    assert persister.release("job", owners[0].owner_token)  # inside its minimum hold: stays live, released
    held = persister.holders("job")
    assert len(held) == 2 and held[0].released_at is not None and held[0].owner_token == ""
    assert not persister.acquire("job", Owner(), 60, limit=2).acquired
    assert persister.renew("job", owners[0].owner_token, 60) is None
    assert not persister.release("job", owners[0].owner_token)
    assert wait_for(lambda: len(persister.holders("job")) == 1)
    assert persister.acquire("job", Owner(), 60, limit=2).acquired


def test_a_renewal_never_ends_a_hold_before_its_minimum_hold(persister: Postgres) -> None:
    owners = take(persister, 2, min_hold=30.0)
    renewed = persister.renew("job", owners[1].owner_token, 1)
    assert renewed is not None and renewed.hold_until is not None and renewed.expires_at is not None
    assert renewed.expires_at >= renewed.hold_until


# -- get, list, holders, force_release -----------------------------------------------------------


def test_get_list_and_holders_show_every_hold_under_the_lock_name(persister: Postgres) -> None:
    take(persister, 3)
    lone = Owner()
    assert persister.acquire("jobs/other", lone, 60).acquired
    held = persister.holders("job")
    assert persister.get("job") == held[0]
    listed = persister.list("job")
    assert [record.name for record in listed] == ["job", "job", "job", "jobs/other"]
    assert listed[:3] == held
    assert persister.holders("missing") == [] and persister.get("missing") is None


def test_force_release_removes_every_hold_and_wakes_waiters(persister: Postgres) -> None:
    take(persister, 3)
    lowest = persister.holders("job")[0]
    with persister.watching("job") as watch:
        assert persister.force_release("job") == lowest
        assert watch.wait(30) is True
    assert persister.holders("job") == [] and persister.force_release("job") is None
    assert persister.acquire("job", Owner(), 60).acquired


def test_retention_keeps_a_shared_row_while_a_hold_lives(persister: Postgres, admin: psycopg.Connection[Any], table: str) -> None:
    take(persister, 2, ttl=None)
    for _ in range(2):
        assert persister.acquire("ended", Owner(), 0.1, limit=3).acquired
    assert stored_row(admin, table, "ended")["owner_token"] == q.SHARED  # type: ignore[index]
    assert wait_for(lambda: persister.holders("ended") == [])
    assert wait_for(lambda: persister.purge(after=0.05) == 1)  # the name whose holds all ended
    assert stored_row(admin, table, "job") is not None and stored_row(admin, table, "ended") is None


# -- waking waiters -------------------------------------------------------------------------


def test_any_release_of_any_hold_wakes_a_watcher_in_another_process(server_url: str, table: str, persister: Postgres) -> None:
    other = Postgres(elsewhere(server_url), table=table)
    try:
        owners = take(other, 3)
        with persister.watching("job") as watch:
            assert persister._hub().subscribed.wait(20) and watch.wait(20)  # the LISTEN's own wake-up
            assert not persister.acquire("job", Owner(), 60, limit=3).acquired  # leaves the waiter's hint
            threading.Timer(0.2, other.release, args=("job", owners[1].owner_token)).start()
            assert watch.wait(30) is True
        assert persister.acquire("job", Owner(), 60, limit=3).acquired
    finally:
        other.close()


# -- async -------------------------------------------------------------------------------


def test_async_primitives_keep_the_same_rules(persister: Postgres) -> None:
    async def scenario() -> None:
        owners = [Owner() for _ in range(3)]
        for owner in owners:
            assert (await persister.aacquire("job", owner, 60, limit=3)).acquired
        refused = await persister.aacquire("job", Owner(), 60, limit=3)
        assert not refused.acquired and len(refused.holders) == 3
        assert tokens(await persister.aholders("job")) == tokens(refused.holders)
        assert await persister.arenew("job", owners[2].owner_token, 120) is not None
        assert await persister.arelease("job", owners[0].owner_token)
        assert [hold.owner_token for hold in await persister.aholders("job")] == [o.owner_token for o in owners[1:]]
        assert len(await persister.alist("")) == 2
        assert (await persister.aforce_release("job")) is not None
        assert await persister.aholders("job") == []
        await persister.aclose()

    asyncio.run(scenario())


# -- behind PgBouncer -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", pgbouncer.MODES)
def test_limits_behind_pgbouncer(mode: str, table: str) -> None:
    store = Postgres(pgbouncer.url(mode), table=table, pooler=mode)
    try:
        owners = take(store, 3)
        refused = store.acquire("job", Owner(), 60, limit=3)
        assert not refused.acquired and len(refused.holders) == 3
        assert store.renew("job", owners[1].owner_token, 120) is not None
        assert store.release("job", owners[0].owner_token)
        assert store.acquire("job", Owner(), 60, limit=3).acquired
        assert not store.acquire("job", Owner(), 60).acquired
        assert len(store.holders("job")) == 3 and len(store.list("")) == 3
        assert store.force_release("job") is not None and store.holders("job") == []
    finally:
        store.close()


# -- racing for N ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["direct", "pgbouncer-transaction"])
def test_racing_stores_never_exceed_the_limit_and_reach_it(route: str, server_url: str, table: str) -> None:
    """8 threads, each with a store (and connections) of its own, race for 3 holds; a counter outside
    the lock, raised after each acquire and lowered before each release, never passes 3 and reaches it.
    Until it has reached 3 the holders keep their holds, so it does, whatever the timing."""
    limit, workers, rounds = 3, 8, 40
    url = pgbouncer.url("transaction") if route != "direct" else None
    stores = [Postgres(url if url else elsewhere(server_url, f"race{index}"), table=table,
                       pooler="transaction" if url else "none", max_size=1) for index in range(workers)]
    guard = threading.Condition()
    active, most, granted = [0], [0], [0]
    failures: list[BaseException] = []
    start = threading.Barrier(workers)

    def compete(store: Postgres) -> None:
        try:
            start.wait(20)
            for _ in range(rounds):
                owner = Owner()
                if not store.acquire("job", owner, 60, limit=limit).acquired:
                    continue
                with guard:
                    active[0] += 1
                    granted[0] += 1
                    most[0] = max(most[0], active[0])
                    guard.notify_all()
                    # The first holders stay until N are held at once, so reaching N does not depend on timing.
                    guard.wait_for(lambda: most[0] >= limit, timeout=60)
                time.sleep(0.002)
                with guard:
                    active[0] -= 1
                assert store.release("job", owner.owner_token)
        except BaseException as error:  # reported by the test thread
            failures.append(error)

    threads = [threading.Thread(target=compete, args=(store,)) for store in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for store in stores:
            store.close()
    assert not failures, failures
    assert most[0] == limit, most[0]
    assert granted[0] >= rounds


_COMPETITOR = textwrap.dedent("""
    import os, sys, time
    from singleton_integrations._record import Owner
    from singleton_integrations.persisters.postgres import Postgres

    url, table, log, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = Postgres(url, table=table, max_size=1)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for _ in range(rounds):
        owner = Owner()
        if not store.acquire("job", owner, 60, limit=3).acquired:
            time.sleep(0.001)
            continue
        started = time.monotonic_ns()
        time.sleep(0.005)
        os.write(out, f"{started} {time.monotonic_ns()}\\n".encode())
        assert store.release("job", owner.owner_token)
    store.close()
""")


def test_racing_processes_never_hold_more_than_the_limit(server_url: str, table: str, tmp_path: Any) -> None:
    """6 processes race for 3 holds; each logs when it held (after its acquire, before its release,
    on the machine-wide monotonic clock), and no instant is covered by more than 3 of the intervals."""
    log = tmp_path / "holds.log"
    Postgres(server_url, table=table).close()
    children = [subprocess.Popen([sys.executable, "-c", _COMPETITOR, elsewhere(server_url, f"proc{index}"), table,
                                  str(log), "40"], stderr=subprocess.PIPE, text=True) for index in range(6)]
    for child in children:
        _, errors = child.communicate(timeout=180)
        assert child.returncode == 0, errors
    intervals = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert intervals
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))  # an end before a start at the same instant
    held = most = 0
    for _, change in events:
        held += change
        most = max(most, held)
    assert most <= 3


def test_racing_takeovers_of_expired_holds_never_exceed_the_limit(server_url: str, table: str, admin: psycopg.Connection[Any]) -> None:
    """Holds that expire mid-race: the store's own view (holders) never shows more than N live."""
    stores = [Postgres(elsewhere(server_url, f"expiry{index}"), table=table, max_size=1) for index in range(6)]
    failures: list[BaseException] = []
    seen: list[int] = []

    def compete(store: Postgres) -> None:
        try:
            for _ in range(30):
                result = store.acquire("job", Owner(), 0.05, limit=3)
                if not result.acquired:
                    assert len(result.holders) >= 3
                seen.append(len(store.holders("job")))
        except BaseException as error:  # reported by the test thread
            failures.append(error)

    threads = [threading.Thread(target=compete, args=(store,)) for store in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for store in stores:
            store.close()
    assert not failures, failures
    assert max(seen) <= 3
    row = stored_row(admin, table, "job")
    assert row is not None
    if row["owner_token"] == q.SHARED:
        assert len(row["metadata"][q.HOLDS_KEY]) <= 3
        assert json.dumps(row["metadata"])  # a list of holds the store can read back
