"""The Redis persister's common path and where it hands over to the full scripts.

An acquire that asks for no place in the queue and no ``limit`` goes through the
small ``acquire_free`` script, which hands over (having written nothing) to the full
one when holds under ``limit`` may be live or the token holds the name already. The
release script runs its common case inline and defines its functions only in the
branches that need them. The sync calls keep their connections between calls. These
tests check each hand-over and each branch by what a caller sees and what the store
keeps, never by time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest

from singleton_integrations._record import Owner
from singleton_integrations.persisters._redis_clients import PoolExhausted, _Slots
from singleton_integrations.persisters._redis_scripts import ACQUIRE_SCRIPT, script_keys
from singleton_integrations.persisters.redis import Redis
from tests.core import test_redis_limits
from tests.core.test_redis_limits import subscribed

redis = pytest.importorskip("redis")


# Shared fixtures (``releaser``: the same store through another client).
url, prefix, store, raw, releaser = (
    test_redis_limits.url, test_redis_limits.prefix, test_redis_limits.store, test_redis_limits.raw,
    test_redis_limits.releaser,
)


def wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- acquire: the small script and its hand-overs ---------------------------------------


def test_a_free_name_is_taken_with_the_documented_layout(store: Redis, prefix: str, raw: Any) -> None:
    owner = Owner(metadata={"job": "x"})
    result = store.acquire("free", owner, 30)
    assert result.acquired and result.record is not None and result.expired is None
    lock = f"{prefix}{{free}}"
    assert raw.get(lock) == owner.owner_token
    assert 0 < raw.pttl(lock) <= 30_000
    holder = json.loads(raw.hget(f"{lock}:state", "holder"))
    assert holder["owner_token"] == owner.owner_token and holder["metadata"] == {"job": "x"}
    assert holder["fencing_token"] == result.record.fencing_token == int(raw.hget(f"{lock}:state", "fence"))
    assert store.get("free") == result.record


def test_a_plain_acquire_is_refused_while_a_hold_under_limit_is_live(store: Redis, releaser: Redis) -> None:
    """The holds key exists: the small script hands over, and the full one names the live hold."""
    holder = Owner()
    assert releaser.acquire("limited", holder, 30, limit=2).acquired
    refused = store.acquire("limited", Owner(), 30)
    assert not refused.acquired
    assert [record.owner_token for record in refused.holders] == [holder.owner_token]
    assert releaser.release("limited", holder.owner_token)
    assert store.acquire("limited", Owner(), 30).acquired


def test_a_holds_key_with_no_live_hold_does_not_block_a_plain_acquire(store: Redis, prefix: str, raw: Any) -> None:
    """A holds key whose every hold ended (here, one that ended at the epoch) goes to the full script, which takes the name."""
    raw.zadd(f"{prefix}{{ended}}:holds", {"gone": 1})
    owner = Owner()
    assert store.acquire("ended", owner, 30).acquired
    assert raw.get(f"{prefix}{{ended}}") == owner.owner_token


def test_a_conflict_names_the_holder_and_its_remaining_lease(store: Redis, releaser: Redis) -> None:
    holder = Owner(metadata={"who": "first"})
    assert releaser.acquire("held", holder, 30).acquired
    refused = store.acquire("held", Owner(), 30)
    assert not refused.acquired and refused.record is not None
    assert refused.record.owner_token == holder.owner_token and refused.record.metadata == {"who": "first"}
    assert refused.retry_after is not None and 0 < refused.retry_after <= 30


def test_an_expired_holder_is_named_by_the_acquire_that_replaces_it(store: Redis, prefix: str, raw: Any) -> None:
    gone = Owner()
    assert store.acquire("lapsed", gone, 30).acquired
    raw.delete(f"{prefix}{{lapsed}}")  # the lease ran out; the holder JSON stays behind
    result = store.acquire("lapsed", Owner(), 30)
    assert result.acquired and result.expired is not None and result.expired.owner_token == gone.owner_token


def test_a_lock_without_expiry_and_its_state_keep_no_ttl(store: Redis, prefix: str, raw: Any) -> None:
    owner = Owner()
    assert store.acquire("forever", owner, None).acquired
    assert raw.pttl(f"{prefix}{{forever}}") == -1 and raw.pttl(f"{prefix}{{forever}}:state") == -1
    assert store.release("forever", owner.owner_token)
    assert raw.pttl(f"{prefix}{{forever}}:state") > 0  # the free name's state is purged later


# -- release: the inline case and its branches -------------------------------------------


def test_a_release_frees_the_name_and_sets_the_state_to_expire(store: Redis, prefix: str, raw: Any) -> None:
    owner = Owner()
    assert store.acquire("plain", owner, 30).acquired
    assert store.release("plain", owner.owner_token)
    lock = f"{prefix}{{plain}}"
    assert raw.exists(lock) == 0
    assert raw.hget(f"{lock}:state", "holder") is None
    assert raw.pttl(f"{lock}:state") > 30_000
    assert store.release("plain", owner.owner_token)  # a retried release is still clean
    assert not store.release("plain", Owner().owner_token)


def test_a_release_wakes_the_queued_head_through_the_queue_branch(store: Redis, releaser: Redis) -> None:
    holder, head, later = Owner(), Owner(), Owner()
    assert releaser.acquire("queued", holder, 30).acquired
    watch = subscribed(store, "queued", head.owner_token)
    try:
        assert not store.acquire("queued", head, 30, queue_for=30).acquired  # queued, with this process's wake channel
        assert releaser.release("queued", holder.owner_token)
        assert watch.wait(15)  # the release told the head's process
        refused = releaser.acquire("queued", later, 30, queue_for=30)
        assert not refused.acquired and refused.queued_behind  # the name is kept for the head
        assert store.acquire("queued", head, 30, queue_for=30).acquired
    finally:
        watch.close()


def test_an_unqueued_watch_hears_the_inline_release(store: Redis, releaser: Redis) -> None:
    holder = Owner()
    assert releaser.acquire("heard", holder, 30).acquired
    watch = subscribed(store, "heard")
    try:
        assert releaser.release("heard", holder.owner_token)
        assert watch.wait(15)
    finally:
        watch.close()


def test_a_minimum_hold_that_has_ended_releases_as_usual(store: Redis, prefix: str, raw: Any) -> None:
    owner = Owner()
    taken = store.acquire("short-hold", owner, 30, min_hold=0.05)
    assert taken.acquired and taken.record is not None and taken.record.hold_until is not None
    hold_ends_ms = taken.record.hold_until.timestamp() * 1000
    wait_for(lambda: _server_ms(raw) > hold_ends_ms)  # the lease (30 s) still runs
    assert raw.get(f"{prefix}{{short-hold}}") == owner.owner_token
    assert store.release("short-hold", owner.owner_token)
    assert raw.exists(f"{prefix}{{short-hold}}") == 0
    assert store.acquire("short-hold", Owner(), 30).acquired


def test_a_metadata_key_named_hold_until_is_not_a_minimum_hold(store: Redis, prefix: str, raw: Any) -> None:
    owner = Owner(metadata={"hold_until": "tomorrow"})
    assert store.acquire("named", owner, 30).acquired
    assert store.release("named", owner.owner_token)
    assert raw.exists(f"{prefix}{{named}}") == 0
    assert store.acquire("named", Owner(), 30).acquired


def _server_ms(raw: Any) -> float:
    seconds, micros = raw.time()
    return seconds * 1000 + micros / 1000


# -- connections kept between calls ------------------------------------------------------


def test_kept_connections_leave_the_pool_usable_for_other_commands(url: str, prefix: str, raw: Any) -> None:
    """With one connection, a listing (redis-py's own commands) and script calls take turns on it."""
    client_name = f"kept-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name, max_connections=1)
    try:
        for round_ in range(3):
            owner = Owner()
            assert store.acquire(f"kept-{round_}", owner, 30).acquired
            assert [record.owner_token for record in store.list()] == [owner.owner_token]
            assert store.release(f"kept-{round_}", owner.owner_token)
            assert store.list() == []
        assert len([c for c in raw.client_list() if c.get("name") == client_name]) == 1
    finally:
        store.close()
    wait_for(lambda: not [c for c in raw.client_list() if c.get("name") == client_name])


def test_every_kept_connection_the_server_closed_is_replaced(url: str, prefix: str, raw: Any) -> None:
    """Two kept connections both killed: the next calls reconnect instead of failing on the second."""
    client_name = f"killed-{uuid.uuid4().hex[:12]}"
    store = Redis(url, key_prefix=prefix, client_name=client_name, max_connections=2)
    shared = store._shared()
    pool = shared.sync_client().connection_pool
    try:
        first, second = (shared.idle_connection(pool, ()) for _ in range(2))
        shared.keep(first)
        shared.keep(second)
        assert store.get("warm") is None and store.get("warm") is None
        for connection in [c for c in raw.client_list() if c.get("name") == client_name]:
            raw.client_kill_filter(_id=connection["id"])
        for index in range(3):
            owner = Owner()
            assert store.acquire(f"after-{index}", owner, 30).acquired
            assert store.release(f"after-{index}", owner.owner_token)
    finally:
        store.close()


# -- a rolling upgrade: clients that send the full acquire script ------------------------


def _full_acquire(raw: Any, prefix: str, name: str, owner: Owner) -> Any:
    """ACQUIRE_SCRIPT as an older client of this library sends it (the layout is unchanged, so it still is)."""
    members = f'"owner_token":"{owner.owner_token}","host":"{owner.host}","pid":{owner.pid},"metadata":{{}}'
    return raw.eval(ACQUIRE_SCRIPT, 6, *script_keys(f"{prefix}{{{name}}}"), owner.owner_token, 30_000, members, 0,
                    86_400_000, 0, "")


def test_the_small_script_and_the_full_one_exclude_each_other(store: Redis, prefix: str, raw: Any) -> None:
    ours, older = Owner(), Owner()
    assert store.acquire("upgrade", ours, 30).acquired
    conflict = _full_acquire(raw, prefix, "upgrade", older)
    assert conflict[0] == 0 and conflict[1] == ours.owner_token
    assert store.release("upgrade", ours.owner_token)
    taken = _full_acquire(raw, prefix, "upgrade", older)
    assert isinstance(taken, str)  # "FENCE CREATED_MS": a free name, with no expired holder to report
    refused = store.acquire("upgrade", Owner(), 30)
    assert not refused.acquired and refused.record is not None and refused.record.owner_token == older.owner_token
    assert int(taken.split()[0]) == refused.record.fencing_token
    assert store.release("upgrade", older.owner_token)  # the newer release frees a lock the full script took
    after = store.acquire("upgrade", Owner(), 30)
    assert after.acquired and after.expired is None and after.record is not None
    assert after.record.fencing_token > refused.record.fencing_token


# -- the connection slots ----------------------------------------------------------------


def test_slots_bound_the_calls_at_once_and_every_waiter_gets_one() -> None:
    """Sixteen threads, 200 turns each, through three slots: never more than three inside, nobody left out."""
    slots = _Slots(3)
    guard = threading.Lock()
    inside, most, failures = [0], [0], []

    def turns() -> None:
        try:
            for _ in range(200):
                slots.acquire(60)
                try:
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0)
                    with guard:
                        inside[0] -= 1
                finally:
                    slots.release()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=turns) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures and not any(thread.is_alive() for thread in threads)
    assert most[0] <= 3
    for _ in range(3):  # all three are free again
        slots.acquire(0)
    with pytest.raises(PoolExhausted, match="no free connection"):
        slots.acquire(0.01)
