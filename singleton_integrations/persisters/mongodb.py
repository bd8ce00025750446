"""Locks in a MongoDB collection (pymongo), judged by the server's clock (``$$NOW``).

One document per name::

    {_id: name, owner: token | null, fence: int, host, pid, createdAt, expiresAt,
     metadata, purgeAt, expired: {...previous holder, only after a takeover}}

Why it is shaped this way:

* **Acquire is one write.** A ``findAndModify`` with an aggregation-pipeline
  update and ``upsert`` takes the name only when ``owner`` is null or
  ``expiresAt`` has passed by ``$$NOW``, mints the fencing token in the same
  write, and copies an expired holder into ``expired`` so the caller can report
  it. A conflict rewrites every field with its own value, which the server
  treats as a no-op. Two first-time upserts racing on a new name meet the
  unique ``_id`` index; the loser's ``DuplicateKeyError`` is retried and then
  sees the winner's live lock.
* **Fencing tokens never go back.** ``release`` clears ``owner`` instead of
  deleting, so the counter survives; each acquire writes
  ``fence = max(fence + 1, $$NOW in ms)``. The clock term is what keeps tokens
  rising after the TTL clean-up below has deleted a document: a new document
  starts at the server's current millisecond, which is past every token minted
  before the purge unless the server's clock went back by more than the
  retention (30 days by default). Tokens are therefore large integers.
* **Clean-up without losing counters.** A TTL index on ``purgeAt`` (not on
  ``expiresAt``) deletes a document between ``purge_after_seconds`` and twice
  that after its lock was last live (released or expired); ``purgeAt`` moves
  only when it would fall short, so most writes leave the index alone.
  ``purge_after_seconds=None`` keeps every document and skips the index.
* **Waiting.** ``watch`` opens a change stream on this ``_id`` before the
  acquire attempt, so no release is missed; change streams need a replica set,
  so on a standalone server it falls back to polling every ``poll_interval``
  (``notifies`` finds out once per persister, on first read, by opening a stream).
* **Bounded calls.** ``timeout_ms`` (8 s, pymongo's client-side operation
  timeout) bounds every operation, server selection and retries included, so
  an unreachable server raises ``PersisterError`` after it; connect and socket
  timeouts (5 s, 10 s) bound the pieces. Options in the URL are kept unless a
  keyword overrides them.
* **Durability.** ``write_concern="majority"`` makes an acquire or release
  survive a primary failover (with the default ``w:1`` a failover can roll back
  an acknowledged acquire, and a second holder can then take the name), at the
  cost of a replication round trip on every write.

SecantusDB (the MongoDB-wire server the tests use) deviates from mongod in ways
this module avoids with formulations that are also correct on mongod:

* comparing a date with ``$$NOW`` can give the wrong answer, so every
  comparison is between ``{$toLong: ...}`` values;
* a ``findAndModify`` with ``upsert`` can return no document: reported after a
  write, and seen here from the loser of concurrent first-time upserts (where
  mongod raises ``DuplicateKeyError``), so the result is then read back by
  ``_id`` (safe: the random owner token says whether the write was ours);
* ``$$NOW`` is undefined in a ``findAndModify`` projection (and the command
  fails after having written), so the time left on a holder's lease is computed
  from the server's clock as reported by ``hello``, never from the client's.
"""

from __future__ import annotations

import logging
import math
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url
from ._base import Persister, ReleaseWatch, SleepWatch

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.change_stream import ChangeStream
    from pymongo.collection import Collection

__all__ = ["DEFAULT_COLLECTION", "DEFAULT_DATABASE", "DEFAULT_PURGE_AFTER_SECONDS", "MongoDb"]

logger = logging.getLogger("singleton_integrations")

DEFAULT_COLLECTION = "singletons"  # the seed's collection name
DEFAULT_DATABASE = "singleton"
#: How long a released or expired lock's document (and so its fencing counter) is kept.
DEFAULT_PURGE_AFTER_SECONDS = 30 * 86400

_UNSET: Any = object()
_TTL_INDEX = "singleton_purgeAt_ttl"
_DUPLICATE_KEY_RETRIES = 5
_CHANGE_STREAM_AWAIT_MS = 100
_CLOCK_REFRESH_SECONDS = 60.0
_PROBE_SECONDS = 2.0
# Options of ours that may appear in the URL's query; pymongo would reject them.
_OWN_QUERY_OPTIONS = {"collection": "collection", "purgeafterseconds": "purge_after_seconds"}
# keyword -> (MongoClient option, default applied when neither keyword nor URL sets it)
_DRIVER_OPTIONS = {
    "server_selection_timeout_ms": ("serverSelectionTimeoutMS", 5000),
    "connect_timeout_ms": ("connectTimeoutMS", 5000),
    "socket_timeout_ms": ("socketTimeoutMS", 10000),
    # pymongo's per-operation bound, retries and server selection included (so an
    # unreachable server fails after this long, not serverSelectionTimeoutMS).
    "timeout_ms": ("timeoutMS", 8000),
}

# --- expressions: every time comparison is on {$toLong} values (see the SecantusDB note) ---
_NOW_MS = {"$toLong": "$$NOW"}
_HAS_OWNER = {"$ne": [{"$ifNull": ["$owner", None]}, None]}
_HAS_EXPIRY = {"$ne": [{"$ifNull": ["$expiresAt", None]}, None]}
_EXPIRED = {"$and": [_HAS_EXPIRY, {"$lte": [{"$toLong": "$expiresAt"}, _NOW_MS]}]}
_FREE = {"$or": [{"$not": [_HAS_OWNER]}, _EXPIRED]}
#: A filter for documents holding a live lock.
_LIVE: dict[str, Any] = {
    "owner": {"$ne": None},
    "$or": [{"expiresAt": None}, {"$expr": {"$gt": [{"$toLong": "$expiresAt"}, _NOW_MS]}}],
}
_HOLDER_FIELDS = ("owner", "fence", "host", "pid", "createdAt", "expiresAt", "metadata")


def _import_pymongo() -> Any:
    try:
        import pymongo
    except ImportError as error:
        raise MissingDependency(backend="mongodb", extra="mongodb", module="pymongo") from error
    return pymongo


def _expires(ttl_ms: int | None) -> Any:
    return None if ttl_ms is None else {"$add": ["$$NOW", ttl_ms]}


def _purge(at: Any, purge_ms: int | None) -> Any:
    """``purgeAt`` for a lock last live at ``at``: kept unless it falls short of ``at`` + retention.

    Moving it only then (to ``at`` + twice the retention) leaves the TTL index
    untouched by almost every acquire and release: the clean-up costs no index
    write on the hot path, and a document goes between one and two retentions
    after its lock was last live.
    """
    if purge_ms is None or at is None:
        return "$$REMOVE"
    far_enough = {"$gte": [{"$toLong": "$purgeAt"}, {"$add": [{"$toLong": at}, purge_ms]}]}
    return {"$cond": [far_enough, "$purgeAt", {"$add": [at, 2 * purge_ms]}]}


def _acquire_update(owner: Owner, ttl_ms: int | None, purge_ms: int | None) -> list[dict[str, Any]]:
    """The pipeline that takes a free or expired name and leaves a live one untouched."""

    def take(value: Any, field: str) -> dict[str, Any]:
        return {"$cond": ["$_free", value, f"${field}"]}

    expires = _expires(ttl_ms)
    previous = {"$cond": [_HAS_OWNER, {field: f"${field}" for field in _HOLDER_FIELDS}, "$$REMOVE"]}
    return [
        {"$set": {"_free": _FREE}},
        {
            "$set": {
                # $literal: a host or metadata value such as "$where" is data, never a field path.
                "owner": take({"$literal": owner.owner_token}, "owner"),
                "fence": take({"$max": [{"$add": [{"$ifNull": ["$fence", 0]}, 1]}, _NOW_MS]}, "fence"),
                "host": take({"$literal": owner.host}, "host"),
                "pid": take({"$literal": owner.pid}, "pid"),
                "metadata": take({"$literal": dict(owner.metadata)}, "metadata"),
                "createdAt": take("$$NOW", "createdAt"),
                "expiresAt": take(expires, "expiresAt"),
                "purgeAt": take(_purge(expires, purge_ms), "purgeAt"),
                "expired": take(previous, "expired"),
            }
        },
        {"$unset": "_free"},
    ]


def _release_update(purge_ms: int | None) -> list[dict[str, Any]]:
    """Free the name but keep the document, and with it the fencing counter."""
    return [
        {"$set": {"owner": None, "expiresAt": None, "purgeAt": _purge("$$NOW", purge_ms)}},
        {"$unset": "expired"},
    ]


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _record(name: str, doc: Mapping[str, Any]) -> LockRecord:
    created = _aware(doc.get("createdAt")) or datetime.fromtimestamp(0, timezone.utc)
    return LockRecord(
        name=name,
        owner_token=str(doc.get("owner") or ""),
        fencing_token=int(doc.get("fence") or 0),
        host=str(doc.get("host") or ""),
        pid=int(doc.get("pid") or 0),
        created_at=created,
        expires_at=_aware(doc.get("expiresAt")),
        metadata={str(k): str(v) for k, v in (doc.get("metadata") or {}).items()},
    )


def _split_url(url: str) -> tuple[str, dict[str, str], str, set[str]]:
    """(driver URL without our options, our options, database from the path, driver option names set)."""
    if not isinstance(url, str):
        raise TypeError(f"a MongoDB URL must be a str, not {type(url).__name__}")
    if any(ord(c) < 32 for c in url):
        raise ValueError("a MongoDB URL must not contain control characters")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mongodb", "mongodb+srv"):
        raise ValueError(f"a MongoDB URL starts with mongodb:// or mongodb+srv://, got {redact_url(url)!r}")
    base, _, query = rest.partition("?")
    hosts, _, path = base.partition("/")
    if not hosts.rpartition("@")[2]:
        raise ValueError(f"a MongoDB URL needs a host, got {redact_url(url)!r}")
    own: dict[str, str] = {}
    kept: list[str] = []
    driver_names: set[str] = set()
    for item in filter(None, re.split("[&;]", query)):
        key, _, value = item.partition("=")
        canonical = _OWN_QUERY_OPTIONS.get(unquote(key).lower().replace("_", ""))
        if canonical:
            own[canonical] = unquote(value)
        else:
            kept.append(item)
            driver_names.add(unquote(key).lower())
    driver_url = f"{scheme}://{base}" + (f"?{'&'.join(kept)}" if kept else "")
    return driver_url, own, unquote(path), driver_names


def _check_name(kind: str, value: object, forbidden: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a MongoDB {kind} name must be a str, not {type(value).__name__}")
    if not value or len(value) > 120 or any(c in forbidden for c in value) or value.startswith("system."):
        raise ValueError(f"invalid MongoDB {kind} name {value!r}")
    return value


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")
    return float(value)


class _ChangeStreamWatch(ReleaseWatch):
    """Woken by a change stream on one ``_id``: a delete, or a write that cleared ``owner``."""

    def __init__(self, persister: MongoDb, stream: ChangeStream[Any]) -> None:
        self._persister = persister
        self._stream: ChangeStream[Any] | None = stream

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while self._stream is not None:
            try:
                if self._stream.try_next() is not None:  # blocks up to _CHANGE_STREAM_AWAIT_MS
                    return
            except self._persister._pymongo.errors.PyMongoError as error:  # broke (e.g. a restart): poll instead
                logger.debug("mongodb: change stream failed, polling instead: %s", type(error).__name__)
                self.close()
                break
            if time.monotonic() >= deadline:
                return
        time.sleep(max(0.0, min(deadline - time.monotonic(), self._persister.poll_interval)))

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except self._persister._pymongo.errors.PyMongoError as error:  # the server times the cursor out
                logger.debug("mongodb: closing a change stream failed: %s", type(error).__name__)


class _NotifiesProbe:
    """``notifies`` that finds out once, on first read, whether the server has change streams.

    ``Singleton`` reads ``notifies`` before it opens a watch, so the answer must be
    right from the first wait; read on the class it stays the conservative False.
    """

    def __get__(self, instance: MongoDb | None, owner: type | None = None) -> bool:
        return False if instance is None else instance._probe_change_streams()


class MongoDb(Persister):
    """Locks in a MongoDB collection; every decision is one write judged by ``$$NOW``.

    >>> store = MongoDb("mongodb://user:secret@db.example/jobs?tls=true")
    >>> store
    MongoDb('mongodb://user:***@db.example/jobs?tls=true', database='jobs', collection='singletons')

    Constructing never connects; the first operation creates one pooled
    ``MongoClient`` (a fresh one in a forked child). Keyword options override
    the URL's query options; other keywords (``tls``, ``tlsCAFile``, ...) go to
    ``MongoClient`` as they are.
    """

    backend: ClassVar[str] = "mongodb"
    distributed: ClassVar[bool] = True
    clock: ClassVar[str] = "the MongoDB server's clock ($$NOW)"
    notifies = _NotifiesProbe()
    poll_interval: float = 0.1

    def __init__(
        self,
        url: str = "mongodb://127.0.0.1:27017/",
        *,
        collection: str | None = None,
        database: str | None = None,
        purge_after_seconds: float | None = _UNSET,
        write_concern: str | int | None = None,
        server_selection_timeout_ms: float | None = None,
        connect_timeout_ms: float | None = None,
        socket_timeout_ms: float | None = None,
        timeout_ms: float | None = None,
        **client_options: Any,
    ) -> None:
        self._pymongo = _import_pymongo()
        driver_url, own, path_database, url_driver_options = _split_url(url)
        self.url = url
        if collection is None:
            collection = own.get("collection", DEFAULT_COLLECTION)
        if database is None:
            database = path_database or DEFAULT_DATABASE
        self.collection_name = _check_name("collection", collection, "$\x00")
        self.database_name = _check_name("database", database, '/\\. "$\x00')
        if purge_after_seconds is _UNSET:
            text = own.get("purge_after_seconds", str(DEFAULT_PURGE_AFTER_SECONDS))
            try:
                purge_after_seconds = None if text.lower() in ("", "none", "never") else float(text)
            except ValueError:
                raise ValueError(f"purgeAfterSeconds must be a number of seconds or 'none', not {text!r}") from None
        if purge_after_seconds is not None:
            _positive("purge_after_seconds", purge_after_seconds)
        self.purge_after_seconds = purge_after_seconds
        self._purge_ms = None if purge_after_seconds is None else int(purge_after_seconds * 1000)
        if isinstance(write_concern, bool) or not isinstance(write_concern, (str, int, type(None))):
            raise TypeError(f"write_concern must be 'majority', a number of nodes or None, not {write_concern!r}")
        self.write_concern = write_concern

        kwargs: dict[str, Any] = dict(client_options)
        explicit = {
            "server_selection_timeout_ms": server_selection_timeout_ms,
            "connect_timeout_ms": connect_timeout_ms,
            "socket_timeout_ms": socket_timeout_ms,
            "timeout_ms": timeout_ms,
        }
        for keyword, (option, default) in _DRIVER_OPTIONS.items():
            value = explicit[keyword]
            if value is not None:
                kwargs[option] = int(_positive(keyword, value))
            elif option.lower() not in url_driver_options and option not in kwargs:
                kwargs[option] = default  # every call stays bounded unless the URL says otherwise
        if write_concern is not None:
            kwargs["w"] = write_concern
        kwargs.setdefault("appname", "singleton-integrations")
        self._driver_url = driver_url
        self._client_options = kwargs
        self._password = urlsplit(driver_url).password
        self._validate_options()

        self._guard, self._guard_pid = threading.Lock(), os.getpid()
        self._client_: MongoClient[Any] | None = None
        self._pid = 0
        self._indexed = False
        self._change_streams: bool | None = None
        self._probed_at = -math.inf
        self._clock_offset: tuple[float, float] | None = None  # (server - client seconds, measured at)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoDb:
        """``mongodb://`` or ``mongodb+srv://``; keyword options override the URL's query options."""
        return cls(url, **options)

    # -- connection --------------------------------------------------------------------

    def _validate_options(self) -> None:
        """Refuse a bad URL or option now, not at the first lock; touches no network."""
        errors = self._pymongo.errors
        try:
            if not self._driver_url.lower().startswith("mongodb+srv://"):  # +srv would resolve DNS here
                self._pymongo.uri_parser.parse_uri(self._driver_url, warn=False)
            for option, value in self._client_options.items():
                self._pymongo.common.validate(option, value)
        except TypeError as error:
            raise TypeError(f"invalid MongoDB option for {redact_url(self.url)!r}: {self._scrub(str(error))}") from None
        except (errors.PyMongoError, ValueError, OSError) as error:
            raise ValueError(
                f"invalid MongoDB URL or option {redact_url(self.url)!r}: {self._scrub(str(error))}"
            ) from None

    def _client(self) -> MongoClient[Any]:
        pid = os.getpid()
        client = self._client_
        if client is not None and self._pid == pid:
            return client
        if self._guard_pid != pid:  # a forked child must not wait on a lock a parent's thread held
            self._guard, self._guard_pid = threading.Lock(), pid
        with self._guard:
            if self._client_ is None or self._pid != pid:
                # In a forked child the parent's client must not be used (pymongo is not
                # fork-safe); it is dropped, not closed, so the parent keeps its sockets.
                try:
                    self._client_ = self._pymongo.MongoClient(
                        self._driver_url, connect=False, tz_aware=True, **self._client_options
                    )
                except (self._pymongo.errors.PyMongoError, ssl.SSLError, OSError, ValueError, TypeError) as error:
                    message = f"cannot create a client for {redact_url(self.url)}: {type(error).__name__}: "
                    raise PersisterError(self.backend, message + self._describe(error)) from error
                self._pid, self._indexed, self._clock_offset = pid, False, None
            return self._client_

    def _collection(self) -> Collection[Any]:
        collection = self._client()[self.database_name][self.collection_name]
        if not self._indexed and self._purge_ms is not None:
            self._ensure_ttl_index(collection)
        return collection

    def _ensure_ttl_index(self, collection: Collection[Any]) -> None:
        """Once per client, inside the caller's ``_translate``: an unreachable server fails the caller."""
        errors = self._pymongo.errors
        try:
            collection.create_index("purgeAt", expireAfterSeconds=0, name=_TTL_INDEX)
        except errors.OperationFailure as error:  # e.g. no createIndex privilege: locks still work
            if isinstance(error, errors.ExecutionTimeout) or error.code in (None, 50):
                raise
            logger.warning("mongodb: cannot create the clean-up TTL index on purgeAt: %s", self._describe(error))
        self._indexed = True

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***").replace(unquote(self._password), "***")
        return text

    def _describe(self, error: BaseException) -> str:
        details = getattr(error, "details", None)
        text = details.get("errmsg") if isinstance(details, Mapping) and details.get("errmsg") else str(error)
        text = self._scrub(str(text))
        return text if len(text) <= 300 else text[:300] + "..."

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Turn every pymongo error into one ``PersisterError`` raised from its cause."""
        try:
            yield
        except PersisterError:
            raise
        except self._pymongo.errors.PyMongoError as error:
            raise PersisterError(
                self.backend,
                f"cannot {action} on {redact_url(self.url)}: {type(error).__name__}: {self._describe(error)}",
            ) from error

    def _server_now(self) -> float:
        """The server's clock in epoch seconds, from ``hello`` (measured once a minute)."""
        now = time.time()
        if self._clock_offset is None or now - self._clock_offset[1] > _CLOCK_REFRESH_SECONDS:
            with self._translate("read the server clock"):
                before = time.time()
                reply = self._client().admin.command("hello")
                after = time.time()
            local = _aware(reply.get("localTime"))
            offset = local.timestamp() - (before + after) / 2 if local else 0.0
            self._clock_offset = (offset, after)
        return now + self._clock_offset[0]

    # -- the primitives ----------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        ttl_ms = None if ttl is None else max(1, round(ttl * 1000))
        update = _acquire_update(owner, ttl_ms, self._purge_ms)
        after = self._pymongo.ReturnDocument.AFTER
        with self._translate(f"acquire {name!r}"):
            collection = self._collection()
            for attempt in range(_DUPLICATE_KEY_RETRIES):
                try:
                    doc = collection.find_one_and_update({"_id": name}, update, upsert=True, return_document=after)
                    break
                except self._pymongo.errors.DuplicateKeyError:
                    # Two first-time upserts raced on the unique _id: the other inserted.
                    # Trying again runs the pipeline on its document, like any contender.
                    if attempt == _DUPLICATE_KEY_RETRIES - 1:
                        raise
            if doc is None:  # SecantusDB: an upsert can answer nothing although it wrote
                doc = collection.find_one({"_id": name})
        if doc is not None and doc.get("owner") == owner.owner_token:
            expired = doc.get("expired")
            return AcquireResult(True, _record(name, doc), expired=_record(name, expired) if expired else None)
        if doc is None or doc.get("owner") is None:
            return AcquireResult(False, None)
        holder = _record(name, doc)
        retry = None
        if holder.expires_at is not None:
            retry = max(0.0, holder.expires_at.timestamp() - self._server_now())
        return AcquireResult(False, holder, retry_after=retry)

    def release(self, name: str, owner_token: str) -> bool:
        update = _release_update(self._purge_ms)
        with self._translate(f"release {name!r}"):
            collection = self._collection()
            if collection.update_one({"_id": name, **_LIVE, "owner": owner_token}, update).matched_count == 1:
                return True
            # A lease that ran out untaken is cleared too (a second trip only on this path),
            # but it was not held until now.
            collection.update_one({"_id": name, "owner": owner_token}, update)
        return False

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        ttl_ms = None if ttl is None else max(1, round(ttl * 1000))
        expires = _expires(ttl_ms)
        update = [{"$set": {"expiresAt": expires, "purgeAt": _purge(expires, self._purge_ms)}}]
        with self._translate(f"renew {name!r}"):
            doc = self._collection().find_one_and_update(
                {"_id": name, **_LIVE, "owner": owner_token}, update, return_document=self._pymongo.ReturnDocument.AFTER
            )
        return _record(name, doc) if doc is not None else None

    def get(self, name: str) -> LockRecord | None:
        with self._translate(f"read {name!r}"):
            doc = self._collection().find_one({"_id": name, **_LIVE})
        return _record(name, doc) if doc is not None else None

    def list(self, prefix: str = "") -> list[LockRecord]:
        if not isinstance(prefix, str):
            raise TypeError(f"a name prefix must be a str, not {type(prefix).__name__}")
        query: dict[str, Any] = dict(_LIVE)
        if prefix:
            query["_id"] = {"$regex": "^" + re.escape(prefix)}  # a prefix is text, never a pattern
        with self._translate("list locks"):
            docs = list(self._collection().find(query).sort("_id", 1))
        records = [_record(doc["_id"], doc) for doc in docs if isinstance(doc.get("_id"), str)]
        return sorted(records, key=lambda record: record.name)

    def force_release(self, name: str) -> LockRecord | None:
        with self._translate(f"force-release {name!r}"):
            doc = self._collection().find_one_and_update(
                {"_id": name, **_LIVE}, _release_update(self._purge_ms),
                return_document=self._pymongo.ReturnDocument.BEFORE,
            )  # fmt: skip
        return _record(name, doc) if doc is not None else None

    def _open_stream(self, name: str) -> ChangeStream[Any] | None:
        """A change stream woken by releases of ``name``; None where the server has none."""
        woken_by = {
            "documentKey._id": name,
            "$or": [
                {"operationType": {"$in": ["delete", "drop", "dropDatabase", "rename", "invalidate"]}},
                {"operationType": "replace", "fullDocument.owner": {"$type": "null"}},
                {"updateDescription.updatedFields.owner": {"$type": "null"}},
            ],
        }
        errors = self._pymongo.errors
        try:
            collection = self._collection()
            stream = collection.watch([{"$match": woken_by}], max_await_time_ms=_CHANGE_STREAM_AWAIT_MS)
        except errors.OperationFailure as error:  # a standalone server: no change streams, ever
            logger.debug("mongodb: change streams unavailable, polling: %s", self._describe(error))
            self._change_streams = False
            return None
        except (errors.PyMongoError, PersisterError, ValueError):  # unreachable now, or timeoutMS < the await
            return None
        self._change_streams = True
        return stream

    def _probe_change_streams(self) -> bool:
        # An unreachable server leaves the answer unknown; asking again at most every
        # _CLOCK_REFRESH_SECONDS keeps each wait from paying a second connect timeout.
        if self._change_streams is None and time.monotonic() - self._probed_at > _CLOCK_REFRESH_SECONDS:
            self._probed_at = time.monotonic()
            with self._pymongo.timeout(_PROBE_SECONDS):  # a dead server costs the probe little
                stream = self._open_stream("")  # the empty name is never a lock: the stream stays quiet
            if stream is not None:
                _ChangeStreamWatch(self, stream).close()
        return bool(self._change_streams)

    def watch(self, name: str) -> ReleaseWatch:
        """A change stream on this name where the server has them, else polling."""
        stream = self._open_stream(name) if self._probe_change_streams() else None
        return SleepWatch() if stream is None else _ChangeStreamWatch(self, stream)

    def close(self) -> None:
        with self._guard:
            client, self._client_ = self._client_, None
            if client is not None and self._pid == os.getpid():
                client.close()

    # -- plumbing ----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only; the client is rebuilt on first use."""
        state = self.__dict__.copy()
        for key in ("_pymongo", "_guard", "_client_", "_clock_offset"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pymongo = _import_pymongo()
        self._guard, self._guard_pid = threading.Lock(), os.getpid()
        self._client_, self._pid, self._clock_offset, self._probed_at = None, 0, None, -math.inf

    def __repr__(self) -> str:
        return (
            f"MongoDb({redact_url(self.url)!r}, database={self.database_name!r}, collection={self.collection_name!r})"
        )
