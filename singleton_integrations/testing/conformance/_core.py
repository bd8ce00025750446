"""The rules every store keeps, whatever else it claims: one holder at a time, checked owners, rising tokens."""

from __future__ import annotations

import os
import subprocess

import pytest

from ... import LockConflict, LockLost
from ...persisters import Persister
from ._helpers import (
    PLAIN_NAMES,
    CountingPersister,
    both_at_once,
    read_fact,
    spawn_role,
)
from ._kit import ConformanceKit

__all__ = ["CoreRules"]


class CoreRules(ConformanceKit):
    """The core rules: atomic acquire, takeover of an expired lock in one step, release only by the owner,
    fencing tokens that rise across release, expiry and instances, plain names, ``list`` by literal prefix,
    ``force_release``, the holder's record, never-expiring locks, and one object shared by many callers.

    Asks of the store: the six primitives (``acquire``, ``release``, ``renew``, ``get``, ``list``,
    ``force_release``), judged by its clock. Every persister composes it.
    """

    def test_lock_conflict_release(self, persister: Persister, name: str) -> None:
        first = self.singleton(name, persister, metadata={"job": "first"})
        second = self.singleton(name, persister)
        events = self.record_events(second)
        assert not first.exists()
        assert first.lock() is True
        assert first.held and first.exists() and second.exists()
        assert second.lock() is False
        assert [event for event, _ in events].count("conflict") == 1
        assert second.last_holder is not None and second.last_holder.fencing_token == first.fencing_token
        holder = second.holder()
        assert holder is not None
        assert (holder.name, holder.pid, holder.metadata) == (name, os.getpid(), {"job": "first"})
        assert holder.fencing_token == first.fencing_token
        assert first.release() is True
        assert not first.held and first.fencing_token is None
        assert not second.exists()
        assert second.lock() is True
        second.release()

    def test_context_manager_conflict_names_the_holder(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, metadata={"run": "r-1"})
        with holder:
            with pytest.raises(LockConflict) as caught, self.singleton(name, persister):
                pytest.fail("entered a held lock")
            assert caught.value.holder is not None
            assert caught.value.holder.metadata == {"run": "r-1"}
            assert str(os.getpid()) in str(caught.value) and "r-1" in str(caught.value)
        assert not holder.exists()

    def test_expired_lock_is_taken_over_in_one_step(self, persister: Persister, name: str) -> None:
        stale = self.singleton(name, persister, lock_expire_seconds=0.3, metadata={"who": "stale"})
        assert stale.lock()
        stale_token = stale.fencing_token
        self.wait_until_expired(persister, name)
        taker = self.singleton(name, persister)
        events = self.record_events(taker)
        assert taker.lock() is True
        names = [event for event, _ in events]
        assert names.index("expired") < names.index("locked")
        expired_message = dict(events)["expired"]
        assert "stale" in expired_message and "expired" in expired_message
        assert taker.fencing_token > stale_token
        taker.release()

    def test_released_lock_is_not_reported_expired(self, persister: Persister, name: str) -> None:
        first = self.singleton(name, persister)
        assert first.lock() and first.release()
        second = self.singleton(name, persister)
        events = self.record_events(second)
        assert second.lock()
        assert "expired" not in [event for event, _ in events]
        second.release()

    def test_release_after_takeover_leaves_the_new_holder(self, persister: Persister, name: str) -> None:
        old = self.singleton(name, persister, lock_expire_seconds=0.3)
        old_events = self.record_events(old)
        assert old.lock()
        self.wait_until_expired(persister, name)
        new = self.singleton(name, persister)
        assert new.lock()
        assert old.release() is False
        assert old.lost and "lost" in [event for event, _ in old_events]
        assert new.verify() is True
        current = persister.get(name)
        assert current is not None and new.record is not None and current.owner_token == new.record.owner_token
        assert new.release() is True

    def test_release_after_the_lease_ran_out_reports_the_loss(self, persister: Persister, name: str) -> None:
        """Nobody took it, but the lease ended before release: exclusivity was not kept."""
        holder = self.singleton(name, persister, lock_expire_seconds=0.3)
        events = self.record_events(holder)
        assert holder.lock()
        self.wait_until_expired(persister, name)
        assert holder.release() is False
        assert holder.lost and "lost" in [event for event, _ in events]
        successor = self.singleton(name, persister)
        successor_events = self.record_events(successor)
        assert successor.lock()
        assert "expired" not in [event for event, _ in successor_events], "release left the stale lock behind"
        successor.release()

    def test_release_without_holding_is_a_no_op(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        other = self.singleton(name, persister)
        assert holder.lock()
        assert other.release() is False
        assert persister.release(name, "not-the-owner-token") is False
        assert holder.verify()
        holder.release()

    def test_lost_lock_fails_the_with_block(self, persister: Persister, name: str) -> None:
        with pytest.raises(LockLost), self.singleton(name, persister, lock_expire_seconds=0.3) as held:
            self.wait_until_expired(persister, name)
            assert self.singleton(name, persister).lock()
            assert held.verify() is False
        persister.force_release(name)

    def test_fencing_tokens_rise_across_release_and_instances(self, persister: Persister, name: str) -> None:
        tokens = []
        for index in range(6):
            singleton = self.singleton(name, persister)
            assert singleton.lock()
            tokens.append(singleton.fencing_token)
            if index % 2:
                singleton.release()
            else:
                persister.force_release(name)
        assert all(isinstance(t, int) for t in tokens)
        assert tokens == sorted(set(tokens)), tokens

    @pytest.mark.parametrize("plain", PLAIN_NAMES, ids=lambda n: repr(n)[:24])
    def test_names_are_plain(self, persister: Persister, plain: str) -> None:
        persister.force_release(plain)
        singleton = self.singleton(plain, persister)
        try:
            assert singleton.lock()
            holder = singleton.holder()
            assert holder is not None and holder.name == plain
            assert [record.name for record in persister.list(plain)] == [plain]
            assert self.singleton(plain, persister).lock() is False
        finally:
            singleton.release()
        assert not singleton.exists()

    def test_list_filters_by_prefix(self, persister: Persister, name: str) -> None:
        held = [self.singleton(f"{name}/{suffix}", persister) for suffix in ("b", "a", "c")]
        other = self.singleton(f"other-{name}", persister)
        for singleton in (*held, other):
            assert singleton.lock()
        held[2].release()
        assert [record.name for record in persister.list(f"{name}/")] == [f"{name}/a", f"{name}/b"]
        for singleton in (*held, other):
            singleton.release()
        assert persister.list(f"{name}/") == []

    def test_force_release_returns_the_holder(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, metadata={"who": "victim"})
        assert holder.lock()
        removed = persister.force_release(name)
        assert removed is not None and removed.metadata == {"who": "victim"}
        assert persister.force_release(name) is None
        assert not holder.verify()

    def test_holder_record_names_its_holder(self, persister: Persister, name: str) -> None:
        import socket

        holder = self.singleton(name, persister, lock_expire_seconds=60, metadata={"dag_id": "d", "run_id": "r"})
        assert holder.lock()
        record = persister.get(name)
        assert record is not None
        assert (record.host, record.pid) == (socket.gethostname(), os.getpid())
        assert record.metadata == {"dag_id": "d", "run_id": "r"}
        assert len(record.owner_token) >= 32
        assert record.expires_at is not None
        lease = (record.expires_at - record.created_at).total_seconds()
        assert 59 <= lease <= 61
        assert "owner_token" not in repr(record) and record.owner_token not in repr(record)
        holder.release()

    def test_lock_without_expiry(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister, lock_expire_seconds=None)
        assert holder.lock()
        record = persister.get(name)
        assert record is not None and record.expires_at is None
        assert self.singleton(name, persister).lock() is False
        assert holder.release()

    def test_two_threads_releasing_one_object_is_not_a_loss(self, persister: Persister, name: str) -> None:
        holder = self.singleton(name, persister)
        events = self.record_events(holder)
        for trial in range(30):
            assert holder.lock(), f"trial {trial}"
            results = both_at_once(holder.release)
            assert True in results, f"trial {trial}: neither release was confirmed ({results})"
            assert not holder.held and persister.get(name) is None
        assert "lost" not in [event for event, _ in events] and not holder.lost

    def test_two_threads_locking_one_object_make_one_attempt(self, persister: Persister, name: str) -> None:
        """Concurrent ``lock()`` calls on one object share one store attempt and both see that it succeeded."""
        counting = CountingPersister(persister)
        for trial in range(20):
            holder = self.singleton(name, counting)
            results = both_at_once(holder.lock)
            assert results == [True, True], f"trial {trial}: {results}"
            assert counting.acquires == trial + 1, f"trial {trial}: {counting.acquires - trial} store attempts for one object"
            assert holder.release() is True
            assert persister.get(name) is None

    def test_nested_with_releases_at_the_outermost_exit(self, persister: Persister, name: str, store_url: str,
                                                        processes: list[subprocess.Popen[str]]) -> None:
        holder = self.singleton(name, persister)
        other = self.singleton(name, persister)
        with holder:
            token = holder.fencing_token
            with holder:
                assert holder.fencing_token == token
            assert holder.held, "the inner exit released the lock"
            current = persister.get(name)
            assert current is not None and current.owner_token == holder.record.owner_token
            assert other.lock() is False
            if persister.multiprocess:
                rival = spawn_role("try_lock", {"name": name, "url": store_url})
                processes.append(rival)
                assert read_fact(rival, timeout=60)["acquired"] is False, "another process took it inside the outer block"
        assert not holder.held and persister.get(name) is None
        assert other.lock() is True
        assert other.release() is True
