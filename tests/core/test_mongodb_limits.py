"""``limit=N`` (issue 21) on the MongoDB store, at the persister level.

The core-level rules are in the conformance kit; these check what the store
itself promises: one write per attempt, holds in the name's document, the
N = 1 document unchanged, the seed kept out while any hold is live, and the
change stream woken by the release of any hold. Runs against SecantusDB, or a
real ``mongod`` when MONGODB_URL is set.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pymongo
import pytest

from singleton_integrations._record import Owner
from singleton_integrations.persisters._mongodb_steps import Op
from singleton_integrations.persisters.mongodb import MongoDb
from singleton_integrations.testing.conformance import LimitsWithFairQueue
from tests.core import test_mongodb
from tests.core.test_seed_migration import Seed

RUN_DATABASE = test_mongodb.RUN_DATABASE
#: The holder fields an N = 1 lock's document has today (issue 13's format), besides ``_id``.
N1_HELD_FIELDS = {"name", "owner", "fence", "host", "pid", "createdAt", "expiresAt", "created", "metadata",
                  "purgeAt", "expired"}  # fmt: skip


# The store's fixtures, shared: a database for the run, a collection per test, a persister on it.
url, collection_name, store = test_mongodb.url, test_mongodb.collection_name, test_mongodb.store


def raw(store: MongoDb) -> Any:
    return store._client()[store.database_name][store.collection_name]


def server_now(store: MongoDb) -> datetime:
    return store._client().admin.command("hello")["localTime"].replace(tzinfo=timezone.utc)


def wait_past(store: MongoDb, moment: datetime | None) -> None:
    """Sleep until the server's clock has passed ``moment`` (expiry is judged by it)."""
    assert moment is not None
    while server_now(store) <= moment:
        time.sleep(0.05)


def tokens(records: Any) -> list[str]:
    return [record.owner_token for record in records]


# -- holds and refusals ----------------------------------------------------------------


def test_n_holds_then_a_refusal_naming_every_holder(store: MongoDb) -> None:
    owners = [Owner(metadata={"run": str(index)}) for index in range(4)]
    taken = [store.acquire("pool", owner, 60, limit=3) for owner in owners[:3]]
    assert all(result.acquired for result in taken)
    assert [result.record.owner_token for result in taken if result.record] == tokens(owners[:3])
    assert {result.record.metadata["run"] for result in taken if result.record} == {"0", "1", "2"}

    refused = store.acquire("pool", owners[3], 60, limit=3)
    assert not refused.acquired and not refused.queued_behind
    assert tokens(refused.holders) == tokens(owners[:3])  # every live hold, by fencing token
    assert refused.record == refused.holders[0]
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    assert tokens(store.holders("pool")) == tokens(owners[:3])
    assert store.get("pool") == refused.holders[0]  # the lowest fencing token

    again = store.acquire("pool", owners[1], 60, limit=3)  # a holder asking again gets its own hold back
    assert again.acquired and again.record == taken[1].record
    assert store.acquire("pool", owners[3], 60, limit=4).acquired  # a larger N admits one more


def test_holds_without_expiry_give_no_retry_after(store: MongoDb) -> None:
    for _ in range(2):
        assert store.acquire("forever", Owner(), None, limit=2).acquired
    refused = store.acquire("forever", Owner(), 60, limit=2)
    assert not refused.acquired and refused.retry_after is None and len(refused.holders) == 2


def test_fencing_tokens_rise_across_holds_and_single_locks(store: MongoDb) -> None:
    seen: list[int] = []
    single = Owner()
    for _ in range(3):
        owners = [Owner() for _ in range(3)]
        for owner in owners:
            result = store.acquire("fence", owner, 60, limit=3)
            assert result.acquired and result.record is not None
            seen.append(result.record.fencing_token)
        for owner in owners:
            assert store.release("fence", owner.owner_token)
        result = store.acquire("fence", single, 60)  # N = 1 draws from the same sequence
        assert result.acquired and result.record is not None
        seen.append(result.record.fencing_token)
        assert store.release("fence", single.owner_token)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_mixed_n_each_attempt_counts_every_live_hold(store: MongoDb) -> None:
    single, second, third = Owner(), Owner(), Owner()
    assert store.acquire("mixed", single, 60).acquired  # an N = 1 lock is one live hold
    assert store.acquire("mixed", second, 60, limit=2).acquired
    full = store.acquire("mixed", third, 60, limit=2)
    assert not full.acquired and tokens(full.holders) == [single.owner_token, second.owner_token]
    assert store.acquire("mixed", third, 60, limit=3).acquired

    assert store.release("mixed", single.owner_token)
    refused = store.acquire("mixed", Owner(), 60)  # N = 1 refuses while any hold is live
    assert not refused.acquired and refused.record is not None
    assert refused.record.owner_token == second.owner_token
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    for owner in (second, third):
        assert store.release("mixed", owner.owner_token)
    assert store.acquire("mixed", Owner(), 60).acquired


# -- release, renew, minimum hold, expiry ----------------------------------------------


def test_release_and_renew_act_on_their_own_hold_only(store: MongoDb) -> None:
    first, second = Owner(), Owner()
    held = {owner.owner_token: store.acquire("own", owner, 30, limit=2).record for owner in (first, second)}
    renewed = store.renew("own", second.owner_token, 600)
    assert renewed is not None and renewed.fencing_token == held[second.owner_token].fencing_token  # type: ignore[union-attr]
    assert renewed.expires_at is not None and renewed.expires_at > held[second.owner_token].expires_at  # type: ignore[operator,union-attr]
    assert store.holders("own")[0] == held[first.owner_token]  # untouched

    assert not store.release("own", Owner().owner_token)
    assert store.renew("own", Owner().owner_token, 60) is None
    assert store.release("own", first.owner_token)
    assert not store.release("own", first.owner_token)  # once
    assert store.renew("own", first.owner_token, 60) is None
    assert tokens(store.holders("own")) == [second.owner_token]


def test_release_and_renew_from_another_persister(store: MongoDb, url: str) -> None:
    """A persister that did not take the hold (another process, the admin tool) finds it all the same."""
    owner = Owner()
    assert store.acquire("elsewhere", owner, 30, limit=2).acquired
    other = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name, appname="other")
    try:
        assert other.renew("elsewhere", owner.owner_token, 600) is not None
        assert other.release("elsewhere", owner.owner_token)
        assert other.holders("elsewhere") == []
    finally:
        other.close()


async def test_async_primitives(store: MongoDb) -> None:
    owners = [Owner() for _ in range(3)]
    for owner in owners[:2]:
        assert (await store.aacquire("async", owner, 60, limit=2)).acquired
    refused = await store.aacquire("async", owners[2], 60, limit=2)
    assert not refused.acquired and tokens(refused.holders) == tokens(owners[:2])
    assert tokens(await store.aholders("async")) == tokens(owners[:2])
    assert await store.arenew("async", owners[0].owner_token, 120) is not None
    assert await store.arelease("async", owners[0].owner_token)
    assert (await store.aacquire("async", owners[2], 60, limit=2)).acquired
    assert [record.name for record in await store.alist("async")] == ["async", "async"]
    removed = await store.aforce_release("async")
    assert removed is not None and removed.owner_token == owners[1].owner_token
    assert await store.aholders("async") == []


def test_minimum_hold_per_hold(store: MongoDb) -> None:
    early, other = Owner(), Owner()
    taken = store.acquire("hold", early, 0.5, min_hold=2, limit=2).record
    assert taken is not None and taken.hold_until is not None
    assert store.acquire("hold", other, 60, limit=2).acquired
    assert store.release("hold", early.owner_token)  # into its minimum hold: still live, still counted
    kept = {record.owner_token: record for record in store.holders("hold")}
    assert kept[early.owner_token].released_at is not None
    assert store.renew("hold", early.owner_token, 60) is None  # a released hold is over for its owner
    assert not store.acquire("hold", Owner(), 60, limit=2).acquired
    wait_past(store, taken.hold_until)
    assert tokens(store.holders("hold")) == [other.owner_token]
    assert store.acquire("hold", Owner(), 60, limit=2).acquired


def test_an_expired_hold_is_taken_over_and_the_others_stay(store: MongoDb) -> None:
    crashed, steady, newcomer = Owner(), Owner(), Owner()
    lost = store.acquire("expiry", crashed, 0.5, limit=2).record
    kept = store.acquire("expiry", steady, 60, limit=2).record
    assert not store.acquire("expiry", newcomer, 60, limit=2).acquired
    assert lost is not None
    wait_past(store, lost.expires_at)
    assert store.renew("expiry", crashed.owner_token, 60) is None  # expired: never renewed
    taken = store.acquire("expiry", newcomer, 60, limit=2)
    assert taken.acquired and taken.record is not None and taken.record.fencing_token > lost.fencing_token
    assert store.holders("expiry") == [kept, taken.record]
    assert not store.release("expiry", crashed.owner_token)


# -- reading and administering ---------------------------------------------------------


def test_list_holders_and_force_release(store: MongoDb) -> None:
    owners = [Owner() for _ in range(3)]
    for owner in owners:
        assert store.acquire("b-pool", owner, 60, limit=3).acquired
    assert store.acquire("a-single", Owner(), 60).acquired
    listed = store.list()
    assert [record.name for record in listed] == ["a-single", "b-pool", "b-pool", "b-pool"]
    assert tokens(listed[1:]) == tokens(owners)
    assert tokens(store.list("b-")) == tokens(owners)

    removed = store.force_release("b-pool")
    assert removed is not None and removed.owner_token == owners[0].owner_token
    assert store.holders("b-pool") == [] and store.get("b-pool") is None
    assert store.force_release("b-pool") is None
    assert store.acquire("b-pool", Owner(), 60).acquired  # free for N = 1 too
    assert [record.name for record in store.list()] == ["a-single", "b-pool"]


# -- the stored format ------------------------------------------------------------------


def test_single_locks_keep_todays_document(store: MongoDb) -> None:
    owner = Owner()
    assert store.acquire("plain", owner, 60).acquired
    assert set(raw(store).find_one({"_id": "plain"})) == {"_id"} | N1_HELD_FIELDS - {"expired"}
    assert store.release("plain", owner.owner_token)
    assert set(raw(store).find_one({"_id": "plain"})) == {"_id", "name", "owner", "fence", "host", "pid",
                                                            "createdAt", "expiresAt", "metadata", "purgeAt"}  # fmt: skip


def test_holds_share_the_names_document(store: MongoDb) -> None:
    owners = [Owner() for _ in range(2)]
    for owner in owners:
        assert store.acquire("shared", owner, 60, limit=2).acquired
    doc = raw(store).find_one({"_id": "shared"})
    assert doc["owner"] is None and doc["name"] == "shared"  # held: the seed's unique index keeps it out
    assert [hold["owner"] for hold in doc["holds"]] == tokens(owners)
    assert doc["created"] == max(hold["expiresAt"] for hold in doc["holds"])  # the seed never judges it expired
    assert doc["fence"] == doc["holds"][-1]["fence"]
    for owner in owners:
        assert store.release("shared", owner.owner_token)
    doc = raw(store).find_one({"_id": "shared"})
    assert doc["holds"] == [] and doc["name"] == {"free": "shared"} and "created" not in doc
    assert raw(store).count_documents({}) == 1


def test_a_seed_process_is_kept_out_while_any_hold_is_live(url: str) -> None:
    database = f"seed_limits_{uuid.uuid4().hex[:10]}"
    store = MongoDb(url, database=database)  # the seed's collection
    seed = Seed(url, database, "shared-job", expire=0.5)
    try:
        single, owners = Owner(), [Owner() for _ in range(2)]
        assert store.acquire("shared-job", single, 5).acquired  # mixed N: an N = 1 holder, whose lease ends first
        for owner in owners:
            assert store.acquire("shared-job", owner, 60, limit=3).acquired
        time.sleep(1)  # past the seed's own lockExpireSeconds: our leases end later, so not expired for it
        assert seed.call("lock")["locked"] is False
        assert store.release("shared-job", single.owner_token)  # the main holder goes, the holds stay
        doc = raw(store).find_one({"_id": "shared-job"})
        assert doc["name"] == "shared-job" and doc["created"] == max(hold["expiresAt"] for hold in doc["holds"])
        assert seed.call("lock")["locked"] is False
        assert store.release("shared-job", owners[0].owner_token)
        assert seed.call("lock")["locked"] is False  # one hold is still live
        assert store.release("shared-job", owners[1].owner_token)
        assert seed.call("lock")["locked"] is True
        refused = store.acquire("shared-job", Owner(), 60, limit=2)  # the seed's lock is exclusive
        assert not refused.acquired and refused.record is not None and refused.record.owner_token == ""
        assert seed.call("release")["released"] is True
        assert store.acquire("shared-job", Owner(), 60, limit=2).acquired
    finally:
        seed.close()
        store.close()
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
        client.drop_database(database)
        client.close()


def test_round_trips_per_cycle(store: MongoDb, monkeypatch: pytest.MonkeyPatch) -> None:
    """N = 1 and N = 10 cycles cost the same trips; a full set's refusal is one write."""
    calls: list[str] = []
    real = store._call

    def counted(collection: Any, op: Op) -> Any:
        if op.method != "server_now" or store._server_now() is None:  # a cached clock costs no trip
            calls.append(op.method)
        return real(collection, op)

    store.acquire("warm", Owner(), 60)  # the indexes, once per collection
    monkeypatch.setattr(store, "_call", counted)

    def cycle(limit: int) -> list[str]:
        calls.clear()
        owner = Owner()
        extra = {"limit": limit} if limit > 1 else {}
        assert store.acquire(f"cycle{limit}", owner, 60, **extra).acquired
        assert store.release(f"cycle{limit}", owner.owner_token)
        return list(calls)

    assert cycle(1) == ["find_one_and_update", "update_one"]
    assert cycle(10) == ["find_one_and_update", "find_one_and_update"]
    for _ in range(3):
        assert store.acquire("full", Owner(), 60, limit=3).acquired
    store.acquire("full", Owner(), 60, limit=3)  # the clock estimate, fetched once
    calls.clear()
    refused = store.acquire("full", Owner(), 60, limit=3)
    assert not refused.acquired and len(refused.holders) == 3
    assert calls == ["find_one_and_update"]


# -- the fair queue (issue 22) -----------------------------------------------------------


class TestLimitsWithFairQueue(LimitsWithFairQueue):
    """The conformance kit's rules for waiters under ``limit=N``, on a collection of this test's own."""

    @pytest.fixture
    def store_url(self, url: str, collection_name: str) -> str:
        return test_mongodb.place_url(url, RUN_DATABASE, collection_name)


def test_queued_waiters_take_free_holds_in_queue_order(store: MongoDb) -> None:
    holders = [Owner() for _ in range(3)]
    for owner in holders:
        assert store.acquire("fair", owner, 30, limit=3).acquired
    waiters = [Owner() for _ in range(3)]
    for waiter in waiters:  # each keeps a place; all three held: a refusal naming them, not "behind"
        refused = store.acquire("fair", waiter, 30, queue_for=30, limit=3)
        assert not refused.acquired and not refused.queued_behind and len(refused.holders) == 3
    assert [place["token"] for place in raw(store).find_one({"_id": "fair"})["queue"]] \
        == tokens(waiters)  # fmt: skip
    assert store.release("fair", holders[0].owner_token)
    assert store.release("fair", holders[1].owner_token)  # two holds free: the first two places
    third = store.acquire("fair", waiters[2], 30, queue_for=30, limit=3)
    assert not third.acquired and third.queued_behind and third.retry_after is not None and third.retry_after > 0
    assert store.acquire("fair", waiters[1], 30, queue_for=30, limit=3).acquired
    assert store.acquire("fair", waiters[2], 30, queue_for=30, limit=3).queued_behind  # still behind the first
    assert store.acquire("fair", Owner(), 30, limit=3).acquired  # a caller that does not wait is not queued
    full = store.acquire("fair", waiters[0], 30, queue_for=30, limit=3)
    assert not full.acquired and not full.queued_behind and len(full.holders) == 3  # all held again
    assert store.release("fair", holders[2].owner_token)
    assert store.acquire("fair", waiters[0], 30, queue_for=30, limit=3).acquired
    store.leave_queue("fair", waiters[2].owner_token)
    assert "queue" not in raw(store).find_one({"_id": "fair"})  # takers and the leaver dropped their places


def test_an_attempt_without_a_limit_waits_in_the_same_queue(store: MongoDb) -> None:
    two = Owner()
    assert store.acquire("mixed-queue", two, 30, limit=2).acquired
    single, later = Owner(), Owner()
    assert not store.acquire("mixed-queue", single, 30, queue_for=10).acquired  # N = 1: any live hold refuses
    assert store.acquire("mixed-queue", later, 30, queue_for=10, limit=2).queued_behind  # one free, a place ahead
    assert store.release("mixed-queue", two.owner_token)
    assert store.acquire("mixed-queue", single, 30, queue_for=10).acquired  # the first place, without a limit
    assert store.acquire("mixed-queue", later, 30, queue_for=10, limit=2).acquired


def test_a_queued_refusal_is_one_write(store: MongoDb, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        assert store.acquire("trips", Owner(), 60, limit=2).acquired
    waiter = Owner()
    store.acquire("trips", waiter, 60, queue_for=30, limit=2)  # the indexes and the clock estimate, once
    calls = test_mongodb.counted_calls(store, monkeypatch)
    assert not store.acquire("trips", waiter, 60, queue_for=30, limit=2).acquired
    assert not store.acquire("trips", Owner(), 60, queue_for=30, limit=2).acquired
    assert calls == ["find_one_and_update", "find_one_and_update"]


# -- waking waiters --------------------------------------------------------------------


def _is_replica_set(store: MongoDb) -> bool:
    hello = store._client().admin.command("hello")
    return bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"


@pytest.mark.parametrize("waiter_limit", [1, 3])
def test_the_release_of_any_hold_wakes_a_waiter_through_the_change_stream(
    store: MongoDb, url: str, waiter_limit: int
) -> None:
    if not _is_replica_set(store):
        pytest.skip("change streams need a replica set")
    holders = [Owner() for _ in range(3)]
    for owner in holders:
        assert store.acquire("wake", owner, 600, limit=3).acquired
    # Another client (other options): its hub hears only the change stream, not this process's releases.
    waiter = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name, appname="waiter")
    extra = {"limit": waiter_limit} if waiter_limit > 1 else {}
    try:
        assert waiter.notifies
        for index in range(3):  # the last hold, a middle one, the first
            leaving = holders.pop(-1 if index == 0 else 1 if index == 1 else 0)
            watch = waiter.watch("wake")
            try:
                assert not waiter.acquire("wake", Owner(), 60, **extra).acquired
                timer = threading.Timer(0.3, store.release, ("wake", leaving.owner_token))
                timer.start()
                assert watch.wait(60) is True  # woken by that one release, not the bound
                timer.join()
            finally:
                watch.close()
            filler = Owner()  # keep the set full for the next round
            assert store.acquire("wake", filler, 600, limit=3).acquired
            holders.append(filler)
        for owner in holders:
            assert store.release("wake", owner.owner_token)
        assert waiter.acquire("wake", Owner(), 60, **extra).acquired
    finally:
        waiter.close()


def test_a_release_wakes_the_queue_head_and_a_taker_wakes_the_next(store: MongoDb, url: str) -> None:
    """Two holds free while two wait: the head is woken, and the head's taking wakes the next place."""
    if not _is_replica_set(store):
        pytest.skip("change streams need a replica set")
    owners = [Owner() for _ in range(2)]
    for owner in owners:
        assert store.acquire("chain", owner, 600, limit=2).acquired
    first, second = Owner(), Owner()
    # Another client (other options): its hub hears only the change stream, not this process's writes.
    waiter = MongoDb(url, database=RUN_DATABASE, collection=store.collection_name, appname="chain")
    head, after = waiter.watch("chain", first.owner_token), waiter.watch("chain", second.owner_token)
    try:
        assert head.wait(60) and after.wait(60)  # the wake-up every (re)subscription gives
        for owner in (first, second):
            assert not waiter.acquire("chain", owner, 60, queue_for=30, limit=2).acquired
        assert store.release("chain", owners[0].owner_token)
        assert head.wait(60) is True
        assert after.wait(0) is False  # the release named the head only
        assert store.release("chain", owners[1].owner_token)
        assert head.wait(60) is True  # the head still heads the queue
        assert store.acquire("chain", first, 60, queue_for=30, limit=2).acquired
        assert after.wait(60) is True  # a hold is still free: the taker woke the next place
        assert waiter.acquire("chain", second, 60, queue_for=30, limit=2).acquired
    finally:
        head.close()
        after.close()
        waiter.close()


def test_in_process_release_wakes_a_waiter(store: MongoDb) -> None:
    owners = [Owner() for _ in range(2)]
    for owner in owners:
        assert store.acquire("local", owner, 600, limit=2).acquired
    watch = store.watch("local")
    try:
        timer = threading.Timer(0.3, store.release, ("local", owners[1].owner_token))
        timer.start()
        assert watch.wait(60) is True
        timer.join()
    finally:
        watch.close()


# -- racing ----------------------------------------------------------------------------


def _contend(url: str, place: tuple[str, str], log: str, seconds: float, seed: int, barrier: Any,
             errors: Any = None) -> None:  # fmt: skip
    """Take one of 3 holds again and again for ``seconds`` once all racers are ready, logging each hold.

    ``place`` is (database, collection): a spawned child draws its own ``RUN_DATABASE``.
    """
    try:
        store = MongoDb(url, database=place[0], collection=place[1])
        store.get("race")  # connected before the start
        barrier.wait(120)
        _contend_once(store, log, time.monotonic() + seconds, seed)
    except BaseException as error:
        if errors is None:  # a process: its exit code tells
            raise
        errors.append(error)


def _contend_once(store: MongoDb, log: str, until: float, seed: int) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        while time.monotonic() < until:
            owner = Owner()
            if not store.acquire("race", owner, 30, limit=3).acquired:
                time.sleep(0.005 * (seed % 3))
                continue
            os.write(descriptor, f"{time.monotonic_ns()} +1 {owner.owner_token}\n".encode())
            time.sleep(0.05)
            os.write(descriptor, f"{time.monotonic_ns()} -1 {owner.owner_token}\n".encode())
            assert store.release("race", owner.owner_token)
    finally:
        os.close(descriptor)
        store.close()


def _most_at_once(log: Path) -> tuple[int, int]:
    """(most holders at once, holds taken), from the start and end lines (each logged inside its hold)."""
    events = sorted((int(stamp), int(step)) for stamp, step, _ in (line.split() for line in log.read_text().splitlines()))
    held = most = 0
    for _, step in events:  # at one instant an end sorts before a start: never over-counted
        held += step
        most = max(most, held)
    return most, sum(1 for _, step in events if step > 0)


@pytest.mark.parametrize("how", ["processes", "threads"])
def test_racers_never_exceed_three(store: MongoDb, url: str, tmp_path: Path, how: str) -> None:
    log = tmp_path / "holds.log"
    log.touch()
    store.acquire("warm", Owner(), 60)  # the indexes, before the race
    errors: list[BaseException] = []
    place = (store.database_name, store.collection_name)
    if how == "processes":
        context = multiprocessing.get_context("spawn")
        barrier: Any = context.Barrier(8)
        racers: list[Any] = [context.Process(target=_contend, args=(url, place, str(log), 3, seed, barrier)) for seed in range(8)]  # fmt: skip
    else:
        barrier = threading.Barrier(8)
        racers = [threading.Thread(target=_contend, args=(url, place, str(log), 3, seed, barrier, errors)) for seed in range(8)]  # fmt: skip
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(120)
    assert all(not racer.is_alive() for racer in racers)
    assert errors == []
    if how == "processes":
        assert all(racer.exitcode == 0 for racer in racers)
    most, taken = _most_at_once(log)
    assert most == 3, (most, taken)  # never more, and the set was filled
    assert taken > 10
    fences = raw(store).find_one({"_id": "race"})["fence"]
    assert store.holders("race") == [] and fences > 0
