"""Waiting: ``lock(wait=)`` takes the name when it comes free, gives up at its deadline, loses no wake-up."""

from __future__ import annotations

import threading
import time

from ... import Singleton
from ...persisters import Persister
from ._helpers import (
    CountingPersister,
    EventLoopThread,
    assert_woken,
    eventually,
    not_per_api,
    start_waiter,
    tried,
)
from ._kit import ConformanceKit

__all__ = ["Waiting"]


class Waiting(ConformanceKit):
    """Waiting: a waiter is woken by a release (blocking, cancellable and async waiters, wherever the
    release lands in their wait), gives up after its timeout, takes over at expiry, and two threads passing
    the lock back and forth lose no wake-up.

    Asks of the store: nothing beyond the core's primitives; a store without ``watch`` is polled, and on a
    notifying one a waiter must not poll.
    """

    def test_wait_is_woken_by_release(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        assert holder.lock()
        timer = threading.Timer(0.3, holder.release)
        timer.start()
        waiter = self.singleton(name, persister)
        started = time.monotonic()
        assert waiter.lock(wait=60) is True
        assert time.monotonic() - started < 50  # a bound on correctness: the wait did not run out
        timer.join()
        waiter.release()

    def test_wait_gives_up_after_its_timeout(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        assert holder.lock()
        waiter = self.singleton(name, persister)
        events = self.record_events(waiter)
        assert waiter.lock(wait=0.3) is False
        assert [event for event, _ in events].count("conflict") == 1
        holder.release()

    def test_wait_takes_over_at_expiry(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, lock_expire_seconds=0.5)
        assert holder.lock()
        waiter = self.singleton(name, persister)
        events = self.record_events(waiter)
        assert waiter.lock(wait=30) is True
        assert "expired" in [event for event, _ in events]
        waiter.release()

    def test_hand_overs_lose_no_wake_up(self, persister: Persister, name: str) -> None:
        """Two threads pass the lock back and forth; every wait must succeed."""
        failures: list[str] = []

        def worker() -> None:
            singleton = self.singleton(name, persister)
            for _ in range(15):
                if not singleton.lock(wait=30):
                    failures.append("wait ran out")
                    return
                singleton.release()

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []

    @not_per_api
    def test_hand_over_wakes_cancellable_waiters(self, persister: Persister, name: str) -> None:
        """A ``lock(wait, cancel=)`` waiter and an async waiter are woken by a release wherever it lands in their wait."""
        holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        runner = EventLoopThread()
        handovers: list[tuple[str, float, int]] = []
        try:
            for trial in range(8):
                for kind in ("sync, cancellable", "async"):
                    assert holder.lock()
                    counting = CountingPersister(persister)
                    finish = start_waiter(kind, name, counting, runner)
                    assert eventually(tried(counting), 20), "the waiter never tried"
                    time.sleep(0.15 + trial * 0.0125)  # the release lands at a different point of a wait slice each time
                    released_at = time.monotonic()
                    assert holder.release()
                    acquired_at = finish()
                    handovers.append((kind, acquired_at - released_at, counting.acquires))
        finally:
            runner.close()
        assert_woken(persister, handovers)
