"""The detached lease (``Lease`` / ``AsyncLease``) on every persister, against real servers.

A lease belongs to its owner token, not to the object or process that took it:
another object or process renews, checks and releases it, and nothing releases it
at exit. Taking one waits through the same loop as ``Singleton.lock(wait=)``.

"Woken, not polled" is shown without timing the hand-over: the safety poll and
the persister's ``poll_interval`` are set far beyond the test's bounds, so only a
release's wake-up can bring a waiter in before them, and the waiter's release
watch records that its last wait was woken.
"""

from __future__ import annotations

import asyncio
import doctest
import json
import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import singleton_integrations
from singleton_integrations import (
    DEFAULT_LOCK_EXPIRE_SECONDS,
    AcquireResult,
    AsyncLease,
    AsyncSingleton,
    Lease,
    LockRecord,
    Owner,
    Singleton,
    _lease,
    _lockstate,
    _singleton,
    persisters,
)
from singleton_integrations.persisters import Persister
from singleton_integrations.testing.conformance import CountingPersister
from singleton_integrations.testing.observing import ObservedPersister

#: Far beyond every bound below: a waiter that gets in before this was woken, not polled.
NEVER = 1000.0
#: How long a woken waiter may take, under any load, to hold the name: far below ``NEVER``.
WOKEN_BY = 60.0
#: A waiter's own wait: long enough that its deadline is not what ends it either.
WAIT = 300.0
TTL = 600.0  # a holder's lease: its end must not be what lets a waiter in


@pytest.fixture
def persister(store_url: str) -> Iterator[Persister]:
    store = persisters.from_url(store_url)
    yield store
    store.close()


@pytest.fixture
def other_client(store_url: str, persister: Persister) -> Iterator[Persister]:
    """A second client of the same store (the same one for memory, which lives in this process)."""
    if persister.backend == "memory":
        yield persister
        return
    store = persisters.from_url(store_url)
    yield store
    store.close()


@pytest.fixture
def name() -> str:
    return f"core-lease-{uuid.uuid4().hex}"


@pytest.fixture
def woken_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No safety poll within the test: on a notifying store only a release's wake-up ends a pause."""
    monkeypatch.setattr(_lockstate, "NOTIFY_SAFETY_POLL", NEVER)


def Observed(inner: Persister) -> ObservedPersister:
    """The waiter's store, observed, with no poll: only a wake-up or the holder's known end ends a pause."""
    return ObservedPersister(inner, poll_interval=NEVER)


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the waiter never tried"
        await asyncio.sleep(0.01)


async def background_cleanups() -> None:
    """Let the tasks a cancelled wait left (release what it took, leave the queue) finish."""
    await asyncio.gather(*list(_singleton._cleanups), return_exceptions=True)


def no_place_is_queued(persister: Persister, name: str) -> bool:
    """On a free name of a fair store: a newcomer that waits takes it only if nobody queued before it."""
    newcomer = Owner()
    result = persister.acquire(name, newcomer, 30, queue_for=5)
    if result.acquired:
        assert persister.release(name, newcomer.owner_token)
        return True
    persister.leave_queue(name, newcomer.owner_token)
    return False


def holder_of(persister: Persister, name: str, ttl: float = TTL) -> Singleton:
    holder = Singleton(name, persister, lock_expire_seconds=ttl, release_on_sigterm=False)
    assert holder.lock()
    return holder


def in_thread(target: Callable[[], Any]) -> Callable[..., Any]:
    """Run ``target`` in a daemon thread; the returned callable joins it and returns its result (or raises)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target()
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float = WOKEN_BY * 2) -> Any:
        thread.join(timeout)
        assert not thread.is_alive(), "the waiter never returned"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join


# -- the public API ------------------------------------------------------------------------------


def test_public_names_and_defaults() -> None:
    for exported in ("Lease", "AsyncLease", "Owner", "DEFAULT_LOCK_EXPIRE_SECONDS", "validate_name", "validate_ttl",
                     "validate_metadata", "validate_min_hold", "validate_owner_token", "redact_url", "scheme_of"):
        assert exported in singleton_integrations.__all__, exported
        assert hasattr(singleton_integrations, exported), exported
    lease = Lease("job", persisters.Memory())
    assert lease.lock_expire_seconds == DEFAULT_LOCK_EXPIRE_SECONDS == Singleton("job", lease.persister).lock_expire_seconds
    assert len(lease.owner_token) == 32 and lease.owner_token != Lease("job", lease.persister).owner_token
    assert lease.owner_token not in repr(lease), "the owner token is a capability: never in a repr"
    assert doctest.testmod(_lease).failed == 0


@pytest.mark.parametrize("face", [Lease, AsyncLease])
@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"lock_expire_seconds": 0}, ValueError, "lock_expire_seconds"),
        ({"lock_expire_seconds": -1}, ValueError, "lock_expire_seconds"),
        ({"lock_expire_seconds": math.inf}, ValueError, "lock_expire_seconds"),
        ({"lock_expire_seconds": "60"}, TypeError, "lock_expire_seconds"),
        ({"lock_expire_seconds": True}, TypeError, "lock_expire_seconds"),
        ({"min_hold_seconds": 0}, ValueError, "min_hold_seconds"),
        ({"metadata": {"a.b": "x"}}, ValueError, "metadata"),
        ({"metadata": ["x"]}, TypeError, "metadata"),
        ({"owner_token": "short"}, ValueError, "owner token"),
        ({"owner_token": "has a space in it, 32 characters"}, ValueError, "owner token"),
        ({"owner_token": 12345678901234567890}, TypeError, "owner token"),
    ],
)
def test_bad_terms_are_refused_before_any_io(face: type[Any], options: dict[str, Any], error: type[Exception],
                                             says: str) -> None:
    with pytest.raises(error, match=says) as refused:
        face("job", persisters.Memory(), **options)
    if "owner_token" not in options:  # Singleton's own checks, word for word
        with pytest.raises(error) as singleton_refused:
            Singleton("job", persisters.Memory(), **options)
        assert str(singleton_refused.value) == str(refused.value)


def test_a_bad_wait_is_refused() -> None:
    lease = Lease("job", persisters.Memory())
    with pytest.raises(ValueError, match="wait"):
        lease.take(wait=-1)
    with pytest.raises(TypeError, match="wait"):
        lease.wait_until_free(wait="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wait"):
        asyncio.run(AsyncLease("job", persisters.Memory()).take(wait=math.nan))
    with pytest.raises(ValueError, match="poll_interval"):
        lease.wait_until_free(poll_interval=0)
    with pytest.raises(TypeError, match="poll_interval"):
        asyncio.run(AsyncLease("job", persisters.Memory()).wait_until_free(poll_interval="1"))  # type: ignore[arg-type]


def test_min_hold_is_refused_on_a_persister_without_it(persister: Persister) -> None:
    lacking = CountingPersister(persister, supports_min_hold=False)
    for face in (Lease, AsyncLease):
        with pytest.raises(ValueError, match=r"does not \(supports_min_hold is False\)"):
            face("job", lacking, min_hold_seconds=60)
    assert Lease("job", lacking).min_hold_seconds is None


# -- take, renew, verify, release by token --------------------------------------------------------


def test_take_renew_verify_release_from_another_object(persister: Persister, other_client: Persister,
                                                       name: str) -> None:
    lease = Lease(name, persister, lock_expire_seconds=30, metadata={"run": "r-1"})
    taken = lease.take()
    assert taken.acquired and taken.expired is None
    record = taken.record
    assert record is not None and record.owner_token == lease.owner_token and record.metadata == {"run": "r-1"}
    assert record.expires_at is not None and record.fencing_token > 0
    # Another object, on another client of the store, knowing only the name and the token.
    elsewhere = Lease(name, other_client, owner_token=lease.owner_token, lock_expire_seconds=60)
    assert elsewhere.verify()
    renewed = elsewhere.renew()
    assert renewed is not None and renewed.fencing_token == record.fencing_token
    assert renewed.expires_at is not None and renewed.expires_at > record.expires_at
    assert elsewhere.release() is True
    assert not lease.verify() and lease.holder() is None
    assert lease.renew() is None
    successor = Lease(name, persister, lock_expire_seconds=30)
    assert successor.take().acquired
    # Redis answers True here (it remembers the token's own clean release, for a retried call);
    # what every store must do is leave the successor's hold alone.
    lease.release()
    assert successor.verify(), "the old token released its successor's hold"
    assert successor.release()


def test_async_take_renew_verify_release_from_another_object(persister: Persister, other_client: Persister,
                                                             name: str) -> None:
    async def main() -> None:
        lease = AsyncLease(name, persister, lock_expire_seconds=30)
        taken = await lease.take()
        assert taken.acquired and taken.record is not None
        elsewhere = AsyncLease(name, other_client, owner_token=lease.owner_token, lock_expire_seconds=60)
        assert await elsewhere.verify()
        renewed = await elsewhere.renew()
        assert renewed is not None and renewed.fencing_token == taken.record.fencing_token
        assert await elsewhere.release() is True
        assert not await lease.verify() and await lease.holder() is None
        assert await lease.renew() is None

    asyncio.run(main())


def test_a_wrong_token_can_neither_release_nor_renew(persister: Persister, name: str) -> None:
    lease = Lease(name, persister, lock_expire_seconds=30)
    record = lease.take().record
    assert record is not None
    impostor = Lease(name, persister, owner_token="f" * 32, lock_expire_seconds=30)
    assert impostor.release() is False
    assert impostor.renew() is None
    assert not impostor.verify()
    assert Lease.adopt(name, persister, fencing_token=record.fencing_token + 1) is None
    assert lease.verify(), "the holder lost its lease to a wrong token"
    holder = lease.holder()
    assert holder is not None and holder.fencing_token == record.fencing_token
    adopted = Lease.adopt(name, persister, fencing_token=record.fencing_token, lock_expire_seconds=30)
    assert adopted is not None and adopted.owner_token == lease.owner_token
    assert adopted.release() is True


def test_taking_again_with_the_same_token_is_the_same_hold(persister: Persister, name: str) -> None:
    """Every store answers alike (some call it a retry, some a conflict), and a waiting take leaves no queue place."""
    lease = Lease(name, persister, lock_expire_seconds=30)
    first = lease.take()
    again = lease.take()
    waited = lease.take(wait=WAIT)  # not a wait for itself until its own lease ends
    assert first.acquired and again.acquired and waited.acquired
    assert first.record is not None and again.record is not None and waited.record is not None
    assert first.record.fencing_token == again.record.fencing_token == waited.record.fencing_token
    assert lease.release()
    if persister.fair:
        assert no_place_is_queued(persister, name), "taking a held lease again left its token queued"


def test_expiry_and_takeover_report_the_previous_holder(persister: Persister, name: str) -> None:
    first = Lease(name, persister, lock_expire_seconds=0.5, metadata={"who": "first"})
    old = first.take().record
    assert old is not None
    assert eventually(lambda: persister.get(name) is None), "the lease never expired by the store's clock"
    assert not first.verify()
    second = Lease(name, persister, lock_expire_seconds=30)
    taken = second.take()
    assert taken.acquired and taken.record is not None
    assert taken.expired is not None, "the takeover did not name the expired holder"
    assert taken.expired.fencing_token == old.fencing_token and taken.expired.metadata == {"who": "first"}
    assert taken.record.fencing_token > old.fencing_token
    assert first.renew() is None and first.release() is False
    assert second.verify() and second.release()


def test_conflict_names_the_holder_and_a_minimum_hold_says_when_it_ends(persister: Persister, name: str) -> None:
    owner = Lease(name, persister, lock_expire_seconds=60, min_hold_seconds=30, metadata={"run": "r-7"})
    record = owner.take().record
    assert record is not None and record.hold_until is not None
    contender = Lease(name, persister, lock_expire_seconds=60)
    conflict = contender.take()
    assert not conflict.acquired and not conflict.queued_behind
    assert conflict.record is not None and conflict.record.fencing_token == record.fencing_token
    assert conflict.record.metadata == {"run": "r-7"} and "r-7" in conflict.record.describe()
    assert conflict.record.owner_token == owner.owner_token  # the holder's record, for whoever can read the store
    assert owner.release() is True
    after = contender.take()
    assert not after.acquired and after.record is not None and after.record.released, "the slot already ran"
    assert after.retry_after is not None and 0 < after.retry_after <= 30
    assert not owner.verify() and owner.renew() is None, "a released hold cannot be renewed"
    persister.force_release(name)


# -- across processes -------------------------------------------------------------------------------

_CHILD = """
import json, sys
from singleton_integrations import Lease, persisters
args = json.loads(sys.argv[1])
store = persisters.from_url(args["url"])
if args["do"] == "take":
    lease = Lease(args["name"], store, lock_expire_seconds=args["ttl"], metadata={"by": "child"})
    result = lease.take()
    print(json.dumps({"acquired": result.acquired, "owner_token": lease.owner_token,
                      "fencing_token": result.record.fencing_token}), flush=True)
    sys.stdin.readline()  # the parent's word: end normally (exit), or a SIGTERM first
else:
    lease = Lease(args["name"], store, owner_token=args["owner_token"], lock_expire_seconds=args["ttl"])
    verified = lease.verify()
    renewed = lease.renew()
    print(json.dumps({"verified": verified, "renewed": renewed.fencing_token if renewed else None,
                      "released": lease.release()}), flush=True)
"""


def _child(args: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])


def _fact(child: subprocess.Popen[str]) -> dict[str, Any]:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(30)
        pytest.fail(f"the child said nothing; stderr: {child.stderr.read() if child.stderr else ''}")
    fact: dict[str, Any] = json.loads(line)
    return fact


@pytest.mark.parametrize("ending", ["exit", "SIGTERM"])
def test_a_lease_outlives_the_process_that_took_it(persister: Persister, store_url: str, name: str,
                                                    ending: str) -> None:
    """Taken in one process, which ends (cleanly or by SIGTERM): still held; renewed and released by another."""
    if not persister.multiprocess:
        pytest.skip(f"{persister.backend} lives inside one process")
    taker = _child({"do": "take", "url": store_url, "name": name, "ttl": 60})
    try:
        fact = _fact(taker)
        assert fact["acquired"]
        assert taker.stdin is not None
        if ending == "SIGTERM":
            taker.send_signal(signal.SIGTERM)
        else:
            taker.stdin.write("exit\n")
            taker.stdin.flush()
        taker.wait(30)
    finally:
        if taker.poll() is None:
            taker.kill()
        taker.communicate()
    holder = persister.get(name)
    assert holder is not None, f"the lease ended with its taker ({ending}): something released it"
    assert holder.fencing_token == fact["fencing_token"] and holder.metadata == {"by": "child"}
    adopted = Lease.adopt(name, persister, fencing_token=fact["fencing_token"], lock_expire_seconds=60)
    assert adopted is not None and adopted.owner_token == fact["owner_token"] and adopted.verify()
    finisher = _child({"do": "finish", "url": store_url, "name": name, "ttl": 60, "owner_token": fact["owner_token"]})
    done = _fact(finisher)
    finisher.communicate(timeout=30)
    assert done == {"verified": True, "renewed": fact["fencing_token"], "released": True}
    assert persister.get(name) is None


# -- waiting: the same loop as Singleton.lock(wait=) ---------------------------------------------------


def test_a_waiting_take_is_woken_by_the_release(persister: Persister, name: str, woken_only: None) -> None:
    holder = holder_of(persister, name)
    store = Observed(persister)
    lease = Lease(name, store, lock_expire_seconds=30)
    cancel = threading.Event()  # math.inf waits for good: the event ends it if the test fails
    join = in_thread(lambda: (lease.take(wait=math.inf, cancel=cancel), time.monotonic()))
    assert eventually(lambda: store.acquires >= 1), "the waiter never tried"
    released_at = time.monotonic()
    assert holder.release()
    try:
        result, acquired_at = join(WOKEN_BY)
    finally:
        cancel.set()
    assert result.acquired and result.record is not None and result.record.owner_token == lease.owner_token
    # Polls are NEVER apart: only the wake-up fits. (PostgreSQL's watch polls until its LISTEN is up,
    # so there a release in that first moment may be seen by a poll; the fair stores' test below
    # also checks the watch said it was woken.)
    assert acquired_at - released_at < WOKEN_BY, "the release did not wake the waiter"
    assert store.waits, "the waiter never waited on its release watch"
    assert lease.release()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_detached_waiter_takes_its_turn_behind_a_singleton_waiter(persister: Persister, name: str,
                                                                     woken_only: None, face: str) -> None:
    """Fair stores: the lease that queued second holds after the Singleton that queued first, each woken in turn."""
    if not persister.fair:
        pytest.skip(f"{persister.backend} does not queue waiters: a free name goes to whoever asks first")
    if face == "sync":
        order, lease_store, acquired_at, released_at = _turns_sync(persister, name)
    else:
        order, lease_store, acquired_at, released_at = asyncio.run(_turns_async(persister, name))
    assert order == ["singleton", "lease"], f"the waiters held the name in the order {order}"
    assert acquired_at - released_at < WOKEN_BY, "the Singleton's release did not wake the lease's waiter"
    assert lease_store.waits and lease_store.waits[-1] is True, f"the lease's last wait was not woken: {lease_store.waits}"
    assert persister.get(name) is None


def _turns_sync(persister: Persister, name: str) -> tuple[list[str], Observed, float, float]:
    holder = holder_of(persister, name)
    singleton_store, lease_store = CountingPersister(persister), Observed(persister)
    first = Singleton(name, singleton_store, lock_expire_seconds=TTL, release_on_sigterm=False)
    second = Lease(name, lease_store, lock_expire_seconds=TTL)
    order: list[str] = []
    released: list[float] = []

    def singleton_turn() -> None:
        assert first.lock(wait=WAIT)
        order.append("singleton")
        time.sleep(0.2)  # the lease's waiter, queued behind, keeps waiting meanwhile
        released.append(time.monotonic())
        assert first.release()

    def lease_turn() -> float:
        result = second.take(wait=WAIT)
        assert result.acquired, f"the lease's waiter gave up: {result}"
        order.append("lease")
        return time.monotonic()

    join_first = in_thread(singleton_turn)
    assert eventually(lambda: singleton_store.acquires >= 1), "the Singleton never tried"
    join_second = in_thread(lease_turn)
    assert eventually(lambda: lease_store.acquires >= 1), "the lease never tried"
    assert holder.release()
    join_first()
    acquired_at = join_second()
    assert second.release()
    return order, lease_store, acquired_at, released[0]


async def _turns_async(persister: Persister, name: str) -> tuple[list[str], Observed, float, float]:
    holder = AsyncSingleton(name, persister, lock_expire_seconds=TTL, release_on_sigterm=False)
    assert await holder.lock()
    singleton_store, lease_store = CountingPersister(persister), Observed(persister)
    first = AsyncSingleton(name, singleton_store, lock_expire_seconds=TTL, release_on_sigterm=False)
    second = AsyncLease(name, lease_store, lock_expire_seconds=TTL)
    order: list[str] = []

    async def singleton_turn() -> float:
        assert await first.lock(wait=WAIT)
        order.append("singleton")
        await asyncio.sleep(0.2)
        released_at = time.monotonic()
        assert await first.release()
        return released_at

    async def lease_turn() -> float:
        result = await second.take(wait=WAIT)
        assert result.acquired, f"the lease's waiter gave up: {result}"
        order.append("lease")
        return time.monotonic()

    turn_first = asyncio.create_task(singleton_turn())
    await until(lambda: singleton_store.acquires >= 1)
    turn_second = asyncio.create_task(lease_turn())
    await until(lambda: lease_store.acquires >= 1)
    assert await holder.release()
    released_at, acquired_at = await asyncio.wait_for(asyncio.gather(turn_first, turn_second), WOKEN_BY * 2)
    assert await second.release()
    await persister.aclose()
    return order, lease_store, acquired_at, released_at


def test_cancel_ends_a_wait_and_leaves_the_queue(persister: Persister, name: str) -> None:
    holder = holder_of(persister, name)
    store = CountingPersister(persister)
    lease = Lease(name, store, lock_expire_seconds=30)
    cancel = threading.Event()
    join = in_thread(lambda: lease.take(wait=WAIT, cancel=cancel))
    assert eventually(lambda: store.acquires >= 1), "the waiter never tried"
    cancel.set()
    result = join(WOKEN_BY)
    assert not result.acquired and result.record is not None
    assert result.record.fencing_token == holder.fencing_token, "a cancelled take names the holder"
    assert holder.release()
    assert not lease.verify() and persister.get(name) is None
    if persister.fair:
        assert no_place_is_queued(persister, name), "the cancelled waiter kept its place in the queue"


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_wait_that_runs_out_names_the_holder_and_leaves_the_queue(persister: Persister, name: str,
                                                                    face: str) -> None:
    holder = holder_of(persister, name)
    if face == "sync":
        result = Lease(name, persister, lock_expire_seconds=30).take(wait=0.3)
    else:
        async def main() -> AcquireResult:
            outcome = await AsyncLease(name, persister, lock_expire_seconds=30).take(wait=0.3)
            await background_cleanups()
            return outcome

        result = asyncio.run(main())
    assert not result.acquired and result.record is not None
    assert result.record.fencing_token == holder.fencing_token and result.record.owner_token != ""
    assert holder.release()
    if persister.fair:
        assert no_place_is_queued(persister, name), "a waiter whose time ran out kept its place in the queue"


def test_a_cancelled_async_take_holds_nothing_and_leaves_no_place(persister: Persister, name: str) -> None:
    async def main() -> None:
        holder = AsyncSingleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        assert await holder.lock()
        store = CountingPersister(persister)
        lease = AsyncLease(name, store, lock_expire_seconds=30)
        task = asyncio.create_task(lease.take(wait=WAIT))
        await until(lambda: store.acquires >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await background_cleanups()
        assert await holder.release()
        assert not await lease.verify()
        await persister.aclose()

    asyncio.run(main())
    assert persister.get(name) is None, "the cancelled waiter took the name after all"
    if persister.fair:
        assert no_place_is_queued(persister, name), "the cancelled waiter kept its place in the queue"


def test_an_async_take_cancelled_in_the_turn_its_wake_up_arrives_raises(name: str) -> None:
    """The cancel and a wake-up (a release, or a listener's resubscribe waking everyone) land
    in one loop turn: the cancel wins, the wait does not go on until the holder's lease ends."""
    store = persisters.Memory()

    async def main() -> None:
        holder = AsyncSingleton(name, store, lock_expire_seconds=30, release_on_sigterm=False)
        assert await holder.lock()
        lease = AsyncLease(name, store, lock_expire_seconds=30)
        task = asyncio.create_task(lease.take(wait=WAIT))

        def parked() -> list[Any]:
            return [watch for watch in store._hub._watches.get(name, ()) if watch._futures]

        await until(lambda: bool(parked()))
        for watch in parked():
            watch.wake()  # resolves the pause's future in the next turn...
        task.cancel()  # ...the very turn the task learns it is cancelled
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        await background_cleanups()
        assert await holder.release()
        assert not await lease.verify()

    asyncio.run(main())
    assert store.get(name) is None


def test_an_acquire_completing_as_its_async_taker_is_cancelled_is_released(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = persister.aacquire
    sent, answer = threading.Event(), threading.Event()

    async def held_back(*args: Any, **kwargs: Any) -> AcquireResult:
        sent.set()
        while not answer.is_set():
            await asyncio.sleep(0.01)
        return await inner(*args, **kwargs)

    monkeypatch.setattr(persister, "aacquire", held_back)

    async def main() -> None:
        lease = AsyncLease(name, persister, lock_expire_seconds=30)
        task = asyncio.create_task(lease.take(wait=WAIT))
        await until(sent.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # at once, while the acquire is still on its way
        answer.set()  # the store now hands the free name to the cancelled taker...
        await background_cleanups()  # ...and the cleanup gives it back
        assert not await lease.verify()
        await persister.aclose()

    asyncio.run(main())
    assert persister.get(name) is None, "an acquire that completed after its taker was cancelled kept the name"
    if persister.fair:
        assert no_place_is_queued(persister, name)


# -- wait until free: observes, acquires nothing ---------------------------------------------------


def test_wait_until_free_is_woken_and_takes_nothing(persister: Persister, name: str) -> None:
    holder = holder_of(persister, name)
    lease = Lease(name, persister)
    seen = lease.wait_until_free()
    assert seen is not None and seen.fencing_token == holder.fencing_token, "one look names the holder"
    seen = lease.wait_until_free(wait=0.3)
    assert seen is not None and seen.fencing_token == holder.fencing_token, "a look that ran out names the holder"
    store = Observed(persister)
    observer = Lease(name, store)
    # poll_interval: the longest pause between looks, the safety poll included; NEVER leaves only the wake-up.
    join = in_thread(lambda: (observer.wait_until_free(wait=WAIT, poll_interval=NEVER), time.monotonic()))
    assert eventually(lambda: store.looks >= 1), "the observer never looked"  # its watch was open before
    released_at = time.monotonic()
    assert holder.release()
    free, freed_at = join(WOKEN_BY)
    assert free is None
    assert freed_at - released_at < WOKEN_BY, "the release did not wake the observer"
    assert store.acquires == 0 and persister.get(name) is None, "a wait until free took the name"


def test_wait_until_free_looks_again_when_the_lease_ends(persister: Persister, name: str) -> None:
    """No release is published when a lease runs out: the holder's ``expires_at`` brings the next look."""
    Lease(name, persister, lock_expire_seconds=1.0).take()
    assert Lease(name, persister).wait_until_free(wait=WAIT) is None
    assert persister.get(name) is None


def test_wait_until_free_is_cancelled_by_its_event(persister: Persister, name: str) -> None:
    holder = holder_of(persister, name)
    cancel = threading.Event()
    join = in_thread(lambda: Lease(name, persister).wait_until_free(wait=WAIT, cancel=cancel))
    time.sleep(0.2)
    cancel.set()
    seen = join(WOKEN_BY)
    assert isinstance(seen, LockRecord) and seen.fencing_token == holder.fencing_token
    assert holder.release()


def test_async_wait_until_free(persister: Persister, name: str, woken_only: None) -> None:
    async def main() -> None:
        holder = AsyncSingleton(name, persister, lock_expire_seconds=TTL, release_on_sigterm=False)
        assert await holder.lock()
        observer = AsyncLease(name, persister)
        seen = await observer.wait_until_free(wait=0.2)
        assert seen is not None and seen.fencing_token == holder.fencing_token
        # Cancelled: returns at once, leaves nothing behind.
        task = asyncio.create_task(observer.wait_until_free(wait=WAIT))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await background_cleanups()
        # Woken by the release.
        store = Observed(persister)
        watcher = asyncio.create_task(AsyncLease(name, store).wait_until_free(wait=WAIT))
        await until(lambda: store.looks >= 1)
        released_at = time.monotonic()
        assert await holder.release()
        assert await asyncio.wait_for(watcher, WOKEN_BY * 2) is None
        assert time.monotonic() - released_at < WOKEN_BY, "the release did not wake the observer"
        assert store.acquires == 0 and await persister.aget(name) is None
        await persister.aclose()

    asyncio.run(main())
