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

from ._messages import waiting

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
    """What the reporter needs: the lock, the store, the run's logger and how our own record looks."""

    name: str
    persister: Persister
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
    metadata: Mapping[str, str]

    def line(self, record: LockRecord | None, started: float, said: bool) -> str | None:
        """The log line for ``record``, or None when it is our own hold (taken, not yet returned)."""
        if record is not None and record.pid == os.getpid() and record.host == _HOST and dict(record.metadata) == dict(self.metadata):
            return None
        return waiting(self.name, record, time.monotonic() - started if said else None)

    def say(self, record: LockRecord | None, started: float, said: bool) -> tuple[float, bool]:
        """Log what ``record`` means; the pause before the next read, and whether the wait was said."""
        line = self.line(record, started, said)
        if line is None:
            return (WAIT_LOG_INTERVAL if said else FIRST_ATTEMPT_SECONDS), said
        self.logger.info("%s", line)
        return WAIT_LOG_INTERVAL, True

    def run(self, done: threading.Event) -> None:
        started, pause, said = time.monotonic(), FIRST_ATTEMPT_SECONDS, False
        while not done.wait(pause):
            try:
                record = self.persister.get(self.name)
            except Exception:  # the report must never break the wait: look again after the same pause
                _fallback_logger.debug("could not read the holder of %r", self.name, exc_info=True)
                continue
            if not done.is_set():
                pause, said = self.say(record, started, said)

    async def arun(self) -> None:
        started, pause, said = time.monotonic(), FIRST_ATTEMPT_SECONDS, False
        while True:
            await asyncio.sleep(pause)
            try:
                record = await self.persister.aget(self.name)
            except Exception:
                _fallback_logger.debug("could not read the holder of %r", self.name, exc_info=True)
                continue
            pause, said = self.say(record, started, said)


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
