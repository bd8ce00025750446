"""An in-process store: for tests and for one process with many threads."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import ClassVar

from .._record import AcquireResult, LockRecord, Owner
from ._base import Persister, ReleaseWatch

__all__ = ["Memory"]

_named_stores: dict[str, Memory] = {}
_named_stores_lock = threading.Lock()


class _ConditionWatch(ReleaseWatch):
    def __init__(self, store: Memory) -> None:
        self._store = store
        self._seen = store._releases

    def wait(self, timeout: float) -> None:
        with self._store._changed:
            self._store._changed.wait_for(lambda: self._store._releases != self._seen, timeout)
            self._seen = self._store._releases


class Memory(Persister):
    """Locks in a dict guarded by a condition variable; expiry uses ``time.time()``."""

    backend: ClassVar[str] = "memory"
    notifies: ClassVar[bool] = True
    multiprocess: ClassVar[bool] = False
    clock: ClassVar[str] = "this process's clock"

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._locks: dict[str, LockRecord] = {}
        self._fences: dict[str, int] = {}
        self._releases = 0

    @classmethod
    def from_url(cls, url: str) -> Memory:
        """``memory://NAME`` gives the same store for the same NAME within a process."""
        key = url.partition("://")[2]
        with _named_stores_lock:
            return _named_stores.setdefault(key, cls())

    def _live(self, name: str, now: float) -> LockRecord | None:
        record = self._locks.get(name)
        if record is not None and record.expires_at is not None and record.expires_at.timestamp() <= now:
            return None
        return record

    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        with self._changed:
            now = time.time()
            previous = self._locks.get(name)
            live = self._live(name, now)
            if live is not None:
                retry = live.expires_at.timestamp() - now if live.expires_at else None
                return AcquireResult(False, live, retry_after=retry)
            fence = self._fences.get(name, 0) + 1
            self._fences[name] = fence
            record = LockRecord(
                name=name,
                owner_token=owner.owner_token,
                fencing_token=fence,
                host=owner.host,
                pid=owner.pid,
                created_at=datetime.fromtimestamp(now, timezone.utc),
                expires_at=datetime.fromtimestamp(now + ttl, timezone.utc) if ttl else None,
                metadata=dict(owner.metadata),
            )
            self._locks[name] = record
            return AcquireResult(True, record, expired=previous)

    def release(self, name: str, owner_token: str) -> bool:
        with self._changed:
            record = self._locks.get(name)
            if record is None or record.owner_token != owner_token:
                return False
            del self._locks[name]
            self._releases += 1
            self._changed.notify_all()
            # A lease that ran out untaken is cleared too, but it was not held until now.
            return record.expires_at is None or record.expires_at.timestamp() > time.time()

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        with self._changed:
            now = time.time()
            live = self._live(name, now)
            if live is None or live.owner_token != owner_token:
                return None
            expires = datetime.fromtimestamp(now + ttl, timezone.utc) if ttl else None
            record = LockRecord(**{**live.__dict__, "expires_at": expires})
            self._locks[name] = record
            return record

    def get(self, name: str) -> LockRecord | None:
        with self._changed:
            return self._live(name, time.time())

    def list(self, prefix: str = "") -> list[LockRecord]:
        with self._changed:
            now = time.time()
            live = (self._live(n, now) for n in sorted(self._locks) if n.startswith(prefix))
            return [r for r in live if r is not None]

    def force_release(self, name: str) -> LockRecord | None:
        with self._changed:
            record = self._live(name, time.time())
            self._locks.pop(name, None)
            self._releases += 1
            self._changed.notify_all()
            return record

    def watch(self, name: str) -> ReleaseWatch:
        return _ConditionWatch(self)

    def __repr__(self) -> str:
        return f"Memory(locks={len(self._locks)})"
