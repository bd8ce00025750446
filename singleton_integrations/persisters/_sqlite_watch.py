"""Hearing other processes' SQLite releases: inotify on the file's directory (Linux).

Every commit in WAL mode writes to ``FILE-wal``; a listener thread (one per file
and process, run by the file's ``ReleaseHub``) waits for those writes, reads
which of the names waited for in this process are free now, and wakes their
waiters (the queue's head, where one waits; ``free_of`` reads both, with the
store's rules). Under ``limit=N`` a name is worth waking when a hold is gone
since the last look and the name has room: ``free_of`` keeps what it saw in a
dict the listener hands it each time. Where inotify is missing (not Linux, or a
file system without it) the hub has no listener and waiters keep their 50 ms
poll, which also stays as the safety net here: a missed event costs one poll,
never a lost wake-up.
"""

from __future__ import annotations

import ctypes
import os
import select
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeAlias

from ._base import Listener, ReleaseHub

__all__ = ["inotify_listener"]

_IN_MODIFY = 0x00000002
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")
#: Whom to wake among the waiters of the names: (name, place to wake or None for the longest waiter);
#: (connection, names, the live fencing tokens it saw of each name at the last look, which it updates).
FreeOf: TypeAlias = Callable[[sqlite3.Connection, Iterable[str], "dict[str, frozenset[int]]"],
                             "list[tuple[str, str | None]]"]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "inotify_init1") and hasattr(libc, "inotify_add_watch") else None
    except OSError:
        return None


def inotify_listener(path: str, free_of: FreeOf) -> Listener | None:
    """A ``ReleaseHub`` listener for the SQLite file at ``path``, or None where inotify is unavailable."""
    libc = _libc()
    if libc is None:
        return None
    directory = os.fsencode(os.path.dirname(os.path.abspath(path)))
    ours = {os.path.basename(os.path.abspath(path)) + suffix for suffix in ("-wal", "")}
    database = os.path.abspath(path)

    def listen(hub: ReleaseHub, stop: threading.Event) -> None:
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        connection: sqlite3.Connection | None = None
        seen: dict[str, frozenset[int]] = {}
        try:
            mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_CREATE | _IN_MOVED_TO
            if libc.inotify_add_watch(fd, directory, mask) < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch failed")
            connection = sqlite3.connect(database, timeout=1.0, isolation_level=None, check_same_thread=False)
            hub.ready()  # subscribed: anything released before now is found by the waiters' next attempt
            while not stop.is_set():
                readable, _, _ = select.select([fd], [], [], 0.5)
                if not readable:
                    continue
                if not _ours(os.read(fd, 64 * 1024), ours):
                    continue
                time.sleep(0)  # let a burst of events arrive; the next read takes them all
                names = hub.names()
                if names:
                    try:
                        free = free_of(connection, names, seen)
                    except sqlite3.OperationalError:  # busy or a schema change mid-migration: wake everyone
                        hub.notify_all()
                        continue
                    for name, head in free:
                        hub.notify(name, head)
        finally:
            if connection is not None:
                connection.close()
            os.close(fd)

    return listen


def _ours(buffer: bytes, names: set[str]) -> bool:
    """True when the events in ``buffer`` touch the database or its WAL (or the queue overflowed)."""
    offset = 0
    while offset + _EVENT.size <= len(buffer):
        _wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
        name = buffer[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0").decode(errors="replace")
        offset += _EVENT.size + length
        if mask & _IN_Q_OVERFLOW or name in names:
            return True
    return False
