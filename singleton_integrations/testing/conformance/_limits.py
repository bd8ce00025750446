"""``limit=N``: up to N holds of one name at once, each a lease of its own, all on one rising fencing sequence."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ... import AsyncLease, Lease, LockConflict
from ..._record import LockRecord
from ...persisters import Persister
from ._helpers import (
    AsyncDriven,
    CountingPersister,
    both_at_once,
    eventually,
    not_per_api,
    read_fact,
    spawn_role,
    tell,
    tried,
)
from ._kit import ConformanceKit

__all__ = ["Limits", "LimitsAcrossProcesses", "LimitsWithFairQueue", "LimitsWithMinimumHold"]

#: Most rules use three holds: enough for a hold that is neither the first nor the last.
N = 3
#: A holder's lease where only a release may let a waiter in: far beyond every wait of a rule.
LONG_LEASE = 600
#: Stores keep times to the millisecond: two store times closer than this are not ordered by the checker.
STORE_TIME_SLACK = 0.002
STORE_TIME_SLACK_DELTA = timedelta(seconds=STORE_TIME_SLACK)
#: How the processes of these rules run their roles: the role module by its path (see its docstring).
CHILD = ("-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
         str(Path(__file__).with_name("_limits_child.py")))


def tokens_of(records: list[LockRecord] | tuple[LockRecord, ...]) -> list[int]:
    """The fencing tokens of ``records``, in their order."""
    return [record.fencing_token for record in records]


class _LimitKit(ConformanceKit):
    """What the ``limit=N`` mixins share: N held locks, the lease's two faces."""

    def held(self, name: str, persister: Persister, count: int = N, **options: Any) -> list[Any]:
        """``count`` locks with ``limit=N`` (unless told) that each took a hold of ``name``."""
        options.setdefault("limit", N)
        locks = [self.singleton(name, persister, **options) for _ in range(count)]
        for index, lock in enumerate(locks):
            assert lock.lock() is True, f"hold {index + 1} of {options['limit']} was refused"
        return locks

    def lease(self, name: str, persister: Persister, **options: Any) -> Any:
        """A ``Lease``, or an ``AsyncLease`` behind ``AsyncDriven`` in the async run."""
        options.setdefault("lock_expire_seconds", 30)
        if self.runner is None:
            return Lease(name, persister, **options)
        return AsyncDriven(AsyncLease(name, persister, **options), self.runner)

    def adopt(self, name: str, persister: Persister, fencing_token: int) -> Any:
        """``Lease.adopt``, or ``AsyncLease.adopt`` on the loop in the async run."""
        if self.runner is None:
            return Lease.adopt(name, persister, fencing_token=fencing_token, lock_expire_seconds=30)
        adopted = self.runner.run(AsyncLease.adopt(name, persister, fencing_token=fencing_token,
                                                   lock_expire_seconds=30))
        return None if adopted is None else AsyncDriven(adopted, self.runner)

    @staticmethod
    def release_all(locks: list[Any]) -> None:
        for lock in locks:
            if lock.held:
                lock.release()


class Limits(_LimitKit):
    """``limit=N``: N holds granted and the next refused naming them all ("3 of 3 held"), fencing tokens that
    rise across every hold, mixed limits (each attempt counts every live hold against its own N), release and
    renewal checked per hold, an expired hold taken over alone, ``auto_renew`` and ``verify`` per hold, a waiter
    woken by the release of any hold, and detached leases under a limit.

    Asks of the store: ``limits = True``: ``acquire(..., limit=N)`` and ``holders`` (see ``Persister.acquire``).
    """

    needs: ClassVar[tuple[str, ...]] = ("limits",)

    def test_limit_grants_n_holds_then_refuses_naming_them_all(self, persister: Persister, name: str) -> None:
        holds = [self.singleton(name, persister, limit=N, metadata={"slot": str(index)}) for index in range(N)]
        assert not holds[0].exists()
        for hold in holds:
            assert hold.lock() is True
        tokens = [hold.fencing_token for hold in holds]
        assert tokens == sorted(set(tokens)), tokens
        records = holds[0].holders()
        assert tokens_of(records) == tokens
        assert [record.name for record in records] == [name] * N
        assert [record.owner_token for record in records] == [hold.record.owner_token for hold in holds]
        assert len({record.owner_token for record in records}) == N, "two holds share an owner token"
        assert [record.metadata for record in records] == [{"slot": str(index)} for index in range(N)]
        assert tokens_of(persister.list(name)) == tokens, "list must show every hold of the name"
        contender = self.singleton(name, persister, limit=N)
        events = self.record_events(contender)
        assert contender.exists() is True
        assert contender.lock() is False
        conflict = str(dict(events)["conflict"])
        assert f"{N} of {N} held" in conflict, conflict
        assert all(f"fencing token {token}" in conflict and f"slot={index}" in conflict
                   for index, token in enumerate(tokens)), conflict
        with pytest.raises(LockConflict) as caught, self.singleton(name, persister, limit=N):
            pytest.fail("entered a lock whose holds were all taken")
        assert caught.value.limit == N and tokens_of(caught.value.holders) == tokens
        assert f"{N} of {N} held" in str(caught.value)
        for hold in holds:
            assert hold.release() is True
        assert not contender.exists() and contender.holders() == []

    def test_fencing_tokens_rise_across_every_hold(self, persister: Persister, name: str) -> None:
        """One sequence per name: across the holds of one limit, across limits, release and force_release."""
        taken: list[int] = []

        def take(limit: int) -> Any:
            lock = self.singleton(name, persister, limit=limit)
            assert lock.lock() is True, f"an attempt with limit={limit} was refused"
            taken.append(lock.fencing_token)
            return lock

        first, second, _third = take(N), take(N), take(N)
        assert second.release() is True
        take(N)
        assert first.release() is True
        assert persister.force_release(name) is not None
        assert persister.holders(name) == []
        take(1).release()
        take(2)
        take(N)
        assert taken == sorted(set(taken)), f"fencing tokens in the order the holds were taken: {taken}"
        assert tokens_of(persister.holders(name)) == taken[-2:]
        persister.force_release(name)

    def test_mixed_limits_count_every_live_hold(self, persister: Persister, name: str) -> None:
        """Each attempt succeeds only while fewer than its own N holds are live, whatever N the holders gave."""
        first, second = self.held(name, persister, count=2)
        assert self.singleton(name, persister, limit=2).lock() is False, "limit=2 was granted a third hold"
        assert self.singleton(name, persister).lock() is False, "limit=1 was granted beside live holds"
        third = self.singleton(name, persister, limit=N)
        assert third.lock() is True
        assert self.singleton(name, persister, limit=N).lock() is False
        assert first.release() is True and second.release() is True
        assert self.singleton(name, persister).lock() is False, "limit=1 was granted beside a live hold"
        pair = self.singleton(name, persister, limit=2)
        assert pair.lock() is True
        assert tokens_of(persister.holders(name)) == [third.fencing_token, pair.fencing_token]
        assert third.release() is True and pair.release() is True
        single = self.singleton(name, persister)
        assert single.lock() is True
        beside = self.singleton(name, persister, limit=2)
        assert beside.lock() is True, "limit=2 was refused beside one hold"
        assert self.singleton(name, persister, limit=2).lock() is False
        assert single.verify() is True and beside.verify() is True
        assert single.release() is True and beside.release() is True
        assert persister.holders(name) == []

    def test_releasing_one_hold_lets_exactly_one_more_in(self, persister: Persister, name: str) -> None:
        holds = self.held(name, persister)
        newcomers = [self.singleton(name, persister, limit=N) for _ in range(2)]
        assert newcomers[0].release() is False, "a lock that holds nothing released a hold"
        assert persister.release(name, "not-the-owner-token") is False
        assert [hold.verify() for hold in holds] == [True] * N
        assert holds[1].release() is True
        assert holds[1].release() is False
        assert newcomers[0].lock() is True
        assert newcomers[1].lock() is False
        assert tokens_of(persister.holders(name)) == [holds[0].fencing_token, holds[2].fencing_token,
                                                      newcomers[0].fencing_token]
        self.release_all([*holds, *newcomers])
        assert persister.holders(name) == []

    def test_renew_and_verify_act_on_their_own_hold(self, persister: Persister, name: str) -> None:
        holds = self.held(name, persister)
        for index, hold in enumerate(holds):
            before = {record.fencing_token: record for record in persister.holders(name)}
            assert hold.renew() is True
            after = {record.fencing_token: record for record in persister.holders(name)}
            assert after.keys() == before.keys()
            mine = hold.fencing_token
            renewed_end, earlier_end = after[mine].expires_at, before[mine].expires_at
            assert renewed_end is not None and earlier_end is not None and renewed_end >= earlier_end
            assert {token: record.expires_at for token, record in after.items() if token != mine} == \
                   {token: record.expires_at for token, record in before.items() if token != mine}, \
                   f"renewing hold {index + 1} moved another hold's lease"
        assert holds[0].release() is True
        assert holds[0].verify() is False
        assert holds[0].renew() is False
        assert holds[1].verify() is True and holds[2].verify() is True, "a later hold failed verify beside others"
        assert holds[2].renew() is True
        self.release_all(holds)

    def test_auto_renew_keeps_each_hold(self, persister: Persister, name: str) -> None:
        holds = self.held(name, persister, lock_expire_seconds=1.5, auto_renew=True)
        events = [self.record_events(hold) for hold in holds]
        first_ends = [hold.record.expires_at for hold in holds]
        assert eventually(lambda: all([event for event, _ in seen].count("renewed") >= 3 for seen in events), 30), \
            "a hold was not renewed"
        assert all("lost" not in [event for event, _ in seen] for seen in events)
        assert [hold.verify() for hold in holds] == [True] * N
        records = persister.holders(name)
        assert tokens_of(records) == [hold.fencing_token for hold in holds]
        assert all(record.expires_at > end for record, end in zip(records, first_ends, strict=True)), "a lease was not extended"
        assert self.singleton(name, persister, limit=N).lock() is False
        for hold in holds:
            assert hold.release() is True

    def test_an_expired_hold_is_taken_over_alone(self, persister: Persister, name: str) -> None:
        """The middle hold's lease runs out: it alone frees, one of two racers takes it, the others stay."""
        first = self.held(name, persister, count=1)[0]
        short = self.singleton(name, persister, limit=N, lock_expire_seconds=0.5)
        events = self.record_events(short)
        assert short.lock() is True
        last = self.held(name, persister, count=1)[0]
        gone = short.fencing_token
        assert eventually(lambda: gone not in tokens_of(persister.holders(name))), "the short lease never ran out"
        assert tokens_of(persister.holders(name)) == [first.fencing_token, last.fencing_token]
        racers: list[Any] = []

        def race() -> bool:
            racer = self.singleton(name, persister, limit=N)
            racers.append(racer)
            return bool(racer.lock())

        assert sorted(both_at_once(race)) == [False, True], "the expired hold was not taken over by exactly one"
        winner = next(racer for racer in racers if racer.held)
        assert winner.fencing_token > last.fencing_token
        assert tokens_of(persister.holders(name)) == [first.fencing_token, last.fencing_token, winner.fencing_token]
        assert short.verify() is False
        assert short.lost and "lost" in [event for event, _ in events]
        assert short.release() is False
        assert first.verify() is True and last.verify() is True
        self.release_all([first, last, winner])

    def test_a_waiter_is_woken_by_the_release_of_any_hold(self, persister: Persister, name: str) -> None:
        """The release of a later hold (not the name's first) lets a waiter in while the other holds stay."""
        for released in (2, 1):
            holds = self.held(name, persister, lock_expire_seconds=LONG_LEASE)
            counting = CountingPersister(persister)
            waiter = self.singleton(name, counting, limit=N)
            outcome: dict[str, bool] = {}
            thread = threading.Thread(target=lambda waiter=waiter, outcome=outcome: outcome.update(
                acquired=waiter.lock(wait=60)), daemon=True)
            thread.start()
            assert eventually(tried(counting)), "the waiter never tried"
            assert holds[released].release() is True
            thread.join(90)
            assert outcome.get("acquired") is True, f"the release of hold {released + 1} did not let the waiter in"
            stayed = [hold for index, hold in enumerate(holds) if index != released]
            assert [hold.verify() for hold in stayed] == [True, True]
            assert tokens_of(persister.holders(name)) == [*(hold.fencing_token for hold in stayed), waiter.fencing_token]
            self.release_all([*stayed, waiter])

    def test_detached_leases_share_the_limit(self, persister: Persister, name: str) -> None:
        """Leases take, renew, release and adopt one hold each among N, from any object with the token."""
        leases = [self.lease(name, persister, limit=N) for _ in range(N)]
        taken = [lease.take() for lease in leases]
        assert all(result.acquired for result in taken)
        tokens = [result.record.fencing_token for result in taken]
        assert tokens == sorted(set(tokens))
        refused = self.lease(name, persister, limit=N).take()
        assert not refused.acquired and tokens_of(refused.holders) == tokens
        elsewhere = self.lease(name, persister, owner_token=leases[1].owner_token, limit=N)
        assert elsewhere.verify() is True
        renewed = elsewhere.renew()
        assert renewed is not None and renewed.fencing_token == tokens[1]
        again = elsewhere.take()
        assert again.acquired and again.record.fencing_token == tokens[1], "the owner token's hold was not given back"
        assert elsewhere.release() is True
        assert leases[1].verify() is False and leases[1].renew() is None
        assert leases[0].verify() is True and leases[2].verify() is True
        adopted = self.adopt(name, persister, tokens[2])
        assert adopted is not None and adopted.owner_token == leases[2].owner_token
        assert self.adopt(name, persister, tokens[1]) is None, "a released hold was adopted"
        assert adopted.renew() is not None
        assert adopted.release() is True
        assert tokens_of(persister.holders(name)) == [tokens[0]]
        assert leases[0].release() is True


class LimitsWithMinimumHold(_LimitKit):
    """The minimum hold of each hold under ``limit=N``: a hold released inside its minimum hold still counts
    toward N until the hold ends.

    Asks of the store: ``limits`` and ``supports_min_hold`` (compose it beside ``Limits`` and ``MinimumHold``).
    """

    needs: ClassVar[tuple[str, ...]] = ("limits", "supports_min_hold")

    def test_a_hold_released_in_its_minimum_hold_counts_until_it_ends(self, persister: Persister, name: str) -> None:
        ran = self.singleton(name, persister, limit=N, min_hold_seconds=2, metadata={"run": "r-1"})
        assert ran.lock() is True
        ran_token = ran.fencing_token
        others = self.held(name, persister, count=N - 1)
        assert ran.release() is True and not ran.lost
        records = persister.holders(name)
        assert tokens_of(records) == [ran_token, *(other.fencing_token for other in others)]
        kept = records[0]
        assert kept.released_at is not None and kept.hold_until is not None, "the released hold left before its end"
        contender = self.singleton(name, persister, limit=N)
        events = self.record_events(contender)
        assert contender.lock() is False, "a hold inside its minimum hold was not counted"
        conflict = str(dict(events)["conflict"])
        assert f"{N} of {N} held" in conflict and "run=r-1" in conflict, conflict
        assert contender.lock(wait=30) is True
        assert contender.record.created_at >= kept.hold_until - STORE_TIME_SLACK_DELTA, \
            "the hold was freed before its minimum hold ended"
        assert contender.fencing_token > max(other.fencing_token for other in others)
        assert [other.verify() for other in others] == [True] * (N - 1)
        assert tokens_of(persister.holders(name)) == [*(other.fencing_token for other in others), contender.fencing_token]
        self.release_all([*others, contender])


class LimitsWithFairQueue(_LimitKit):
    """Fair waiting under ``limit=N``: freed holds go to the waiters in queue order.

    Asks of the store: ``limits`` and ``fair`` (compose it beside ``Limits`` and ``FairQueue``).
    """

    needs: ClassVar[tuple[str, ...]] = ("limits", "fair")

    def test_waiters_take_freed_holds_in_queue_order(self, persister: Persister, name: str) -> None:
        holds = self.held(name, persister, lock_expire_seconds=LONG_LEASE)
        order: list[int] = []
        waiters: list[Any] = []
        threads = []
        for index in range(N + 1):
            counting = CountingPersister(persister)
            waiter = self.singleton(name, counting, limit=N, lock_expire_seconds=LONG_LEASE)
            waiters.append(waiter)

            def wait(index: int = index, waiter: Any = waiter) -> None:
                assert waiter.lock(wait=60)
                order.append(index)

            threads.append(threading.Thread(target=wait, daemon=True))
            threads[-1].start()
            assert eventually(tried(counting)), "a waiter never tried"
        assert holds[0].release() is True
        assert eventually(lambda: len(order) == 1, 60), "no waiter took the freed hold"
        assert order == [0], f"the freed hold went to waiter {order}, not the head of the queue"
        assert holds[1].release() is True and holds[2].release() is True
        assert eventually(lambda: len(order) == N, 60), "the waiters did not take the two freed holds"
        assert sorted(order[1:]) == [1, 2], f"two freed holds went to waiters {order[1:]}, not the next two"
        assert waiters[0].release() is True
        for thread in threads:
            thread.join(90)
        assert order[N:] == [N], f"the last waiter did not take the hold its predecessor freed: {order}"
        self.release_all(waiters)


def _live_at_each_start(lines: list[dict[str, Any]]) -> list[tuple[int, list[int]]]:
    """For each ``start`` line of a hold log (see ``_limits_child.worker``): its index and the holds live
    when the store granted that hold.

    Judged honestly, with no client clock (some children run an hour off): the store grants holds in
    the order of their fencing tokens, so a hold X was granted before the hold Y of a ``start`` line
    when X's token is lower. Such an X was still live at Y's grant when:

    - X was confirmed by a renewal and then released, and its ``end`` line (written before the
      release) comes after Y's ``start`` line (written after Y's grant); or
    - X never ended so (its process was killed, or stopped past its lease, or its release was
      refused), and Y was granted before X's lease ended, by the store's clock.

    The log's order alone would be wrong here: a child may write its ``start`` line after a child
    the store granted later has written its own.
    """
    ended: dict[int, int] = {}
    expires: dict[int, float] = {}
    for index, line in enumerate(lines):
        if line["event"] == "start":
            expires[line["token"]] = line["expires"]
        elif line["event"] == "end":
            ended[line["token"]] = index
            expires[line["token"]] = line["expires"]
        elif line["event"] == "released" and not line["released"]:
            del ended[line["token"]]  # the lease ended it before the release came
    starts = [(index, line) for index, line in enumerate(lines) if line["event"] == "start"]
    seen: list[tuple[int, list[int]]] = []
    for index, line in starts:
        token: int = line["token"]
        granted: float = line["created"]
        earlier = [other["token"] for _, other in starts if other["token"] < token]
        live = [other for other in earlier
                if (ended[other] > index if other in ended else granted < expires[other] - STORE_TIME_SLACK)]
        seen.append((index, [*live, token]))
    return seen


def _most_at_once(lines: list[dict[str, Any]]) -> int:
    """The most holds live at once in a hold log (see ``_live_at_each_start``)."""
    return max((len(live) for _, live in _live_at_each_start(lines)), default=0)


def _first_over(lines: list[dict[str, Any]], limit: int) -> str:
    """The first ``start`` line that found more than ``limit`` holds live, with the lines of those holds."""
    for index, live in _live_at_each_start(lines):
        if len(live) > limit:
            shown = [f"{at}: {line}" for at, line in enumerate(lines) if line["token"] in live]
            return f"at line {index}, holds {live} were live:\n" + "\n".join(shown)
    return "none"


class LimitsAcrossProcesses(_LimitKit):
    """``limit=N`` across processes: never more than N holders among competing processes, with holders
    killed, stopped past their lease and on skewed clocks; a killed holder's hold frees at its lease end, alone.

    Asks of the store: ``limits`` and ``multiprocess`` (compose it beside ``Limits`` and ``Processes``); on a
    ``distributed`` store, Debian's ``faketime`` for the skewed children.
    """

    needs: ClassVar[tuple[str, ...]] = ("limits", "multiprocess")

    @staticmethod
    def start_hold(processes: list[subprocess.Popen[str]], name: str, store_url: str, **args: Any) -> tuple[
            subprocess.Popen[str], dict[str, Any]]:
        """A child holding one of the name's holds (``_limits_child.hold``), and what it said."""
        child = spawn_role("hold", {"name": name, "url": store_url, "limit": N, **args}, program=CHILD)
        processes.append(child)
        fact = read_fact(child, timeout=60)
        assert fact["acquired"] is True, fact
        return child, fact

    @not_per_api
    def test_a_killed_holders_hold_frees_at_its_lease_end_alone(self, persister: Persister, name: str,
                                                                 store_url: str,
                                                                 processes: list[subprocess.Popen[str]]) -> None:
        kept = [self.start_hold(processes, name, store_url, ttl=LONG_LEASE)]
        victim, killed = self.start_hold(processes, name, store_url, ttl=2)
        kept.append(self.start_hold(processes, name, store_url, ttl=LONG_LEASE))
        victim.kill()
        victim.wait(timeout=30)
        successor = self.singleton(name, persister, limit=N)
        assert successor.lock(wait=60) is True, "the killed holder's hold never came free"
        assert successor.record.created_at.timestamp() >= killed["expires_at"] - STORE_TIME_SLACK, \
            "the killed holder's hold was taken before its lease ended"
        kept_tokens = [fact["token"] for _, fact in kept]
        assert tokens_of(persister.holders(name)) == [*kept_tokens, successor.fencing_token]
        for child, _ in kept:
            tell(child, "verify")
            assert read_fact(child) == {"verified": True}, "a hold beside the killed one was touched"
            tell(child, "release")
            assert read_fact(child) == {"released": True}
        assert successor.release() is True

    @not_per_api
    def test_never_more_than_n_holders_across_processes(self, persister: Persister, name: str, store_url: str,
                                                        tmp_path: Path,
                                                        processes: list[subprocess.Popen[str]]) -> None:
        """8 processes share N=3 holds for 10 s: two holders are SIGKILLed while they hold, one is stopped past its
        lease (it must find its hold lost), and on a distributed store two run on clocks an hour off."""
        log = tmp_path / "holds.jsonl"
        common = {"name": name, "url": store_url, "limit": N, "ttl": 2, "log": str(log), "seconds": 10}
        # Two sitters keep their first hold, a third its third, until the rule kills or stops them.
        skews = [self.faketime("+1h"), self.faketime("-1h")] if persister.distributed else []
        killed_first, stopped, killed_later, *workers = everyone = [
            spawn_role("worker", {**common, "sit_at": sit_at}, prefix=skews[index - 3] if 0 <= index - 3 < len(skews) else (),
                       env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"}, program=CHILD)
            for index, sit_at in enumerate((1, 1, 3, None, None, None, None, None))]
        processes.extend(everyone)
        for sitter, signal_number in ((killed_first, signal.SIGKILL), (stopped, signal.SIGSTOP),
                                      (killed_later, signal.SIGKILL)):
            sat = read_fact(sitter, timeout=60)
            assert "holding" in sat, sat
            sitter.send_signal(signal_number)
            if sitter is stopped:
                stopped_token = sat["holding"]
        assert eventually(lambda: stopped_token not in tokens_of(persister.holders(name)), 60), \
            "the stopped holder's lease never ran out"
        stopped.send_signal(signal.SIGCONT)
        tell(stopped, "go")
        woke = read_fact(stopped, timeout=60)
        assert woke == {"renewed": False, "lost": True, "token": stopped_token}, \
            f"a holder stopped past its lease did not find its hold lost: {woke}"
        for child in (*workers, stopped):
            assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
        for child in (killed_first, killed_later):
            assert child.wait(timeout=30) == -signal.SIGKILL
        lines = _log_lines(log)
        starts = [line for line in lines if line["event"] == "start"]
        assert len({line["token"] for line in starts}) == len(starts), "two holds shared a fencing token"
        assert len({line["pid"] for line in starts}) >= len(everyone) - 3, "few processes ever held"
        assert [line["token"] for line in lines if line["event"] == "lost"].count(stopped_token) == 1
        most = _most_at_once(lines)
        assert most == N, f"holds live at once: {most} (limit {N}); the first start over it: {_first_over(lines, N)}"


def _log_lines(log: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The hold log's lines so far (``event`` ones only, if given)."""
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line]
    return [line for line in lines if event is None or line["event"] == event]

