"""A waiting run says so in its log: when the wait starts, then every ``WAIT_LOG_INTERVAL`` seconds.

The core's wait gives no sign while it lasts, so a reporter runs beside it (a
thread for ``with``, a task for ``async with``) and reads the holder from the
store: one read when the wait starts and one per interval, never on the path
of a lock that is free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from singleton_integrations import LockRecord
from singleton_integrations.persisters import Persister

from ._messages import waiting, waiting_at_limit

__all__ = ["WAIT_LOG_INTERVAL", "WaitReport", "areporting_wait", "reporting_wait"]

#: Seconds between two "still waiting" lines in the run's log.
WAIT_LOG_INTERVAL = 60.0
#: How long the first attempt gets before the wait counts as started: a store round trip
#: is far shorter, so a lock that is free is taken before the reporter reads anything.
FIRST_ATTEMPT_SECONDS = 0.5

_HOST = socket.gethostname()
_fallback_logger = logging.getLogger("prefect_blocks")


@dataclass(frozen=True)
class WaitReport:
    """What the reporter needs: the lock, the store, the run's logger, how our own record looks, and ``limit``."""

    name: str
    persister: Persister
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
    metadata: Mapping[str, str]
    limit: int = 1

    def _ours(self, record: LockRecord) -> bool:
        return record.pid == os.getpid() and record.host == _HOST and dict(record.metadata) == dict(self.metadata)

    def line(self, seen: list[LockRecord], started: float, said: bool) -> str | None:
        """The log line for the holds ``seen``, or None when one is our own (taken, not yet returned)."""
        if any(self._ours(record) for record in seen):
            return None
        waited = time.monotonic() - started if said else None
        if self.limit > 1:
            return waiting_at_limit(self.name, seen, self.limit, waited)
        return waiting(self.name, seen[0] if seen else None, waited)

    def read(self) -> list[LockRecord]:
        """The holds to name: every hold under ``limit=N``, else the one holder."""
        if self.limit > 1:
            return self.persister.holders(self.name)
        record = self.persister.get(self.name)
        return [] if record is None else [record]

    async def aread(self) -> list[LockRecord]:
        if self.limit > 1:
            return await self.persister.aholders(self.name)
        record = await self.persister.aget(self.name)
        return [] if record is None else [record]

    def say(self, seen: list[LockRecord], started: float, said: bool) -> tuple[float, bool]:
        """Log what the holds ``seen`` mean; the pause before the next read, and whether the wait was said."""
        line = self.line(seen, started, said)
        if line is None:
            return (WAIT_LOG_INTERVAL if said else FIRST_ATTEMPT_SECONDS), said
        self.logger.info("%s", line)
        return WAIT_LOG_INTERVAL, True

    def run(self, done: threading.Event) -> None:
        started, pause, said = time.monotonic(), FIRST_ATTEMPT_SECONDS, False
        while not done.wait(pause):
            try:
                seen = self.read()
            except Exception:  # the report must never break the wait: look again after the same pause
                _fallback_logger.debug("could not read the holders of %r", self.name, exc_info=True)
                continue
            if not done.is_set():
                pause, said = self.say(seen, started, said)

    async def arun(self) -> None:
        started, pause, said = time.monotonic(), FIRST_ATTEMPT_SECONDS, False
        while True:
            await asyncio.sleep(pause)
            try:
                seen = await self.aread()
            except Exception:
                _fallback_logger.debug("could not read the holders of %r", self.name, exc_info=True)
                continue
            pause, said = self.say(seen, started, said)


@contextmanager
def reporting_wait(report: WaitReport) -> Iterator[None]:
    """Report on a blocking wait from a daemon thread until the block ends."""
    done = threading.Event()
    threading.Thread(target=report.run, args=(done,), name=f"prefect-blocks-wait:{report.name}", daemon=True).start()
    try:
        yield
    finally:
        done.set()  # not joined: a store read in flight ends by its own timeout


@asynccontextmanager
async def areporting_wait(report: WaitReport) -> AsyncIterator[None]:
    """Report on an awaited wait from a task on the loop until the block ends."""
    reporter = asyncio.ensure_future(report.arun())
    try:
        yield
    finally:
        reporter.cancel()
