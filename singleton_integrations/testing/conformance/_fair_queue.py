"""Fair waiting: a free name goes to the longest waiter, not to whoever asks first."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any, ClassVar

from ... import Singleton
from ..._record import Owner
from ...persisters import Persister
from ._helpers import (
    CountingPersister,
    eventually,
    not_per_api,
    read_fact,
    spawn_role,
    tell,
)
from ._kit import ConformanceKit

__all__ = ["FairQueue", "FairQueueAcrossProcesses"]


class FairQueue(ConformanceKit):
    """The fair queue: places kept in arrival order, a waiter behind the head refused, a non-waiting caller
    not made to wait, places that end when their waiter leaves or stops renewing, and a releaser that asks
    again queued behind its waiter.

    Asks of the store: ``fair = True``: ``acquire(..., queue_for=)``, ``leave_queue`` and
    ``watch(name, owner_token)``.
    """

    needs: ClassVar[tuple[str, ...]] = ("fair",)

    @not_per_api
    def test_fair_queue_primitives(self, persister: Persister, name: str) -> None:
        """Places are kept in arrival order, a waiter behind the head is refused, a non-waiting caller
        is not, and a place ends when its waiter leaves or stops renewing it."""
        holder, first, second, third = Owner(), Owner(), Owner(), Owner()
        assert persister.acquire(name, holder, 30).acquired
        assert not persister.acquire(name, first, 30, queue_for=30).acquired  # queued 1st
        assert not persister.acquire(name, second, 30, queue_for=30).acquired  # queued 2nd
        assert persister.release(name, holder.owner_token)
        refused = persister.acquire(name, second, 30, queue_for=30)
        assert not refused.acquired and refused.queued_behind, "the second waiter took the name from the first"
        assert refused.retry_after is not None and 0 < refused.retry_after <= 30
        barging = persister.acquire(name, third, 30)  # no queue_for: it does not wait, so it is not made to
        assert barging.acquired
        assert persister.release(name, third.owner_token)
        taken = persister.acquire(name, first, 30, queue_for=30)
        assert taken.acquired, "the head of the queue was refused a free name"
        assert persister.release(name, first.owner_token)
        assert persister.acquire(name, second, 30, queue_for=30).acquired, "the next waiter was not next"
        assert persister.release(name, second.owner_token)
        # A waiter that leaves, or whose place runs out, holds nobody up.
        assert persister.acquire(name, holder, 30).acquired
        assert not persister.acquire(name, first, 30, queue_for=30).acquired
        assert not persister.acquire(name, second, 30, queue_for=0.5).acquired
        assert not persister.acquire(name, third, 30, queue_for=30).acquired
        persister.leave_queue(name, first.owner_token)
        assert persister.release(name, holder.owner_token)
        assert eventually(lambda: persister.acquire(name, third, 30, queue_for=30).acquired, 10), \
            "a place that ran out kept holding the name"
        assert persister.release(name, third.owner_token)
        assert persister.get(name) is None

    def test_waiters_take_the_name_in_arrival_order(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        assert holder.lock()
        order: list[int] = []
        threads = []
        for index in range(4):
            counting = CountingPersister(persister)
            waiter = self.singleton(name, counting)

            def wait(index: int = index, waiter: Any = waiter) -> None:
                assert waiter.lock(wait=60)
                order.append(index)
                time.sleep(0.05)
                assert waiter.release()

            threads.append(threading.Thread(target=wait, daemon=True))
            threads[-1].start()
            assert eventually(lambda counting=counting: counting.acquires >= 1, 20), "a waiter never tried"
        assert holder.release()
        for thread in threads:
            thread.join(90)
        assert order == [0, 1, 2, 3], f"waiters held the name in the order {order}"

    def test_releaser_asking_again_queues_behind_a_waiter(self, persister: Persister, name: str) -> None:
        """The classic unfair hand-over: the releaser asks again at once and takes the name back."""
        releaser = self.singleton(name, persister)
        waiter = self.singleton(name, CountingPersister(persister))
        assert releaser.lock()
        got: list[str] = []
        taken = threading.Event()

        def wait() -> None:
            assert waiter.lock(wait=60)
            got.append("waiter")
            taken.set()

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        assert eventually(lambda: waiter.persister.acquires >= 1, 20)
        assert releaser.release()
        assert releaser.lock(wait=0.3) is False, "the releaser took the name back from its waiter"
        assert taken.wait(30) and got == ["waiter"]
        thread.join(30)
        assert waiter.release()
        assert releaser.lock(wait=10)
        assert releaser.release()


class FairQueueAcrossProcesses(ConformanceKit):
    """The fair queue across processes: a release goes to the waiter of another process, not back to the
    releaser.

    Asks of the store: ``fair`` and ``multiprocess`` (compose it beside ``FairQueue`` and ``Processes``).
    """

    needs: ClassVar[tuple[str, ...]] = ("fair", "multiprocess")

    @not_per_api
    def test_waiter_in_another_process_is_not_overtaken(self, persister: Persister, name: str, store_url: str,
                                                       processes: list[subprocess.Popen[str]]) -> None:
        """Across processes: a release goes to the waiter of another process, not back to the releaser."""
        child = spawn_role("handover", {"name": name, "url": store_url, "wait": 60, "announce": True})
        processes.append(child)
        releaser = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        for _ in range(3):
            assert releaser.lock(wait=30)
            tell(child, "lock")
            assert read_fact(child)["waiting"], "the child did not wait"  # its place is in the queue
            asked_again = threading.Thread(target=lambda: releaser.lock(wait=60), daemon=True)
            assert releaser.release()
            asked_again.start()
            fact = read_fact(child, timeout=20)
            assert fact["acquired"], "the other process's waiter did not get the name"
            assert not releaser.held, "the releaser took the name back before the waiter held it"
            tell(child, "release")
            assert read_fact(child)["released"] is True
            asked_again.join(30)
            assert releaser.held, "the releaser, queued behind, never got the name"
            assert releaser.release()
