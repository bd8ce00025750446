"""A persister seen from inside a waiter: its attempts, its looks, and whether each wait was woken.

For tests that must tell a waiter woken by a release from one that polled: wrap the
store in ``ObservedPersister``, give the wait no safety poll (``poll_interval``, and
the core's ``_lockstate.NOTIFY_SAFETY_POLL`` in the test), and check that the wait
that ended with the name was woken (``waits[-1] is True``).
"""

from __future__ import annotations

from singleton_integrations import LockRecord
from singleton_integrations.persisters import Persister, ReleaseWatch

from .conformance import CountingPersister

__all__ = ["ObservedPersister", "RecordedWatch"]


class RecordedWatch(ReleaseWatch):
    """A release watch that records whether each wait was woken (True) or ran out (False)."""

    def __init__(self, inner: ReleaseWatch, waits: list[bool]) -> None:
        self.inner = inner
        self.waits = waits

    def wait(self, timeout: float) -> bool:
        woken = bool(self.inner.wait(timeout))
        self.waits.append(woken)
        return woken

    async def wait_async(self, timeout: float) -> bool:
        woken = bool(await self.inner.wait_async(timeout))
        self.waits.append(woken)
        return woken

    def close(self) -> None:
        self.inner.close()


class ObservedPersister(CountingPersister):
    """Counts acquire attempts (``acquires``) and looks at the holder (``looks``); records every wait (``waits``).

    Everything else passes through to ``inner``. ``poll_interval`` replaces the store's,
    e.g. with a value far beyond the test so that only a wake-up can end a pause.
    """

    def __init__(self, inner: Persister, poll_interval: float | None = None) -> None:
        super().__init__(inner)
        if poll_interval is not None:
            self.poll_interval = poll_interval
        self.waits: list[bool] = []
        self.looks = 0

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        return RecordedWatch(super().watch(name, owner_token), self.waits)

    def get(self, name: str) -> LockRecord | None:
        try:
            return self.inner.get(name)
        finally:
            self.looks += 1

    async def aget(self, name: str) -> LockRecord | None:
        try:
            return await self.inner.aget(name)
        finally:
            self.looks += 1
