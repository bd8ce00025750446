"""``block.lock(name)``: one context manager for ``with`` and ``async with``.

It acquires or raises ``LockConflict``, renews while held (when the block says so),
releases on exit, on exceptions, on cancellation and on Prefect's ``TerminationSignal``,
and turns every step into a Prefect event and a run log line. The run's logger is
taken when the lock is entered: a loss is learned on the renewal thread, where
Prefect has no run context, and its line must still reach the run's log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from singleton_integrations import AsyncSingleton, LockLost, Singleton, validate_limit

from ._context import RunInfo, current_run, prefect_handles_sigterm, run_logger
from ._events import emit_lock_event
from ._messages import conflict
from ._waiting import WaitReport, areporting_wait, reporting_wait

if TYPE_CHECKING:
    from prefect.events import Event

__all__ = ["LockSource", "SingletonLock"]

#: What ``with`` (a ``Singleton``) or ``async with`` (an ``AsyncSingleton``) holds.
CoreLock = Singleton | AsyncSingleton


class LockSource(Protocol):
    """What a lock needs of its block (``SingletonBlock``): the stored name and a configured core lock."""

    def lock_name(self, name: str) -> str: ...

    def get_singleton(self, name: str, *, lock_expire_seconds: float | None = ..., min_hold_seconds: float | None = ...,
                      metadata: Mapping[str, str] | None = ..., release_on_sigterm: bool = ...,
                      apply_prefix: bool = ..., limit: int = ...) -> Singleton: ...

    def get_async_singleton(self, name: str, *, lock_expire_seconds: float | None = ...,
                            min_hold_seconds: float | None = ..., metadata: Mapping[str, str] | None = ...,
                            release_on_sigterm: bool = ..., apply_prefix: bool = ...,
                            limit: int = ...) -> AsyncSingleton: ...


class SingletonLock:
    """A lock on one name through a block; enter it with ``with`` or ``async with``.

    ``with`` yields the core ``Singleton`` and ``async with`` an ``AsyncSingleton``, so the
    body can read ``fencing_token`` or call ``ensure_held()`` before side effects.
    ``limit=N`` lets up to N holders in at once, each with a hold of its own; the
    conflict then names every holder.
    """

    def __init__(
        self,
        block: LockSource,
        name: str,
        *,
        wait: float | None = None,
        lock_expire_seconds: float | None = None,
        min_hold_seconds: float | None = None,
        metadata: Mapping[str, str] | None = None,
        log_conflict: bool = True,
        limit: int = 1,
    ) -> None:
        self.limit = validate_limit(limit)
        self.block = block
        self.name = block.lock_name(name)
        self.wait = wait
        self.lock_expire_seconds = lock_expire_seconds
        self.min_hold_seconds = min_hold_seconds
        self.extra_metadata = dict(metadata or {})
        #: ``@singleton`` turns the conflict into the run's state, whose message Prefect logs: say it once.
        self.log_conflict = log_conflict
        self._held: CoreLock | None = None
        self._run = RunInfo()
        self._log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logging.getLogger("prefect_blocks")
        self._lost_reason: str | None = None
        self._entered = threading.Lock()
        self._acquired_event: Event | None = None  # the hold's acquired event: its released event follows it
        self._hold_token: int | None = None  # the hold's fencing token, labelling its events (read after it ends too)

    @property
    def singleton(self) -> CoreLock | None:
        """The core lock while entered."""
        return self._held

    # -- sync ----------------------------------------------------------------------

    def __enter__(self) -> Singleton:
        singleton = self._prepare(asynchronous=False)
        assert isinstance(singleton, Singleton)
        try:
            with self._reporting_wait(singleton):
                acquired = singleton.lock(wait=self.wait)
        except BaseException:
            self._finish()
            raise
        self._entered_with(singleton, acquired)
        return singleton

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        singleton = self._held
        assert isinstance(singleton, Singleton), "exit without enter"
        try:
            released = singleton.release()
        except Exception as error:
            if exc_type is None:
                raise
            released = self._release_failed(singleton, error)  # the body's exception says more
        finally:
            self._finish()
        self._after_release(singleton, released, exc_type is None)

    # -- async ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncSingleton:
        singleton = self._prepare(asynchronous=True)
        assert isinstance(singleton, AsyncSingleton)
        try:
            async with self._areporting_wait(singleton):
                acquired = await singleton.lock(wait=self.wait)
        except BaseException:  # cancellation included: AsyncSingleton never leaks a lock it got
            self._finish()
            raise
        self._entered_with(singleton, acquired)
        return singleton

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        singleton = self._held
        assert isinstance(singleton, AsyncSingleton), "exit without enter"
        try:
            released = await singleton.release()  # shielded: a cancelled task still releases
        except Exception as error:
            if exc_type is None:
                raise
            released = self._release_failed(singleton, error)
        finally:
            self._finish()
        self._after_release(singleton, released, exc_type is None)

    # -- shared ----------------------------------------------------------------------

    def _prepare(self, asynchronous: bool) -> CoreLock:
        if not self._entered.acquire(blocking=False):
            raise RuntimeError(f"this lock on {self.name!r} is already entered; create another with block.lock()")
        self._run = current_run()
        self._log = run_logger()  # here, in the run's thread: the renewal thread has no run context
        self._lost_reason = None
        self._hold_token = None
        metadata = {**self._run.metadata(), **self.extra_metadata}
        options: dict[str, Any] = {
            "lock_expire_seconds": self.lock_expire_seconds,
            "min_hold_seconds": self.min_hold_seconds,
            "metadata": metadata,
            "release_on_sigterm": not prefect_handles_sigterm(),
            "apply_prefix": False,
        }
        if self.limit > 1:
            options["limit"] = self.limit
        try:
            singleton: CoreLock
            if asynchronous:
                singleton = self.block.get_async_singleton(self.name, **options)
            else:
                singleton = self.block.get_singleton(self.name, **options)
        except BaseException:
            self._entered.release()
            raise
        singleton.on("expired", lambda message: self._on_expired(singleton, str(message)))
        singleton.on("lost", lambda message: self._on_lost(singleton, str(message)))
        self._held = singleton
        return singleton

    def _finish(self) -> None:
        self._held = None
        self._entered.release()

    def _entered_with(self, singleton: CoreLock, acquired: bool) -> None:
        """What an enter's answer means, for both faces: the conflict raised, or the hold announced."""
        if not acquired:
            self._conflict(singleton)
        self._acquired(singleton)

    def _conflict(self, singleton: CoreLock) -> None:
        self._finish()
        error = conflict(singleton.name, singleton.last_holder, self.wait, singleton.last_holders, self.limit)
        every = {"limit": self.limit, "holders": [record.to_dict() for record in error.holders]} if self.limit > 1 else None
        self._emit("conflict", singleton, str(error), error.holder, payload=every)
        if self.log_conflict:
            self._log.info("%s", error)
        raise error

    def _acquired(self, singleton: CoreLock) -> None:
        message = f"acquired lock {singleton.name!r} with fencing token {singleton.fencing_token}"
        self._hold_token = singleton.fencing_token
        self._acquired_event = self._emit("acquired", singleton, message, singleton.record)
        self._log.info("%s", message)

    def _after_release(self, singleton: CoreLock, released: bool, body_succeeded: bool) -> None:
        if released:
            message = f"released lock {singleton.name!r}"
            self._emit("released", singleton, message, follows=self._acquired_event)
            self._log.info("%s", message)
        if self._lost_reason is not None and body_succeeded:
            raise LockLost(singleton.name, self._lost_reason)

    def _release_failed(self, singleton: CoreLock, error: Exception) -> bool:
        self._log.warning("could not release lock %r (its lease will expire): %s", singleton.name, error)
        return False

    def _on_expired(self, singleton: CoreLock, message: str) -> None:
        self._emit("expired", singleton, message)
        self._log.warning("%s", message)

    def _on_lost(self, singleton: CoreLock, message: str) -> None:
        # May run on the renewal thread: the run and its logger are the ones captured at enter.
        self._lost_reason = message
        self._emit("lost", singleton, message)
        self._log.warning("%s", message)

    def _wait_report(self, singleton: CoreLock) -> WaitReport:
        return WaitReport(singleton.name, singleton.persister, self._log, singleton.metadata, self.limit)

    def _reporting_wait(self, singleton: CoreLock) -> AbstractContextManager[None]:
        """Say in the run's log that the run waits, and for whom, while ``lock(wait=...)`` blocks."""
        return reporting_wait(self._wait_report(singleton)) if self.wait else nullcontext()

    def _areporting_wait(self, singleton: CoreLock) -> AbstractAsyncContextManager[None]:
        return areporting_wait(self._wait_report(singleton)) if self.wait else nullcontext()

    def _emit(self, what: str, singleton: CoreLock, message: str, record: Any = None,
              follows: Event | None = None, payload: Mapping[str, Any] | None = None) -> Event | None:
        hold = self._hold_token if what in ("acquired", "released", "lost") else None
        return emit_lock_event(what, singleton.name, run=self._run, backend=singleton.persister.backend,
                               message=message, record=record, follows=follows, payload=payload, fencing_token=hold)

    def __repr__(self) -> str:
        limit = f", limit={self.limit}" if self.limit > 1 else ""
        return f"SingletonLock({self.name!r}, wait={self.wait!r}{limit})"
