"""The persister interface: the few atomic primitives a store must provide.

``Singleton`` owns everything else (waiting, events, renewal, signals), so a new
backend is a handful of methods. Each primitive is one atomic step on the store
and judges expiry by the store's clock. Run
``singleton_integrations.testing.conformance`` against a new persister to prove it.
"""

from __future__ import annotations

import functools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

from .._record import AcquireResult, LockRecord, Owner

__all__ = ["Persister", "ReleaseWatch", "SleepWatch"]

_logger = logging.getLogger("singleton_integrations")


def _logged_force_release(method: Callable[[Persister, str], LockRecord | None]) -> Callable[[Persister, str], LockRecord | None]:
    """Every forced release leaves a warning naming the lock and whom it was taken from."""

    @functools.wraps(method)
    def force_release(self: Persister, name: str) -> LockRecord | None:
        removed = method(self, name)
        if removed is not None:
            _logger.warning("force-released lock %r held by %s (%s)", name, removed.describe(), self.backend)
        else:
            _logger.info("force release of lock %r found no live holder (%s)", name, self.backend)
        return removed

    force_release.__logged__ = True  # type: ignore[attr-defined]
    return force_release


class ReleaseWatch:
    """A subscription to releases of one name, opened before the acquire attempt.

    Opening it first is what makes waiting lose no wake-up: a release that
    happens between a failed attempt and ``wait()`` is already queued.
    """

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when the name may be free."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the subscription."""


class SleepWatch(ReleaseWatch):
    """The fallback for stores that cannot notify: a bounded, interruptible sleep."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)

    def notify(self) -> None:
        self._event.set()


class Persister(ABC):
    """Stores locks; every method is one atomic operation judged by the store's clock."""

    backend: ClassVar[str] = "persister"
    #: True when several hosts can share the store (False for in-memory and SQLite).
    distributed: ClassVar[bool] = False
    #: True when separate processes can share the store (False only for in-memory).
    multiprocess: ClassVar[bool] = True
    #: True when ``watch`` is woken by releases rather than polling.
    notifies: ClassVar[bool] = False
    #: Where expiry is judged, for docs and errors.
    clock: ClassVar[str] = "the store's clock"
    #: Longest pause between polls while waiting when notification is unavailable.
    poll_interval: float = 0.5

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("force_release")
        if method is not None and not getattr(method, "__logged__", False) and not getattr(method, "__isabstractmethod__", False):
            cls.force_release = _logged_force_release(method)  # type: ignore[method-assign]

    @abstractmethod
    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        """Take ``name`` if it is free or expired (replacing the expired lock in the same step).

        A successful acquire mints a fencing token strictly greater than every earlier
        one for ``name``. On conflict, return the live holder's record.
        """

    @abstractmethod
    def release(self, name: str, owner_token: str) -> bool:
        """Give up ``name`` only if ``owner_token`` still holds it; True when it did."""

    @abstractmethod
    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        """Extend our live lease to ``ttl`` from now; None when the lock is no longer ours."""

    @abstractmethod
    def get(self, name: str) -> LockRecord | None:
        """The live (unexpired) lock on ``name``, if any."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[LockRecord]:
        """Every live lock whose name starts with ``prefix``, sorted by name."""

    @abstractmethod
    def force_release(self, name: str) -> LockRecord | None:
        """Administrative release regardless of owner; returns the record it removed."""

    def watch(self, name: str) -> ReleaseWatch:
        """Subscribe to releases of ``name``; the default polls."""
        return SleepWatch()

    @contextmanager
    def watching(self, name: str) -> Iterator[ReleaseWatch]:
        watch = self.watch(name)
        try:
            yield watch
        finally:
            watch.close()

    def close(self) -> None:
        """Release pooled connections; the persister reconnects if used again."""

    def __enter__(self) -> Persister:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
