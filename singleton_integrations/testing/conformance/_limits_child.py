"""Roles played by separate processes in the ``limit=N`` rules (``LimitsAcrossProcesses``).

Run by its path (``runpy.run_path``) with ``ROLE JSON`` as the last two arguments; each
role prints one JSON line per fact, as ``singleton_integrations.testing._child`` does.
By path, not ``-m``: importing this package would import pytest and every rule first,
which made eight children starting at once on a loaded machine take seconds each.

``worker`` also appends its holds to a shared log, one ``write`` per line on a file
opened with ``O_APPEND``, so the lines of every process form one order: ``start``
once the store has granted a hold (with the store's ``created_at`` and ``expires_at``),
``end`` once a renewal has confirmed the hold and before it is released, ``released``
with the release's answer, ``lost`` when the renewal found the hold gone.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from typing import Any

from singleton_integrations import Singleton, persisters
from singleton_integrations.persisters import Persister


def _say(**fact: Any) -> None:
    print(json.dumps(fact), flush=True)


def _singleton(args: dict[str, Any], persister: Persister) -> Singleton:
    return Singleton(args["name"], persister, lock_expire_seconds=args.get("ttl", 30), limit=args["limit"],
                     release_on_sigterm=False)


class _Log:
    """The shared hold log: each line one ``write`` under ``O_APPEND``, so no two lines interleave."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(self, event: str, **fields: Any) -> None:
        os.write(self._fd, (json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n").encode())


def _pause(seconds: float) -> None:
    """Sleep without ``time.sleep``: under libfaketime its ``clock_nanosleep`` fails with EINVAL."""
    threading.Event().wait(seconds)


def hold(args: dict[str, Any]) -> None:
    """Take one of the name's holds, say so, then answer ``verify`` and ``release`` lines until stdin ends."""
    singleton = _singleton(args, persisters.from_url(args["url"]))
    acquired = singleton.lock(wait=args.get("wait"))
    record = singleton.record
    _say(acquired=acquired, token=singleton.fencing_token, pid=os.getpid(),
         expires_at=record.expires_at.timestamp() if record is not None and record.expires_at else None)
    for command in sys.stdin:
        if command.strip() == "verify":
            _say(verified=singleton.verify())
        elif command.strip() == "release":
            _say(released=singleton.release())


def worker(args: dict[str, Any]) -> None:
    """Take a hold, work a little, confirm it by a renewal, release; repeat for ``seconds``.

    With ``sit_at`` (k), the k-th hold is kept until a ``go`` line comes: the parent kills
    or stops this process meanwhile. A renewal refused after that (a SIGSTOP past the lease)
    is noted ``lost``: the hold ended with its lease, not at the release.
    """
    persister = persisters.from_url(args["url"])
    log = _Log(args["log"])
    deadline = time.monotonic() + args["seconds"]
    taken = 0
    while time.monotonic() < deadline:
        singleton = _singleton(args, persister)
        if not singleton.lock(wait=max(0.1, min(5.0, deadline - time.monotonic()))):
            continue
        record = singleton.record
        assert record is not None and record.expires_at is not None
        log.note("start", token=record.fencing_token, created=record.created_at.timestamp(),
                 expires=record.expires_at.timestamp())
        taken += 1
        sat = taken == args.get("sit_at")
        if sat:
            _say(holding=record.fencing_token, pid=os.getpid())
            sys.stdin.readline()
        else:
            _pause(random.uniform(0, args.get("work", 0.1)))
        renewed_ok = singleton.renew()
        if sat:
            _say(renewed=renewed_ok, lost=singleton.lost, token=record.fencing_token)
        if not renewed_ok:
            log.note("lost", token=record.fencing_token)
            singleton.release()
            continue
        renewed = singleton.record
        assert renewed is not None and renewed.expires_at is not None
        log.note("end", token=record.fencing_token, expires=renewed.expires_at.timestamp())
        log.note("released", token=record.fencing_token, released=singleton.release())
    persister.close()


ROLES = {role.__name__: role for role in (hold, worker)}

if __name__ == "__main__":
    ROLES[sys.argv[-2]](json.loads(sys.argv[-1]))
