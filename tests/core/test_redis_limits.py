"""The Redis persister's ``limit=N``: up to N holds of a name, called on the store directly.

The core's rules for N > 1 run on every store in the conformance kit; these check the
scripts themselves: what is stored, the holds' own leases, the shared fencing counter,
the queue and the wake-ups. Every test uses a uuid key prefix, so it can share the
server with other runs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from singleton_integrations._record import LockRecord, Owner
from singleton_integrations.persisters.redis import Redis
from tests.servers import redis_server

redis = pytest.importorskip("redis")


@pytest.fixture(scope="module")
def url() -> str:
    return redis_server.url()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def store(url: str, prefix: str) -> Iterator[Redis]:
    persister = Redis(url, key_prefix=prefix)
    yield persister
    persister.close()


@pytest.fixture
def releaser(url: str, prefix: str) -> Iterator[Redis]:
    """The same store through another client: its calls wake ``store``'s waiters through pub/sub only."""
    persister = Redis(url, key_prefix=prefix, client_name="releaser")
    yield persister
    persister.close()


@pytest.fixture
def raw(url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(url, decode_responses=True)
    yield client
    client.close()


def keys_of(prefix: str, name: str) -> tuple[str, str, str, str]:
    """The lock key, the state hash, the holds set and the holders hash of ``name``."""
    lock = f"{prefix}{{{name}}}"
    return lock, f"{lock}:state", f"{lock}:holds", f"{lock}:holders"


def take(store: Redis, name: str, count: int, limit: int, ttl: float | None = 60, **options: Any) -> list[Owner]:
    """``count`` owners, each granted one hold of ``name`` under ``limit``."""
    owners = [Owner(metadata={"n": str(index)}) for index in range(count)]
    for owner in owners:
        result = store.acquire(name, owner, ttl, limit=limit, **options)
        assert result.acquired, owner.metadata
    return owners


def tokens(records: list[LockRecord] | tuple[LockRecord, ...]) -> list[str]:
    return [record.owner_token for record in records]


def limit_scenario(store: Redis, name: str) -> None:
    """N holds granted, the N+1th refused naming all, a release frees one hold for another; on any topology."""
    owners = take(store, name, 3, limit=3)
    refused = store.acquire(name, Owner(), 60, limit=3)
    assert not refused.acquired
    assert tokens(refused.holders) == tokens(store.holders(name)) == [owner.owner_token for owner in owners]
    assert refused.record == refused.holders[0]
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    assert [record.name for record in store.list()] == [name] * 3
    assert store.release(name, owners[1].owner_token)
    later = Owner()
    taken = store.acquire(name, later, 60, limit=3)
    assert taken.acquired and taken.record is not None
    assert taken.record.fencing_token > max(record.fencing_token for record in refused.holders)
    assert tokens(store.holders(name)) == [owners[0].owner_token, owners[2].owner_token, later.owner_token]
    removed = store.force_release(name)
    assert removed is not None and removed.owner_token == owners[0].owner_token
    assert store.holders(name) == [] and store.get(name) is None


# -- holds and refusals ------------------------------------------------------------------


def test_n_holds_are_granted_then_refused_naming_every_holder(store: Redis) -> None:
    limit_scenario(store, "three")


def test_a_hold_stores_its_own_lease_and_the_keys_expire_with_the_last(store: Redis, prefix: str, raw: Any) -> None:
    lock, state, holds, holders = keys_of(prefix, "layout")
    short, long = Owner(metadata={"run": "1"}), Owner(metadata={"run": "2"})
    first = store.acquire("layout", short, 10, limit=2).record
    second = store.acquire("layout", long, 30, limit=2).record
    assert first is not None and second is not None
    assert raw.exists(lock) == 0  # the lock key is N = 1's alone
    assert raw.hget(state, "fence") == str(second.fencing_token)
    assert raw.hget(state, "holder") is None
    ends = dict(raw.zrange(holds, 0, -1, withscores=True))
    assert set(ends) == {short.owner_token, long.owner_token}
    stored = json.loads(raw.hget(holders, long.owner_token))
    assert stored["owner_token"] == long.owner_token and stored["metadata"] == {"run": "2"}
    assert stored["fencing_token"] == second.fencing_token
    assert ends[long.owner_token] == stored["expires_at"] == stored["created_at"] + 30_000
    assert raw.pexpiretime(holds) == raw.pexpiretime(holders) == stored["expires_at"]  # the last hold's end

    assert store.release("layout", long.owner_token)  # the last end goes: the keys follow the first
    assert raw.pexpiretime(holds) == raw.pexpiretime(holders) == json.loads(raw.hget(holders, short.owner_token))["expires_at"]
    assert store.release("layout", short.owner_token)
    assert raw.exists(holds, holders) == 0
    assert 0 < raw.pttl(state) <= store.purge_after_seconds * 1000  # the state is kept as after any release


def test_an_n1_lock_is_stored_as_before(store: Redis, prefix: str, raw: Any) -> None:
    lock, _, holds, holders = keys_of(prefix, "single")
    owner = Owner()
    assert store.acquire("single", owner, 30).acquired
    assert raw.get(lock) == owner.owner_token and raw.exists(holds, holders) == 0
    assert store.holders("single") == [store.get("single")]


def test_a_retried_acquire_gets_its_own_hold_back(store: Redis) -> None:
    owner = Owner()
    first = store.acquire("again", owner, 30, limit=2)
    second = store.acquire("again", owner, 30, limit=2)
    assert second.acquired and second.record is not None and first.record is not None
    assert second.record.fencing_token == first.record.fencing_token
    assert len(store.holders("again")) == 1


def test_fencing_tokens_rise_across_holds_and_single_locks(store: Redis) -> None:
    seen: list[int] = []
    for _ in range(3):
        owners = take(store, "fenced", 3, limit=3)
        seen.extend(record.fencing_token for record in store.holders("fenced"))
        for owner in owners:
            assert store.release("fenced", owner.owner_token)
        single = Owner()
        record = store.acquire("fenced", single, 30).record
        assert record is not None
        seen.append(record.fencing_token)
        assert store.release("fenced", single.owner_token)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_holds_without_expiry_keep_their_keys_and_give_no_retry_time(store: Redis, prefix: str, raw: Any) -> None:
    _, _, holds, holders = keys_of(prefix, "forever")
    owners = take(store, "forever", 2, limit=2, ttl=None)
    assert raw.pttl(holds) == raw.pttl(holders) == -1
    refused = store.acquire("forever", Owner(), 30, limit=2)
    assert not refused.acquired and refused.retry_after is None and len(refused.holders) == 2
    assert all(record.expires_at is None for record in refused.holders)
    renewed = store.renew("forever", owners[0].owner_token, 20)
    assert renewed is not None and renewed.expires_at is not None
    assert raw.pttl(holds) == -1  # the other hold still has no end
    assert store.release("forever", owners[1].owner_token)
    assert 0 < raw.pttl(holds) <= 20_000


# -- mixed N -------------------------------------------------------------------------------


def test_a_single_lock_is_refused_while_any_hold_is_live(store: Redis) -> None:
    owners = take(store, "mixed", 2, limit=3)
    refused = store.acquire("mixed", Owner(), 30)
    assert not refused.acquired
    assert refused.record is not None and refused.record.owner_token == owners[0].owner_token
    assert tokens(refused.holders) == [owner.owner_token for owner in owners]
    assert refused.retry_after is not None and 0 < refused.retry_after <= 60
    for owner in owners:
        assert store.release("mixed", owner.owner_token)
    assert store.acquire("mixed", Owner(), 30).acquired


def test_each_attempt_counts_every_hold_against_its_own_n(store: Redis) -> None:
    single = Owner()
    assert store.acquire("counted", single, 30).acquired  # a single lock is one live hold
    second = Owner()
    assert store.acquire("counted", second, 30, limit=2).acquired
    refused = store.acquire("counted", Owner(), 30, limit=2)
    assert not refused.acquired
    assert tokens(refused.holders) == [single.owner_token, second.owner_token]
    assert store.acquire("counted", Owner(), 30, limit=3).acquired  # a larger N still has room
    assert not store.acquire("counted", Owner(), 30, limit=3).acquired
    assert store.release("counted", single.owner_token)  # the single lock's release leaves the holds
    assert len(store.holders("counted")) == 2
    assert not store.acquire("counted", Owner(), 30).acquired
    assert store.get("counted") is not None


# -- each hold's own lease -----------------------------------------------------------------


def test_release_and_renew_act_on_their_own_hold_only(store: Redis) -> None:
    owners = take(store, "own", 3, limit=3, ttl=30)
    before = {record.owner_token: record for record in store.holders("own")}
    renewed = store.renew("own", owners[1].owner_token, 120)
    assert renewed is not None and renewed.fencing_token == before[owners[1].owner_token].fencing_token
    assert renewed.expires_at is not None and renewed.expires_at > before[owners[1].owner_token].expires_at  # type: ignore[operator]
    after = {record.owner_token: record for record in store.holders("own")}
    assert after[owners[1].owner_token].expires_at == renewed.expires_at
    assert after[owners[0].owner_token] == before[owners[0].owner_token]
    assert store.renew("own", Owner().owner_token, 30) is None
    assert store.release("own", Owner().owner_token) is False
    assert store.release("own", owners[0].owner_token)
    assert store.renew("own", owners[0].owner_token, 30) is None
    assert tokens(store.holders("own")) == [owners[1].owner_token, owners[2].owner_token]


def test_an_expired_hold_is_taken_over_and_the_others_stay(store: Redis) -> None:
    short = Owner(metadata={"who": "short"})
    assert store.acquire("lapse", short, 0.3, limit=2).acquired
    long = Owner()
    assert store.acquire("lapse", long, 60, limit=2).acquired
    wait_for(lambda: len(store.holders("lapse")) == 1)
    assert store.renew("lapse", short.owner_token, 30) is None  # an expired hold is never renewed
    assert store.release("lapse", short.owner_token) is False
    again = store.acquire("lapse", Owner(), 60, limit=2)
    assert again.acquired
    assert tokens(store.holders("lapse"))[0] == long.owner_token
    assert store.renew("lapse", long.owner_token, 60) is not None


def test_an_expired_hold_is_named_by_the_acquire_that_replaces_it(store: Redis) -> None:
    assert store.acquire("named", Owner(metadata={"who": "crashed"}), 0.2, limit=2).acquired
    assert store.acquire("named", Owner(), 60, limit=2).acquired
    wait_for(lambda: len(store.holders("named")) == 1)
    after = store.acquire("named", Owner(), 60, limit=2)
    assert after.acquired and after.expired is not None and after.expired.metadata == {"who": "crashed"}


def test_each_hold_serves_its_own_minimum_hold(store: Redis, prefix: str, raw: Any) -> None:
    held, other = Owner(), Owner()
    taken = store.acquire("minimum", held, 30, min_hold=5, limit=2).record
    assert taken is not None and taken.hold_until is not None
    assert store.acquire("minimum", other, 30, limit=2).acquired
    pubsub = raw.pubsub()
    pubsub.subscribe(f"{prefix}{{minimum}}:released")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    try:
        assert store.release("minimum", held.owner_token) is True
        records = store.holders("minimum")
        assert len(records) == 2  # the released hold still counts until its hold ends
        released = next(record for record in records if record.released)
        assert released.owner_token == held.owner_token and released.fencing_token == taken.fencing_token
        assert released.expires_at == released.hold_until == taken.hold_until
        assert store.renew("minimum", held.owner_token, 30) is None
        refused = store.acquire("minimum", Owner(), 30, limit=2)
        assert not refused.acquired and refused.retry_after is not None and 0 < refused.retry_after <= 5
        assert pubsub.get_message(timeout=0.3) is None  # no hold freed: nobody is woken
        assert store.release("minimum", other.owner_token)
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["type"] == "message"
    finally:
        pubsub.close()


def test_a_short_minimum_hold_ends_and_frees_its_hold(store: Redis) -> None:
    owner = Owner()
    assert store.acquire("brief", owner, 30, min_hold=0.3, limit=2).acquired
    assert store.release("brief", owner.owner_token)
    assert len(store.holders("brief")) == 1
    wait_for(lambda: store.holders("brief") == [])
    assert store.acquire("brief", Owner(), 30).acquired


def test_a_crashed_holders_hold_lasts_until_its_minimum_hold(store: Redis) -> None:
    taken = store.acquire("crash", Owner(), 0.2, min_hold=1.5, limit=2).record
    assert taken is not None and taken.expires_at == taken.hold_until  # the lease is stretched to the hold


# -- list, holders, force_release ----------------------------------------------------------


def test_list_shows_every_hold_by_name_and_fencing_token(store: Redis) -> None:
    take(store, "b-limited", 3, limit=3)
    assert store.acquire("a-single", Owner(), 30).acquired
    assert store.acquire("c-single", Owner(), 30).acquired
    take(store, "c-single", 1, limit=2)  # a single lock and a hold on one name
    listed = store.list()
    assert [record.name for record in listed] == ["a-single"] + ["b-limited"] * 3 + ["c-single"] * 2
    for name in ("b-limited", "c-single"):
        mine = [record.fencing_token for record in listed if record.name == name]
        assert mine == sorted(mine)
    assert [record.name for record in store.list("b-")] == ["b-limited"] * 3
    assert store.list("d") == []


def test_get_prefers_the_lowest_fencing_token(store: Redis) -> None:
    owners = take(store, "lowest", 3, limit=3)
    first = store.get("lowest")
    assert first is not None and first.owner_token == owners[0].owner_token
    assert store.release("lowest", owners[0].owner_token)
    second = store.get("lowest")
    assert second is not None and second.owner_token == owners[1].owner_token


def test_force_release_removes_every_hold_and_wakes_waiters(store: Redis, releaser: Redis) -> None:
    single = Owner()
    assert store.acquire("forced", single, 30).acquired
    take(store, "forced", 2, limit=3)
    watch = subscribed(store, "forced")
    try:
        removed = releaser.force_release("forced")
        assert removed is not None and removed.owner_token == single.owner_token
        assert watch.wait(15)
    finally:
        watch.close()
    assert store.holders("forced") == [] and store.force_release("forced") is None
    assert store.acquire("forced", Owner(), 30).acquired


# -- the queue and wake-ups ----------------------------------------------------------------


def test_queued_waiters_take_free_holds_in_queue_order(store: Redis) -> None:
    holders = take(store, "fair", 3, limit=3)
    waiters = [Owner() for _ in range(3)]
    for waiter in waiters:  # each keeps a place
        assert not store.acquire("fair", waiter, 30, queue_for=30, limit=3).acquired
    assert store.release("fair", holders[0].owner_token)
    assert store.release("fair", holders[1].owner_token)  # two holds free: the first two places
    third = store.acquire("fair", waiters[2], 30, queue_for=30, limit=3)
    assert not third.acquired and third.queued_behind
    assert store.acquire("fair", waiters[1], 30, queue_for=30, limit=3).acquired
    assert not store.acquire("fair", waiters[2], 30, queue_for=30, limit=3).acquired  # still behind the first
    assert store.acquire("fair", Owner(), 30, limit=3).acquired  # a caller that does not wait is not queued
    assert not store.acquire("fair", waiters[0], 30, queue_for=30, limit=3).acquired  # all held again
    assert store.release("fair", holders[2].owner_token)
    assert store.acquire("fair", waiters[0], 30, queue_for=30, limit=3).acquired
    store.leave_queue("fair", waiters[2].owner_token)


def test_any_release_wakes_an_unqueued_watch(store: Redis, releaser: Redis) -> None:
    owners = take(store, "woken", 2, limit=2)
    watch = subscribed(store, "woken")
    try:
        assert releaser.release("woken", owners[1].owner_token)
        assert watch.wait(15)
    finally:
        watch.close()


def test_a_release_wakes_the_queue_head_and_a_taker_wakes_the_next(store: Redis, releaser: Redis) -> None:
    """Two holds free while two wait: the head's process is woken, and the head's taking wakes the next."""
    owners = take(releaser, "chain", 2, limit=2)
    first, second = Owner(), Owner()
    head = subscribed(store, "chain", first.owner_token)
    after = store.watch("chain", second.owner_token)
    try:
        # Queued with this process's wake channel, as a waiting lock is once it watches.
        assert not store.acquire("chain", first, 30, queue_for=30, limit=2).acquired
        assert not store.acquire("chain", second, 30, queue_for=30, limit=2).acquired
        assert releaser.release("chain", owners[0].owner_token)
        assert releaser.release("chain", owners[1].owner_token)
        assert head.wait(15)
        assert after.wait(0.2) is False  # the releases named the head only
        assert releaser.acquire("chain", first, 30, queue_for=30, limit=2).acquired
        assert after.wait(15)  # a hold is still free: the taker woke the next place
        assert store.acquire("chain", second, 30, queue_for=30, limit=2).acquired
    finally:
        head.close()
        after.close()


def test_async_primitives_keep_holds(store: Redis) -> None:
    async def scenario() -> None:
        owners = [Owner(), Owner()]
        for owner in owners:
            assert (await store.aacquire("async", owner, 30, limit=2)).acquired
        refused = await store.aacquire("async", Owner(), 30, limit=2)
        assert not refused.acquired and tokens(refused.holders) == tokens(await store.aholders("async"))
        assert await store.arenew("async", owners[0].owner_token, 60) is not None
        assert await store.arelease("async", owners[1].owner_token)
        assert tokens(await store.aholders("async")) == [owners[0].owner_token]
        assert [record.name for record in await store.alist()] == ["async"]
        removed = await store.aforce_release("async")
        assert removed is not None and removed.owner_token == owners[0].owner_token
        await store.aclose()

    asyncio.run(scenario())


def test_a_hold_too_few_replicas_confirmed_is_given_back(store: Redis, url: str, prefix: str) -> None:
    strict = Redis(url, key_prefix=prefix, wait_replicas=1, wait_timeout_ms=50)  # this server has no replicas
    try:
        kept = take(store, "replicated", 1, limit=2)
        with pytest.raises(Exception, match="replicas confirmed"):
            strict.acquire("replicated", Owner(), 30, limit=2)
        assert tokens(store.holders("replicated")) == [kept[0].owner_token]
    finally:
        strict.close()


def test_retention_purges_the_state_once_the_last_hold_goes(url: str, prefix: str, raw: Any) -> None:
    brief = Redis(url, key_prefix=prefix, purge_after_seconds=0.5)
    try:
        _, state, holds, _ = keys_of(prefix, "purged")
        owners = take(brief, "purged", 2, limit=2)
        assert brief.release("purged", owners[0].owner_token)
        assert raw.pttl(state) > 50_000  # a hold is live: the state outlives it
        assert brief.release("purged", owners[1].owner_token)
        assert raw.exists(holds) == 0
        wait_for(lambda: raw.exists(state) == 0)
    finally:
        brief.close()


# -- helpers shared with test_redis ----------------------------------------------------------


def wait_for(check: Any, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def subscribed(store: Redis, name: str, owner_token: str | None = None) -> Any:
    """A watch whose shared listener is subscribed (see ``test_redis.subscribed``)."""
    first = store._hub() is None
    watch = store.watch(name, owner_token)
    hub = store._hub()
    assert hub is not None
    if first:
        assert watch.wait(15), "the listener subscribed and woke the watch registered before it"
    assert hub.subscribed.is_set() and not watch.pending
    return watch
