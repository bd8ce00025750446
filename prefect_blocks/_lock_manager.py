"""A ``prefect.locking`` lock manager on any persister, so SERIALIZABLE transactions lock across hosts.

Prefect names a lock's owner with a ``holder`` string (a transaction's UUID, or
host:pid:thread) and may release it from another instance or process. The owner
token stored with the lock is derived from that holder (a hash), so any
instance that knows the holder can release or check it, and nothing else can.
The manager pickles as configuration only; each process opens its own clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from prefect.locking.protocol import LockManager
from pydantic import SecretStr

from singleton_integrations import AcquireResult, LockRecord, Owner
from singleton_integrations._record import validate_metadata, validate_name, validate_ttl
from singleton_integrations.persisters import Persister

from ._context import current_run
from ._store import persister_for

__all__ = ["SingletonLockManager"]

_SAFETY_POLL = 2.0  # even when the store notifies, look again this often


def owner_token_for(holder: str) -> str:
    """The owner token for Prefect's ``holder``: the same holder gives the same token in every process."""
    if not isinstance(holder, str) or not holder:
        raise ValueError("a lock holder must be a non-empty str")
    return hashlib.sha256(f"prefect-holder\x00{holder}".encode()).hexdigest()[:32]


class SingletonLockManager(LockManager):
    """Transaction record locks in a singleton-integrations store (any URL ``persisters.from_url`` takes).

    ``name_prefix`` keeps record keys apart from job lock names.
    ``default_hold_timeout`` applies when Prefect asks for no hold timeout (it never passes
    one from transactions); None keeps Prefect's meaning, held until released.
    """

    DEFAULT_NAME_PREFIX = "prefect-record:"

    def __init__(
        self,
        url: str | SecretStr,
        *,
        name_prefix: str = DEFAULT_NAME_PREFIX,
        default_hold_timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._url = url if isinstance(url, SecretStr) else SecretStr(url)
        if not isinstance(name_prefix, str):
            raise TypeError("name_prefix must be a str")
        self.name_prefix = name_prefix
        self.default_hold_timeout = validate_ttl(default_hold_timeout, "default_hold_timeout")
        self.metadata = validate_metadata(metadata)

    # -- configuration, pickling ---------------------------------------------------

    @property
    def persister(self) -> Persister:
        """This process's persister for the URL (created on first use, never pickled)."""
        return persister_for(self._url.get_secret_value())

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self._url.get_secret_value(),
            "name_prefix": self.name_prefix,
            "default_hold_timeout": self.default_hold_timeout,
            "metadata": dict(self.metadata),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        url = state.pop("url")
        self.__init__(url, **state)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SingletonLockManager) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash((self._url.get_secret_value(), self.name_prefix))

    def __repr__(self) -> str:
        from singleton_integrations._urls import redact_url

        return f"SingletonLockManager({redact_url(self._url.get_secret_value())!r}, name_prefix={self.name_prefix!r})"

    def lock_name(self, key: str) -> str:
        """The stored lock name for a transaction record key."""
        return validate_name(f"{self.name_prefix}{key}")

    # -- the protocol: sync ----------------------------------------------------------

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return self._acquire(key, holder, acquire_timeout, hold_timeout, None)

    def release_lock(self, key: str, holder: str) -> None:
        """Release ``holder``'s lock; ``ValueError`` when another holder has it, nothing when nobody does.

        As prefect-redis does (PrefectHQ/prefect#17676): a transaction retried after a
        rollback releases again, and a lock already released or run out is no conflict.
        The holder is read first because a store's release answers a repeated release
        of this token as done, even after another holder took the name.
        """
        name, token = self.lock_name(key), owner_token_for(holder)
        persister = self.persister
        record = persister.get(name)
        if record is not None and record.owner_token == token:
            if persister.release(name, token):
                return
            record = persister.get(name)  # our hold ran out just now: free, or someone else's
        if record is not None:
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")

    def is_locked(self, key: str) -> bool:
        return self.persister.get(self.lock_name(key)) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        record = self.persister.get(self.lock_name(key))
        return record is not None and record.owner_token == owner_token_for(holder)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self._wait_free(key, timeout, None)

    # -- the protocol: async (the persister's async twins: no thread per waiter) --------

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        name, token, ttl, owner = self._request(key, holder, hold_timeout)
        persister = self.persister
        deadline = _deadline(acquire_timeout)
        async with persister.awatching(name) as watch:
            while True:
                attempt = asyncio.ensure_future(persister.aacquire(name, owner, ttl))
                try:
                    result = await asyncio.shield(attempt)
                except asyncio.CancelledError:
                    await _release_if_acquired(persister, name, token, attempt)  # never leak it
                    raise
                if result.acquired or (result.record is not None and result.record.owner_token == token):
                    return True  # re-entrant, as Prefect's own managers are
                pause = self._pause(deadline, result.retry_after, None)
                if pause is None:
                    return False
                await watch.wait_async(pause)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        name = self.lock_name(key)
        persister = self.persister
        deadline = _deadline(timeout)
        async with persister.awatching(name) as watch:
            while True:
                record = await persister.aget(name)
                if record is None:
                    return True
                pause = self._pause(deadline, _retry_after(record), None)
                if pause is None:
                    return False
                await watch.wait_async(pause)

    # -- internals ---------------------------------------------------------------------

    def _acquire(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None,
        hold_timeout: float | None,
        cancelled: threading.Event | None,
    ) -> bool:
        name, token, ttl, owner = self._request(key, holder, hold_timeout)
        persister = self.persister
        deadline = _deadline(acquire_timeout)
        with persister.watching(name) as watch:
            while True:
                result = persister.acquire(name, owner, ttl)
                if result.acquired:
                    return True
                if result.record is not None and result.record.owner_token == token:
                    return True  # re-entrant, as Prefect's own managers are
                pause = self._pause(deadline, result.retry_after, cancelled)
                if pause is None:
                    return False
                watch.wait(pause)

    def _request(self, key: str, holder: str, hold_timeout: float | None) -> tuple[str, str, float | None, Owner]:
        """The stored name, owner token, lease and owner for one acquire."""
        token = owner_token_for(holder)
        ttl = validate_ttl(self.default_hold_timeout if hold_timeout is None else hold_timeout, "hold_timeout")
        owner = Owner(owner_token=token, metadata={**current_run().metadata(), **self.metadata})
        return self.lock_name(key), token, ttl, owner

    def _wait_free(self, key: str, timeout: float | None, cancelled: threading.Event | None) -> bool:
        name = self.lock_name(key)
        persister = self.persister
        deadline = _deadline(timeout)
        with persister.watching(name) as watch:
            while True:
                record = persister.get(name)
                if record is None:
                    return True
                pause = self._pause(deadline, _retry_after(record), cancelled)
                if pause is None:
                    return False
                watch.wait(pause)

    def _pause(self, deadline: float, retry_after: float | None, cancelled: threading.Event | None) -> float | None:
        """How long to wait before the next look, or None when the time is up."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (cancelled is not None and cancelled.is_set()):
            return None
        persister = self.persister
        pause = min(remaining, _SAFETY_POLL if persister.notifies else persister.poll_interval)
        if retry_after is not None:
            pause = min(pause, retry_after + 0.001)
        if cancelled is not None:
            pause = min(pause, 0.1)
        return pause


def _retry_after(record: LockRecord) -> float | None:
    """Seconds until ``record``'s lease ends, as far as this host's clock can tell."""
    if record.expires_at is None:
        return None
    return max(record.expires_at.timestamp() - time.time(), 0.0)


async def _release_if_acquired(persister: Persister, name: str, token: str, attempt: asyncio.Future[AcquireResult]) -> None:
    """After a cancellation: let the acquire in flight finish, and give back what it got."""
    try:
        result = await asyncio.shield(attempt)
        if result.acquired:
            await asyncio.shield(persister.arelease(name, token))
    except Exception:  # the lease frees it; the cancellation matters more
        logging.getLogger("prefect_blocks").warning("could not release lock %r after a cancellation", name, exc_info=True)


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"a timeout must be zero or more seconds, or None, not {timeout!r}")
    return time.monotonic() + timeout
