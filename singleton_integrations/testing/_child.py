"""Roles played by separate processes in the conformance suite.

Run as ``python -m singleton_integrations.testing._child ROLE JSON``; each role
prints one JSON line per fact so the parent can assert on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .. import AsyncSingleton, Singleton, persisters


def _say(**fact: Any) -> None:
    print(json.dumps(fact), flush=True)


def _options(args: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "lock_expire_seconds": args.get("ttl", 30),
        "auto_renew": args.get("auto_renew", False),
        "metadata": args.get("metadata"),
    }
    if args.get("min_hold") is not None:  # only when asked: the option is new in this round
        options["min_hold_seconds"] = args["min_hold"]
    return options


def _recorder(events: list[str], event: str) -> Callable[[Any], None]:
    """An event handler that notes ``event`` in ``events``."""
    return lambda message: events.append(event)


def _singleton(args: dict[str, Any], events: list[str] | None = None) -> Singleton:
    singleton = Singleton(args["name"], persisters.from_url(args["url"]), **_options(args))
    if events is not None:
        for event in ("expired", "locked", "conflict", "lost", "released"):
            singleton.on(event, _recorder(events, event))
    return singleton


def race(args: dict[str, Any]) -> None:
    """Wait for a shared start time, try once, report the outcome and event order."""
    events: list[str] = []
    singleton = _singleton(args, events)
    singleton.persister.get(args["name"])  # connect before the start line, so the race is on the acquire
    time.sleep(max(0.0, args["start_at"] - time.time()))
    late = time.time() - args["start_at"]
    acquired = singleton.lock()
    _say(acquired=acquired, events=events, token=singleton.fencing_token, late=late)
    sys.stdin.read()  # the parent closes our stdin once every racer has reported
    if acquired:
        singleton.release()


def hold(args: dict[str, Any]) -> None:
    """Take the lock, say so, then sleep until killed or ``hold_for`` has passed."""
    if args.get("previous_handler"):
        def previous_handler(signum: int, frame: FrameType | None) -> None:
            _say(previous_handler=True)
            sys.exit(3)

        signal.signal(signal.SIGTERM, previous_handler)
    singleton = _singleton(args)
    acquired = singleton.lock(wait=args.get("wait"))
    _say(acquired=acquired, token=singleton.fencing_token, pid=os.getpid(), at=time.monotonic())
    released = None
    if acquired:
        time.sleep(args.get("hold_for", 60))
        if args.get("release", True):
            released = singleton.release()
    _say(done=True, released=released, lost=singleton.lost, at=time.monotonic())


def try_lock(args: dict[str, Any]) -> None:
    """One attempt (used under a skewed clock): report acquired, exists and the holder's times."""
    singleton = _singleton(args)
    conflicts: list[str] = []
    singleton.on("conflict", lambda message: conflicts.append(str(message)))
    exists = singleton.exists()
    acquired = singleton.lock()
    holder = singleton.holder()
    _say(acquired=acquired, exists_before=exists, token=singleton.fencing_token,
         holder_expires_at=holder.expires_at.timestamp() if holder and holder.expires_at else None,
         holder_released=getattr(holder, "released_at", None) is not None, conflict=conflicts[-1] if conflicts else None)
    if acquired and args.get("release", False):
        singleton.release()


def loop(args: dict[str, Any]) -> None:
    """Acquire, note the hold interval by the system-wide monotonic clock, release; repeat."""
    singleton = _singleton(args)
    deadline = time.time() + args["seconds"]
    with open(args["log"], "a", buffering=1) as log:
        while time.time() < deadline:
            if not singleton.lock(wait=args.get("wait", 5)):
                log.write(json.dumps({"conflict": True}) + "\n")
                continue
            start = time.monotonic()
            token = singleton.fencing_token
            time.sleep(args.get("work", 0.002))
            end = time.monotonic()
            released = singleton.release()
            log.write(json.dumps({"start": start, "end": end, "token": token, "released": released, "pid": os.getpid()}) + "\n")


def exit_holding(args: dict[str, Any]) -> None:
    """Take the lock (renewing) and return without releasing: exit must release it."""
    singleton = _singleton(args)
    _say(acquired=singleton.lock(), token=singleton.fencing_token)


def fork_child(args: dict[str, Any]) -> None:
    """Hold with renewal, fork, and report what the child sees; the child must not own the lock."""
    singleton = _singleton(args)
    assert singleton.lock()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        report = {"held": singleton.held, "token": singleton.fencing_token, "released": singleton.release()}
        os.write(write, json.dumps(report).encode())
        os.close(write)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    time.sleep(args.get("after", 0))
    _say(child=child, parent_held=singleton.verify())
    singleton.release()


def handover(args: dict[str, Any]) -> None:
    """Take and give back the lock on command (``lock`` / ``release`` lines), saying when each happened.

    ``released_at`` is the monotonic time just before the release call: a waiter
    in another process measures its hand-over from there. With ``announce``, the
    first refused attempt of each ``lock`` says ``{"waiting": true}``: the store
    has seen this waiter.
    """
    singleton = _singleton(args)
    if args.get("announce"):
        persister, attempt = singleton.persister, singleton.persister.acquire
        announced = [False]

        def acquire(*call: Any, **options: Any) -> Any:
            result = attempt(*call, **options)
            if not result.acquired and not announced[0]:
                announced[0] = True
                _say(waiting=True)
            return result

        persister.acquire = acquire  # type: ignore[method-assign]  # this child only: its first refused attempt is announced
    for command in sys.stdin:
        command = command.strip()
        if command == "lock":
            if args.get("announce"):
                announced[0] = False
            acquired = singleton.lock(wait=args.get("wait", 30))
            _say(acquired=acquired, token=singleton.fencing_token)
        elif command == "release":
            released_at = time.monotonic()
            _say(released=singleton.release(), released_at=released_at)


_kept: list[AsyncSingleton] = []


def async_hold(args: dict[str, Any]) -> None:
    """Hold with ``AsyncSingleton`` in ``asyncio.run``; then return without releasing, or sleep until killed."""

    async def main() -> None:
        singleton = AsyncSingleton(args["name"], persisters.from_url(args["url"]), **_options(args))
        _kept.append(singleton)  # still referenced at exit, as a program's lock usually is
        acquired = await singleton.lock()
        _say(acquired=acquired, token=singleton.fencing_token)
        if args.get("then") == "sleep":
            await asyncio.sleep(args.get("hold_for", 60))

    asyncio.run(main())


ROLES = {f.__name__: f for f in (race, hold, try_lock, loop, exit_holding, fork_child, handover, async_hold)}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
