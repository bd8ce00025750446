"""Leases that outlive their taker: a hold that belongs to its owner token, not to an object.

A ``Singleton`` ties its hold to one object in one process: it renews it, releases
it at exit and on SIGTERM, and declares it lost. Some holds must outlive whoever
took them: an Airflow task group's lock is taken by one task and renewed and
released by others, in other processes; a Prefect transaction's lock is released
by whichever worker ends the transaction. ``Lease`` (blocking) and ``AsyncLease``
(coroutines) are that hold: a name and an owner token on a store. Taking one waits
through the same loop as ``Singleton.lock(wait=)`` (the fair queue, release
wake-ups, the deadline, cancellation); anyone who knows the token renews, checks
or releases it, from any process. They register nothing for exit or SIGTERM and
keep no state but their terms, so the lease length is what bounds a holder that
vanished.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, TypeVar

from . import metrics
from ._lockstate import (
    UNSET,
    Terms,
    TermsView,
    Waiting,
    acall_store,
    call_store,
    hold_of,
    holder_seen,
    holds,
    holds_seen,
    measure,
    validate_wait,
)
from ._record import AcquireResult, LockRecord, validate_owner_token
from ._singleton import await_turn, wait_turn
from .persisters._base import Persister

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncLease", "Lease"]

_R = TypeVar("_R")


def _owner_of(records: list[LockRecord], fencing_token: int) -> str | None:
    """The owner token of the live hold with ``fencing_token`` among a name's holds, if the store still shows it."""
    record = next((hold for hold in records if hold.fencing_token == fencing_token), None)
    if record is None or record.released:
        return None
    return record.owner_token


class _Terms(TermsView):
    """What both faces hold: the validated terms and the owner token; nothing that changes."""

    __slots__ = ("_info", "_owner_token", "_terms")

    def __init__(
        self,
        name: str,
        persister: Persister | str | None = None,
        *,
        owner_token: str | None = None,
        lock_expire_seconds: float | None = UNSET,
        metadata: Mapping[str, str] | None = None,
        min_hold_seconds: float | None = None,
        limit: int = 1,
    ) -> None:
        self._terms = Terms.of(
            name, persister, lock_expire_seconds=lock_expire_seconds, metadata=metadata,
            min_hold_seconds=min_hold_seconds, limit=limit,
        )
        self._owner_token = secrets.token_hex(16) if owner_token is None else validate_owner_token(owner_token)
        self._info = self._terms.lock_info(follows_hold=False)  # the hold may end elsewhere, or by expiry

    def _lock_terms(self) -> Terms:
        return self._terms

    @property
    def owner_token(self) -> str:
        """Proves ownership: whoever has it can renew and release the lease, so hand it on as a secret."""
        return self._owner_token

    def _waiting(self, wait: float | None) -> Waiting:
        return Waiting.to_take(self._terms, validate_wait(wait), self._owner_token, self._info)

    def _released(self, confirmed: object) -> bool:
        """The store's answer to a release; a confirmed one is measured (the hold's length is unknown here)."""
        if confirmed and (recorder := metrics.active()) is not None:
            measure(recorder.released, self._info, held_seconds=None)
        return bool(confirmed)

    def _adopted(self, records: list[LockRecord], fencing_token: int) -> Self | None:
        """``adopt``'s answer once the holds are read: a lease on that hold's owner token, or None."""
        token = _owner_of(records, fencing_token)
        if token is None:
            return None
        return type(self)(self.name, self.persister, owner_token=token, lock_expire_seconds=self.lock_expire_seconds)

    def __repr__(self) -> str:  # never the owner token: it is a capability
        limit = f", limit={self.limit}" if self.limit > 1 else ""
        return (f"{type(self).__name__}({self.name!r}, {self.persister!r}, "
                f"lock_expire_seconds={self.lock_expire_seconds!r}{limit})")


class Lease(_Terms):
    """A hold on a name that outlives this object and its process; its owner token is the hold.

    >>> from singleton_integrations import Lease, persisters
    >>> store = persisters.Memory()
    >>> lease = Lease("nightly-report", store, lock_expire_seconds=600)
    >>> lease.take().acquired
    True
    >>> elsewhere = Lease("nightly-report", store, owner_token=lease.owner_token, lock_expire_seconds=600)
    >>> elsewhere.verify(), elsewhere.renew() is not None, elsewhere.release()
    (True, True, True)

    Nothing renews it in the background or releases it at exit: renew it by
    ``lock_expire_seconds``, or let it run out. The token is random unless
    ``owner_token`` is given (16-128 visible ASCII characters, unguessable: it is
    a capability), e.g. derived from an id that every process of the owner knows.
    """

    __slots__ = ()

    @classmethod
    def adopt(cls, name: str, persister: Persister | str | None = None, *, fencing_token: int,
              lock_expire_seconds: float | None = UNSET) -> Lease | None:
        """The lease on the live hold whose fencing token is ``fencing_token``; None when that hold is over.

        For a hold handed on by its fencing token, which may be shown and logged,
        while the owner token stays in the store (readable only by who can read the store).
        """
        looking = cls(name, persister, lock_expire_seconds=lock_expire_seconds)
        return looking._adopted(looking.holders(), fencing_token)

    def take(self, *, wait: float | None = None, cancel: threading.Event | None = None) -> AcquireResult:
        """Acquire the name for this owner token; with ``wait``, wait up to that many seconds (``math.inf``: for good).

        The wait is ``Singleton.lock(wait=)``'s: queued on a fair store under the
        owner token, woken by the release, ended by its deadline or by ``cancel``
        (a ``threading.Event``), leaving the queue either way. Returns the store's
        answer: ``acquired`` with our record, its ``expired`` predecessor if one
        was taken over; else the holder (``record``), ``queued_behind`` and
        ``retry_after``. A token that already holds the name gets ``acquired``.
        """
        terms = self._terms
        return wait_turn(self._waiting(wait), terms.acquirer(terms.owner(self._owner_token)), cancel)[1]

    def renew(self) -> LockRecord | None:
        """Extend the lease to ``lock_expire_seconds`` from now; the renewed record, or None when the token no longer holds the name."""
        persister = self.persister
        renewed: LockRecord | None = call_store(
            persister, persister.renew, self.name, self._owner_token, self.lock_expire_seconds
        )
        return renewed

    def release(self) -> bool:
        """Give the name up if this token still holds it; True when the store confirms it did (owner-checked)."""
        persister = self.persister
        return self._released(call_store(persister, persister.release, self.name, self._owner_token))

    def holder(self) -> LockRecord | None:
        """Who holds the name now, whoever it is (during a minimum hold, the released record); one hold under ``limit``."""
        persister = self.persister
        record: LockRecord | None = call_store(persister, persister.get, self.name)
        return record

    def holders(self) -> list[LockRecord]:
        """Every live hold of the name, by fencing token."""
        persister = self.persister
        records: list[LockRecord] = call_store(persister, persister.holders, self.name)
        return records

    def verify(self) -> bool:
        """Whether the store shows this token holding the name now (call before side effects).

        Among every hold of the name, whatever ``limit`` this object was given: a lease adopted
        or rebuilt from its token alone may be any of a name's holds.
        """
        return holds(hold_of(self.holders(), self._owner_token), self._owner_token)

    def wait_until_free(
        self, *, wait: float | None = None, cancel: threading.Event | None = None, poll_interval: float | None = None
    ) -> LockRecord | None:
        """Wait until nobody holds the name, taking nothing; None once free, else the holder when the wait ended.

        Under ``limit=N``: until fewer than N holds are live (``wait_for_room`` returns them all).

        The same loop as ``take`` (woken by the release, looking again when the
        holder's lease or minimum hold ends), for code that only reports the name
        free and lets someone else take it. ``poll_interval`` is the longest pause
        between looks (default: the store's ``poll_interval``, or a 2 s safety poll
        where releases wake the wait); a process serving many waits may look less often.
        """
        if self.limit > 1:
            seen = self.wait_for_room(wait=wait, cancel=cancel, poll_interval=poll_interval)
            return seen[0] if seen else None
        seconds = validate_wait(wait)
        persister = self.persister
        name = self.name
        waiting = Waiting.until_free(persister, name, seconds, poll_interval)
        return wait_turn(waiting, lambda _: holder_seen(persister.get(name)), cancel)[1].record

    def wait_for_room(
        self, *, wait: float | None = None, cancel: threading.Event | None = None, poll_interval: float | None = None
    ) -> list[LockRecord]:
        """Wait until fewer than ``limit`` holds of the name are live, taking nothing: [] once so, else every
        hold when the wait ended.

        ``wait_until_free`` for a limit: the same loop, woken by the release of any hold and
        looking again when the first of them can end. With ``limit=1``, until the name is free.
        """
        seconds = validate_wait(wait)
        persister, name, limit = self.persister, self.name, self.limit
        waiting = Waiting.until_free(persister, name, seconds, poll_interval)
        return list(wait_turn(waiting, lambda _: holds_seen(persister.holders(name), limit), cancel)[1].holders)


class AsyncLease(_Terms):
    """``Lease`` for coroutines, over the persister's async primitives: waits hold no thread.

    Cancellation is native: a cancelled ``take`` returns at once holding nothing
    and leaves the queue; an acquire that completed as the cancellation arrived
    is released, owner-checked (with a caller's own ``owner_token`` that already
    held the name, that gives the earlier hold up too). ``release`` is shielded.
    """

    __slots__ = ()

    @classmethod
    async def adopt(cls, name: str, persister: Persister | str | None = None, *, fencing_token: int,
                    lock_expire_seconds: float | None = UNSET) -> AsyncLease | None:
        """``Lease.adopt`` for coroutines."""
        looking = cls(name, persister, lock_expire_seconds=lock_expire_seconds)
        return looking._adopted(await looking.holders(), fencing_token)

    async def take(self, *, wait: float | None = None) -> AcquireResult:
        """``Lease.take`` for coroutines; cancel the task to give up."""
        terms = self._terms
        return (await await_turn(self._waiting(wait), terms.async_acquirer(terms.owner(self._owner_token))))[1]

    async def renew(self) -> LockRecord | None:
        """``Lease.renew`` for coroutines."""
        renewed: LockRecord | None = await self._call(
            self.persister.arenew(self.name, self._owner_token, self.lock_expire_seconds)
        )
        return renewed

    async def release(self) -> bool:
        """``Lease.release``, shielded from cancellation: a cancelled task still releases."""
        import asyncio  # here, not at the top: a sync lock never loads asyncio

        return self._released(await asyncio.shield(self._call(self.persister.arelease(self.name, self._owner_token))))

    async def holder(self) -> LockRecord | None:
        """``Lease.holder`` for coroutines."""
        record: LockRecord | None = await self._call(self.persister.aget(self.name))
        return record

    async def holders(self) -> list[LockRecord]:
        """``Lease.holders`` for coroutines."""
        records: list[LockRecord] = await self._call(self.persister.aholders(self.name))
        return records

    async def verify(self) -> bool:
        """``Lease.verify`` for coroutines."""
        return holds(hold_of(await self.holders(), self._owner_token), self._owner_token)

    async def wait_until_free(self, *, wait: float | None = None, poll_interval: float | None = None) -> LockRecord | None:
        """``Lease.wait_until_free`` for coroutines; cancel the task to give up."""
        if self.limit > 1:
            seen = await self.wait_for_room(wait=wait, poll_interval=poll_interval)
            return seen[0] if seen else None
        seconds = validate_wait(wait)
        waiting = Waiting.until_free(self.persister, self.name, seconds, poll_interval)
        persister = self.persister
        name = self.name

        async def look(_: float | None) -> AcquireResult:
            return holder_seen(await persister.aget(name))

        return (await await_turn(waiting, look))[1].record

    async def wait_for_room(self, *, wait: float | None = None, poll_interval: float | None = None) -> list[LockRecord]:
        """``Lease.wait_for_room`` for coroutines; cancel the task to give up."""
        seconds = validate_wait(wait)
        persister, name, limit = self.persister, self.name, self.limit
        waiting = Waiting.until_free(persister, name, seconds, poll_interval)

        async def look(_: float | None) -> AcquireResult:
            return holds_seen(await persister.aholders(name), limit)

        return list((await await_turn(waiting, look))[1].holders)

    async def _call(self, call: Awaitable[_R]) -> _R:
        return await acall_store(self.persister, call)
