"""The Redis persister's rules, written once for the sync and the async client.

Each primitive is a generator of ``Op`` values (one script call, or for ``list``
a SCAN and pipelined reads) that is sent each call's reply and returns the
primitive's answer: ``redis.Redis`` drives the same generator with redis-py's
sync and async clients (``_steps.drive``/``adrive``), so only the sending, the
topology's routing and the pub/sub listener are written twice. The scripts
themselves, and the key layout they keep, are in ``_redis_scripts``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from .._errors import PersisterError
from .._record import AcquireResult, LockRecord, Owner
from ._redis_scripts import HOLDS_SUFFIX, RELEASED_MARKER, script_keys

__all__ = ["EVAL", "READ", "SCAN", "Op", "Rules", "Steps", "bulk", "record", "sorted_holds"]

EVAL, SCAN, READ = "eval", "scan", "read"

_R = TypeVar("_R")

_EPOCH = datetime.fromtimestamp(0, timezone.utc)


class Op:
    """One client call.

    ``eval``: the script ``script`` on ``keys`` with ``args`` (bytes and ints, so
    nothing is encoded again per call); with ``wait``, WAIT follows on the same
    connection and the reply is ``(script reply, replicas that confirmed)``.
    ``packed_keys`` is the key count and the keys already in the protocol's form,
    for a sender that writes the command itself. ``scan``: every key matching
    ``args[0]`` (a list). ``read``: for each lock key in ``keys``, its value and its
    holder JSON, in one pipelined round trip (a flat list).
    """

    __slots__ = ("args", "keys", "kind", "packed_keys", "script", "wait")

    def __init__(self, kind: str, script: str, keys: tuple[Any, ...], args: tuple[Any, ...], wait: bool = False,
                 packed_keys: bytes = b"") -> None:
        self.kind, self.script, self.keys, self.args, self.wait = kind, script, keys, args, wait
        self.packed_keys = packed_keys

    def __repr__(self) -> str:  # the arguments hold owner tokens: keep them out of logs
        return f"Op({self.kind} {self.script})"


#: A primitive's steps: each yields an ``Op``, is sent its reply, and returns the primitive's answer.
Steps = Generator[Op, Any, _R]


def _when(milliseconds: object) -> datetime | None:
    if milliseconds is None or milliseconds == "":
        return None
    return datetime.fromtimestamp(int(milliseconds) / 1000, timezone.utc)  # type: ignore[call-overload]


def record(name: str, token: str | None, holder: str | None) -> LockRecord:
    """A record from the state hash's holder JSON; tolerant of one someone else removed."""
    data: dict[str, Any] = json.loads(holder) if holder else {}
    if token is None or token == RELEASED_MARKER:
        token = str(data.get("owner_token", ""))
    return LockRecord(
        name=name,
        owner_token=token,
        fencing_token=int(data.get("fencing_token", 0)),
        host=str(data.get("host", "unknown")),
        pid=int(data.get("pid", 0)),
        created_at=_when(data.get("created_at")) or _EPOCH,
        expires_at=_when(data.get("expires_at")),
        metadata=data.get("metadata") or {},
        released_at=_when(data.get("released_at")),
        hold_until=_when(data.get("hold_until")),
    )


def sorted_holds(name: str, listed: Any) -> list[LockRecord]:
    """The records of a script's ``every_hold`` list (the lock key's token and holder JSON,
    '' when it is free, then each hold's JSON), by fencing token."""
    records = [record(name, None, text) for text in listed[2:] if text]
    if listed[0]:
        records.append(record(name, listed[0], listed[1] or None))
    records.sort(key=_fencing)
    return records


def _fencing(held: LockRecord) -> int:
    return held.fencing_token


def _our_record(name: str, owner: Owner, fence: int, created_ms: int, ttl_ms: int, hold_ms: int) -> LockRecord:
    """The record a fresh acquire made, built without reading the holder JSON back."""
    life = max(ttl_ms, hold_ms) if ttl_ms else 0
    return LockRecord(
        name=name,
        owner_token=owner.owner_token,
        fencing_token=int(fence),
        host=owner.host,
        pid=owner.pid,
        created_at=datetime.fromtimestamp(created_ms / 1000, timezone.utc),
        expires_at=datetime.fromtimestamp((created_ms + life) / 1000, timezone.utc) if life else None,
        metadata=dict(owner.metadata),
        hold_until=datetime.fromtimestamp((created_ms + hold_ms) / 1000, timezone.utc) if hold_ms else None,
    )


def _acquired(name: str, owner: Owner, reply: Any, ttl_ms: int, hold_ms: int) -> AcquireResult:
    """What ACQUIRE_SCRIPT's reply means."""
    if type(reply) is str:  # the uncontended path: "FENCE CREATED_MS"
        fence, _, created = reply.partition(" ")
        return AcquireResult(True, _our_record(name, owner, int(fence), int(created), ttl_ms, hold_ms))
    if reply[0] == 1:
        return AcquireResult(True, _our_record(name, owner, reply[1], reply[2], ttl_ms, hold_ms),
                             expired=record(name, None, reply[3]))
    if reply[0] == 2:
        return AcquireResult(True, record(name, owner.owner_token, reply[1]))
    if reply[0] == 3:
        return AcquireResult(False, None, retry_after=reply[1] / 1000, queued_behind=True)
    if reply[0] == 5:  # one of the holds of limit=N
        return AcquireResult(True, _our_record(name, owner, reply[1], reply[2], ttl_ms, hold_ms),
                             expired=record(name, None, reply[3]) if reply[3] else None)
    if reply[0] == 4:  # every live hold, read by the refusing step
        holds = sorted_holds(name, reply[2:])
        return AcquireResult(False, holds[0] if holds else None,
                             retry_after=reply[1] / 1000 if reply[1] >= 0 else None, holders=tuple(holds))
    pttl = reply[3]
    return AcquireResult(False, record(name, reply[1], reply[2]), retry_after=pttl / 1000 if pttl >= 0 else None)


def _freed(reply: Any) -> tuple[bool, str | None]:
    """RELEASE_SCRIPT's reply: (the name is free now, the queue head it should wake)."""
    if reply == 1:
        return True, None
    if isinstance(reply, str):  # the clients decode replies
        return True, reply
    return False, None


def bulk(value: bytes) -> bytes:
    """One argument in the Redis protocol's form (a bulk string)."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


#: Lock names whose keys are kept encoded per ``Rules``; past it the cache starts over.
_KEYS_CACHED = 1024


def ttl_ms(ttl: float | None) -> int:
    """A lease in whole milliseconds for the scripts; 0 means no expiry."""
    return max(1, round(ttl * 1000)) if ttl else 0


class Rules:
    """The primitives as step generators for one key prefix.

    ``notify(name, head)`` wakes this process's next waiter of a name a primitive
    freed (no I/O: the in-process release hub), before the PUBLISH comes back.
    """

    def __init__(self, prefix: str, purge_ms: int, wait_replicas: int, wait_timeout_ms: int,
                 notify: Callable[[str, str | None], None]) -> None:
        self.prefix = prefix
        self.purge_ms = purge_ms
        self._purge = b"%d" % purge_ms
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.notify = notify
        self._members: tuple[str, int, Mapping[str, str], bytes] | None = None
        self._keys: dict[str, tuple[tuple[bytes, ...], bytes]] = {}

    def _op(self, script: str, name: str, args: tuple[Any, ...], wait: bool = False) -> Op:
        """A script call on ``name``'s keys, encoded once per name and kept."""
        cached = self._keys.get(name)
        if cached is None:
            if len(self._keys) >= _KEYS_CACHED:
                self._keys = {}
            keys = tuple(key.encode() for key in script_keys(f"{self.prefix}{{{name}}}"))
            counted = (b"%d" % len(keys), *keys)
            cached = self._keys[name] = (counted, b"".join(map(bulk, counted)))
        return Op(EVAL, script, cached[0], args, wait, cached[1])

    def _holder_members(self, owner: Owner) -> bytes:
        """The holder's JSON members but the times; host, pid and metadata are encoded once while they stay."""
        token = owner.owner_token
        token_json = f'"{token}"' if token.isalnum() and token.isascii() else json.dumps(token)
        cached = self._members
        if cached is None or cached[0] != owner.host or cached[1] != owner.pid or cached[2] != owner.metadata:
            metadata = dict(owner.metadata)
            text = json.dumps({"host": owner.host, "pid": owner.pid, "metadata": metadata}, separators=(",", ":"))[1:-1]
            self._members = cached = (owner.host, owner.pid, metadata, text.encode())
        return b'"owner_token":%s,%s' % (token_json.encode(), cached[3])

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None,
                queue_for: float | None, wake: str, limit: int = 1) -> Steps[AcquireResult]:
        """``wake``: the wake channel of this process's listener, for a queued caller ('' for none).

        ``limit`` > 1 takes one of the name's ``limit`` holds instead of the lock key.
        With ``wait_replicas``, an acquire too few replicas confirmed is given back and raises.
        """
        lease, hold, queue = ttl_ms(ttl), ttl_ms(min_hold), ttl_ms(queue_for)
        token, waits = owner.owner_token.encode(), self.wait_replicas
        members = self._holder_members(owner)
        reply = None
        if queue == 0 and limit == 1:  # the common call: the small script, which may hand over to the full one
            life = max(lease, hold) if lease else 0
            reply = yield self._op("acquire_free", name, (token, life, members, hold, self._purge), bool(waits))
            if waits and reply[0] is None:
                reply = None
        if reply is None:
            args: tuple[Any, ...] = (token, lease, members, hold, self._purge, queue, wake.encode())
            script = "acquire"
            if limit > 1:
                script, args = "acquire_limit", (*args, limit)
            reply = yield self._op(script, name, args, bool(waits))
        acknowledged = waits
        if waits:
            reply, acknowledged = reply
        result = _acquired(name, owner, reply, lease, hold)
        if type(reply) is not str and reply[0] == 5 and reply[4]:
            self.notify(name, reply[4])  # holds are still free: the queue's head may take one
        if result.acquired and acknowledged < waits:
            yield self._op("release", name, (token, self._purge))
            raise PersisterError(
                "redis",
                f"acquiring {name!r}: only {acknowledged} of {waits} replicas confirmed "
                f"within {self.wait_timeout_ms} ms; the lock was given back",
            )
        return result

    def release(self, name: str, owner_token: str) -> Steps[bool]:
        """True when the token held the name; too few replicas' confirmations is not an error."""
        reply = yield self._op("release", name, (owner_token.encode(), self._purge), bool(self.wait_replicas))
        if self.wait_replicas:
            reply = reply[0]
        freed, head = _freed(reply)
        if freed:
            self.notify(name, head)
        return freed or reply == 2

    def renew(self, name: str, owner_token: str, ttl: float | None) -> Steps[LockRecord | None]:
        holder = yield self._op("renew", name, (owner_token.encode(), ttl_ms(ttl), self._purge))
        return record(name, owner_token, holder) if holder else None

    def get(self, name: str) -> Steps[LockRecord | None]:
        """The lock key's holder; when it is free, the live hold under ``limit`` with the lowest fencing token."""
        reply = yield self._op("get", name, ())
        if not reply:
            return None
        if reply[0]:
            return record(name, reply[0], reply[1])
        holds = sorted_holds(name, reply)
        return holds[0] if holds else None

    def holders(self, name: str) -> Steps[list[LockRecord]]:
        """Every live hold of ``name`` (the lock key's and those under ``limit``), by fencing token."""
        return sorted_holds(name, (yield self._op("holders", name, ())))

    def force_release(self, name: str) -> Steps[LockRecord | None]:
        """Every live hold goes; the answer is the one with the lowest fencing token."""
        reply = yield self._op("force_release", name, (self._purge,))
        if not reply:
            return None
        self.notify(name, reply[0] or None)
        holds = sorted_holds(name, reply[1:])
        return holds[0] if holds else None

    def leave_queue(self, name: str, owner_token: str) -> Steps[None]:
        head = yield self._op("leave_queue", name, (owner_token.encode(),))
        if head:
            self.notify(name, head)

    def list(self, pattern: str, batch: int = 500) -> Steps[list[LockRecord]]:
        """Every live hold whose keys match ``pattern`` (SCAN, never KEYS), by name and fencing token.

        ``pattern`` matches every key of the names listed: the lock keys (ending in ``}``) are
        read in pipelined batches; a name with a holds key is read whole by the holders script.
        """
        keys: list[str] = yield Op(SCAN, "list", (), (pattern,))
        start = len(self.prefix) + 1
        limited = {str(key)[start:-len(HOLDS_SUFFIX)] for key in keys if str(key).endswith(HOLDS_SUFFIX)}
        # SCAN may return a key twice; a name with holds under limit is read with them.
        plain = sorted({str(key) for key in keys if str(key).endswith("}") and str(key)[start:-1] not in limited})
        found: dict[str, list[LockRecord]] = {}
        for first in range(0, len(plain), batch):
            chunk = tuple(plain[first:first + batch])
            replies = yield Op(READ, "list", chunk, ())
            for key, token, holder in zip(chunk, replies[::2], replies[1::2], strict=True):
                if token is not None:  # None: expired between SCAN and the read
                    name = key[start:-1]
                    found[name] = [record(name, token, holder)]
        for name in limited:
            holds = sorted_holds(name, (yield self._op("holders", name, ())))
            if holds:
                found[name] = holds
        return [held for name in sorted(found) for held in found[name]]
