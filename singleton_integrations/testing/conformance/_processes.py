"""Rules across processes: a store several processes share, and what a process owes its locks at exit and on signals."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from typing import Any, ClassVar

from ...persisters import Persister
from ._helpers import (
    not_per_api,
    read_fact,
    spawn_role,
)
from ._kit import ConformanceKit

__all__ = ["Processes"]


class Processes(ConformanceKit):
    """Processes and signals: one winner among racing processes, no overlapping holds and rising tokens across
    processes, release at exit and on SIGTERM (chaining the previous handler, for ``AsyncSingleton`` too),
    a forked child that owns nothing, and a killed holder's lease that ends.

    Asks of the store: ``multiprocess = True`` (several processes share it through its URL); the cases
    start children with ``sys.executable -m singleton_integrations.testing._child``.
    """

    needs: ClassVar[tuple[str, ...]] = ("multiprocess",)

    @staticmethod
    def assert_ends_freeing(child: subprocess.Popen[str], exit_code: int, persister: Persister, name: str,
                            why: str = "the ended process left its lock behind") -> None:
        """``child`` ends with ``exit_code``, and the name it held is free."""
        assert child.wait(timeout=30) == exit_code
        assert persister.get(name) is None, why

    @not_per_api
    def test_exit_releases_and_stops_renewal(self, persister: Persister, name: str, store_url: str,
                                             processes: list[subprocess.Popen[str]]) -> None:
        child = self.start_holder(processes, "exit_holding", name, store_url, ttl=30, auto_renew=True)
        self.assert_ends_freeing(child, 0, persister, name)

    @not_per_api
    def test_forked_child_does_not_own_the_lock(self, persister: Persister, name: str, store_url: str,
                                                processes: list[subprocess.Popen[str]]) -> None:
        child = spawn_role("fork_child", {"name": name, "url": store_url, "ttl": 1, "auto_renew": True, "after": 1.5})
        processes.append(child)
        fact = read_fact(child, timeout=60)
        assert fact["child"] == {"held": False, "token": None, "released": False}
        assert fact["parent_held"] is True, "the parent lost its lock after a fork"
        assert child.wait(timeout=30) == 0

    @not_per_api
    def test_sigterm_releases_then_ends_the_process(self, persister: Persister, name: str, store_url: str,
                                                    processes: list[subprocess.Popen[str]]) -> None:
        child = self.start_holder(processes, "hold", name, store_url)
        child.send_signal(signal.SIGTERM)
        self.assert_ends_freeing(child, -signal.SIGTERM, persister, name)

    @not_per_api
    def test_sigterm_chains_the_previous_handler(self, persister: Persister, name: str, store_url: str,
                                                 processes: list[subprocess.Popen[str]]) -> None:
        child = self.start_holder(processes, "hold", name, store_url, previous_handler=True)
        child.send_signal(signal.SIGTERM)
        assert read_fact(child) == {"previous_handler": True}
        self.assert_ends_freeing(child, 3, persister, name)

    @not_per_api
    def test_killed_holder_lock_expires(self, persister: Persister, name: str, store_url: str,
                                        processes: list[subprocess.Popen[str]]) -> None:
        child = self.start_holder(processes, "hold", name, store_url, ttl=1)
        child.kill()
        child.wait(timeout=30)
        assert persister.get(name) is not None
        successor = self.singleton(name, persister)
        assert successor.lock(wait=30) is True
        successor.release()

    @not_per_api
    def test_async_holder_is_released_at_exit_and_on_sigterm(self, persister: Persister, name: str, store_url: str,
                                                             processes: list[subprocess.Popen[str]]) -> None:
        child = self.start_holder(processes, "async_hold", name, store_url, ttl=300, auto_renew=True)
        self.assert_ends_freeing(child, 0, persister, name, "exit did not release an AsyncSingleton's lock")
        child = self.start_holder(processes, "async_hold", name, store_url, ttl=300, then="sleep")
        child.send_signal(signal.SIGTERM)
        self.assert_ends_freeing(child, -signal.SIGTERM, persister, name, "SIGTERM did not release an AsyncSingleton's lock")

    # The rules that start many children come last, as before the split: run beside the fork rule
    # (a one-second lease) on a loaded machine, their busy children can starve its renewal.

    @not_per_api
    def test_expired_takeover_race_has_one_winner(self, persister: Persister, name: str, store_url: str,
                                                   processes: list[subprocess.Popen[str]]) -> None:
        for _round in range(3):
            stale = self.singleton(name, persister, lock_expire_seconds=0.2)
            assert stale.lock()
            self.wait_until_expired(persister, name)
            start_at = time.time() + 3.0
            racers = [spawn_role("race", {"name": name, "url": store_url, "start_at": start_at}) for _ in range(8)]
            processes.extend(racers)
            facts = [read_fact(racer, timeout=60) for racer in racers]
            for racer in racers:
                assert racer.stdin is not None
                racer.stdin.close()  # the winner holds until every racer has tried
            winners = [fact for fact in facts if fact["acquired"]]
            assert len(winners) == 1, facts
            assert winners[0]["events"].index("expired") < winners[0]["events"].index("locked")
            assert all("expired" not in fact["events"] for fact in facts if not fact["acquired"])
            for racer in racers:
                assert racer.wait(timeout=30) == 0
            assert not persister.get(name)

    @not_per_api
    def test_fencing_tokens_rise_across_processes(self, persister: Persister, name: str, store_url: str,
                                                   processes: list[subprocess.Popen[str]]) -> None:
        tokens = []
        for _ in range(4):
            child = spawn_role("hold", {"name": name, "url": store_url, "hold_for": 0})
            processes.append(child)
            tokens.append(read_fact(child)["token"])
            assert child.wait(timeout=30) == 0
            local = self.singleton(name, persister)
            assert local.lock()
            tokens.append(local.fencing_token)
            local.release()
        assert tokens == sorted(set(tokens)), tokens

    @not_per_api
    def test_no_overlap_across_processes(self, persister: Persister, name: str, store_url: str, tmp_path: Any,
                                         processes: list[subprocess.Popen[str]]) -> None:
        log = tmp_path / "holds.jsonl"
        workers = [spawn_role("loop", {"name": name, "url": store_url, "seconds": 3, "log": str(log), "work": 0.003})
                   for _ in range(8)]
        processes.extend(workers)
        for worker in workers:
            assert worker.wait(timeout=120) == 0, worker.stderr.read() if worker.stderr else ""
        holds = [json.loads(line) for line in log.read_text().splitlines()]
        holds = [hold for hold in holds if "start" in hold]
        assert len(holds) >= 16, f"only {len(holds)} holds in 3 s"
        assert len({hold["pid"] for hold in holds}) >= 2
        holds.sort(key=lambda hold: hold["start"])
        overlaps = sum(1 for a, b in itertools.pairwise(holds) if b["start"] < a["end"])
        assert overlaps == 0
        tokens = [hold["token"] for hold in holds]
        assert tokens == sorted(set(tokens)), "fencing tokens did not rise with the holds"
        assert all(hold["released"] for hold in holds)
