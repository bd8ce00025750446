"""The minimum hold: a released name stays taken until ``min_hold_seconds`` from its acquisition have passed."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import ClassVar

import pytest

from ... import Singleton, SingletonError
from ..._record import Owner
from ...persisters import Persister
from ._helpers import (
    ONE_MS,
    CountingPersister,
    not_per_api,
    read_fact,
    spawn_role,
)
from ._kit import ConformanceKit

__all__ = ["MinimumHold", "MinimumHoldAcrossProcesses", "MinimumHoldByStoreClock"]


class MinimumHold(ConformanceKit):
    """The minimum hold (``min_hold_seconds``): ``acquire(min_hold=)`` records ``hold_until``; a release inside
    the hold keeps the record, marked released, until it ends; a lease shorter than the hold does not end it.

    Asks of the store: ``supports_min_hold = True``.
    """

    needs: ClassVar[tuple[str, ...]] = ("supports_min_hold",)

    @not_per_api
    def test_min_hold_primitives(self, persister: Persister, name: str) -> None:
        """acquire(min_hold=) records hold_until; release keeps the record, marked released, until then."""
        owner = Owner()
        first = persister.acquire(name, owner, 30, min_hold=2.0)
        assert first.acquired and first.record is not None
        taken = first.record
        assert taken.hold_until is not None and taken.released_at is None
        assert 1.0 <= (taken.hold_until - taken.created_at).total_seconds() <= 3.0
        assert persister.release(name, owner.owner_token) is True
        held = persister.get(name)
        assert held is not None and held.released_at is not None, "the released record must hold the name"
        assert held.fencing_token == taken.fencing_token and held.hold_until is not None
        assert abs((held.hold_until - taken.hold_until).total_seconds()) < 0.5
        assert held.expires_at is not None and abs((held.expires_at - held.hold_until).total_seconds()) < 0.5
        # A repeated release may answer True (a store may make a retried release idempotent), but
        # it must not end the hold; nor may the old token renew it.
        persister.release(name, owner.owner_token)
        assert persister.renew(name, owner.owner_token, 30) is None, "the token renewed a released lock"
        again = persister.get(name)
        assert again is not None and again.released_at is not None, "a repeated release ended the minimum hold"
        refused = persister.acquire(name, Owner(), 30)
        assert not refused.acquired and refused.record is not None and refused.record.released_at is not None
        assert refused.retry_after is not None and 0 < refused.retry_after <= 2.5
        deadline = time.monotonic() + 20
        while not (after := persister.acquire(name, Owner(), 30)).acquired:
            assert time.monotonic() < deadline, "the name never came free after the minimum hold"
            time.sleep(0.1)
        assert after.record is not None and after.record.fencing_token > taken.fencing_token
        assert after.expired is None, "the end of a minimum hold is not an expiry"
        persister.force_release(name)
        # renew never ends the lease before hold_until
        renewing = Owner()
        assert persister.acquire(f"{name}-renew", renewing, 1, min_hold=30).acquired
        renewed = persister.renew(f"{name}-renew", renewing.owner_token, 1)
        assert renewed is not None and renewed.expires_at is not None and renewed.hold_until is not None
        assert renewed.expires_at >= renewed.hold_until - ONE_MS
        persister.force_release(f"{name}-renew")

    def test_min_hold_keeps_a_released_name_until_it_ends(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, min_hold_seconds=2, metadata={"deployment": "A"})
        events = self.record_events(holder)
        assert holder.lock()
        token = holder.fencing_token
        assert holder.release() is True
        assert not holder.held and not holder.lost and "lost" not in [event for event, _ in events]
        assert holder.exists() is True
        record = holder.holder()
        assert record is not None and record.released_at is not None and record.hold_until is not None
        assert (record.fencing_token, record.metadata) == (token, {"deployment": "A"})
        contender = self.singleton(name, persister)
        contender_events = self.record_events(contender)
        assert contender.lock() is False
        conflict = dict(contender_events)["conflict"]
        assert "ran at" in conflict and "deployment=A" in conflict, conflict
        assert contender.last_holder is not None and contender.last_holder.released_at is not None
        assert holder.lock() is False, "the last holder took its own slot again"
        assert contender.lock(wait=30) is True
        assert "expired" not in [event for event, _ in contender_events]
        assert contender.fencing_token > token
        assert contender.release() is True

    def test_release_after_the_min_hold_frees_at_once(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, min_hold_seconds=0.3)
        assert holder.lock()
        time.sleep(1.0)
        assert holder.release() is True
        assert persister.get(name) is None
        assert holder.exists() is False

    def test_min_hold_outlasts_a_shorter_lease(self, persister: Persister, name: str) -> None:
        """lock_expire_seconds < min_hold: released or crashed, the name stays held until the hold ends."""
        released = self.singleton(name, persister, lock_expire_seconds=0.5, min_hold_seconds=2.5)
        crashed = self.singleton(f"{name}-crashed", persister, lock_expire_seconds=0.5, min_hold_seconds=2.5)
        assert released.lock() and crashed.lock()  # ``crashed`` is never released: a holder that died
        tokens = {name: released.fencing_token, f"{name}-crashed": crashed.fencing_token}
        assert released.release() is True
        time.sleep(1.2)  # past both leases, well inside the hold
        contenders = {held_name: self.singleton(held_name, persister) for held_name in tokens}
        for held_name, contender in contenders.items():  # both inside their hold: check before waiting on either
            assert persister.get(held_name) is not None, f"{held_name} was freed by the lease, inside the hold"
            assert contender.lock() is False, f"{held_name} was taken inside the hold"
        for held_name, token in tokens.items():
            contender = contenders[held_name]
            assert contender.lock(wait=30) is True
            assert contender.fencing_token > token
            assert contender.release() is True

    def test_min_hold_refused_without_store_support(self, persister: Persister, name: str) -> None:
        """A persister that does not declare supports_min_hold is refused a minimum hold, before any I/O."""
        self.singleton(name, persister, min_hold_seconds=5)  # accepted where the store supports it
        bare = CountingPersister(persister, supports_min_hold=False)
        with pytest.raises((TypeError, ValueError, SingletonError)) as caught:
            self.singleton(name, bare, min_hold_seconds=5).lock()
        assert "min_hold" in str(caught.value), str(caught.value)
        assert bare.acquires == 0 and persister.get(name) is None


class MinimumHoldAcrossProcesses(ConformanceKit):
    """The minimum hold across processes: a process that holds and releases at once keeps the name from
    other processes until the hold ends; SIGTERM releases into the hold, never out of it.

    Asks of the store: ``supports_min_hold`` and ``multiprocess`` (compose it beside ``MinimumHold`` and
    ``Processes``).
    """

    needs: ClassVar[tuple[str, ...]] = ("multiprocess", "supports_min_hold")

    @not_per_api
    def test_min_hold_across_processes(self, persister: Persister, name: str, store_url: str,
                                       processes: list[subprocess.Popen[str]]) -> None:
        """A process holds and releases at once: another process is refused until S has passed, then succeeds."""
        hold_seconds = 2.5
        child = spawn_role("hold", {"name": name, "url": store_url, "min_hold": hold_seconds, "hold_for": 0})
        processes.append(child)
        taken = read_fact(child)
        assert taken["acquired"]
        done = read_fact(child)
        assert done["released"] is True and done["lost"] is False
        assert child.wait(timeout=30) == 0
        local = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        assert local.lock() is False
        assert local.last_holder is not None and local.last_holder.released_at is not None
        assert local.last_holder.pid == taken["pid"]
        assert local.lock(wait=30) is True
        assert time.monotonic() >= taken["at"] + hold_seconds - 0.5, "the name was free before the minimum hold ended"
        assert local.fencing_token > taken["token"]
        assert local.release() is True

    @not_per_api
    def test_sigterm_releases_into_the_min_hold(self, persister: Persister, name: str, store_url: str,
                                                processes: list[subprocess.Popen[str]]) -> None:
        child = self.start_holder(processes, "hold", name, store_url, min_hold=60)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
        record = persister.get(name)
        assert record is not None, "SIGTERM freed the name inside its minimum hold"
        assert record.released_at is not None, "SIGTERM did not release (the record is still the live lease)"
        contender = Singleton(name, persister, lock_expire_seconds=30, release_on_sigterm=False)
        assert contender.lock() is False
        persister.force_release(name)


class MinimumHoldByStoreClock(ConformanceKit):
    """The minimum hold by the store's clock: a contender whose clock runs two hours ahead cannot end it.

    Asks of the store: ``supports_min_hold`` and ``distributed``, and ``faketime`` on the machine (compose
    it beside ``MinimumHold`` and ``StoreClock``).
    """

    needs: ClassVar[tuple[str, ...]] = ("supports_min_hold", "distributed")

    @not_per_api
    def test_min_hold_is_judged_by_the_store_clock(self, persister: Persister, name: str, store_url: str,
                                                    processes: list[subprocess.Popen[str]]) -> None:
        """A contender whose clock is 2 h ahead cannot end the hold early."""
        ahead_clock = self.faketime("+2h")
        holder = Singleton(name, persister, lock_expire_seconds=30, min_hold_seconds=120, release_on_sigterm=False)
        assert holder.lock() and holder.release()
        ahead = spawn_role("try_lock", {"name": name, "url": store_url}, prefix=ahead_clock,
                           env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        processes.append(ahead)
        fact = read_fact(ahead, timeout=60)
        assert fact["exists_before"] is True and fact["acquired"] is False
        assert fact["holder_released"] is True
        record = persister.get(name)
        assert record is not None and record.released_at is not None
        persister.force_release(name)
