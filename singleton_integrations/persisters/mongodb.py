"""Locks in a MongoDB collection (pymongo), judged by the server's clock (``$$NOW``).

One document per name; the shape and the rules are in ``_mongodb_steps`` (written
once, driven here by ``MongoClient`` and by ``AsyncMongoClient``).

Why it is shaped this way:

* **Acquire is one write.** A ``findAndModify`` with an aggregation-pipeline
  update and ``upsert`` takes the name only when ``owner`` is null or
  ``expiresAt`` has passed by ``$$NOW``, mints the fencing token in the same
  write, and copies an expired holder into ``expired`` so the caller can report
  it. A conflict rewrites every field with its own value, which the server
  treats as a no-op. Two first-time upserts racing on a new name meet the
  unique ``_id`` index; the loser's ``DuplicateKeyError`` is retried and then
  sees the winner's live lock.
* **Shared with singleton-process.** The seed (Node.js) inserts ``{name,
  created}`` into the same default collection, under a unique index on
  ``name``. A Python document that holds a name carries ``name`` too, so
  whichever side inserts second meets that index: a seed process gets its
  duplicate-key conflict, and a Python acquire gets one and reports the seed's
  lock as the holder. A free Python document carries ``name: {free: NAME}``
  (unique, and never the seed's string), so the seed can take a name Python
  released at once while the fencing counter stays. ``created``, which the
  seed's expiry reads, is Python's lease end. A seed lock counts as expired
  for Python ``seed_lock_expire_seconds`` after its ``created`` by ``$$NOW``
  (default: the acquiring lock's own ``lock_expire_seconds``, the seed's rule);
  the takeover deletes only that document, re-judged in the delete, then
  acquires as for a free name.
* **Fencing tokens never go back.** ``release`` frees the document instead of
  deleting it, so the counter survives; each acquire writes ``fence =
  max(fence + 1, $$NOW in ms)``. The clock term keeps tokens rising after the
  TTL clean-up (or a seed process) deleted a document: a new document starts
  at the server's current millisecond.
* **At most N.** ``acquire(..., limit=N)`` keeps N > 1 holds in the name's
  document, in a ``holds`` list beside the N = 1 holder's fields: one
  ``findAndModify`` counts the live holds by ``$$NOW`` (the N = 1 holder
  included), adds one with a token from the document's ``fence`` counter when
  fewer than N are live, and answers a refusal with every holder, so a full
  set costs one round trip whatever N. Concurrent attempts are serialised by
  the document. An N = 1 acquire also waits for every entry of ``holds`` to
  end (a check made only once the main holder is over). Releasing one sets
  ``freedBy``, which the change stream turns into a wake-up.
* **Minimum hold.** ``holdUntil`` is recorded with the lock and folded into
  ``expiresAt``; a release before it keeps the record (``releasedAt`` set) as
  the holder until then.
* **Clean-up without losing counters.** A TTL index on ``purgeAt`` (not on
  ``expiresAt``) deletes a document between ``purge_after_seconds`` and twice
  that after its lock was last live. ``purge_after_seconds=None`` keeps every
  document and skips the index.
* **Waiting.** One change stream per collection and process, in the
  ``ReleaseHub``'s listener thread, wakes the waiters (sync or async) of a
  released name; in-process releases wake them directly. Change streams need
  a replica set: on a standalone server waiters poll every ``poll_interval``.
* **Fair waiting.** Waiters queue in the name's own document (``queue``, see
  ``_mongodb_steps``): the attempt's one ``findAndModify`` keeps the waiter's
  place, refuses a waiter behind the head with ``queued_behind`` and the time
  until the earliest place ahead ends, and lets the head take a free name.
  A release costs nothing more: the change stream looks the document up
  (``updateLookup``) and each process wakes the head only if it waits there
  (and one waiter that does not queue), so a release no longer sends every
  process's waiter at the store. A place ends at most ``queue_for`` after the
  waiter's last attempt (its end is moved on only once half of that is left,
  so most attempts write nothing and raise no change event), so a dead waiter
  holds the name up for seconds at most; ``leave_queue`` drops one in one write. A caller that does not wait never
  reads the queue: the uncontended cycle is the same two round trips.
* **Clients.** Persisters built from the same URL and options share one
  ``MongoClient`` per process (and one ``AsyncMongoClient`` per event loop:
  pymongo binds an async client to the loop it first ran on). The last
  ``close()`` closes it; so does the interpreter's exit.
* **Bounded calls.** ``timeout_ms`` (8 s, pymongo's client-side operation
  timeout) bounds every operation, server selection, a wait for a pooled
  connection and retries included, so an unreachable server raises
  ``PersisterError`` after it; it is ``call_timeout``.
* **Durability.** ``write_concern="majority"`` makes an acquire or release
  survive a primary failover, at the cost of a replication round trip per write.

SecantusDB (the MongoDB-wire server the tests use) deviates from mongod in ways
avoided here with formulations that are also correct on mongod: comparing a
date with ``$$NOW`` can give the wrong answer (every comparison is between
``{$toLong: ...}`` values); a ``findAndModify`` with ``upsert`` can return no
document (it is then read back by ``_id``; the random owner token says whose
write it was); ``$$NOW`` is undefined in a projection (the time left on a
lease is computed from the server clock reported by ``hello``); and field
paths through arrays (``$queue.token``) read nothing (``$map`` is used). A
server that reports pipeline updates as ``replace`` events (mongod before 5.0)
is met by the listener comparing each with the name's previous one, so a
waiter refreshing its place wakes nobody.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import math
import os
import re
import ssl
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from .. import _process
from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url
from ._base import DEFAULT_PURGE_AFTER_SECONDS, Persister, ReleaseHub, ReleaseWatch
from ._mongodb_steps import Op, Rules, Steps, aware, queue_head
from ._steps import adrive, drive

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.collection import Collection

__all__ = ["DEFAULT_COLLECTION", "DEFAULT_DATABASE", "DEFAULT_PURGE_AFTER_SECONDS", "SEED_RULE", "MongoDb"]

logger = logging.getLogger("singleton_integrations")
_R = TypeVar("_R")
_Client = TypeVar("_Client")

DEFAULT_COLLECTION = "singletons"  # the seed's collection name
DEFAULT_DATABASE = "singleton"

_UNSET: Any = object()
#: ``seed_lock_expire_seconds`` default: a seed lock expires after the acquiring lock's own
#: ``lock_expire_seconds``, counted from its ``created`` (the seed's rule, on the server's clock).
SEED_RULE = "lock_expire_seconds"
_CHANGE_STREAM_AWAIT_MS = 200
_CLOCK_REFRESH_SECONDS = 60.0
_PROBE_SECONDS = 2.0
_SEED_IDS_KEPT = 10_000
_HINTS_KEPT = 10_000
# Options of ours that may appear in the URL's query; pymongo would reject them.
_OWN_QUERY_OPTIONS = {
    "collection": "collection",
    "purgeafterseconds": "purge_after_seconds",
    "seedlockexpireseconds": "seed_lock_expire_seconds",
}
# keyword -> (MongoClient option, default applied when neither keyword nor URL sets it)
_DRIVER_OPTIONS = {
    "server_selection_timeout_ms": ("serverSelectionTimeoutMS", 5000),
    "connect_timeout_ms": ("connectTimeoutMS", 5000),
    "socket_timeout_ms": ("socketTimeoutMS", 10000),
    # pymongo's per-operation bound, retries and server selection included (so an
    # unreachable server fails after this long, not serverSelectionTimeoutMS).
    "timeout_ms": ("timeoutMS", 8000),
}
#: Change-stream events that can mean a name became free.
_RELEASES = [{"$match": {"$or": [
    {"operationType": {"$in": ["delete", "drop", "dropDatabase", "rename", "invalidate"]}},
    {"operationType": "insert", "fullDocument.owner": {"$exists": False}},  # a seed lock: remember its name
    {"operationType": "replace", "fullDocument.owner": {"$type": "null"}},
    {"updateDescription.updatedFields.owner": {"$type": "null"}},
    {"updateDescription.updatedFields.freedBy": {"$exists": True}},  # a hold of ``holds`` freed
    {"operationType": "replace", "fullDocument.freedBy": {"$exists": True}},
]}}]  # fmt: skip


def _import_pymongo() -> Any:
    try:
        import pymongo
    except ImportError as error:
        raise MissingDependency(backend="mongodb", extra="mongodb", module="pymongo") from error
    return pymongo


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
    from urllib.parse import unquote

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


def _seconds_option(name: str, keyword: Any, own: Mapping[str, str], default: Any, words: tuple[str, ...]) -> Any:
    """A seconds option from its keyword, else the URL's query, else ``default``; ``words`` mean None."""
    if keyword is not _UNSET:
        return None if keyword is None else _positive(name, keyword)
    text = own.get(name)
    if text is None:
        return default
    if text.strip().lower() in words:
        return None
    try:
        return _positive(name, float(text))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds or {words[-1]!r}, not {text!r}") from None


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, round(seconds * 1000))


# -- shared clients: one per URL + options per process (one per event loop for async) --


class _Entry(Generic[_Client]):
    """A shared client and who uses it; ``indexed`` remembers collections already set up."""

    __slots__ = ("client", "indexed", "users")

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.users: weakref.WeakSet[MongoDb] = weakref.WeakSet()  # a collected persister stops counting
        self.indexed: set[tuple[str, str, bool]] = set()


class _Registry:
    """The process's MongoDB clients, keyed by the full configuration (a forked child starts empty)."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.sync: dict[Any, _Entry[MongoClient[Any]]] = {}
        # pymongo's AsyncMongoClient, found by name (it is missing before pymongo 4.9).
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _Entry[Any]]] = \
            weakref.WeakKeyDictionary()
        self.hubs: dict[Any, ReleaseHub] = {}

    def reset(self) -> None:
        """After a fork: the parent's clients are not ours to use (pymongo is not fork-safe) or close."""
        self.guard = threading.Lock()
        self.sync, self.loops, self.hubs = {}, weakref.WeakKeyDictionary(), {}

    def close_all(self) -> None:
        with self.guard:
            entries, self.sync = list(self.sync.values()), {}
            hubs, self.hubs = list(self.hubs.values()), {}
        for hub in hubs:
            hub.close()
        for entry in entries:
            try:
                entry.client.close()
            except Exception as error:  # noqa: BLE001 - at exit, nothing is left to tell
                logger.debug("mongodb: closing a client at exit failed: %s", type(error).__name__)


_registry = _Registry()
os.register_at_fork(after_in_child=_registry.reset)
_process.after_exit_release(_registry.close_all)  # the exit release still needs the clients


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
    >>> store.url
    'mongodb://user:***@db.example/jobs?tls=true'

    Constructing never connects. Keyword options override the URL's query
    options (``collection``, ``purgeAfterSeconds``, ``seedLockExpireSeconds``
    and the driver's); other keywords (``tls``, ``tlsCAFile``, ...) go to
    ``MongoClient`` as they are. ``seed_lock_expire_seconds``: when a lock
    held by a singleton-process (Node.js) process counts as expired here,
    counted from its ``created`` by the server's clock; by default after the
    acquiring lock's ``lock_expire_seconds`` (the seed's own rule), ``None``
    never (wait for its release).
    """

    backend: ClassVar[str] = "mongodb"
    distributed: ClassVar[bool] = True
    clock: ClassVar[str] = "the MongoDB server's clock ($$NOW)"
    supports_min_hold: ClassVar[bool] = True
    native_async: ClassVar[bool] = True
    limits: ClassVar[bool] = True
    fair: ClassVar[bool] = True
    notifies = _NotifiesProbe()
    poll_interval: float = 0.1

    @classmethod
    def preload(cls) -> None:
        _import_pymongo()

    def __init__(
        self,
        url: str = "mongodb://127.0.0.1:27017/",
        *,
        collection: str | None = None,
        database: str | None = None,
        purge_after_seconds: float | None = _UNSET,
        seed_lock_expire_seconds: float | str | None = _UNSET,
        write_concern: str | int | None = None,
        server_selection_timeout_ms: float | None = None,
        connect_timeout_ms: float | None = None,
        socket_timeout_ms: float | None = None,
        timeout_ms: float | None = None,
        **client_options: Any,
    ) -> None:
        self._pymongo = _import_pymongo()
        driver_url, own, path_database, url_driver_options = _split_url(url)
        #: The URL without its password (the client is built from the full one, kept private).
        self.url = redact_url(url)
        if collection is None:
            collection = own.get("collection", DEFAULT_COLLECTION)
        if database is None:
            database = path_database or DEFAULT_DATABASE
        self.collection_name = _check_name("collection", collection, "$\x00")
        self.database_name = _check_name("database", database, '/\\. "$\x00')
        self.purge_after_seconds: float | None = _seconds_option(
            "purge_after_seconds", purge_after_seconds, own, DEFAULT_PURGE_AFTER_SECONDS, ("", "never", "none")
        )
        #: A number of seconds, None (never), or SEED_RULE: the acquiring lock's lock_expire_seconds.
        seed_rule: Any = seed_lock_expire_seconds
        if seed_rule is _UNSET and own.get("seed_lock_expire_seconds", SEED_RULE).strip().lower() != SEED_RULE:
            seed_rule = _seconds_option("seed_lock_expire_seconds", _UNSET, own, None, ("never", "none"))
        elif seed_rule is _UNSET or (isinstance(seed_rule, str) and seed_rule == SEED_RULE):
            seed_rule = SEED_RULE
        elif seed_rule is not None:
            seed_rule = _positive("seed_lock_expire_seconds", seed_rule)
        #: Seconds, None (seed locks never expire here) or SEED_RULE (the acquiring lock's lock_expire_seconds).
        self.seed_lock_expire_seconds: float | str | None = seed_rule
        seed_ms: int | bool | None = True if seed_rule == SEED_RULE else _ms(seed_rule)
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
        self._password = self._password_of(driver_url)
        self._validate_options()
        self._rules = Rules(self._pymongo.errors, _ms(self.purge_after_seconds), seed_ms)
        self._key = (driver_url, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._client_: MongoClient[Any] | None = None
        self._pid = 0
        self._change_streams: bool | None = None
        self._probed_at = -math.inf
        self._clock_offset: tuple[float, float] | None = None  # (server - client seconds, measured at)
        #: (name, owner token) of holds this persister took under ``limit``: their release tries ``holds`` first.
        self._in_holds: set[tuple[str, str]] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoDb:
        """``mongodb://`` or ``mongodb+srv://``; keyword options override the URL's query options."""
        return cls(url, **options)

    # -- configuration -----------------------------------------------------------------

    @staticmethod
    def _password_of(driver_url: str) -> str | None:
        from urllib.parse import unquote

        userinfo = driver_url.partition("://")[2].split("/", 1)[0].rpartition("@")[0]
        if ":" not in userinfo:
            return None
        return unquote(userinfo.partition(":")[2]) or None

    def _validate_options(self) -> None:
        """Refuse a bad URL or option now, not at the first lock; touches no network."""
        errors = self._pymongo.errors
        timeout: Any = None
        try:
            if not self._driver_url.lower().startswith("mongodb+srv://"):  # +srv would resolve DNS here
                parsed = self._pymongo.uri_parser.parse_uri(self._driver_url, warn=False)
                timeout = parsed["options"].get("timeoutms")
            for option, value in self._client_options.items():
                _, valid = self._pymongo.common.validate(option, value)
                if option == "timeoutMS":
                    timeout = valid
        except TypeError as error:
            raise TypeError(f"invalid MongoDB option for {self.url!r}: {self._scrub(str(error))}") from None
        except (errors.PyMongoError, ValueError, OSError) as error:
            raise ValueError(f"invalid MongoDB URL or option {self.url!r}: {self._scrub(str(error))}") from None
        if isinstance(timeout, (int, float)) and timeout > 0:
            self.call_timeout = float(timeout)  # pymongo gives timeoutMS in seconds

    def _scrub(self, text: str) -> str:
        if self._password:
            from urllib.parse import quote

            for form in {self._password, quote(self._password, safe=""), quote(self._password)}:
                text = text.replace(form, "***")
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
                self.backend, f"cannot {action} on {self.url}: {type(error).__name__}: {self._describe(error)}"
            ) from error

    def _new_client(self, factory: Callable[..., Any]) -> Any:
        try:
            return factory(self._driver_url, connect=False, tz_aware=True, **self._client_options)
        except (self._pymongo.errors.PyMongoError, ssl.SSLError, OSError, ValueError, TypeError) as error:
            message = f"cannot create a client for {self.url}: {type(error).__name__}: "
            raise PersisterError(self.backend, message + self._describe(error)) from error

    # -- connections -------------------------------------------------------------------

    def _entry(self) -> _Entry[MongoClient[Any]]:
        """This persister's share of the process's client for its configuration."""
        pid = os.getpid()
        with _registry.guard:
            entry = _registry.sync.get(self._key)
            if entry is None:
                entry = _registry.sync[self._key] = _Entry(self._new_client(self._pymongo.MongoClient))
            entry.users.add(self)
            if self._client_ is not entry.client or self._pid != pid:
                self._client_, self._pid, self._clock_offset = entry.client, pid, None
            return entry

    def _client(self) -> MongoClient[Any]:
        client = self._client_
        if client is not None and self._pid == os.getpid():
            return client
        return self._entry().client

    def _collection(self) -> Collection[Any]:
        entry = self._entry()
        collection = entry.client[self.database_name][self.collection_name]
        if marker := self._unindexed(entry):
            drive(self._rules.ensure_indexes(), lambda op: self._call(collection, op), self._answerable)  # inside the caller's _translate
            entry.indexed.add(marker)
        return collection

    def _unindexed(self, entry: _Entry[Any]) -> tuple[str, str, bool] | None:
        """This collection's mark in ``entry.indexed`` while its indexes are still to make, else None."""
        marker = (self.database_name, self.collection_name, self.purge_after_seconds is not None)
        return None if marker in entry.indexed else marker

    async def _acollection(self) -> Any:
        loop = asyncio.get_running_loop()
        with _registry.guard:
            clients = _registry.loops.setdefault(loop, {})
            entry = clients.get(self._key)
            if entry is None:
                factory = getattr(self._pymongo, "AsyncMongoClient", None)
                if factory is None:  # before pymongo 4.9; stable from 4.13
                    raise PersisterError(self.backend, f"async needs pymongo 4.13.2 or later, not {self._pymongo.version}; "
                                         "run: pip install -U 'singleton-integrations[mongodb]'")  # fmt: skip
                entry = clients[self._key] = _Entry(self._new_client(factory))
            entry.users.add(self)
        collection = entry.client[self.database_name][self.collection_name]
        if marker := self._unindexed(entry):
            await adrive(self._rules.ensure_indexes(), lambda op: self._acall(collection, op), self._answerable)
            entry.indexed.add(marker)
        if self._change_streams is None and time.monotonic() - self._probed_at > _CLOCK_REFRESH_SECONDS:
            self._probed_at = time.monotonic()  # so that ``notifies`` never blocks the loop later
            await self._aprobe_change_streams(collection)
        return collection

    def close(self) -> None:
        """Drop this persister's share of the client; the last user closes it. Reconnects if used again."""
        with _registry.guard:
            entry = _registry.sync.get(self._key)
            hubs: list[ReleaseHub] = []
            last = entry is not None and set(entry.users) <= {self} and entry.client is self._client_
            if entry is not None:
                entry.users.discard(self)
                if last:
                    del _registry.sync[self._key]
                    for key in [key for key in _registry.hubs if key[0] == self._key]:
                        hubs.append(_registry.hubs.pop(key))
            self._client_ = None
        for hub in hubs:  # their listeners used this client
            hub.close()
        if last and entry is not None and self._pid == os.getpid():
            entry.client.close()

    async def aclose(self) -> None:
        """Drop this persister's share of the running loop's async client; the last user closes it."""
        with _registry.guard:
            clients = _registry.loops.get(asyncio.get_running_loop(), {})
            entry = clients.get(self._key)
            if entry is not None:
                entry.users.discard(self)
            if entry is None or entry.users:
                return
            del clients[self._key]
        await entry.client.close()

    # -- running the rules: the only I/O, written once per driver ------------------------

    def _server_now(self, reply: Mapping[str, Any] | None = None, sent: float = 0.0) -> float | None:
        """The server's clock (epoch seconds) from the cached offset; None when a ``hello`` is due."""
        now = time.time()
        if reply is not None:
            local = aware(reply.get("localTime"))
            offset = local.timestamp() - (sent + now) / 2 if local else 0.0
            self._clock_offset = (offset, now)
        if self._clock_offset is None or now - self._clock_offset[1] > _CLOCK_REFRESH_SECONDS:
            return None
        return now + self._clock_offset[0]

    def _call(self, collection: Any, op: Op) -> Any:
        if op.method == "server_now":
            now = self._server_now()
            if now is None:
                sent = time.time()
                now = self._server_now(collection.database.client.admin.command("hello"), sent)
            return now
        if op.method == "find":
            return list(collection.find(*op.args, **op.kwargs))
        if op.method == "aggregate":
            return list(collection.aggregate(*op.args, **op.kwargs))
        result = getattr(collection, op.method)(*op.args, **op.kwargs)
        return _result(op.method, result)

    async def _acall(self, collection: Any, op: Op) -> Any:
        if op.method == "server_now":
            now = self._server_now()
            if now is None:
                sent = time.time()
                now = self._server_now(await collection.database.client.admin.command("hello"), sent)
            return now
        if op.method == "find":
            return await collection.find(*op.args, **op.kwargs).to_list(None)
        if op.method == "aggregate":
            return await (await collection.aggregate(*op.args, **op.kwargs)).to_list(None)
        result = await getattr(collection, op.method)(*op.args, **op.kwargs)
        return _result(op.method, result)

    def _answerable(self, error: BaseException) -> bool:
        return isinstance(error, self._pymongo.errors.PyMongoError)

    def _run(self, action: str, steps: Steps[_R]) -> _R:
        with self._translate(action):
            collection = self._collection()
            return drive(steps, lambda op: self._call(collection, op), self._answerable)

    async def _arun(self, action: str, steps: Steps[_R]) -> _R:
        with self._translate(action):
            collection = await self._acollection()
            return await adrive(steps, lambda op: self._acall(collection, op), self._answerable)

    # -- the primitives ----------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        """``queue_for``: a waiter keeps its place in the name's queue in the same write; ``limit`` N > 1
        keeps up to N holds."""
        steps = self._rules.acquire(name, owner, _ms(ttl), _ms(min_hold), _limit(limit), _ms(queue_for))
        return self._taken(self._run(f"acquire {name!r}", steps), name, owner, limit)

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        steps = self._rules.acquire(name, owner, _ms(ttl), _ms(min_hold), _limit(limit), _ms(queue_for))
        return self._taken(await self._arun(f"acquire {name!r}", steps), name, owner, limit)

    def leave_queue(self, name: str, owner_token: str) -> None:
        self._run(f"leave the queue of {name!r}", self._rules.leave_queue(name, owner_token))
        self._left(name)

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        await self._arun(f"leave the queue of {name!r}", self._rules.leave_queue(name, owner_token))
        self._left(name)

    def _left(self, name: str) -> None:
        """Without change streams, a waiter here that may be the next place tries again now."""
        if not self._change_streams:
            self._notify(name)

    def _taken(self, result: AcquireResult, name: str, owner: Owner, limit: int) -> AcquireResult:
        """Remember a hold taken in ``holds``, so that its release and renewal try that first."""
        if limit > 1 and result.acquired:
            if len(self._in_holds) >= _HINTS_KEPT:
                self._in_holds.clear()  # a hint only: a forgotten token costs its release a trip or two
            self._in_holds.add((name, owner.owner_token))
        return result

    def release(self, name: str, owner_token: str) -> bool:
        hint = (name, owner_token) in self._in_holds
        released, freed = self._run(f"release {name!r}", self._rules.release(name, owner_token, hint))
        self._in_holds.discard((name, owner_token))
        if freed:
            self._notify(name)
        return bool(released)

    async def arelease(self, name: str, owner_token: str) -> bool:
        hint = (name, owner_token) in self._in_holds
        released, freed = await self._arun(f"release {name!r}", self._rules.release(name, owner_token, hint))
        self._in_holds.discard((name, owner_token))
        if freed:
            self._notify(name)
        return bool(released)

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        hint = (name, owner_token) in self._in_holds
        return self._run(f"renew {name!r}", self._rules.renew(name, owner_token, _ms(ttl), hint))

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        hint = (name, owner_token) in self._in_holds
        return await self._arun(f"renew {name!r}", self._rules.renew(name, owner_token, _ms(ttl), hint))

    def holders(self, name: str) -> builtins.list[LockRecord]:
        return self._run(f"read {name!r}", self._rules.holders(name))

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        return await self._arun(f"read {name!r}", self._rules.holders(name))

    def get(self, name: str) -> LockRecord | None:
        return self._run(f"read {name!r}", self._rules.get(name))

    async def aget(self, name: str) -> LockRecord | None:
        return await self._arun(f"read {name!r}", self._rules.get(name))

    def list(self, prefix: str = "") -> list[LockRecord]:
        return self._run("list locks", self._rules.list(prefix, _prefix_pattern(prefix)))

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:  # ``list`` is a method here
        return await self._arun("list locks", self._rules.list(prefix, _prefix_pattern(prefix)))

    def force_release(self, name: str) -> LockRecord | None:
        removed = self._run(f"force-release {name!r}", self._rules.force_release(name))
        if removed is not None:
            self._notify(name)
        return removed

    async def aforce_release(self, name: str) -> LockRecord | None:
        removed = await self._arun(f"force-release {name!r}", self._rules.force_release(name))
        if removed is not None:
            self._notify(name)
        return removed

    # -- waiting: one change stream per collection and process -------------------------

    def _hub_key(self) -> Any:
        return (self._key, self.database_name, self.collection_name)

    def _hub(self, create: bool = True) -> ReleaseHub | None:
        with _registry.guard:
            hub = _registry.hubs.get(self._hub_key())
            if hub is None and create:
                hub = _registry.hubs[self._hub_key()] = ReleaseHub(
                    self._listen, thread_name=f"singleton-mongodb-{self.collection_name}"
                )
            return hub

    def _notify(self, name: str) -> None:
        hub = self._hub(create=False)
        if hub is not None:
            hub.notify(name)

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        """A wake-up from the process's one change stream (or an in-process release); see ``ReleaseHub``.

        A queued waiter (``owner_token``) is woken by a release only while its place heads the queue.
        """
        hub = self._hub()
        assert hub is not None
        return hub.watch(name, owner_token)

    def _listen(self, hub: ReleaseHub, stop: threading.Event) -> None:
        """The hub's listener: one collection-wide change stream, fanned out by name."""
        errors = self._pymongo.errors
        try:
            # updateLookup: the document as it is now, whose queue names the waiter to wake.
            stream = self._collection().watch(_RELEASES, max_await_time_ms=_CHANGE_STREAM_AWAIT_MS,
                                              full_document="updateLookup")
        except errors.OperationFailure as error:  # a standalone server: no change streams, ever
            logger.debug("mongodb: change streams unavailable, waiters poll: %s", self._describe(error))
            self._change_streams = False
            stop.wait()
            return
        self._change_streams = True
        seed_names: OrderedDict[Any, str] = OrderedDict()  # a seed's delete names only its ObjectId
        seen: OrderedDict[str, tuple[Any, ...]] = OrderedDict()  # each name's last replace event
        with stream:
            hub.ready()
            while not stop.is_set():
                change = stream.try_next()  # blocks up to _CHANGE_STREAM_AWAIT_MS
                if change is not None:
                    _dispatch(hub, change, seed_names, seen, self._server_now() or time.time())

    async def _aprobe_change_streams(self, collection: Any) -> None:
        errors = self._pymongo.errors
        try:
            with self._pymongo.timeout(_PROBE_SECONDS):
                stream = await collection.watch([{"$match": {"documentKey._id": ""}}], max_await_time_ms=50)
                await stream.close()
            self._change_streams = True
        except errors.OperationFailure as error:
            logger.debug("mongodb: change streams unavailable, polling: %s", self._describe(error))
            self._change_streams = False
        except errors.PyMongoError:  # unreachable now: still unknown
            pass

    def _probe_change_streams(self) -> bool:
        if self._change_streams is None and _in_event_loop():
            # Never block a loop on a probe: unknown means poll (waiters are still woken
            # by the hub); the first async store call finds out without blocking.
            return False
        # An unreachable server leaves the answer unknown; asking again at most every
        # _CLOCK_REFRESH_SECONDS keeps each wait from paying a second connect timeout.
        if self._change_streams is None and time.monotonic() - self._probed_at > _CLOCK_REFRESH_SECONDS:
            self._probed_at = time.monotonic()
            errors = self._pymongo.errors
            try:
                with self._pymongo.timeout(_PROBE_SECONDS):  # a dead server costs the probe little
                    stream = self._collection().watch([{"$match": {"documentKey._id": ""}}], max_await_time_ms=50)
                    stream.close()
                self._change_streams = True
            except errors.OperationFailure as error:
                logger.debug("mongodb: change streams unavailable, polling: %s", self._describe(error))
                self._change_streams = False
            except (errors.PyMongoError, PersisterError, ValueError):  # unreachable now: unknown
                pass
        return bool(self._change_streams)

    # -- plumbing ----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only; the client is rebuilt on first use."""
        state = self.__dict__.copy()
        for key in ("_pymongo", "_client_", "_clock_offset", "_rules", "_in_holds"):
            state.pop(key, None)
        state["_purge_seed"] = (self._rules.purge_ms, self._rules.seed_expire_ms)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        purge_ms, seed_ms = state.pop("_purge_seed")
        self.__dict__.update(state)
        self._pymongo = _import_pymongo()
        self._rules = Rules(self._pymongo.errors, purge_ms, seed_ms)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"MongoDb({self.url!r}, database={self.database_name!r}, collection={self.collection_name!r})"


def _unchanged(seen: OrderedDict[str, tuple[Any, ...]], name: str, doc: Mapping[str, Any]) -> bool:
    """Whether a replace event of ``name`` left every field a release changes as the last one did.

    mongod before 5.0 reports a pipeline update as a whole document: a waiter refreshing its place
    would otherwise wake the head, whose own refresh would wake it again, round and round.
    """
    holds = tuple((hold.get("fence"), hold.get("releasedAt")) for hold in doc.get("holds") or () if isinstance(hold, Mapping))
    state = (doc.get("owner"), doc.get("fence"), doc.get("freedBy"), doc.get("releasedAt"), holds)
    before = seen.pop(name, None)
    seen[name] = state
    while len(seen) > _SEED_IDS_KEPT:
        seen.popitem(last=False)
    return before == state


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _result(method: str, result: Any) -> Any:
    if method == "update_one":
        return result.matched_count
    if method == "delete_one":
        return result.deleted_count
    return result


def _limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, not {limit!r}")
    return limit


def _prefix_pattern(prefix: str) -> str | None:
    if not isinstance(prefix, str):
        raise TypeError(f"a name prefix must be a str, not {type(prefix).__name__}")
    return "^" + re.escape(prefix) if prefix else None  # a prefix is text, never a pattern


def _dispatch(hub: ReleaseHub, change: Mapping[str, Any], seed_names: OrderedDict[Any, str],
              seen: OrderedDict[str, tuple[Any, ...]] | None = None, server_now: float | None = None) -> None:
    """Turn one change event into wake-ups: the name when it is known, everyone when it is not.

    When the document (as it is now) queues waiters, the wake-up goes to the first live place's
    waiter, if it waits here, and to one unqueued waiter: the other places would only be refused.
    """
    kind = change.get("operationType")
    key = (change.get("documentKey") or {}).get("_id")
    if kind == "insert":
        name = (change.get("fullDocument") or {}).get("name")
        if isinstance(name, str) and not isinstance(key, str):
            seed_names[key] = name
            while len(seed_names) > _SEED_IDS_KEPT:
                seed_names.popitem(last=False)
        return
    if kind in ("update", "replace", "delete") and isinstance(key, str):
        doc = change.get("fullDocument")
        if kind == "replace" and isinstance(doc, Mapping) and seen is not None and _unchanged(seen, key, doc):
            return  # a server that reports whole documents: only a queued place moved, nothing was freed
        head = queue_head(doc, time.time() if server_now is None else server_now) if isinstance(doc, Mapping) else None
        if head is not None:
            hub.notify(key, head)
        else:
            hub.notify(key)
    elif kind == "delete" and key in seed_names:
        hub.notify(seed_names.pop(key))
    else:  # a seed lock from before the stream opened, or the collection went away
        hub.notify_all()
