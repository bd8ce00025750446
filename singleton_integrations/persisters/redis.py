"""Locks in Redis: each primitive is one Lua script, so one round trip and one atomic step.

Layout for a lock ``NAME`` under the key prefix (default ``singleton:``); the
braces are a hash tag, so both keys of a name share one cluster slot::

    singleton:{NAME}        string: the holder's owner token, with a PX lease (none for ttl=None)
    singleton:{NAME}:state  hash, no TTL: ``fence`` (the fencing counter, kept across release
                            and expiry) and the latest holder's fields, cleared on release
    singleton:{NAME}:released   pub/sub channel told of every release

Expiry is Redis's own key TTL, so an expired lock is simply gone. The state hash
still names its holder, which is how the next acquire tells "expired" (holder
fields present) from "released" (cleared) in the same script. Times come from
the server's ``TIME``, never the client's clock.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url, scheme_of
from ._base import Persister, ReleaseWatch

if TYPE_CHECKING:
    import redis as redis_py

__all__ = ["Redis"]

_SCHEMES = ("redis", "rediss", "unix")
_DEFAULT_URL = "redis://127.0.0.1:6379/0"
_DEFAULT_PREFIX = "singleton:"
# Options this persister reads from the URL's query string; the rest go to redis-py.
_OWN_QUERY_OPTIONS = ("key_prefix", "wait_replicas", "wait_timeout_ms")
_EMPTY_METADATA = "{}"

# Shared Lua: the state hash fields of a holder, in the order every script returns them.
_FIELDS = "local FIELDS = {'fence', 'owner_token', 'host', 'pid', 'created_at', 'expires_at', 'metadata'}\n"
_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: KEYS: lock, state. ARGV: owner_token, ttl_ms (0 = no expiry), host, pid, metadata JSON.
#: Returns {1, fence, created_ms, expires_ms or '', expired holder fields or nil}
#:      or {0, holder token, holder fields, pttl}.
ACQUIRE_SCRIPT = _FIELDS + _NOW_MS + """
local holder = redis.call('GET', KEYS[1])
if holder then
  local fields = redis.call('HMGET', KEYS[2], unpack(FIELDS))
  if holder == ARGV[1] then
    -- a retried attempt whose first reply was lost: it already holds the lock
    return {1, tonumber(fields[1]), tonumber(fields[5]), fields[6], false}
  end
  return {0, holder, fields, redis.call('PTTL', KEYS[1])}
end
local expired = false
if redis.call('HEXISTS', KEYS[2], 'owner_token') == 1 then
  expired = redis.call('HMGET', KEYS[2], unpack(FIELDS))
end
local now = now_ms()
local ttl = tonumber(ARGV[2])
local expires = ''
if ttl > 0 then
  expires = now + ttl
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
local fence = redis.call('HINCRBY', KEYS[2], 'fence', 1)
redis.call('HSET', KEYS[2], 'owner_token', ARGV[1], 'host', ARGV[3], 'pid', ARGV[4],
           'created_at', now, 'expires_at', expires, 'metadata', ARGV[5])
return {1, fence, now, expires, expired}
"""

#: KEYS: lock, state. ARGV: owner_token, channel. Returns 1 when the token held the lock.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'owner_token', 'host', 'pid', 'created_at', 'expires_at', 'metadata')
redis.call('PUBLISH', ARGV[2], 'released')
return 1
"""

#: KEYS: lock, state. ARGV: owner_token, ttl_ms (0 = no expiry). Returns {token, fields} or nil.
RENEW_SCRIPT = _FIELDS + _NOW_MS + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local ttl = tonumber(ARGV[2])
local expires = ''
if ttl > 0 then
  expires = now_ms() + ttl
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('HSET', KEYS[2], 'expires_at', expires)
return {ARGV[1], redis.call('HMGET', KEYS[2], unpack(FIELDS))}
"""

#: KEYS: lock, state. Returns {token, fields} of the live holder, or nil.
GET_SCRIPT = _FIELDS + """
local token = redis.call('GET', KEYS[1])
if not token then
  return false
end
return {token, redis.call('HMGET', KEYS[2], unpack(FIELDS))}
"""

#: KEYS: lock, state. ARGV: channel. Returns {token, fields} of the holder it removed, or nil.
FORCE_RELEASE_SCRIPT = _FIELDS + """
local token = redis.call('GET', KEYS[1])
if not token then
  return false
end
local fields = redis.call('HMGET', KEYS[2], unpack(FIELDS))
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'owner_token', 'host', 'pid', 'created_at', 'expires_at', 'metadata')
redis.call('PUBLISH', ARGV[1], 'released')
return {token, fields}
"""

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]^\-{}])")


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as error:
        raise MissingDependency(backend="redis", extra="redis", module="redis") from error
    return redis


def _when(milliseconds: object) -> datetime | None:
    if milliseconds in (None, "", b""):
        return None
    return datetime.fromtimestamp(int(milliseconds) / 1000, timezone.utc)  # type: ignore[call-overload]


def _record(name: str, token: str, fields: Sequence[Any] | None) -> LockRecord:
    """A record from a state hash; tolerant of a state hash someone else removed."""
    fence, _token, host, pid, created, expires, metadata = fields or (None,) * 7
    return LockRecord(
        name=name,
        owner_token=token,
        fencing_token=int(fence or 0),
        host=host if host is not None else "unknown",
        pid=int(pid or 0),
        created_at=_when(created) or datetime.fromtimestamp(0, timezone.utc),
        expires_at=_when(expires),
        metadata=json.loads(metadata) if metadata else {},
    )


def _connection_option_names(connection_class: type) -> set[str]:
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(
                p.name for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
            )
    return names


class _PubSubWatch(ReleaseWatch):
    """A subscription to one name's release channel, confirmed before the first attempt."""

    def __init__(self, persister: Redis, channel: str) -> None:
        self._persister = persister
        with persister._translate("subscribing to releases"):
            self._pubsub = persister._client().pubsub()
            try:
                self._pubsub.subscribe(channel)
                # The confirmation proves the server registered us before we try to acquire,
                # so a release between a failed attempt and wait() is already queued.
                deadline = time.monotonic() + persister.socket_timeout
                while True:
                    message = self._pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
                    if message is not None and message["type"] == "subscribe":
                        break
                    if time.monotonic() >= deadline:
                        raise PersisterError("redis", f"no subscription confirmation within {persister.socket_timeout} s")
            except BaseException:
                self._pubsub.close()
                raise

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._persister._translate("waiting for a release"):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                message = self._pubsub.get_message(timeout=remaining)
                if message is not None and message["type"] == "message":
                    return

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:  # closing a broken subscription must not mask the caller's outcome
            pass


class Redis(Persister):
    """Locks in Redis (standalone or a replicated primary); one Lua round trip per primitive.

    ``url`` accepts ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs as redis-py
    does, plus our query options ``key_prefix``, ``wait_replicas`` and ``wait_timeout_ms``.
    Keyword options override the URL's; other keywords (``ssl_ca_certs``, ``ssl_certfile``,
    ``username``, ``client_name``, ...) go to redis-py's connections unchanged.

    ``wait_replicas``: after each acquire and release, also send ``WAIT`` for that many
    replicas (``wait_timeout_ms`` at most). An acquire that too few replicas confirm is
    undone and raises ``PersisterError``, so a failover right after it cannot hand the
    same lock to a second holder. It costs a second round trip and the replication lag
    on every acquire and release, and still is not consensus: Redis replication is
    asynchronous, so ``WAIT`` narrows the window after a failover rather than closing it.
    A release that too few replicas confirm is not an error (the worst case after a
    failover is a lock that lives until its TTL). Leave it at 0 on a single server.

    Network errors are retried once only for ``ConnectionError`` (a pooled connection the
    server closed); timeouts are not retried, so an unreachable server fails within
    about ``socket_connect_timeout`` seconds. A retried acquire is recognised by its owner
    token, so a lost reply never makes us conflict with ourselves.
    """

    backend: ClassVar[str] = "redis"
    distributed: ClassVar[bool] = True
    notifies: ClassVar[bool] = True
    clock: ClassVar[str] = "the Redis server's clock (TIME, key TTLs)"

    def __init__(
        self,
        url: str = _DEFAULT_URL,
        *,
        key_prefix: str | None = None,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        max_connections: int | None = None,
        wait_replicas: int | None = None,
        wait_timeout_ms: int | None = None,
        **connection_options: Any,
    ) -> None:
        redis = _import_redis()
        if scheme_of(url) not in _SCHEMES:
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, not {redact_url(url)!r}")
        self.url = url
        driver_url, query = self._split_own_options(url)
        try:
            options: dict[str, Any] = redis.connection.parse_url(driver_url)
        except ValueError as error:
            raise ValueError(f"malformed Redis URL {redact_url(url)!r}: {error}") from None

        prefix = key_prefix if key_prefix is not None else query.get("key_prefix", _DEFAULT_PREFIX)
        if not isinstance(prefix, str) or any(ord(c) < 32 for c in prefix):
            raise TypeError("key_prefix must be a str without control characters")
        self.key_prefix = prefix
        self.wait_replicas = _int_option("wait_replicas", wait_replicas, query, 0, minimum=0)
        self.wait_timeout_ms = _int_option("wait_timeout_ms", wait_timeout_ms, query, 1000, minimum=1)

        for key, value, default in (
            ("socket_timeout", socket_timeout, 5.0),
            ("socket_connect_timeout", socket_connect_timeout, 5.0),
        ):
            chosen = value if value is not None else options.get(key, default)
            if isinstance(chosen, bool) or not isinstance(chosen, (int, float)) or not 0 < chosen < 3600:
                raise ValueError(f"{key} must be a positive number of seconds, not {chosen!r}")
            options[key] = float(chosen)
        if max_connections is not None:
            options["max_connections"] = max_connections
        if self.wait_replicas and self.wait_timeout_ms / 1000 >= options["socket_timeout"]:
            raise ValueError("wait_timeout_ms must be shorter than socket_timeout")

        options.update(connection_options)
        connection_class = options.get("connection_class", redis.Connection)
        unknown = set(options) - _connection_option_names(connection_class) - {"connection_class", "max_connections"}
        if unknown:
            raise TypeError(f"unknown Redis connection option(s): {', '.join(sorted(unknown))}")
        options["decode_responses"] = True
        if "retry" not in connection_options:
            options["retry"] = redis.retry.Retry(
                redis.backoff.ExponentialBackoff(cap=0.05, base=0.01), retries=1,
                supported_errors=(redis.exceptions.ConnectionError,),
            )
        self.socket_timeout: float = options["socket_timeout"]
        self._password: str | None = options.get("password")
        self._options = options
        self._guard = threading.Lock()
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Redis:
        """The persister for ``url``; keyword options override the URL's query options."""
        return cls(url, **options)

    @staticmethod
    def _split_own_options(url: str) -> tuple[str, dict[str, str]]:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        own = {k: v for k, v in query if k in _OWN_QUERY_OPTIONS}
        rest = [(k, v) for k, v in query if k not in _OWN_QUERY_OPTIONS]
        return urlunsplit(parts._replace(query=urlencode(rest))), own

    # -- connection ------------------------------------------------------------------

    def _client(self) -> redis_py.Redis:
        """The shared client; its pool is made at first use and resets itself after fork."""
        client = self._redis
        if client is not None:
            return client
        with self._guard:
            if self._redis is None:
                redis = _import_redis()
                pool = redis.ConnectionPool(**self._options)
                client = redis.Redis(connection_pool=pool)
                self._scripts = {
                    "acquire": client.register_script(ACQUIRE_SCRIPT),
                    "release": client.register_script(RELEASE_SCRIPT),
                    "renew": client.register_script(RENEW_SCRIPT),
                    "get": client.register_script(GET_SCRIPT),
                    "force_release": client.register_script(FORCE_RELEASE_SCRIPT),
                }
                self._redis = client
            return self._redis

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """The one place redis-py errors become ``PersisterError``, without the password."""
        redis = _import_redis()
        try:
            yield
        except (redis.exceptions.RedisError, OSError) as error:
            detail = f"{type(error).__name__}: {error}"
            if self._password:
                detail = detail.replace(self._password, "***")
            raise PersisterError(self.backend, f"{action} failed on {redact_url(self.url)}: {detail}") from error

    def _keys(self, name: str) -> tuple[str, str]:
        lock = f"{self.key_prefix}{{{name}}}"
        return lock, lock + ":state"

    def _channel(self, name: str) -> str:
        return f"{self.key_prefix}{{{name}}}:released"

    def _run(self, script: str, keys: Sequence[str], args: Sequence[object] = ()) -> Any:
        """One EVALSHA (redis-py loads the script once if the server lacks it)."""
        if self._redis is None:
            self._client()
        return self._scripts[script](keys=keys, args=args)

    def _wait_for_replicas(self) -> int:
        return int(self._client().execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms))

    # -- primitives ------------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        lock, state = self._keys(name)
        ttl_ms = max(1, round(ttl * 1000)) if ttl else 0
        metadata = json.dumps(dict(owner.metadata), separators=(",", ":")) if owner.metadata else _EMPTY_METADATA
        with self._translate(f"acquiring {name!r}"):
            reply = self._run("acquire", (lock, state), (owner.owner_token, ttl_ms, owner.host, owner.pid, metadata))
            if reply[0] == 1 and self.wait_replicas:
                acknowledged = self._wait_for_replicas()
                if acknowledged < self.wait_replicas:
                    self._run("release", (lock, state), (owner.owner_token, self._channel(name)))
                    raise PersisterError(
                        self.backend,
                        f"acquiring {name!r}: only {acknowledged} of {self.wait_replicas} replicas confirmed "
                        f"within {self.wait_timeout_ms} ms; the lock was given back",
                    )
        if reply[0] == 0:
            _, token, fields, pttl = reply
            retry_after = pttl / 1000 if pttl >= 0 else None
            return AcquireResult(False, _record(name, token, fields), retry_after=retry_after)
        _, fence, created, expires, expired = reply
        record = LockRecord(
            name=name,
            owner_token=owner.owner_token,
            fencing_token=int(fence),
            host=owner.host,
            pid=owner.pid,
            created_at=_when(created),  # type: ignore[arg-type]
            expires_at=_when(expires),
            metadata=dict(owner.metadata),
        )
        return AcquireResult(True, record, expired=_record(name, expired[1], expired) if expired else None)

    def release(self, name: str, owner_token: str) -> bool:
        lock, state = self._keys(name)
        with self._translate(f"releasing {name!r}"):
            released = self._run("release", (lock, state), (owner_token, self._channel(name)))
            if released and self.wait_replicas:
                self._wait_for_replicas()  # best effort: see the class docstring
        return released == 1

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        lock, state = self._keys(name)
        ttl_ms = max(1, round(ttl * 1000)) if ttl else 0
        with self._translate(f"renewing {name!r}"):
            reply = self._run("renew", (lock, state), (owner_token, ttl_ms))
        return _record(name, reply[0], reply[1]) if reply else None

    def get(self, name: str) -> LockRecord | None:
        with self._translate(f"reading {name!r}"):
            reply = self._run("get", self._keys(name))
        return _record(name, reply[0], reply[1]) if reply else None

    def list(self, prefix: str = "") -> list[LockRecord]:
        """SCAN for lock keys (never KEYS), then read each batch in one MULTI/EXEC round trip."""
        pattern = f"{_glob_escape(self.key_prefix)}\\{{{_glob_escape(prefix)}*\\}}"
        start = len(self.key_prefix) + 1
        found: list[LockRecord] = []
        with self._translate(f"listing locks under {prefix!r}"):
            client = self._client()
            cursor = 0
            while True:
                cursor, keys = client.scan(cursor=cursor, match=pattern, count=500)
                if keys:
                    with client.pipeline(transaction=True) as pipe:
                        for key in keys:
                            pipe.get(key)
                            pipe.hmget(key + ":state", "fence", "owner_token", "host", "pid", "created_at", "expires_at", "metadata")
                        replies = pipe.execute()
                    for key, token, fields in zip(keys, replies[::2], replies[1::2]):
                        if token is not None:  # expired between SCAN and the read
                            found.append(_record(key[start:-1], token, fields))
                if cursor == 0:
                    break
        # SCAN may return a key twice; keep one record per name.
        unique = {record.name: record for record in found}
        return [unique[name] for name in sorted(unique)]

    def force_release(self, name: str) -> LockRecord | None:
        lock, state = self._keys(name)
        with self._translate(f"force-releasing {name!r}"):
            reply = self._run("force_release", (lock, state), (self._channel(name),))
        return _record(name, reply[0], reply[1]) if reply else None

    def watch(self, name: str) -> ReleaseWatch:
        return _PubSubWatch(self, self._channel(name))

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections; the next operation reconnects."""
        client = self._redis
        if client is not None:
            with self._translate("closing"):
                client.connection_pool.disconnect()

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the configuration only; the copy opens its own pool when first used.
        state = self.__dict__.copy()
        state.update(_guard=None, _redis=None, _scripts={})
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self._guard = threading.Lock()

    def __repr__(self) -> str:
        return f"Redis({redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"


def _int_option(name: str, value: int | None, query: Mapping[str, str], default: int, *, minimum: int) -> int:
    raw: object = value if value is not None else query.get(name, default)
    try:
        number = int(raw) if not isinstance(raw, bool) else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (isinstance(raw, float) and raw != number):
        raise ValueError(f"{name} must be an integer >= {minimum}, not {raw!r}")
    return number
