"""MySQL/MariaDB with ``limit=N`` (issue 21): the persister's own rules for up to N holds of a name.

Called on the persister directly, against the real server (``tests.core.test_mysql``'s);
the core-level rules are the conformance kit's. Holds beyond today's one row live in
``<table>_holds``; these tests look at both tables only where the stored format is the point.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from singleton_integrations._record import AcquireResult, Owner
from singleton_integrations.persisters._mysql_steps import Op
from singleton_integrations.persisters.mysql import MySql
from tests.core.test_mysql import _admin_connect, run_table, server_url


@pytest.fixture(scope="module")
def base_url() -> str:
    return server_url()


@pytest.fixture
def table(base_url: str) -> Iterator[str]:
    name = run_table("limits")
    yield name
    connection = _admin_connect(base_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS `{name}`, `{name}_waiters`, `{name}_holds`")
    finally:
        connection.close()


@pytest.fixture
def store(base_url: str, table: str) -> Iterator[MySql]:
    persister = MySql(base_url, table=table)
    yield persister
    persister.close()


@pytest.fixture
def admin(base_url: str) -> Iterator[Any]:
    connection = _admin_connect(base_url)
    yield connection
    connection.close()


def _expire(admin: Any, table: str, owner: Owner) -> None:
    """End a hold's lease now, by the server's clock, as if its holder had died long ago."""
    with admin.cursor() as cursor:
        for target in (table, f"{table}_holds"):
            cursor.execute(f"UPDATE `{target}` SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND "
                           "WHERE owner_token = %s", (owner.owner_token,))


def _take(store: MySql, name: str, limit: int, count: int, ttl: float | None = 30) -> list[Owner]:
    owners = [Owner() for _ in range(count)]
    for owner in owners:
        result = store.acquire(name, owner, ttl, limit=limit)
        assert result.acquired and result.record is not None and result.record.owner_token == owner.owner_token
    return owners


def test_the_store_says_it_keeps_limits(store: MySql) -> None:
    assert MySql.limits
    with pytest.raises(ValueError, match="limit"):
        store.acquire("job", Owner(), 30, limit=0)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_n_holds_then_a_refusal_naming_every_holder(store: MySql, api: str) -> None:
    def acquire(owner: Owner) -> AcquireResult:
        if api == "sync":
            return store.acquire("three", owner, 30, limit=3)
        return asyncio.run(store.aacquire("three", owner, 30, limit=3))

    owners = [Owner(metadata={"run": str(index)}) for index in range(3)]
    tokens = []
    for owner in owners:
        result = acquire(owner)
        assert result.acquired and result.record is not None
        assert (result.record.owner_token, result.record.metadata) == (owner.owner_token, owner.metadata)
        tokens.append(result.record.fencing_token)
    assert tokens == sorted(set(tokens)), "each hold's fencing token is above every earlier one"
    refused = acquire(Owner())
    assert not refused.acquired and not refused.queued_behind
    assert [held.owner_token for held in refused.holders] == [owner.owner_token for owner in owners]
    assert refused.record == refused.holders[0]
    assert refused.retry_after is not None and 0 < refused.retry_after <= 30
    assert all(held.name == "three" for held in refused.holders)
    assert store.holders("three") == list(refused.holders)
    assert asyncio.run(store.aholders("three")) == list(refused.holders)
    again = acquire(owners[1])  # a token that holds one gets it back, the same fencing token
    assert again.acquired and again.record is not None and again.record.fencing_token == tokens[1]


def test_no_expiry_holds_give_no_retry_after(store: MySql) -> None:
    _take(store, "forever", 2, 2, ttl=None)
    refused = store.acquire("forever", Owner(), None, limit=2)
    assert not refused.acquired and refused.retry_after is None and len(refused.holders) == 2


def test_mixed_n_each_attempt_counts_every_live_hold(store: MySql) -> None:
    single = Owner()
    first = store.acquire("mixed", single, 30)
    assert first.acquired and first.record is not None
    two, three = _take(store, "mixed", 3, 2)
    holders = store.holders("mixed")
    assert [held.owner_token for held in holders] == [single.owner_token, two.owner_token, three.owner_token]
    assert holders[0] == store.get("mixed"), "the N = 1 hold keeps its record and its fencing token"
    assert not store.acquire("mixed", Owner(), 30, limit=3).acquired  # 3 of 3
    assert store.acquire("mixed", Owner(), 30, limit=4).acquired  # its own N is 4
    assert store.release("mixed", single.owner_token)
    refused = store.acquire("mixed", Owner(), 30)  # N = 1: refused while any hold is live
    assert not refused.acquired and refused.record is not None and refused.record.owner_token == two.owner_token
    for held in store.holders("mixed"):
        assert store.release("mixed", held.owner_token)
    after = store.acquire("mixed", Owner(), 30)
    assert after.acquired and after.record is not None
    assert after.record.fencing_token > max(record.fencing_token for record in holders)


def test_an_n1_acquire_after_holds_taken_under_an_n1_holder_mints_a_higher_token(store: MySql) -> None:
    """Slots taken while the name's row was held by an N = 1 hold carry tokens above that row's
    counter; the row's mark sends the next N = 1 acquire to the steps, which read every hold."""
    single = Owner()
    assert store.acquire("marked", single, 30).acquired
    (extra,) = _take(store, "marked", 2, 1)
    extra_token = store.holders("marked")[-1].fencing_token
    assert store.get("marked") == store.holders("marked")[0], "the N = 1 hold's record is as it was"
    assert store.release("marked", single.owner_token)
    assert not store.acquire("marked", Owner(), 30).acquired, "the slot is live"
    assert store.release("marked", extra.owner_token)
    later = store.acquire("marked", Owner(), 30)
    assert later.acquired and later.record is not None and later.record.fencing_token > extra_token
    assert store.release("marked", later.record.owner_token)
    fast = store.acquire("marked", Owner(), 30)  # the mark is gone: the one-round-trip path again
    assert fast.acquired and fast.record is not None and fast.record.fencing_token > later.record.fencing_token


@pytest.mark.parametrize("how", ["held", "in its minimum hold", "free"])
def test_the_mark_outlives_the_n1_hold_until_the_slots_end(store: MySql, admin: Any, table: str, how: str) -> None:
    """Whatever state the name's row is in when a slot is taken, no N = 1 acquire takes the row
    while the slot is live, however that row's own hold ends."""
    single = Owner()
    if how != "free":
        assert store.acquire("mark", single, 30, 60 if how == "in its minimum hold" else None).acquired
    if how == "in its minimum hold":
        assert store.release("mark", single.owner_token)
    (extra,) = _take(store, "mark", 3, 1)
    if how == "held":
        assert store.release("mark", single.owner_token)
    with admin.cursor() as cursor:  # the row's minimum hold, if any, is over
        cursor.execute(f"UPDATE `{table}` SET hold_until = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND "
                       "WHERE hold_until IS NOT NULL")
    assert [held.owner_token for held in store.holders("mark")] == [extra.owner_token]
    refused = store.acquire("mark", Owner(), 30)
    assert not refused.acquired and refused.record is not None and refused.record.owner_token == extra.owner_token
    assert store.release("mark", extra.owner_token)
    assert store.acquire("mark", Owner(), 30).acquired


def test_a_row_released_into_its_minimum_hold_shows_the_hold_s_end_not_the_mark(store: MySql) -> None:
    """The mark is the store's bookkeeping: a released hold's record still ends when its hold does."""
    single = Owner()
    assert store.acquire("shown", single, 30, 60).acquired
    _take(store, "shown", 2, 1)
    assert store.release("shown", single.owner_token)
    released = store.holders("shown")[0]
    assert released.released_at is not None and released.hold_until is not None
    assert released.expires_at == released.hold_until


def test_an_n1_acquire_refuses_a_name_whose_row_is_free_but_a_slot_is_live(store: MySql) -> None:
    """The name's row can be free (never held by N = 1) while slots are live: the guard refuses."""
    owners = _take(store, "slots-only", 3, 2)
    refused = store.acquire("slots-only", Owner(), 30)
    assert not refused.acquired and refused.record is not None
    assert refused.record.owner_token == owners[0].owner_token and refused.retry_after is not None
    waiting = store.acquire("slots-only", Owner(), 30, queue_for=30)
    assert not waiting.acquired


def test_release_and_renew_act_on_the_token_s_hold_only(store: MySql, base_url: str, table: str) -> None:
    first, second = _take(store, "per-token", 2, 2)
    before = {held.owner_token: held for held in store.holders("per-token")}
    renewed = store.renew("per-token", second.owner_token, 120)
    assert renewed is not None and renewed.fencing_token == before[second.owner_token].fencing_token
    assert renewed.expires_at is not None and renewed.created_at is not None
    assert renewed.expires_at - renewed.created_at > timedelta(seconds=100)
    assert store.get("per-token") == before[first.owner_token], "the other hold is untouched"
    assert store.renew("per-token", Owner().owner_token, 30) is None
    assert not store.release("per-token", Owner().owner_token)
    # Another process (another pool) did not take these holds: its calls find them all the same.
    other = MySql(base_url, table=table, max_size=2)
    try:
        assert other.renew("per-token", first.owner_token, 60) is not None
        assert other.release("per-token", first.owner_token)
        assert asyncio.run(other.arenew("per-token", second.owner_token, 60)) is not None
    finally:
        other.close()
    assert [held.owner_token for held in store.holders("per-token")] == [second.owner_token]
    assert asyncio.run(store.arelease("per-token", second.owner_token))
    assert store.holders("per-token") == []
    assert not store.release("per-token", second.owner_token)


def test_a_minimum_hold_keeps_each_hold_live_after_its_release(store: MySql, admin: Any, table: str) -> None:
    owner = Owner()
    assert store.acquire("min-hold", owner, 30, 60, limit=2).acquired
    (other,) = _take(store, "min-hold", 2, 1)
    assert store.renew("min-hold", owner.owner_token, 1) is not None
    renewed = store.holders("min-hold")[0]
    assert renewed.expires_at is not None and renewed.hold_until is not None
    assert renewed.expires_at >= renewed.hold_until, "never renewed to end before the minimum hold"
    assert store.release("min-hold", owner.owner_token)
    held = store.holders("min-hold")
    assert len(held) == 2 and held[0].released_at is not None and held[0].owner_token == ""
    assert not store.acquire("min-hold", Owner(), 30, limit=2).acquired, "released into its minimum hold: still live"
    assert store.renew("min-hold", owner.owner_token, 30) is None
    with admin.cursor() as cursor:
        cursor.execute(f"UPDATE `{table}_holds` SET hold_until = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND, "
                       "expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND WHERE owner_token IS NULL")
    assert [h.owner_token for h in store.holders("min-hold")] == [other.owner_token]
    assert store.acquire("min-hold", Owner(), 30, limit=2).acquired


def test_an_expired_hold_is_taken_over_and_the_others_stay(store: MySql, admin: Any, table: str) -> None:
    owners = _take(store, "expiry", 3, 3)
    tokens = [held.fencing_token for held in store.holders("expiry")]
    _expire(admin, table, owners[1])
    assert store.renew("expiry", owners[1].owner_token, 30) is None, "an expired hold cannot be renewed"
    newcomer = Owner()
    taken = store.acquire("expiry", newcomer, 30, limit=3)
    assert taken.acquired and taken.record is not None and taken.record.fencing_token > max(tokens)
    assert [h.owner_token for h in store.holders("expiry")] == [owners[0].owner_token, owners[2].owner_token,
                                                              newcomer.owner_token]
    assert not store.release("expiry", owners[1].owner_token), "its slot is somebody else's now"
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM `{table}_holds`")
        assert cursor.fetchone() == (3,), "the expired hold's slot was reused"


def test_an_expired_n1_hold_is_replaced_by_a_hold_under_a_limit(store: MySql, admin: Any, table: str) -> None:
    single = Owner()
    first = store.acquire("n1-expired", single, 30)
    assert first.acquired and first.record is not None
    _expire(admin, table, single)
    owners = _take(store, "n1-expired", 2, 2)
    held = store.holders("n1-expired")
    assert [h.owner_token for h in held] == [o.owner_token for o in owners]
    assert held[0].fencing_token > first.record.fencing_token
    assert not store.release("n1-expired", single.owner_token)


def test_list_get_and_force_release(store: MySql) -> None:
    _take(store, "b-limited", 3, 3)
    single = Owner()
    assert store.acquire("a-single", single, 30).acquired
    listed = store.list()
    assert [record.name for record in listed] == ["a-single", "b-limited", "b-limited", "b-limited"]
    limited = [record.fencing_token for record in listed[1:]]
    assert limited == sorted(limited)
    assert store.list("b") == listed[1:] == store.holders("b-limited")
    assert asyncio.run(store.alist("b-")) == listed[1:]
    lowest = store.get("b-limited")
    assert lowest is not None and lowest.fencing_token == limited[0]
    removed = store.force_release("b-limited")
    assert removed is not None and removed.fencing_token == limited[0]
    assert store.holders("b-limited") == [] and store.get("b-limited") is None
    assert store.force_release("b-limited") is None
    assert store.holders("a-single") == [store.get("a-single")]
    # A name with an N = 1 hold and slots: every hold goes, the lowest token comes back.
    _take(store, "a-single", 3, 2)
    assert asyncio.run(store.aforce_release("a-single")) == listed[0]
    assert store.holders("a-single") == []
    again = store.acquire("a-single", Owner(), 30, limit=3)
    assert again.acquired and again.record is not None and again.record.fencing_token > limited[-1] > 0


def test_waiters_take_free_holds_in_queue_order(store: MySql) -> None:
    holders = _take(store, "queue", 2, 2)
    first, second, third = Owner(), Owner(), Owner()
    for waiter in (first, second, third):
        refused = store.acquire("queue", waiter, 30, queue_for=30, limit=2)
        assert not refused.acquired and not refused.queued_behind and len(refused.holders) == 2
    assert store.release("queue", holders[0].owner_token)
    behind = store.acquire("queue", second, 30, queue_for=30, limit=2)
    assert not behind.acquired and behind.queued_behind and behind.retry_after is not None
    assert not store.acquire("queue", Owner(), 30, queue_for=30, limit=2).acquired, "a newcomer queues too"
    assert store.acquire("queue", first, 30, queue_for=30, limit=2).acquired, "the head takes the free hold"
    assert store.release("queue", holders[1].owner_token)
    assert not store.acquire("queue", third, 30, queue_for=30, limit=2).acquired
    assert store.acquire("queue", second, 30, queue_for=30, limit=2).acquired
    assert store.release("queue", first.owner_token)
    # Two holds free with one place ahead: the second in the queue may take one too.
    assert store.release("queue", second.owner_token)
    assert store.acquire("queue", third, 30, queue_for=30, limit=2).acquired
    store.leave_queue("queue", Owner().owner_token)


def test_a_caller_that_does_not_wait_ignores_the_queue(store: MySql) -> None:
    holder = _take(store, "no-wait", 2, 2)[0]
    assert not store.acquire("no-wait", Owner(), 30, queue_for=30, limit=2).acquired
    assert store.release("no-wait", holder.owner_token)
    assert store.acquire("no-wait", Owner(), 30, limit=2).acquired


def test_any_release_wakes_the_name_s_waiters(store: MySql) -> None:
    owners = _take(store, "wake", 3, 3)
    for owner in owners:
        watch = store.watch("wake")
        try:
            assert not watch.wait(0)
            assert store.release("wake", owner.owner_token)
            assert watch.wait(10)
        finally:
            watch.close()


def test_an_attempt_is_one_round_trip_whatever_it_finds(base_url: str, table: str) -> None:
    store = MySql(base_url, table=table, purge_after_seconds=None)  # no retention sweep after the release
    calls: list[str] = []
    call = store._call

    def counted(connection: Any, op: Op) -> Any:
        calls.append(op.kind)
        return call(connection, op)

    _take(store, "trips", 2, 1)  # the tables exist
    store._call = counted  # type: ignore[method-assign]
    owner = Owner()
    assert store.acquire("trips", owner, 30, limit=2).acquired
    assert not store.acquire("trips", Owner(), 30, limit=2).acquired
    assert not store.acquire("trips", Owner(), 30, queue_for=30, limit=2).acquired
    assert store.renew("trips", owner.owner_token, 30) is not None
    assert store.release("trips", owner.owner_token)
    store.close()
    assert calls == ["results"] * 4 + ["counts"], calls


def test_idle_slots_and_names_are_purged(store: MySql, admin: Any, table: str) -> None:
    owners = _take(store, "purged", 2, 2)
    assert store.acquire("kept", Owner(), 30, limit=2).acquired
    for owner in owners:
        assert store.release("purged", owner.owner_token)
    store.purge(after=3600)
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM `{table}_holds`")
        assert cursor.fetchone() == (3,), "nothing idle for an hour yet"
        cursor.execute(f"UPDATE `{table}_holds` SET released_at = released_at - INTERVAL 2 HOUR, "
                       "created_at = created_at - INTERVAL 2 HOUR WHERE owner_token IS NULL")
        cursor.execute(f"UPDATE `{table}` SET released_at = released_at - INTERVAL 2 HOUR, "
                       "created_at = created_at - INTERVAL 2 HOUR")
    assert store.purge(after=3600) == 0, "a name's row stays while it has slots"
    assert store.purge(after=3600) == 1, "then goes, its slots gone"
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT HEX(name) FROM `{table}` UNION ALL SELECT HEX(name) FROM `{table}_holds`")
        assert {row[0] for row in cursor.fetchall()} == {b"kept".hex().upper()}
    again = store.acquire("purged", Owner(), 30, limit=2)
    assert again.acquired


def test_n1_holds_are_stored_as_before(store: MySql, admin: Any, table: str) -> None:
    owner = Owner()
    assert store.acquire("plain", owner, 30).acquired
    with admin.cursor() as cursor:
        cursor.execute(f"SELECT owner_token FROM `{table}` WHERE name = 'plain'")
        assert cursor.fetchone() == (owner.owner_token,)
        cursor.execute(f"SELECT COUNT(*) FROM `{table}_holds`")
        assert cursor.fetchone() == (0,)


# -- races: never more than N -----------------------------------------------------------


class _Books:
    """The holders at once, kept outside the store: a holder counts itself in after its acquire
    and out before its release. Fencing tokens follow the order the store granted holds in, so
    a holder that finds N holders with lower tokens still in was granted beyond its own N."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.holding: dict[int, int] = {}  # fencing token: that holder's N
        self.most = self.taken = 0
        self.errors: list[str] = []

    def enter(self, limit: int, token: int) -> None:
        with self.guard:
            earlier = [held for held in self.holding if held < token]
            if len(earlier) >= limit:
                self.errors.append(f"granted with limit={limit} while {len(earlier)} earlier holds were held")
            self.holding[token] = limit
            self.taken += 1
            self.most = max(self.most, len(self.holding))

    def leave(self, token: int) -> None:
        with self.guard:
            del self.holding[token]


def _compete(store: MySql, name: str, books: _Books, limits: tuple[int, ...], rounds: int) -> None:
    for index in range(rounds):
        limit = limits[index % len(limits)]
        owner = Owner()
        extra = {"limit": limit} if limit > 1 else {}  # N = 1 as the core calls it: no limit
        result = store.acquire(name, owner, 30, **extra)
        if not result.acquired:
            continue
        assert result.record is not None
        books.enter(limit, result.record.fencing_token)
        threading.Event().wait(0.002)
        books.leave(result.record.fencing_token)
        assert store.release(name, owner.owner_token)


def test_threads_racing_for_three_holds_never_exceed_three(base_url: str, table: str) -> None:
    stores = [MySql(base_url, table=table, max_size=8), MySql(base_url, table=table, max_size=7)]
    books = _Books()
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            _compete(stores[index % 2], "race", books, (3,), 40)
        except BaseException as error:
            failures.append(error)

    try:
        threads = [threading.Thread(target=run, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures and not books.errors, (failures, books.errors)
        assert books.most == 3 and books.taken >= 40
        assert stores[0].holders("race") == []
    finally:
        for store in stores:
            store.close()


def test_threads_mixing_n1_and_n3_never_break_either_rule(base_url: str, table: str) -> None:
    """An N = 1 holder is alone; an N = 3 holder has at most two others: the books check both."""
    store = MySql(base_url, table=table, max_size=8)
    books = _Books()
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            _compete(store, "mixed-race", books, (1, 3) if index % 2 else (3, 1), 40)
        except BaseException as error:
            failures.append(error)

    try:
        threads = [threading.Thread(target=run, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures and not books.errors, (failures, books.errors)
        assert books.taken > 0 and books.most <= 3
    finally:
        store.close()


def _process(url: str, table: str, counter: Any, guard: Any, most: Any, errors: Any, rounds: int) -> None:
    store = MySql(url, table=table)
    try:
        for _ in range(rounds):
            owner = Owner()
            if not store.acquire("process-race", owner, 30, limit=3).acquired:
                continue
            with guard:
                counter.value += 1
                most.value = max(most.value, counter.value)
                if counter.value > 3:
                    errors.value += 1
            threading.Event().wait(0.003)
            with guard:
                counter.value -= 1
            store.release("process-race", owner.owner_token)
    finally:
        store.close()


def test_processes_racing_for_three_holds_never_exceed_three(base_url: str, table: str) -> None:
    context = multiprocessing.get_context("spawn")
    guard = context.Lock()
    counter, most, errors = context.Value("i", 0), context.Value("i", 0), context.Value("i", 0)
    processes = [context.Process(target=_process, args=(base_url, table, counter, guard, most, errors, 60))
                 for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [process.exitcode for process in processes] == [0] * 6
    assert errors.value == 0 and most.value == 3
