"""A ``prefect.locking`` lock manager on any persister, so SERIALIZABLE transactions lock across hosts.

Prefect names a lock's owner with a ``holder`` string (a transaction's UUID, or
host:pid:thread) and may release it from another instance or process. The owner
token stored with the lock is derived from that holder (a hash), so any
instance that knows the holder can release or check it, and nothing else can:
each hold is a core ``Lease`` on that token, so waiting for a lock goes through
the core's own loop (the store's fair queue, woken by the release). The manager
pickles as configuration only; each process opens its own clients.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from prefect.locking.protocol import LockManager
from pydantic import SecretStr

from singleton_integrations import AsyncLease, Lease, redact_url, validate_metadata, validate_name, validate_ttl
from singleton_integrations.persisters import Persister

from ._context import current_run
from ._store import persister_for

__all__ = ["SingletonLockManager"]


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
        return f"SingletonLockManager({redact_url(self._url.get_secret_value())!r}, name_prefix={self.name_prefix!r})"

    def lock_name(self, key: str) -> str:
        """The stored lock name for a transaction record key."""
        return validate_name(f"{self.name_prefix}{key}")

    # -- the protocol: sync ----------------------------------------------------------

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """Take the record's lock for ``holder``, waiting up to ``acquire_timeout`` s (None: for good) in the store's queue.

        Re-entrant, as Prefect's own managers are: a holder that has it already gets True.
        """
        return self._lease(key, holder, hold_timeout).take(wait=_wait(acquire_timeout)).acquired

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
        """Wait until nobody holds the record's lock (taking nothing); False when ``timeout`` ran out first."""
        return Lease(self.lock_name(key), self.persister).wait_until_free(wait=_wait(timeout)) is None

    # -- the protocol: async (the persister's async twins: no thread per waiter) --------

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """``acquire_lock`` for coroutines: cancelling the task gives back whatever the attempt in flight took."""
        lease = self._async_lease(key, holder, hold_timeout)
        if await lease.verify():
            # Re-entrant without a new attempt: a cancelled take would give this earlier hold back too.
            return True
        return (await lease.take(wait=_wait(acquire_timeout))).acquired

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """``wait_for_lock`` for coroutines."""
        return await AsyncLease(self.lock_name(key), self.persister).wait_until_free(wait=_wait(timeout)) is None

    # -- internals ---------------------------------------------------------------------

    def _terms(self, key: str, holder: str, hold_timeout: float | None) -> dict[str, Any]:
        """The lease on the record's lock that ``holder`` owns: its token is derived from the holder."""
        return {
            "name": self.lock_name(key),
            "persister": self.persister,
            "owner_token": owner_token_for(holder),
            "lock_expire_seconds": validate_ttl(self.default_hold_timeout if hold_timeout is None else hold_timeout,
                                                "hold_timeout"),
            "metadata": {**current_run().metadata(), **self.metadata},
        }

    def _lease(self, key: str, holder: str, hold_timeout: float | None) -> Lease:
        return Lease(**self._terms(key, holder, hold_timeout))

    def _async_lease(self, key: str, holder: str, hold_timeout: float | None) -> AsyncLease:
        return AsyncLease(**self._terms(key, holder, hold_timeout))


def _wait(timeout: float | None) -> float:
    """Prefect's timeout as the core's wait: None waits for good."""
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"a timeout must be zero or more seconds, or None, not {timeout!r}")
    return float(timeout)
