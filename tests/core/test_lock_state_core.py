"""Issue 14 items 1, 2, 4 and 5 on every persister: no false loss, loss in time, reentrancy, one object across threads.

Faults are injected by wrapping one primitive of a real persister (a gate that
holds a call in flight), never by mocking a server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from singleton_integrations import LockLost, Singleton, persisters
from singleton_integrations.persisters import Persister


@pytest.fixture
def persister(store_url: str) -> Iterator[Persister]:
    store = persisters.from_url(store_url)
    yield store
    store.close()


@pytest.fixture
def name() -> str:
    return f"core-{uuid.uuid4().hex}"


def events(singleton: Singleton, *names: str) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for event in names:
        singleton.on(event, lambda payload, event=event: seen.append((event, str(payload))))
    return seen


def gate(persister: Persister, method: str, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold every call of ``method`` until ``opened`` is set; ``entered`` says one is in flight."""
    original: Callable[..., Any] = getattr(persister, method)
    entered, opened = threading.Event(), threading.Event()

    def gated(*args: Any) -> Any:
        entered.set()
        opened.wait(30)
        return original(*args)

    monkeypatch.setattr(persister, method, gated)
    return entered, opened


def count_calls(persister: Persister, method: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    original: Callable[..., Any] = getattr(persister, method)
    calls = [0]

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(persister, method, counted)
    return calls


# -- item 1: a clean release is never a loss ---------------------------------------


def test_release_racing_an_in_flight_renewal_is_not_a_loss(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singleton = Singleton(
        name, persister, lock_expire_seconds=30, auto_renew=True, renew_interval=0.01, release_on_sigterm=False
    )
    seen = events(singleton, "lost")
    entered, opened = gate(persister, "renew", monkeypatch)
    assert singleton.lock()
    assert entered.wait(10), "the renewal never started"
    assert singleton.release() is True  # the renewal is still in flight, held at the gate
    opened.set()  # now it reaches the store, finds the lock gone, and answers None
    time.sleep(0.2)
    assert seen == [] and not singleton.lost


def test_renewal_refused_while_the_release_answer_is_on_its_way_is_not_a_loss(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of issue 14: a renewal reaches the store just after the release and answers first."""
    singleton = Singleton(
        name, persister, lock_expire_seconds=30, auto_renew=True, renew_interval=0.01, release_on_sigterm=False
    )
    seen = events(singleton, "lost")
    original = persister.release
    done_at_store, answer = threading.Event(), threading.Event()

    def slow_answer(*args: Any) -> Any:
        result = original(*args)  # the store has released ...
        done_at_store.set()
        answer.wait(30)  # ... but its answer is still on the wire
        return result

    monkeypatch.setattr(persister, "release", slow_answer)
    renewing, let_renew = gate(persister, "renew", monkeypatch)
    assert singleton.lock()
    assert renewing.wait(10)  # a renewal is in flight
    releasing = threading.Thread(target=singleton.release)
    releasing.start()
    assert done_at_store.wait(10)
    let_renew.set()  # the renewal reaches a store without our lock: refused, answered before the release
    time.sleep(0.2)
    answer.set()
    releasing.join(30)
    assert seen == [] and not singleton.lost


def test_release_and_renewal_in_many_cycles_never_report_a_loss(persister: Persister, name: str) -> None:
    singleton = Singleton(
        name, persister, lock_expire_seconds=30, auto_renew=True, renew_interval=0.001, release_on_sigterm=False
    )
    seen = events(singleton, "lost")
    for _ in range(150):
        assert singleton.lock()
        time.sleep(0.002)
        assert singleton.release() is True
    assert seen == [] and not singleton.lost


def test_two_threads_releasing_share_one_release(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    seen = events(singleton, "lost")
    releases = count_calls(persister, "release", monkeypatch)
    for _ in range(50):
        assert singleton.lock()
        barrier = threading.Barrier(2)
        answers: list[bool] = []

        def release(barrier: threading.Barrier, answers: list[bool]) -> None:
            barrier.wait()
            answers.append(singleton.release())

        threads = [threading.Thread(target=release, args=(barrier, answers)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        # Either both shared one store call (True, True) or the second came after it (True, False).
        assert sorted(answers) in ([False, True], [True, True])
    assert seen == [] and not singleton.lost
    assert releases[0] == 50, "each hold was released by exactly one store call"
    assert persister.get(name) is None


# -- item 2: a lock whose renewals cannot get through is lost before its lease can end ---


def test_hung_renewal_is_lost_before_the_lease_ends(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 2.0
    singleton = Singleton(
        name, persister, lock_expire_seconds=ttl, auto_renew=True, renew_interval=0.2, release_on_sigterm=False
    )
    lost = threading.Event()
    singleton.on("lost", lambda message: lost.set())
    assert singleton.lock()
    record = singleton.record
    assert record is not None and record.expires_at is not None
    entered, opened = gate(persister, "renew", monkeypatch)
    try:
        assert entered.wait(10)
        assert lost.wait(10), "lost never fired while the renewal hung"
        # The store's own lease (its clock, the last successful renewal) had not ended yet.
        current = persister.get(name)
        assert current is not None and current.owner_token == record.owner_token
        assert not singleton.held and singleton.lost and singleton.fencing_token is None
        assert singleton.loss_margin == pytest.approx(min(persister.call_timeout, ttl / 4))
    finally:
        opened.set()
    assert singleton.release() is True  # the token was kept: the store still had it, so it is cleaned up
    assert persister.get(name) is None


def test_renewal_that_stops_getting_through_fails_the_block(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singleton = Singleton(
        name, persister, lock_expire_seconds=1.0, auto_renew=True, renew_interval=0.2, release_on_sigterm=False
    )
    seen = events(singleton, "lost")
    entered, opened = gate(persister, "renew", monkeypatch)
    try:
        with pytest.raises(LockLost), singleton:
            assert entered.wait(10)
            deadline = time.monotonic() + 10
            while singleton.held and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not singleton.held and singleton.lost
    finally:
        opened.set()
    # Whichever thread found the deadline passed declares the loss, then runs the handlers:
    # this thread may read ``lost`` in between, so it waits for the event itself.
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [event for event, _ in seen] == ["lost"] and "lease may have ended" in seen[0][1]


def test_a_fixed_lease_is_judged_at_release(persister: Persister, name: str) -> None:
    """Without auto_renew the caller chose a fixed lease: the loss is learned from the store, at release."""
    singleton = Singleton(name, persister, lock_expire_seconds=0.3, release_on_sigterm=False)
    seen = events(singleton, "lost")
    assert singleton.lock()
    time.sleep(0.6)
    assert singleton.held and seen == []
    assert singleton.release() is False and singleton.lost and [event for event, _ in seen] == ["lost"]


def test_lock_again_after_a_deadline_loss_cleans_up_the_old_hold(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singleton = Singleton(
        name, persister, lock_expire_seconds=1.0, auto_renew=True, renew_interval=0.2, release_on_sigterm=False
    )
    assert singleton.lock()
    first = singleton.record
    assert first is not None
    _entered, opened = gate(persister, "renew", monkeypatch)
    deadline = time.monotonic() + 10
    while singleton.held and time.monotonic() < deadline:
        time.sleep(0.02)
    opened.set()
    assert singleton.lost and persister.get(name) is not None  # the store still has the old hold
    assert singleton.lock(), "the stale hold of this same object must not block it"
    assert singleton.held and not singleton.lost and singleton.record.owner_token != first.owner_token
    assert singleton.release()


# -- item 4: a reentrant context manager -------------------------------------------------


def test_nested_with_releases_at_the_outermost_exit(persister: Persister, name: str) -> None:
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    other = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    with singleton:
        token = singleton.fencing_token
        with singleton:
            with singleton:
                assert singleton.fencing_token == token
            assert singleton.held
        assert singleton.held and persister.get(name) is not None
        assert not other.lock(), "another object took the name inside the outer block"
    assert not singleton.held and persister.get(name) is None
    assert other.lock() and other.release()


def test_lock_on_a_held_object_returns_true_without_a_store_call(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    assert singleton.lock()
    attempts = count_calls(persister, "acquire", monkeypatch)
    with singleton:
        assert singleton.lock()
    assert attempts[0] == 0
    assert not singleton.held, "the outermost with released the lock it entered holding"


def test_explicit_release_inside_nested_with_releases_now(persister: Persister, name: str) -> None:
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    with singleton, singleton:
        assert singleton.release() is True
        assert persister.get(name) is None
    assert not singleton.held and not singleton.lost


# -- item 5: one object shared by threads -----------------------------------------------


def test_concurrent_lock_calls_share_one_attempt(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    attempts = count_calls(persister, "acquire", monkeypatch)
    for trial in range(40):
        barrier = threading.Barrier(4)
        answers: list[bool] = []

        def lock(barrier: threading.Barrier, answers: list[bool]) -> None:
            barrier.wait()
            answers.append(singleton.lock())

        threads = [threading.Thread(target=lock, args=(barrier, answers)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == [True] * 4, f"trial {trial}: {answers}"
        assert attempts[0] == trial + 1, "one store attempt per hold"
        assert singleton.release()


def test_a_joiner_woken_while_the_owner_records_the_hold_shares_it(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A joiner that does not wait wakes on the shared attempt's answer (its deadline long past)
    while the owner still records the hold: it reports the hold, not a conflict."""
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    owner = threading.current_thread()
    joiner_in, joiner_done = threading.Event(), threading.Event()
    answers: list[bool] = []

    def join() -> None:
        answers.append(singleton.lock())
        joiner_done.set()

    joiner = threading.Thread(target=join)
    start_acquire = singleton._state.start_acquire

    def noting_the_joiner() -> Any:
        started = start_acquire()
        if started is not None and not started[1]:
            joiner_in.set()
        return started

    acquire = persister.acquire

    def acquire_once_the_joiner_is_in(*args: Any, **kwargs: Any) -> Any:
        joiner.start()
        assert joiner_in.wait(5), "the second call never joined the attempt"
        return acquire(*args, **kwargs)

    def hold_up_the_owner(_: Any) -> None:
        if threading.current_thread() is owner:
            joiner_done.wait(0.5)  # the joiner, woken by the answer, answers now or waits for the owner

    monkeypatch.setattr(singleton._state, "start_acquire", noting_the_joiner)
    monkeypatch.setattr(persister, "acquire", acquire_once_the_joiner_is_in)
    singleton.on("locked", hold_up_the_owner)
    assert singleton.lock()
    joiner.join(10)
    assert answers == [True], "a joiner woken as the owner recorded the hold reported a conflict"
    assert singleton.held
    assert singleton.release()
    assert persister.get(name) is None


def test_concurrent_lock_calls_all_see_the_conflict(
    persister: Persister, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    assert holder.lock()
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    entered, opened = gate(persister, "acquire", monkeypatch)
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(singleton.lock())) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert entered.wait(10)
    opened.set()
    for thread in threads:
        thread.join(30)
    assert answers == [False] * 3
    assert singleton.last_holder is not None and singleton.last_holder.owner_token == holder.record.owner_token
    assert holder.release()


def test_a_waiting_lock_is_joined_and_shared(persister: Persister, name: str) -> None:
    holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    assert holder.lock()
    singleton = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(singleton.lock(wait=20))) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert holder.release()
    for thread in threads:
        thread.join(30)
    assert answers == [True] * 3 and singleton.held
    assert singleton.release()
