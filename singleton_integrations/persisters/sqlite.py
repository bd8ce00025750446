"""The embedded default: one SQLite file shared by every process on one host."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from .._errors import PersisterError
from .._record import AcquireResult, LockRecord, Owner
from ._base import Persister

__all__ = ["Sqlite", "default_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS singleton_locks (
    name TEXT PRIMARY KEY,
    owner_token TEXT,
    fencing_token INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    metadata TEXT NOT NULL
)
"""
_COLUMNS = "name, owner_token, fencing_token, host, pid, created_at, expires_at, metadata"
# A free name keeps its row (owner_token NULL) so its fencing counter survives release.
_LIVE = "owner_token IS NOT NULL AND (expires_at IS NULL OR expires_at > ?)"


def default_path() -> Path:
    """The user's state directory, so every process of a user finds the same store."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "singleton-integrations" / "locks.sqlite3"


def _retry_busy(step: Callable[[], object], timeout: float) -> None:
    """Run ``step``, retrying "database is locked" until ``timeout``.

    Several processes opening a fresh file at once can get SQLITE_BUSY from the
    switch to WAL without SQLite calling its busy handler (it would deadlock), so
    the busy timeout alone does not cover the first open.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as error:
            if ("locked" not in str(error) and "busy" not in str(error)) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _when(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _record(row: tuple) -> LockRecord:
    name, owner_token, fence, host, pid, created, expires, metadata = row
    return LockRecord(name, owner_token, fence, host, pid, _when(created), _when(expires), json.loads(metadata))


class Sqlite(Persister):
    """Locks in a SQLite file; ``BEGIN IMMEDIATE`` makes each acquire one atomic step.

    The clock is the host's: every process sharing the file shares that host's
    clock, which is why this store is for one host only.
    """

    backend: ClassVar[str] = "sqlite"
    clock: ClassVar[str] = "the host's clock"
    poll_interval: float = 0.05

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 10.0) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"a SQLite path must be a str or path, not {type(path).__name__}")
        self.path = Path(path) if path is not None else default_path()
        self.timeout = float(timeout)
        self._guard = threading.RLock()  # re-entrant: a SIGTERM handler may release mid-call
        self._connection: sqlite3.Connection | None = None
        self._pid = 0

    @classmethod
    def from_url(cls, url: str, **options: object) -> Sqlite:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db``; ``sqlite://`` is the default file."""
        rest = url.partition("://")[2].partition("?")[0]
        if rest in ("", "/"):
            return cls(None, **options)  # type: ignore[arg-type]
        if not rest.startswith("/"):
            raise ValueError("a SQLite URL has no host: write sqlite:///relative.db or sqlite:////absolute.db")
        return cls(rest[1:], **options)  # type: ignore[arg-type]

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            _retry_busy(lambda: connection.execute("PRAGMA journal_mode=WAL"), self.timeout)
            connection.execute("PRAGMA synchronous=NORMAL")
            _retry_busy(lambda: connection.execute(_SCHEMA), self.timeout)
        except (sqlite3.Error, OSError) as error:
            raise PersisterError(self.backend, f"cannot open {str(self.path)!r}: {error}") from error
        self._connection, self._pid = connection, os.getpid()
        return connection

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._guard:
            connection = self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            except sqlite3.Error as error:
                raise PersisterError(self.backend, f"{error} (file {str(self.path)!r})") from error

    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        with self._transaction() as db:
            now = time.time()
            row = db.execute(f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ?", (name,)).fetchone()
            previous = _record(row) if row and row[1] is not None else None
            if previous and (previous.expires_at is None or previous.expires_at.timestamp() > now):
                retry = previous.expires_at.timestamp() - now if previous.expires_at else None
                return AcquireResult(False, previous, retry_after=retry)
            fence = (row[2] if row else 0) + 1
            values = (name, owner.owner_token, fence, owner.host, owner.pid, now,
                      now + ttl if ttl else None, json.dumps(dict(owner.metadata)))
            db.execute(f"INSERT OR REPLACE INTO singleton_locks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
            return AcquireResult(True, _record(values), expired=previous)

    def release(self, name: str, owner_token: str) -> bool:
        with self._transaction() as db:
            mine = "WHERE name = ? AND owner_token = ?"
            row = db.execute(f"SELECT expires_at FROM singleton_locks {mine}", (name, owner_token)).fetchone()
            if row is None:
                return False
            db.execute(f"UPDATE singleton_locks SET owner_token = NULL, expires_at = NULL {mine}", (name, owner_token))
            # A lease that ran out untaken is cleared too, but it was not held until now.
            return row[0] is None or row[0] > time.time()

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        with self._transaction() as db:
            now = time.time()
            row = db.execute(
                f"UPDATE singleton_locks SET expires_at = ? WHERE name = ? AND owner_token = ? AND {_LIVE} "
                f"RETURNING {_COLUMNS}",
                (now + ttl if ttl else None, name, owner_token, now),
            ).fetchone()
            return _record(row) if row else None

    def get(self, name: str) -> LockRecord | None:
        with self._transaction(write=False) as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM singleton_locks WHERE name = ? AND {_LIVE}", (name, time.time())
            ).fetchone()
            return _record(row) if row else None

    def list(self, prefix: str = "") -> list[LockRecord]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM singleton_locks WHERE substr(name, 1, ?) = ? AND {_LIVE} ORDER BY name",
                (len(prefix), prefix, time.time()),
            ).fetchall()
            return [_record(row) for row in rows]

    def force_release(self, name: str) -> LockRecord | None:
        with self._transaction() as db:
            row = db.execute(
                f"UPDATE singleton_locks SET owner_token = NULL, expires_at = NULL WHERE name = ? AND {_LIVE} "
                f"RETURNING {_COLUMNS}",
                (name, time.time()),
            ).fetchone()
            # RETURNING shows the row after the update: rebuild the holder from the old values we need.
            return _record((row[0], "", *row[2:6], None, row[7])) if row else None

    def close(self) -> None:
        with self._guard:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    def __repr__(self) -> str:
        return f"Sqlite({str(self.path)!r})"
