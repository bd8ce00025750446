"""Notifications: a release wakes a store's ``watch``, so waiters need not poll."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from typing import ClassVar

from ... import Singleton
from ...persisters import Persister
from ._helpers import (
    WOKEN_WITHIN,
    CountingPersister,
    EventLoopThread,
    assert_woken,
    eventually,
    not_per_api,
    read_fact,
    spawn_role,
    start_waiter,
    tell,
    tried,
)
from ._kit import ConformanceKit

__all__ = ["Notifications", "NotificationsAcrossProcesses"]


class Notifications(ConformanceKit):
    """Notifications: ``watch`` is woken by a release, and remembers a release that came between opening
    the watch and waiting on it (sync and async).

    Asks of the store: ``notifies = True`` and a ``watch(name)`` that subscribes before the acquire attempt.
    """

    needs: ClassVar[tuple[str, ...]] = ("notifies",)

    @not_per_api
    def test_watch_is_notified_by_release(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        assert holder.lock()
        with persister.watching(name) as watch:
            timer = threading.Timer(0.2, holder.release)
            timer.start()
            started = time.monotonic()
            watch.wait(30)
            woke_after = time.monotonic() - started
            timer.join()
        assert woke_after < 25, "the release did not wake the watcher"

    @not_per_api
    def test_watch_remembers_a_release_before_its_wait(self, persister: Persister, name: str) -> None:
        """A release between opening a watch and waiting on it wakes the wait at once (sync and async)."""
        for mode in ("sync", "async"):
            holder = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
            assert holder.lock()
            with persister.watching(name) as watch:
                assert holder.release()
                started = time.monotonic()
                woken = watch.wait(10) if mode == "sync" else asyncio.run(watch.wait_async(10))
                took = time.monotonic() - started
            assert woken is True, f"{mode}: the wait did not report the release"
            assert took < WOKEN_WITHIN, f"{mode}: the remembered release took {took:.2f} s to wake the wait"


class NotificationsAcrossProcesses(ConformanceKit):
    """Notifications across processes: a release in another process wakes a cancellable sync waiter and an
    async waiter here, through one subscription.

    Asks of the store: ``notifies`` and ``multiprocess`` (compose it beside ``Notifications`` and
    ``Processes``).
    """

    needs: ClassVar[tuple[str, ...]] = ("multiprocess",)

    @not_per_api
    def test_hand_over_across_processes_is_woken(self, persister: Persister, name: str, store_url: str,
                                                 processes: list[subprocess.Popen[str]]) -> None:
        """A release in another process wakes a cancellable sync waiter and an async waiter here (one subscription)."""
        # notifies is asked here rather than in ``needs``, for a reason that says "across processes"
        self.need(persister, "notifies", "{backend} cannot notify across processes; waiting polls every {poll_interval} s")
        child = spawn_role("handover", {"name": name, "url": store_url})
        processes.append(child)
        runner = EventLoopThread()
        handovers: list[tuple[str, float, int]] = []
        try:
            for trial in range(4):
                for kind in ("sync, cancellable", "async"):
                    tell(child, "lock")
                    assert read_fact(child)["acquired"]
                    counting = CountingPersister(persister)
                    finish = start_waiter(kind, name, counting, runner)
                    assert eventually(tried(counting), 20), "the waiter never tried"
                    time.sleep(0.15 + trial * 0.025)
                    tell(child, "release")
                    released = read_fact(child)
                    assert released["released"] is True
                    acquired_at = finish()
                    handovers.append((kind, acquired_at - released["released_at"], counting.acquires))
        finally:
            runner.close()
        assert_woken(persister, handovers)
