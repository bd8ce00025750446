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

Holds taken with ``limit=N`` (N > 1) live in the same document, in ``holds``: a
list of ``{owner, fence, host, pid, createdAt, expiresAt, metadata, holdUntil,
releasedAt}`` (the holder fields, one set per hold), so one write counts the
live holds by ``$$NOW`` and adds one, and every hold draws its token from the
document's one ``fence`` counter. The main fields stay the N = 1 holder's
(exactly today's document when ``limit`` is never used); an N = 1 acquire also
needs every entry of ``holds`` to be over. While any hold is live the document
carries ``name: <the name>`` and a ``created`` no earlier than the latest lease
end, so a seed process neither inserts nor expires it. ``freedBy`` (the owner
token, or the date of a forced release) is written by every write that frees a
hold of ``holds``: the change stream wakes waiters on it, and a release reads
it back to know that it was the one that freed the hold. Clients older than
``limit`` ignore ``holds``: they count only the main holder.

The waiter queue (``fair``) lives in the same document too, in ``queue``: a
list of ``{token, ends}`` places in arrival order (the waiter's owner token,
and when its place ends unless a later attempt moves that on: once less than
half of its ``queue_for`` is left, so most attempts write nothing). It only orders
waiters; the lock's exclusivity never depends on it. An attempt with
``queue_ms`` (a waiter) reads it in its one write: a free name (or, under
``limit``, a free hold) goes only to the first (N - live) live places, and a
waiter that does not take it keeps its place; ended places go with the next
write that lists the queue. Taking the name drops the taker's place, and the
field is removed once no place is left, so an N = 1 document nobody waits on
is exactly today's. An attempt without ``queue_ms`` never reads it. A write
that hands the queue's head a free hold without freeing the main holder (a
taker under ``limit`` that leaves one free, a head that leaves) sets
``freedBy`` to ``$$NOW``, so the change stream wakes the head then too.
Older clients and seed processes ignore ``queue``: they take a free name
whoever waits, as before.
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
_NOW = "$$NOW"


def _hold_live(hold: str) -> dict[str, Any]:
    """One entry of ``holds`` (a ``$$variable``) is live: no expiry, or not yet passed by ``$$NOW``."""
    return {"$or": [{"$eq": [{"$ifNull": [f"{hold}.expiresAt", None]}, None]},
                    {"$gt": [{"$toLong": f"{hold}.expiresAt"}, NOW_MS]}]}  # fmt: skip


def _hold_in_minimum(hold: str) -> dict[str, Any]:
    return {"$and": [{"$ne": [{"$ifNull": [f"{hold}.holdUntil", None]}, None]},
                     {"$gt": [{"$toLong": f"{hold}.holdUntil"}, NOW_MS]}]}  # fmt: skip


def _holds_where(cond: Any, source: Any = "$holds") -> dict[str, Any]:
    return {"$filter": {"input": {"$ifNull": [source, []]}, "as": "h", "cond": cond}}


#: The live entries of ``holds`` (an expired one is dropped by the next write that lists them).
LIVE_HOLDS = _holds_where(_hold_live("$$h"))
_NO_LIVE_HOLDS = {"$eq": [{"$size": LIVE_HOLDS}, 0]}
_MAIN_LIVE = {"$and": [_HAS_OWNER, {"$not": [_EXPIRED]}]}
#: A filter for documents with a live entry in ``holds``.
HOLDS_LIVE: dict[str, Any] = {"$expr": {"$gt": [{"$size": LIVE_HOLDS}, 0]}}
_FAR_MS = int(FAR_FUTURE.timestamp() * 1000)


# --- the waiter queue: ``queue``, a list of {token, ends} places in arrival order ---

#: The places of ``queue`` that have not ended (an ended one is dropped by the next write that lists them).
LIVE_PLACES = {"$filter": {"input": {"$ifNull": ["$queue", []]}, "as": "p",
                           "cond": {"$gt": [{"$toLong": "$$p.ends"}, NOW_MS]}}}  # fmt: skip


def _place_index(token: str) -> dict[str, Any]:
    """Where ``token``'s place is among the live places in ``_q`` (-1: it has none).

    By ``$map``, not ``$_q.token``: SecantusDB reads no field path through an array.
    """
    return {"$indexOfArray": [{"$map": {"input": "$_q", "as": "p", "in": "$$p.token"}}, {"$literal": token}]}


#: How many live places come before the caller's (all of them when it has none); needs ``_q`` and ``_at``.
_AHEAD = {"$cond": [{"$lt": ["$_at", 0]}, {"$size": "$_q"}, "$_at"]}


def _queue_stages(token: str) -> list[dict[str, Any]]:
    """``_q`` (the live places) and ``_at`` (the caller's index among them, -1 for none)."""
    return [{"$set": {"_q": LIVE_PLACES}}, {"$set": {"_at": _place_index(token)}}]


def _queue_after(token: str, queue_ms: int, placed: Any) -> dict[str, Any]:
    """The stage that writes the queue back: without the caller's place when ``placed`` is false (it
    took the name, or holds it), else with it, appended or its end moved to now + ``queue_ms``; the
    field goes once no place is left.

    A kept place's end is moved only once less than half of ``queue_ms`` is left (or it lies beyond
    it), so most attempts of a waiter leave the document as it was: a write that changes nothing
    raises no change event, and SecantusDB answers every open change stream's wait on each event.
    """
    mine = {"token": {"$literal": token}, "ends": {"$add": ["$$NOW", queue_ms]}}
    left_ms = {"$subtract": [{"$toLong": "$$p.ends"}, NOW_MS]}
    due = {"$and": [{"$eq": ["$$p.token", {"$literal": token}]},
                    {"$or": [{"$lt": [left_ms, queue_ms // 2]}, {"$gt": [left_ms, queue_ms]}]}]}  # fmt: skip
    kept = {"$cond": [{"$lt": ["$_at", 0]},
                      {"$concatArrays": ["$_q", [mine]]},
                      {"$map": {"input": "$_q", "as": "p", "in": {"$cond": [due, mine, "$$p"]}}}]}  # fmt: skip
    left = {"$filter": {"input": "$_q", "as": "p", "cond": {"$ne": ["$$p.token", {"$literal": token}]}}}
    queue = {"$cond": [placed, kept, left]}
    return {"$set": {"queue": {"$let": {"vars": {"q": queue},
                                        "in": {"$cond": [{"$gt": [{"$size": "$$q"}, 0]}, "$$q", "$$REMOVE"]}}}}}  # fmt: skip


def queue_update(token: str, queue_ms: int) -> list[dict[str, Any]]:
    """Keep ``token``'s place (appended, or its end moved) without touching the lock: for an attempt
    that a seed process's lock refused, whose write could not keep it."""
    return [*_queue_stages(token), _queue_after(token, queue_ms, True), {"$unset": ["_q", "_at"]}]


def leave_update(token: str) -> list[dict[str, Any]]:
    """Drop ``token``'s place; when it was the head and the main holder is over, set ``freedBy`` (the
    change stream's wake-up) so the next place hears it: under ``limit`` a hold may be free too."""
    first = {"$arrayElemAt": [{"$map": {"input": "$_q", "as": "p", "in": "$$p.token"}}, 0]}
    return [
        {"$set": {"_q": LIVE_PLACES}},
        {"$set": {"_head": {"$eq": [first, {"$literal": token}]},
                  "_q": {"$filter": {"input": "$_q", "as": "p", "cond": {"$ne": ["$$p.token", {"$literal": token}]}}}}},
        {"$set": {"queue": {"$cond": [{"$gt": [{"$size": "$_q"}, 0]}, "$_q", "$$REMOVE"]},
                  "freedBy": {"$cond": [{"$and": ["$_head", {"$gt": [{"$size": "$_q"}, 0]}, _FREE]},
                                        "$$NOW", "$freedBy"]}}},
        {"$unset": ["_q", "_head"]},
    ]  # fmt: skip


def _owned_by(token: str) -> dict[str, Any]:
    """Whether ``$$h`` is ``token``'s hold that its owner can still release or renew."""
    return {"$and": [{"$eq": ["$$h.owner", {"$literal": token}]},
                     {"$eq": [{"$ifNull": ["$$h.releasedAt", None]}, None]}]}  # fmt: skip


def _holds_settled(purge_ms: int | None) -> list[dict[str, Any]]:
    """After ``holds`` (now live entries only) changed: the seed's view and retention follow every live hold.

    ``_end`` is the latest lease end among the live holds, the main holder
    included (the far future for one without expiry), or null when none is
    live: then the name is free for a seed process and retention starts now.
    Needs ``_main`` (the main holder was live) set by an earlier stage.
    """
    # Compared as {$toLong}: SecantusDB misorders a date made from $$NOW and a stored one.
    ends = {"$map": {"input": "$holds", "as": "h", "in": {"$ifNull": [{"$toLong": "$$h.expiresAt"}, _FAR_MS]}}}
    main_end = {"$cond": ["$_main", {"$ifNull": [{"$toLong": "$expiresAt"}, _FAR_MS]}, None]}
    live = {"$ne": [{"$ifNull": ["$_end", None]}, None]}
    unbounded = {"$gte": [{"$toLong": "$_end"}, _FAR_MS]}
    return [
        {"$set": {"_end": {"$toDate": {"$max": [main_end, {"$max": ends}]}}}},
        {"$set": {
            "name": {"$cond": [live, "$_id", {"free": "$_id"}]},
            "created": {"$cond": [live, "$_end", "$$REMOVE"]},
            "purgeAt": {"$cond": [live, {"$cond": [unbounded, "$$REMOVE", _purge("$_end", purge_ms)]},
                                  _purge(_NOW, purge_ms)]},
        }},
        {"$unset": ["_end", "_main"]},
    ]  # fmt: skip


def limit_acquire_update(name: str, owner: Owner, ttl_ms: int | None, hold_ms: int | None,
                         purge_ms: int | None, limit: int, queue_ms: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The pipeline that adds a hold to ``holds`` while fewer than ``limit`` holds are live.

    The main holder (an N = 1 lock) counts as one. With ``queue_ms`` (a waiter) the caller takes
    only from among the first (limit - live) live places, and keeps its place otherwise. A taker
    that leaves a hold free while places remain sets ``freedBy`` (the next place's wake-up). A
    refusal changes nothing but drop expired entries and keep the caller's place, so it raises no
    change event the waiters listen for.
    """
    del name  # the document's _id is the name; ``name`` is rewritten from it
    token = {"$literal": owner.owner_token}
    expires = _at(None if ttl_ms is None else max(ttl_ms, hold_ms or 0))
    hold = {
        "owner": token, "fence": "$fence", "host": {"$literal": owner.host}, "pid": {"$literal": owner.pid},
        "createdAt": _NOW, "expiresAt": expires, "metadata": {"$literal": dict(owner.metadata)},
        "holdUntil": _at(hold_ms) if hold_ms else None, "releasedAt": None,
    }  # fmt: skip
    mine = {"$or": [{"$and": ["$_main", {"$eq": ["$owner", token]}]},
                    {"$anyElementTrue": [{"$map": {"input": "$_live", "as": "h",
                                                   "in": {"$eq": ["$$h.owner", token]}}}]}]}  # fmt: skip
    count = {"$add": [{"$size": "$_live"}, {"$cond": ["$_main", 1, 0]}]}
    room = [{"$lt": [count, limit]}]
    queued: list[dict[str, Any]] = []
    if queue_ms is not None:
        room.append({"$lt": [_AHEAD, {"$subtract": [limit, count]}]})
        queued = _queue_stages(owner.owner_token)
    # A take that leaves a hold free wakes the queue's next place (its own place is gone by then).
    handed_on = {"$and": [{"$lt": [{"$add": [count, 1]}, limit]}, {"$gt": [{"$size": LIVE_PLACES}, 0]}]}
    return [
        {"$set": {"_live": LIVE_HOLDS, "_main": _MAIN_LIVE, "owner": {"$ifNull": ["$owner", None]},
                  "_before": {"$size": {"$ifNull": ["$holds", []]}}}},
        *queued,
        {"$set": {"_mine": mine}},
        {"$set": {"_take": {"$and": [{"$not": ["$_mine"]}, *room]}}},
        {"$set": {"fence": {"$cond": ["$_take", {"$max": [{"$add": [{"$ifNull": ["$fence", 0]}, 1]}, NOW_MS]},
                                      "$fence"]}}},
        {"$set": {"holds": {"$cond": ["$_take", {"$concatArrays": ["$_live", [hold]]}, "$_live"]}}},
        *([_queue_after(owner.owner_token, queue_ms, {"$not": [{"$or": ["$_take", "$_mine"]}]})] if queue_ms is not None else []),
        {"$set": {"freedBy": {"$cond": ["$_take", {"$cond": [handed_on, _NOW, "$$REMOVE"]}, "$freedBy"]},
                  "_changed": {"$or": ["$_take", {"$ne": [{"$size": "$holds"}, "$_before"]}]}}},
        *_settled_if_changed(purge_ms),
        {"$unset": ["_live", "_take", "_mine", "_changed", "_before", *(["_q", "_at"] if queue_ms is not None else [])]},
    ]  # fmt: skip


def _settled_if_changed(purge_ms: int | None) -> list[dict[str, Any]]:
    """``_holds_settled``, but leaving ``name``/``created``/``purgeAt`` as they were unless ``_changed``."""
    stages = _holds_settled(purge_ms)
    settled = stages[1]["$set"]
    stages[1] = {"$set": {field: {"$cond": ["$_changed", value, f"${field}"]} for field, value in settled.items()}}
    return stages


def limit_release_update(owner_token: str, purge_ms: int | None) -> list[dict[str, Any]]:
    """Drop ``owner_token``'s entry of ``holds``, or mark it released until its minimum hold ends.

    Sets ``freedBy`` to the token when the hold is freed (the wake-up, and the
    caller's proof); expired entries go in the same write.
    """
    released = {"$mergeObjects": ["$$h", {"releasedAt": _NOW, "expiresAt": "$$h.holdUntil"}]}
    return [
        {"$set": {"_main": _MAIN_LIVE, "_live": LIVE_HOLDS}},
        {"$set": {"_mine": _holds_where(_owned_by(owner_token), "$_live")}},
        {"$set": {"_kept": _holds_where(_hold_in_minimum("$$h"), "$_mine")}},
        {"$set": {
            "holds": {"$concatArrays": [_holds_where({"$not": [_owned_by(owner_token)]}, "$_live"),
                                        {"$map": {"input": "$_kept", "as": "h", "in": released}}]},
            "freedBy": {"$cond": [{"$gt": [{"$size": "$_mine"}, {"$size": "$_kept"}]},
                                  {"$literal": owner_token}, "$freedBy"]},
        }},
        *_holds_settled(purge_ms),
        {"$unset": ["_live", "_mine", "_kept"]},
    ]  # fmt: skip


def limit_renew_update(owner_token: str, ttl_ms: int | None, purge_ms: int | None) -> list[dict[str, Any]]:
    """``expiresAt = max(now + ttl, holdUntil)`` for ``owner_token``'s live entry of ``holds``."""
    if ttl_ms is None:
        expires: Any = None
    else:
        expires = {"$toDate": {"$max": [{"$add": [NOW_MS, ttl_ms]}, {"$ifNull": [{"$toLong": "$$h.holdUntil"}, 0]}]}}
    renewed = {"$cond": [_owned_by(owner_token), {"$mergeObjects": ["$$h", {"expiresAt": expires}]}, "$$h"]}
    return [
        {"$set": {"_main": _MAIN_LIVE, "holds": {"$map": {"input": LIVE_HOLDS, "as": "h", "in": renewed}}}},
        *_holds_settled(purge_ms),
    ]


def force_update(purge_ms: int | None) -> list[dict[str, Any]]:
    """``free_update`` for the main holder, and every entry of ``holds`` gone (a wake-up when one was live)."""
    return [
        {"$set": {"freedBy": {"$cond": [_NO_LIVE_HOLDS, "$freedBy", _NOW]}}},
        {"$unset": "holds"},
        *free_update(purge_ms),
    ]
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
                   purge_ms: int | None, queue_ms: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The pipeline that takes a free or expired name and leaves a live one untouched.

    A minimum hold is folded into the lease: ``expiresAt = now + max(ttl, hold)``,
    so one rule (``expiresAt`` passed) frees a crashed holder at the later bound.
    With ``queue_ms`` (a waiter) a free name is taken only by the first live place
    (or anyone while none is queued), and a caller that does not take it keeps its
    place; without it, the queue is not even read.
    """

    def take(value: Any, field: str) -> dict[str, Any]:
        return {"$cond": ["$_free", value, f"${field}"]}

    expires = _at(None if ttl_ms is None else max(ttl_ms, hold_ms or 0))
    # A holder released into its minimum hold is over, not expired: nobody to report.
    previous = {"$cond": [{"$and": [_HAS_OWNER, _NOT_RELEASED]},
                          {field: f"${field}" for field in _HOLDER_FIELDS}, "$$REMOVE"]}  # fmt: skip
    queued: list[dict[str, Any]] = []
    if queue_ms is not None:
        queued = [*_queue_stages(owner.owner_token), {"$set": {"_free": {"$and": ["$_free", {"$eq": [_AHEAD, 0]}]}}}]
    return [
        # The holds of ``limit`` callers count too: a cheap check, made only once the main holder is over.
        {"$set": {"_free": {"$and": [_FREE, _NO_LIVE_HOLDS]}}},
        *queued,
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
        *([_queue_after(owner.owner_token, queue_ms, {"$ne": ["$owner", {"$literal": owner.owner_token}]}),
           {"$unset": ["_free", "_q", "_at"]}] if queue_ms is not None else [{"$unset": "_free"}]),
    ]


def _freed(purge_ms: int | None) -> dict[str, Any]:
    """``name``, ``created`` and ``purgeAt`` once the main holder is over: free, unless ``holds`` has a live one.

    Exactly today's values for a document without ``holds``; with a live hold
    there, the seed stays kept out until the latest lease end among them, and
    retention stays as the holds' own writes set it.
    """
    latest = {"$max": {"$map": {"input": LIVE_HOLDS, "as": "h",
                                "in": {"$ifNull": [{"$toLong": "$$h.expiresAt"}, _FAR_MS]}}}}  # fmt: skip
    return {
        "name": {"$cond": [_NO_LIVE_HOLDS, {"free": "$_id"}, "$_id"]},
        "created": {"$cond": [_NO_LIVE_HOLDS, "$$REMOVE", {"$toDate": latest}]},
        "purgeAt": {"$cond": [_NO_LIVE_HOLDS, _purge("$$NOW", purge_ms), "$purgeAt"]},
    }


def free_update(purge_ms: int | None) -> list[dict[str, Any]]:
    """Free the name but keep the document, and with it the fencing counter."""
    return [
        {"$set": {"owner": None, "expiresAt": None, **_freed(purge_ms)}},
        {"$unset": ["expired", "releasedAt", "holdUntil"]},
    ]


def release_update(purge_ms: int | None) -> list[dict[str, Any]]:
    """Free the name, or, before ``holdUntil``, keep it held by the released record until then."""

    def held(value: Any, otherwise: Any) -> dict[str, Any]:
        return {"$cond": ["$_hold", value, otherwise]}

    freed = _freed(purge_ms)
    return [
        {"$set": {"_hold": _IN_HOLD}},
        {
            "$set": {
                "owner": held("$owner", None),
                "name": held("$name", freed["name"]),
                "releasedAt": held("$$NOW", "$$REMOVE"),
                "expiresAt": held("$holdUntil", None),
                "created": held("$holdUntil", freed["created"]),
                "purgeAt": held(_purge("$holdUntil", purge_ms), freed["purgeAt"]),
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

    def acquire(self, name: str, owner: Owner, ttl_ms: int | None, hold_ms: int | None,
                limit: int = 1, queue_ms: int | None = None) -> Steps[AcquireResult]:  # fmt: skip
        """One write takes the name (or, under ``limit`` N > 1, one of its N holds); a seed lock is met by index.

        ``queue_ms``: the caller waits, so the same write keeps its place in the queue
        (or drops it once taken), and a free name goes to the first live place.
        """
        if limit > 1:
            update = limit_acquire_update(name, owner, ttl_ms, hold_ms, self.purge_ms, limit, queue_ms)
        else:
            update = acquire_update(name, owner, ttl_ms, hold_ms, self.purge_ms, queue_ms)
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
                if queue_ms is not None:  # the refused write kept no place: keep it apart (this path only)
                    yield Op("update_one", {"_id": name}, queue_update(owner.owner_token, queue_ms))
                now = yield Op("server_now")
                return AcquireResult(False, holder, retry_after=_retry_after(holder.expires_at, now),
                                     holders=(holder,) if limit > 1 else ())  # fmt: skip
            if doc is None:  # SecantusDB: an upsert can answer nothing although it wrote
                doc = yield Op("find_one", {"_id": name})
            break
        else:
            return AcquireResult(False, None)
        if doc is None:
            return AcquireResult(False, None)
        token = owner.owner_token
        ours = next((hold for hold in doc.get("holds") or () if hold.get("owner") == token), None)
        if ours is not None:  # only live entries stay in ``holds`` after this write
            return AcquireResult(True, record(name, ours))
        if doc.get("owner") == token:
            previous = doc.get("expired")
            return AcquireResult(True, record(name, doc), expired=record(name, previous) if previous else expired_seed)
        queued = queue_ms is not None and bool(doc.get("queue"))
        if doc.get("owner") is None and not doc.get("holds") and not queued:
            return AcquireResult(False, None)
        now = yield Op("server_now")
        holders = live_holds(name, doc, now)
        if queued and len(holders) < limit:
            ahead = places_ahead(doc, token)
            if ahead:  # room was left, but for earlier places: the soonest of them to end may change that
                soonest = min(aware(place.get("ends")) or FAR_FUTURE for place in ahead).timestamp()
                return AcquireResult(False, None, retry_after=max(soonest - now, 0.001), queued_behind=True)
        if not holders:  # the write judged one live that our estimate of the server's clock just passed
            holders = sorted((record(name, hold) for hold in doc.get("holds") or ()), key=_by_token) or [record(name, doc)]
        ends = [max(0.0, holder.expires_at.timestamp() - now) for holder in holders if holder.expires_at is not None]
        return AcquireResult(False, holders[0], retry_after=min(ends) if ends else None,
                             holders=tuple(holders) if limit > 1 else ())  # fmt: skip

    def release(self, name: str, owner_token: str, in_holds: bool = False) -> Steps[tuple[bool, bool]]:
        """Returns (released, freed): freed is False when the release went into a minimum hold.

        ``in_holds``: the token was seen taking an entry of ``holds``, so that is
        tried first (a hint: every path is still tried).
        """
        if in_holds:
            answer = yield from self._release_hold(name, owner_token)
            if answer is not None:
                return answer
        ours = {"_id": name, **_OWNED, "owner": owner_token}
        # The common case, no minimum hold left: one plain update (cheaper than a
        # findAndModify on SecantusDB, which scans for it).
        if (yield Op("update_one", {"$and": [ours, _NO_HOLD_LEFT]}, free_update(self.purge_ms))):
            return True, True
        doc = yield Op("find_one_and_update", ours, release_update(self.purge_ms),
                       return_document=True, projection={"releasedAt": 1})  # fmt: skip
        if doc is not None:  # into the hold (or freed, had it just ended)
            return True, doc.get("releasedAt") is None
        if not in_holds:
            answer = yield from self._release_hold(name, owner_token)
            if answer is not None:
                return answer
        # A lease that ran out untaken is cleared too (a second trip only on this path),
        # but it was not held until now.
        yield Op("update_one", {"_id": name, "owner": owner_token, "releasedAt": None}, free_update(self.purge_ms))
        return False, False

    def _release_hold(self, name: str, owner_token: str) -> Steps[tuple[bool, bool] | None]:
        """Release ``owner_token``'s entry of ``holds``; None when it has none there (live or not)."""
        doc = yield Op("find_one_and_update", _holding(name, owner_token),
                       limit_release_update(owner_token, self.purge_ms), return_document=True,
                       projection={"freedBy": 1, "holds": 1})  # fmt: skip
        if doc is None:
            return None
        if doc.get("freedBy") == owner_token:
            return True, True
        kept = any(hold.get("owner") == owner_token for hold in doc.get("holds") or ())
        return kept, False  # into its minimum hold, or it had expired (then dropped, and not held till now)

    def renew(self, name: str, owner_token: str, ttl_ms: int | None, in_holds: bool = False) -> Steps[LockRecord | None]:
        if not in_holds:
            doc = yield Op("find_one_and_update", {"_id": name, **_OWNED, "owner": owner_token},
                           renew_update(ttl_ms, self.purge_ms), return_document=True)  # fmt: skip
            if doc is not None:
                return record(name, doc)
        doc = yield Op("find_one_and_update", _holding(name, owner_token),
                       limit_renew_update(owner_token, ttl_ms, self.purge_ms), return_document=True)  # fmt: skip
        hold = next((hold for hold in (doc or {}).get("holds") or () if hold.get("owner") == owner_token), None)
        if hold is not None and hold.get("releasedAt") is None:
            return record(name, hold)
        if in_holds:  # the hint was wrong: the main holder's renewal
            doc = yield Op("find_one_and_update", {"_id": name, **_OWNED, "owner": owner_token},
                           renew_update(ttl_ms, self.purge_ms), return_document=True)  # fmt: skip
            return record(name, doc) if doc is not None else None
        return None

    def leave_queue(self, name: str, owner_token: str) -> Steps[None]:
        """Drop ``owner_token``'s place (one write; its ``freedBy`` wakes the next place when the
        leaver was the head of a free name)."""
        yield Op("update_one", {"_id": name, "queue": {"$elemMatch": {"token": owner_token}}}, leave_update(owner_token))

    def _seed_live(self) -> dict[str, Any]:
        """Seed documents that are live for ``get``/``list``: all, unless an explicit expiry says otherwise."""
        if isinstance(self.seed_expire_ms, bool) or self.seed_expire_ms is None:
            return dict(_SEED)
        return {**_SEED, "$expr": {"$gt": [{"$add": [{"$toLong": "$created"}, self.seed_expire_ms]}, NOW_MS]}}

    def _seed_shown_ms(self) -> int | None:
        return None if isinstance(self.seed_expire_ms, bool) else self.seed_expire_ms

    def _read(self, ours: dict[str, Any], seeds: dict[str, Any]) -> Steps[builtins.list[LockRecord]]:
        """Every live hold of the matching documents, judged by ``$$NOW`` in one aggregation.

        A name of ours hides a seed document of the same name (a leftover the
        unique index would have refused while ours was held).
        """
        docs = yield Op("aggregate", [
            {"$match": {"$or": [{"$and": [ours, {"$or": [LIVE, HOLDS_LIVE]}]}, seeds]}},
            {"$set": {"_main": _MAIN_LIVE, "holds": LIVE_HOLDS}},
        ])  # fmt: skip
        found: dict[str, builtins.list[LockRecord]] = {}
        for doc in docs:
            if "owner" in doc and isinstance(doc.get("_id"), str):
                name = doc["_id"]
                holds = [record(name, hold) for hold in doc.get("holds") or ()]
                found[name] = sorted(([record(name, doc)] if doc.get("_main") else []) + holds, key=_by_token)
        for doc in docs:
            if "owner" not in doc and isinstance(doc.get("name"), str) and not found.get(doc["name"]):
                found[doc["name"]] = [seed_record(doc["name"], doc, self._seed_shown_ms())]
        return [hold for key in sorted(found) for hold in found[key]]

    def holders(self, name: str) -> Steps[builtins.list[LockRecord]]:
        return (yield from self._read({"_id": name}, {"$and": [{"name": name}, self._seed_live()]}))

    def get(self, name: str) -> Steps[LockRecord | None]:
        holders = yield from self.holders(name)
        return holders[0] if holders else None

    def list(self, prefix: str, pattern: str | None) -> Steps[builtins.list[LockRecord]]:
        ours: dict[str, Any] = {"_id": {"$type": "string"}}
        seeds = self._seed_live()
        if pattern is not None:
            ours = {"_id": {"$regex": pattern}}
            seeds = {"$and": [seeds, {"name": {"$regex": pattern}}]}
        else:
            seeds = {"$and": [seeds, {"name": {"$type": "string"}}]}
        return (yield from self._read(ours, seeds))

    def force_release(self, name: str) -> Steps[LockRecord | None]:
        """Free the main holder and every entry of ``holds``; returns the removed hold with the lowest token."""
        doc = yield Op("find_one_and_update", {"$and": [{"_id": name}, {"$or": [LIVE, HOLDS_LIVE]}]},
                       force_update(self.purge_ms), return_document=False)  # fmt: skip
        if doc is not None:
            if not doc.get("holds"):
                return record(name, doc)
            now = yield Op("server_now")
            removed = live_holds(name, doc, now)
            return removed[0] if removed else record(name, doc)
        seed = yield Op("find_one_and_delete", {"name": name, **_SEED})
        return seed_record(name, seed, self._seed_shown_ms()) if seed is not None else None


def _holding(name: str, owner_token: str) -> dict[str, Any]:
    """The name's document when ``owner_token`` has an unreleased entry in ``holds`` (live or not)."""
    return {"_id": name, "holds": {"$elemMatch": {"owner": owner_token, "releasedAt": None}}}


def places_ahead(doc: Mapping[str, Any], owner_token: str) -> builtins.list[Mapping[str, Any]]:
    """The places of ``doc``'s queue before ``owner_token``'s (all of them when it has none).

    Read from the document a write returned, which kept only live places.
    """
    places = [place for place in doc.get("queue") or () if isinstance(place, Mapping)]
    mine = next((index for index, place in enumerate(places) if place.get("token") == owner_token), len(places))
    return places[:mine]


def queue_head(doc: Mapping[str, Any], server_now: float) -> str | None:
    """The owner token of the first place in ``doc``'s queue that has not ended at ``server_now``."""
    for place in doc.get("queue") or ():
        ends = aware(place.get("ends")) if isinstance(place, Mapping) else None
        if ends is not None and ends.timestamp() > server_now and isinstance(place.get("token"), str):
            return str(place["token"])
    return None


def _by_token(hold: LockRecord) -> int:
    return hold.fencing_token


def live_holds(name: str, doc: Mapping[str, Any], server_now: float) -> builtins.list[LockRecord]:
    """The holds of ``doc`` live at ``server_now`` (the main holder and ``holds``), by fencing token.

    Used where the write that returned ``doc`` could not also say which were
    live; ``server_now`` is this client's estimate of the server's clock.
    """
    candidates = [doc] if doc.get("owner") is not None else []
    candidates += list(doc.get("holds") or ())
    found = [record(name, hold) for hold in candidates]
    return sorted((hold for hold in found if hold.expires_at is None or hold.expires_at.timestamp() > server_now),
                  key=_by_token)  # fmt: skip
