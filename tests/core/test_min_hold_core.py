"""Issue 11, the core part: ``min_hold_seconds`` on Singleton and AsyncSingleton, on every persister.

The name stays held until acquisition + S even after a release (the slot already
ran); a crashed holder frees it at the later of its lease end and the hold.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from typing import ClassVar

import pytest

from singleton_integrations import AsyncSingleton, LockConflict, Singleton, persisters
from singleton_integrations.persisters import Persister

HOLD = 1.5


@pytest.fixture
def persister(store_url: str) -> Iterator[Persister]:
    store = persisters.from_url(store_url)
    assert store.supports_min_hold, f"{store.backend} must keep a minimum hold (issue 11)"
    yield store
    store.close()


@pytest.fixture
def name() -> str:
    return f"core-hold-{uuid.uuid4().hex}"


def make(name: str, persister: Persister, **options: object) -> Singleton:
    options.setdefault("lock_expire_seconds", 30)
    options.setdefault("release_on_sigterm", False)
    return Singleton(name, persister, **options)  # type: ignore[arg-type]


def wait_until_free(persister: Persister, name: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while persister.get(name) is not None:
        assert time.monotonic() < deadline, "the minimum hold never ended"
        time.sleep(0.05)


class _NoHold(persisters.Memory):
    supports_min_hold: ClassVar[bool] = False


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
)
def test_bad_min_hold_is_refused_before_any_io(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="min_hold_seconds"):
        Singleton("job", persisters.Memory(), min_hold_seconds=bad)  # type: ignore[arg-type]
    with pytest.raises(error, match="min_hold_seconds"):
        AsyncSingleton("job", persisters.Memory(), min_hold_seconds=bad)  # type: ignore[arg-type]


def test_a_persister_without_minimum_hold_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"_NoHold \(memory\) does not \(supports_min_hold is False\)"):
        Singleton("job", _NoHold(), min_hold_seconds=60)
    assert Singleton("job", _NoHold()).min_hold_seconds is None  # without a hold it works as before


def test_release_inside_the_hold_keeps_the_slot_taken(persister: Persister, name: str) -> None:
    first, second = make(name, persister, min_hold_seconds=HOLD), make(name, persister, min_hold_seconds=HOLD)
    expired: list[str] = []
    second.on("expired", expired.append)
    released: list[str] = []
    first.on("released", released.append)
    assert first.lock()
    token = first.fencing_token
    assert first.release() is True and not first.held and not first.lost
    assert "stays held until" in released[0] and "minimum hold" in released[0]
    # During the hold: refused, with a message that says the slot already ran.
    assert not second.lock()
    with pytest.raises(LockConflict) as caught, second:
        pass
    message = str(caught.value)
    assert "already ran its slot" in message and "ran at" in message and "held until" in message
    assert first.record is None and second.exists()
    record = second.holder()
    assert record is not None and record.released and record.hold_until is not None
    assert record.fencing_token == token and record.released_at is not None
    assert first.release() is False  # the released token cannot release the hold early
    wait_until_free(persister, name)
    assert second.lock() and second.fencing_token > token  # type: ignore[operator]
    assert expired == [], "the end of a minimum hold is not an expired takeover"
    assert second.release()


def test_release_after_the_hold_frees_at_once(persister: Persister, name: str) -> None:
    first, second = make(name, persister, min_hold_seconds=0.2), make(name, persister)
    assert first.lock()
    time.sleep(0.5)
    assert first.release() is True
    assert second.lock() and second.release()


def test_a_lease_shorter_than_the_hold_still_holds_until_the_hold_ends(persister: Persister, name: str) -> None:
    crashed = make(name, persister, lock_expire_seconds=0.5, min_hold_seconds=HOLD + 1)
    contender = make(name, persister, lock_expire_seconds=30)
    assert crashed.lock()
    time.sleep(1.0)  # past the lease: a crashed holder, but inside its hold
    assert not contender.lock() and contender.last_holder is not None
    assert crashed.held, "the store keeps the name until hold_until, so the hold is still ours"
    wait_until_free(persister, name)
    assert contender.lock() and contender.release()


def test_min_hold_on_async_singleton(persister: Persister, name: str) -> None:
    async def main() -> None:
        first = AsyncSingleton(name, persister, lock_expire_seconds=30, min_hold_seconds=HOLD, release_on_sigterm=False)
        second = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        async with first:
            pass
        assert not first.held and not await second.lock()
        holder = await second.holder()
        assert holder is not None and holder.released
        # A waiter is woken (or polls) when the hold ends: the store's retry_after bounds its pause.
        assert await second.lock(wait=15) and await second.release()

    asyncio.run(main())
