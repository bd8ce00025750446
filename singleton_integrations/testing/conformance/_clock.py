"""The store's clock judges every lease: a client's skewed clock neither steals a lock nor shortens one."""

from __future__ import annotations

import subprocess
import time
from typing import ClassVar

from ...persisters import Persister
from ._helpers import (
    not_per_api,
    read_fact,
    spawn_role,
)
from ._kit import ConformanceKit

__all__ = ["StoreClock"]


class StoreClock(ConformanceKit):
    """The store's clock: a client three hours ahead cannot take a live lock, one three hours behind cannot
    write a lock others see as expired.

    Asks of the store: ``distributed = True`` (clients on other hosts, with other clocks), and Debian's
    ``faketime`` on the machine (skipped without it, failed without it under ``CI=true``).
    """

    needs: ClassVar[tuple[str, ...]] = ("distributed",)

    @not_per_api
    def test_client_clock_skew_neither_steals_nor_shortens(self, persister: Persister, name: str, store_url: str,
                                                             processes: list[subprocess.Popen[str]]) -> None:
        ahead_clock, behind_clock = self.faketime("+3h"), self.faketime("-3h")
        skew_env = {"FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        holder = self.singleton(name, persister, lock_expire_seconds=30)
        assert holder.lock()
        # A client three hours ahead must not see our 30-second lease as long expired.
        ahead = spawn_role("try_lock", {"name": name, "url": store_url}, prefix=ahead_clock, env=skew_env)
        processes.append(ahead)
        fact = read_fact(ahead, timeout=60)
        assert fact["exists_before"] is True and fact["acquired"] is False
        assert holder.verify()
        holder.release()
        # A client three hours behind must not write a lock that others see as expired.
        behind = spawn_role("try_lock", {"name": name, "url": store_url, "ttl": 20},
                            prefix=behind_clock, env=skew_env)
        processes.append(behind)
        fact = read_fact(behind, timeout=60)
        assert fact["acquired"] is True
        assert holder.exists() is True
        assert holder.lock() is False
        record = persister.get(name)
        assert record is not None and record.expires_at is not None
        assert abs(record.expires_at.timestamp() - (time.time() + 20)) < 15
        persister.force_release(name)
