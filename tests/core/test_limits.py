"""``limit=N`` in the core, whatever the store: its validation, a store that cannot keep it, the conflict's
message and pickling, adopting one hold among several, and the admin release of one hold.

The rules every store keeps under ``limit=N`` are the conformance kit's (``Limits`` and its combinations).
"""

from __future__ import annotations

import asyncio
import pickle
import uuid
from typing import Any

import pytest

from singleton_integrations import AsyncLease, AsyncSingleton, Lease, LockConflict, Singleton, admin, persisters
from singleton_integrations.admin import NotHeld, TokenChanged
from singleton_integrations.persisters import Persister
from singleton_integrations.testing.conformance import CountingPersister

N = 3
FACES = (Singleton, AsyncSingleton, Lease, AsyncLease)


@pytest.fixture
def store() -> Persister:
    return persisters.Memory()


@pytest.fixture
def name() -> str:
    return f"core-limit-{uuid.uuid4().hex}"


def held(name: str, store: Persister, count: int = N, **options: Any) -> list[Singleton]:
    """``count`` locks with ``limit=N`` that each took a hold of ``name``."""
    locks = [Singleton(name, store, limit=N, release_on_sigterm=False, **options) for _ in range(count)]
    assert all(lock.lock() for lock in locks)
    return locks


@pytest.mark.parametrize("face", FACES, ids=lambda face: face.__name__)
@pytest.mark.parametrize(("limit", "error", "says"), [
    (0, ValueError, "limit must be from 1 to 1000, not 0"),
    (-1, ValueError, "limit must be from 1 to 1000, not -1"),
    (1001, ValueError, "limit must be from 1 to 1000, not 1001"),
    (True, TypeError, "limit must be an int, not bool"),
    ("3", TypeError, "limit must be an int, not str"),
    (3.0, TypeError, "limit must be an int, not float"),
    (None, TypeError, "limit must be an int, not NoneType"),
])
def test_a_limit_out_of_range_or_not_an_int_is_refused(face: type, limit: object, error: type[Exception],
                                                       says: str, store: Persister) -> None:
    with pytest.raises(error) as caught:
        face("job", store, limit=limit)
    assert str(caught.value) == says


@pytest.mark.parametrize("face", FACES, ids=lambda face: face.__name__)
def test_the_limits_range_ends_included(face: type, store: Persister) -> None:
    assert face("job", store).limit == 1
    assert face("job", store, limit=1).limit == 1
    assert face("job", store, limit=1000).limit == 1000


@pytest.mark.parametrize("face", FACES, ids=lambda face: face.__name__)
def test_a_store_without_limits_refuses_a_limit_before_any_call(face: type, store: Persister) -> None:
    lacking = CountingPersister(store, limits=False)
    with pytest.raises(ValueError) as caught:
        face("job", lacking, limit=2)
    assert str(caught.value) == ("limit=2 needs a persister that keeps several holds of a name; "
                                 "CountingPersister (memory) does not (limits is False)")
    assert lacking.acquires == 0 and store.holders("job") == []
    single = Singleton("job", lacking, limit=1, release_on_sigterm=False)
    assert single.lock() and single.release(), "limit=1 is today's lock on every store"


def test_the_conflict_names_every_holder_and_says_how_many(store: Persister, name: str) -> None:
    holds = [Singleton(name, store, limit=N, metadata={"slot": str(index)}, release_on_sigterm=False)
             for index in range(N)]
    assert all(hold.lock() for hold in holds)
    with pytest.raises(LockConflict) as caught, Singleton(name, store, limit=N):
        pytest.fail("entered a lock whose holds were all taken")
    conflict = caught.value
    records = store.holders(name)
    assert conflict.limit == N and conflict.holders == tuple(records)
    assert conflict.holder is not None and conflict.holder.fencing_token == records[0].fencing_token
    assert str(conflict) == f"lock {name!r} is at its limit, 3 of 3 held: " + "; ".join(
        record.describe() for record in records)
    assert all(f"slot={index}" in str(conflict) for index in range(N))
    assert all(record.owner_token not in str(conflict) for record in records), "an owner token in a message"


def test_a_limit_conflict_survives_pickling(store: Persister, name: str) -> None:
    holds = held(name, store)
    with pytest.raises(LockConflict) as caught, Singleton(name, store, limit=N):
        pytest.fail("entered a lock whose holds were all taken")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is LockConflict
    assert (copy.name, copy.limit, str(copy)) == (name, N, str(caught.value))
    assert [record.fencing_token for record in copy.holders] == [hold.fencing_token for hold in holds]
    assert copy.holder is not None and copy.holder.fencing_token == holds[0].fencing_token


def test_an_async_conflict_names_every_holder(store: Persister, name: str) -> None:
    holds = held(name, store)

    async def refused() -> LockConflict:
        with pytest.raises(LockConflict) as caught:
            async with AsyncSingleton(name, store, limit=N):
                pytest.fail("entered a lock whose holds were all taken")
        return caught.value

    conflict = asyncio.run(refused())
    assert "3 of 3 held" in str(conflict)
    assert [record.fencing_token for record in conflict.holders] == [hold.fencing_token for hold in holds]


def test_lease_adopt_finds_its_hold_among_several(store: Persister, name: str) -> None:
    holds = held(name, store)
    tokens = [hold.fencing_token for hold in holds]
    for hold in holds:
        adopted = Lease.adopt(name, store, fencing_token=hold.fencing_token, lock_expire_seconds=30)
        assert adopted is not None and adopted.owner_token == hold.record.owner_token
    last = holds[2]
    adopted = Lease.adopt(name, store, fencing_token=last.fencing_token, lock_expire_seconds=30)
    assert adopted is not None
    assert adopted.release() is True
    assert last.verify() is False and holds[0].verify() is True and holds[1].verify() is True
    assert Lease.adopt(name, store, fencing_token=tokens[2]) is None
    assert Lease.adopt(name, store, fencing_token=tokens[2] + 1) is None


def test_an_adopted_later_hold_verifies(store: Persister, name: str) -> None:
    holds = held(name, store)
    adopted = Lease.adopt(name, store, fencing_token=holds[2].fencing_token, lock_expire_seconds=30)
    assert adopted is not None
    assert adopted.verify() is True


def test_async_lease_adopt_finds_its_hold_among_several(store: Persister, name: str) -> None:
    holds = held(name, store)

    async def adopt_and_release() -> bool:
        adopted = await AsyncLease.adopt(name, store, fencing_token=holds[1].fencing_token, lock_expire_seconds=30)
        assert adopted is not None and adopted.owner_token == holds[1].record.owner_token
        return await adopted.release()

    assert asyncio.run(adopt_and_release()) is True
    assert [hold.verify() for hold in holds] == [True, False, True]


def test_admin_force_release_frees_only_the_hold_with_that_token(store: Persister, name: str) -> None:
    holds = held(name, store, metadata={"run": "r-1"})
    tokens = [hold.fencing_token for hold in holds]
    middle = holds[1]
    released = admin.force_release(store, name, tokens[1], reason="stuck")
    assert released.fencing_token == tokens[1] and released.metadata == {"run": "r-1"}
    assert [record.fencing_token for record in store.holders(name)] == [tokens[0], tokens[2]]
    assert middle.verify() is False and middle.lost
    assert holds[0].verify() is True and holds[2].verify() is True
    with pytest.raises((NotHeld, TokenChanged)):
        admin.force_release(store, name, tokens[1])
    assert len(store.holders(name)) == N - 1, "a second release by a spent token freed another hold"
    newcomer = Singleton(name, store, limit=N, release_on_sigterm=False)
    assert newcomer.lock() is True
    assert Singleton(name, store, limit=N).lock() is False


def test_admin_aforce_release_frees_only_the_hold_with_that_token(store: Persister, name: str) -> None:
    holds = held(name, store)
    released = asyncio.run(admin.aforce_release(store, name, holds[2].fencing_token))
    assert released.fencing_token == holds[2].fencing_token
    assert [hold.verify() for hold in holds] == [True, True, False]


def test_waiting_for_room_ends_once_fewer_than_n_holds_are_live(store: Persister, name: str) -> None:
    locks = held(name, store)
    watcher = Lease(name, store, limit=N)
    seen = watcher.wait_for_room(wait=0.05)
    assert [hold.fencing_token for hold in seen] == [lock.fencing_token for lock in locks], "full: every hold"
    assert watcher.wait_until_free(wait=0.05) == seen[0]
    release = asyncio.get_event_loop_policy().new_event_loop()
    try:
        release.call_later(0.1, locks[1].release)  # a hold in the middle: any release makes room
        assert release.run_until_complete(AsyncLease(name, store, limit=N).wait_for_room(wait=30)) == []
    finally:
        release.close()
    assert Lease(name, store, limit=N).wait_until_free(wait=0) is None, "room now, though two holds are live"
    assert Lease(name, store).wait_for_room(wait=0) == store.holders(name), "limit=1: room only once none is live"
