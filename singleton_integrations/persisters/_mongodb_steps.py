"""The MongoDB persister's rules, written once for the sync and the async driver.

Each primitive is a generator of ``Op`` values (one driver call each) that
receives each call's reply, or has the call's error thrown in, and returns the
primitive's answer. ``mongodb.MongoDb`` drives the same generator with
``MongoClient`` or with ``AsyncMongoClient``, so only the I/O is written twice.

Documents (one per name, ``_id`` = the name)::

    {_id, name, owner, fence, host, pid, createdAt, expiresAt, created, metadata,
     purgeAt, releasedAt, holdUntil, expired}

``name`` and ``created`` are for singleton-process (the Node.js seed), which
shares the ``singletons`` collection: its unique index on ``name`` is what keeps
a seed process and a Python process from both holding a name, so a Python
document that holds a name carries ``name: <the name>``, and a free one carries
``name: {free: <the name>}`` (unique, and never equal to a seed's string, so
the seed can insert the name at once). ``created`` is the date the seed's own
expiry rule counts from: the lease end, moved by every renewal, so a seed
process cannot judge a live Python lock expired before its lease has ended
(the far future for a lock without expiry). Seed documents are
``{_id: ObjectId, name, created}``, recognised by having no ``owner`` field.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Generator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from .._record import AcquireResult, LockRecord, Owner

__all__ = ["SEED_HOST", "Op", "Steps"]

logger = logging.getLogger("singleton_integrations")

#: How a seed process's lock is shown: it records neither host nor pid.
SEED_HOST = "singleton-process (Node.js)"
#: ``created`` of a Python lock without expiry: the seed's expiry rule never reaches it.
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=timezone.utc)
TTL_INDEX = "singleton_purgeAt_ttl"
_RETRIES = 6


class Op:
    """One driver call: a collection method with its arguments, or ``server_now``.

    The runners map ``update_one``/``delete_one`` to their counts, ``find`` to a
    list, and ``server_now`` to the server's clock in epoch seconds.
    """

    __slots__ = ("args", "kwargs", "method")

    def __init__(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.method, self.args, self.kwargs = method, args, kwargs

    def __repr__(self) -> str:
        return f"Op({self.method})"


_R = TypeVar("_R")

#: A primitive's steps: each yields an ``Op``, is sent its result, and returns the primitive's answer.
Steps = Generator[Op, Any, _R]

# --- expressions: every time comparison is on {$toLong} values (a SecantusDB deviation) ---
NOW_MS = {"$toLong": "$$NOW"}
_HAS_OWNER = {"$ne": [{"$ifNull": ["$owner", None]}, None]}
_HAS_EXPIRY = {"$ne": [{"$ifNull": ["$expiresAt", None]}, None]}
_EXPIRED = {"$and": [_HAS_EXPIRY, {"$lte": [{"$toLong": "$expiresAt"}, NOW_MS]}]}
_FREE = {"$or": [{"$not": [_HAS_OWNER]}, _EXPIRED]}
_NOT_RELEASED = {"$eq": [{"$ifNull": ["$releasedAt", None]}, None]}
_IN_HOLD = {"$and": [
    {"$ne": [{"$ifNull": ["$holdUntil", None]}, None]},
    {"$gt": [{"$toLong": "$holdUntil"}, NOW_MS]},
]}  # fmt: skip
_NO_HOLD_LEFT = {"$or": [{"holdUntil": None}, {"$expr": {"$lte": [{"$toLong": "$holdUntil"}, NOW_MS]}}]}
#: A filter for Python documents holding a live lock (including a release held for its minimum hold).
LIVE: dict[str, Any] = {
    "owner": {"$ne": None},
    "$or": [{"expiresAt": None}, {"$expr": {"$gt": [{"$toLong": "$expiresAt"}, NOW_MS]}}],
}
#: A live lock its owner can still renew or release (not yet released into a minimum hold).
_OWNED = {**LIVE, "releasedAt": None}
_SEED = {"owner": {"$exists": False}}
_HOLDER_FIELDS = ("owner", "fence", "host", "pid", "createdAt", "expiresAt", "metadata")


def _at(ms: int | None) -> Any:
    return None if ms is None else {"$add": ["$$NOW", ms]}


def _purge(at: Any, purge_ms: int | None) -> Any:
    """``purgeAt`` for a lock last live at ``at``: kept unless it falls short of ``at`` + retention.

    Moving it only then (to ``at`` + twice the retention) leaves the TTL index
    untouched by almost every write, and a document goes between one and two
    retentions after its lock was last live.
    """
    if purge_ms is None or at is None:
        return "$$REMOVE"
    far_enough = {"$gte": [{"$toLong": "$purgeAt"}, {"$add": [{"$toLong": at}, purge_ms]}]}
    return {"$cond": [far_enough, "$purgeAt", {"$add": [at, 2 * purge_ms]}]}


def acquire_update(name: str, owner: Owner, ttl_ms: int | None, hold_ms: int | None,
                   purge_ms: int | None) -> list[dict[str, Any]]:  # fmt: skip
    """The pipeline that takes a free or expired name and leaves a live one untouched.

    A minimum hold is folded into the lease: ``expiresAt = now + max(ttl, hold)``,
    so one rule (``expiresAt`` passed) frees a crashed holder at the later bound.
    """

    def take(value: Any, field: str) -> dict[str, Any]:
        return {"$cond": ["$_free", value, f"${field}"]}

    expires = _at(None if ttl_ms is None else max(ttl_ms, hold_ms or 0))
    # A holder released into its minimum hold is over, not expired: nobody to report.
    previous = {"$cond": [{"$and": [_HAS_OWNER, _NOT_RELEASED]},
                          {field: f"${field}" for field in _HOLDER_FIELDS}, "$$REMOVE"]}  # fmt: skip
    return [
        {"$set": {"_free": _FREE}},
        {
            "$set": {
                # $literal: a name, host or metadata value such as "$where" is data, never a field path.
                "name": take({"$literal": name}, "name"),
                "owner": take({"$literal": owner.owner_token}, "owner"),
                "fence": take({"$max": [{"$add": [{"$ifNull": ["$fence", 0]}, 1]}, NOW_MS]}, "fence"),
                "host": take({"$literal": owner.host}, "host"),
                "pid": take({"$literal": owner.pid}, "pid"),
                "metadata": take({"$literal": dict(owner.metadata)}, "metadata"),
                "createdAt": take("$$NOW", "createdAt"),
                "expiresAt": take(expires, "expiresAt"),
                "created": take(FAR_FUTURE if expires is None else expires, "created"),
                "holdUntil": take(_at(hold_ms) if hold_ms else "$$REMOVE", "holdUntil"),
                "releasedAt": take("$$REMOVE", "releasedAt"),
                "purgeAt": take(_purge(expires, purge_ms), "purgeAt"),
                "expired": take(previous, "expired"),
            }
        },
        {"$unset": "_free"},
    ]


def free_update(purge_ms: int | None) -> list[dict[str, Any]]:
    """Free the name but keep the document, and with it the fencing counter."""
    return [
        {"$set": {"owner": None, "expiresAt": None, "name": {"free": "$_id"}, "purgeAt": _purge("$$NOW", purge_ms)}},
        {"$unset": ["expired", "created", "releasedAt", "holdUntil"]},
    ]


def release_update(purge_ms: int | None) -> list[dict[str, Any]]:
    """Free the name, or, before ``holdUntil``, keep it held by the released record until then."""

    def held(value: Any, freed: Any) -> dict[str, Any]:
        return {"$cond": ["$_hold", value, freed]}

    return [
        {"$set": {"_hold": _IN_HOLD}},
        {
            "$set": {
                "owner": held("$owner", None),
                "name": held("$name", {"free": "$_id"}),
                "releasedAt": held("$$NOW", "$$REMOVE"),
                "expiresAt": held("$holdUntil", None),
                "created": held("$holdUntil", "$$REMOVE"),
                "purgeAt": held(_purge("$holdUntil", purge_ms), _purge("$$NOW", purge_ms)),
            }
        },
        {"$set": {"holdUntil": {"$cond": ["$_hold", "$holdUntil", "$$REMOVE"]}}},
        {"$unset": ["_hold", "expired"]},
    ]


def renew_update(ttl_ms: int | None, purge_ms: int | None) -> list[dict[str, Any]]:
    """``expiresAt = max(now + ttl, holdUntil)``, and ``created`` (the seed's view) with it."""
    if ttl_ms is None:
        expires: Any = None
    else:
        later = {"$max": [{"$add": [NOW_MS, ttl_ms]}, {"$ifNull": [{"$toLong": "$holdUntil"}, 0]}]}
        expires = {"$toDate": later}
    return [
        {"$set": {"expiresAt": expires}},
        {"$set": {"created": {"$ifNull": ["$expiresAt", FAR_FUTURE]}, "purgeAt": _purge("$expiresAt", purge_ms)}},
    ]


def aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def record(name: str, doc: Mapping[str, Any]) -> LockRecord:
    created = aware(doc.get("createdAt")) or datetime.fromtimestamp(0, timezone.utc)
    return LockRecord(
        name=name,
        owner_token=str(doc.get("owner") or ""),
        fencing_token=int(doc.get("fence") or 0),
        host=str(doc.get("host") or ""),
        pid=int(doc.get("pid") or 0),
        created_at=created,
        expires_at=aware(doc.get("expiresAt")),
        metadata={str(k): str(v) for k, v in (doc.get("metadata") or {}).items()},
        released_at=aware(doc.get("releasedAt")),
        hold_until=aware(doc.get("holdUntil")),
    )


def seed_record(name: str, doc: Mapping[str, Any], expire_ms: int | None) -> LockRecord:
    """A seed process's lock as a record: no owner token, host, pid or fencing token exist for it."""
    created = aware(doc.get("created")) or datetime.fromtimestamp(0, timezone.utc)
    expires = None if expire_ms is None else created + timedelta(milliseconds=expire_ms)
    return LockRecord(
        name=name, owner_token="", fencing_token=0, host=SEED_HOST, pid=0, created_at=created,
        expires_at=expires, metadata={"protocol": "singleton-process"},
    )  # fmt: skip


def _seed_expired(expire_ms: int) -> dict[str, Any]:
    return {"$expr": {"$lte": [{"$add": [{"$toLong": "$created"}, expire_ms]}, NOW_MS]}}


def _duplicate_on(error: BaseException, field: str) -> bool:
    details = getattr(error, "details", None) or {}
    pattern = details.get("keyPattern") if isinstance(details, Mapping) else None
    if isinstance(pattern, Mapping):
        return field in pattern
    return f"index: {field}_" in str(error)  # servers that send no keyPattern name the index


def _retry_after(expires_at: datetime | None, server_now: float) -> float | None:
    return None if expires_at is None else max(0.0, expires_at.timestamp() - server_now)


class Rules:
    """The primitives as step generators, for one collection's configuration."""

    def __init__(self, errors: Any, purge_ms: int | None, seed_expire_ms: int | bool | None) -> None:
        #: pymongo.errors, so the steps can recognise duplicate keys without importing pymongo.
        self.errors = errors
        self.purge_ms = purge_ms
        #: None: seed locks never expire; True: they expire after the caller's ttl; else milliseconds.
        self.seed_expire_ms = seed_expire_ms

    def _seed_ms(self, ttl_ms: int | None) -> int | None:
        if self.seed_expire_ms is True:
            return ttl_ms
        return self.seed_expire_ms if self.seed_expire_ms is not None else None

    def ensure_indexes(self) -> Steps[None]:
        """The seed's unique index on ``name`` (same key and options, so its ensureIndex is a no-op) and the TTL index."""
        wanted: list[tuple[tuple[str, ...], dict[str, Any], str]] = [
            (("name",), {"unique": True}, "the unique index on name (shared with singleton-process)")
        ]
        if self.purge_ms is not None:
            wanted.append((("purgeAt",), {"expireAfterSeconds": 0, "name": TTL_INDEX}, "the clean-up TTL index on purgeAt"))
        for args, kwargs, what in wanted:
            try:
                yield Op("create_index", *args, **kwargs)
            except self.errors.OperationFailure as error:  # e.g. no createIndex privilege: locks still work
                if isinstance(error, self.errors.ExecutionTimeout) or error.code in (None, 50):
                    raise
                logger.warning("mongodb: cannot create %s: %s", what, error.code)

    def acquire(self, name: str, owner: Owner, ttl_ms: int | None, hold_ms: int | None) -> Steps[AcquireResult]:
        update = acquire_update(name, owner, ttl_ms, hold_ms, self.purge_ms)
        seed_ms = self._seed_ms(ttl_ms)
        expired_seed: LockRecord | None = None
        doc: Any = None
        for attempt in range(_RETRIES):
            try:
                doc = yield Op("find_one_and_update", {"_id": name}, update, upsert=True, return_document=True)
            except self.errors.DuplicateKeyError as error:
                last = attempt == _RETRIES - 1
                if not _duplicate_on(error, "name"):
                    # Two first-time upserts raced on _id: the other inserted. Again, like any contender.
                    if last:
                        raise
                    continue
                # A seed process holds the name: its document blocked ours on the unique index.
                seed = yield Op("find_one", {"name": name, **_SEED})
                if seed is None:  # released meanwhile: the name is free again
                    continue
                holder = seed_record(name, seed, seed_ms)
                # A seed lock without a date never expires, by the seed's rule as by ours.
                if seed_ms is not None and isinstance(seed.get("created"), datetime) and not last:
                    # Takeover: delete exactly that expired document (same _id and created,
                    # re-judged by $$NOW in the delete), then acquire like a free name. A
                    # fresh lock can never be deleted here, and the unique index admits
                    # exactly one of the contenders that then try.
                    gone = yield Op("delete_one", {"_id": seed["_id"], "created": seed.get("created"), **_SEED,
                                                   **_seed_expired(seed_ms)})  # fmt: skip
                    if gone:
                        expired_seed = holder
                        continue
                now = yield Op("server_now")
                return AcquireResult(False, holder, retry_after=_retry_after(holder.expires_at, now))
            if doc is None:  # SecantusDB: an upsert can answer nothing although it wrote
                doc = yield Op("find_one", {"_id": name})
            break
        else:
            return AcquireResult(False, None)
        if doc is not None and doc.get("owner") == owner.owner_token:
            previous = doc.get("expired")
            return AcquireResult(True, record(name, doc), expired=record(name, previous) if previous else expired_seed)
        if doc is None or doc.get("owner") is None:
            return AcquireResult(False, None)
        holder = record(name, doc)
        now = yield Op("server_now")
        return AcquireResult(False, holder, retry_after=_retry_after(holder.expires_at, now))

    def release(self, name: str, owner_token: str) -> Steps[tuple[bool, bool]]:
        """Returns (released, freed): freed is False when the release went into a minimum hold."""
        ours = {"_id": name, **_OWNED, "owner": owner_token}
        # The common case, no minimum hold left: one plain update (cheaper than a
        # findAndModify on SecantusDB, which scans for it).
        if (yield Op("update_one", {"$and": [ours, _NO_HOLD_LEFT]}, free_update(self.purge_ms))):
            return True, True
        doc = yield Op("find_one_and_update", ours, release_update(self.purge_ms),
                       return_document=True, projection={"releasedAt": 1})  # fmt: skip
        if doc is not None:  # into the hold (or freed, had it just ended)
            return True, doc.get("releasedAt") is None
        # A lease that ran out untaken is cleared too (a second trip only on this path),
        # but it was not held until now.
        yield Op("update_one", {"_id": name, "owner": owner_token, "releasedAt": None}, free_update(self.purge_ms))
        return False, False

    def renew(self, name: str, owner_token: str, ttl_ms: int | None) -> Steps[LockRecord | None]:
        doc = yield Op("find_one_and_update", {"_id": name, **_OWNED, "owner": owner_token},
                       renew_update(ttl_ms, self.purge_ms), return_document=True)  # fmt: skip
        return record(name, doc) if doc is not None else None

    def _seed_live(self) -> dict[str, Any]:
        """Seed documents that are live for ``get``/``list``: all, unless an explicit expiry says otherwise."""
        if isinstance(self.seed_expire_ms, bool) or self.seed_expire_ms is None:
            return dict(_SEED)
        return {**_SEED, "$expr": {"$gt": [{"$add": [{"$toLong": "$created"}, self.seed_expire_ms]}, NOW_MS]}}

    def _seed_shown_ms(self) -> int | None:
        return None if isinstance(self.seed_expire_ms, bool) else self.seed_expire_ms

    def get(self, name: str) -> Steps[LockRecord | None]:
        docs = yield Op("find", {"$or": [{"$and": [{"_id": name}, LIVE]}, {"$and": [{"name": name}, self._seed_live()]}]})
        ours = [doc for doc in docs if doc.get("_id") == name and "owner" in doc]
        if ours:
            return record(name, ours[0])
        seeds = [doc for doc in docs if "owner" not in doc]
        return seed_record(name, seeds[0], self._seed_shown_ms()) if seeds else None

    def list(self, prefix: str, pattern: str | None) -> Steps[builtins.list[LockRecord]]:
        ours: dict[str, Any] = {"$and": [LIVE]}
        seeds = self._seed_live()
        if pattern is not None:
            ours["$and"].append({"_id": {"$regex": pattern}})
            seeds = {"$and": [seeds, {"name": {"$regex": pattern}}]}
        else:
            seeds = {"$and": [seeds, {"name": {"$type": "string"}}]}
        docs = yield Op("find", {"$or": [ours, seeds]})
        found: dict[str, LockRecord] = {}
        for doc in docs:
            if "owner" in doc and isinstance(doc.get("_id"), str):
                found[doc["_id"]] = record(doc["_id"], doc)
        for doc in docs:
            if "owner" not in doc and isinstance(doc.get("name"), str) and doc["name"] not in found:
                found[doc["name"]] = seed_record(doc["name"], doc, self._seed_shown_ms())
        return [found[key] for key in sorted(found)]

    def force_release(self, name: str) -> Steps[LockRecord | None]:
        doc = yield Op("find_one_and_update", {"_id": name, **LIVE}, free_update(self.purge_ms), return_document=False)
        if doc is not None:
            return record(name, doc)
        seed = yield Op("find_one_and_delete", {"name": name, **_SEED})
        return seed_record(name, seed, self._seed_shown_ms()) if seed is not None else None
