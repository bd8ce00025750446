"""Locks in Redis: each primitive is one Lua script, so one round trip and one atomic step.

Layout for a lock ``NAME`` under the key prefix (default ``singleton:``); the
braces are a hash tag, so both keys of a name share one cluster slot::

    singleton:{NAME}            string: the holder's owner token, with a PX lease (none for ttl=None)
    singleton:{NAME}:state      hash, no TTL: ``fence``, the fencing counter kept across release and
                                expiry, and ``holder``, the latest holder as JSON, removed on release
    singleton:{NAME}:released   pub/sub channel told of every release

A name's first fencing token is the server's ``TIME`` in milliseconds, and each
later one adds 1: should the state hash be lost (a restart without persistence,
an eviction), the next token still exceeds every earlier one unless the server's
clock went back or the name was locked more than 1,000 times a second on average.

Expiry is Redis's own key TTL, so an expired lock is simply gone; a ``holder``
still present in the state hash is what tells the next acquire that the lock
expired rather than was released, in the same script. Times come from the
server's ``TIME``, never the client's clock. The state hash of every name ever
locked stays (a few dozen bytes) so that fencing tokens keep rising.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import parse_qsl, urlencode

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
_EPOCH = datetime.fromtimestamp(0, timezone.utc)
#: Subscription connections a persister keeps for reuse (about one per waiting thread).
_IDLE_PUBSUBS = 4

# The holder JSON starts with expires_at so RENEW can rewrite it with one anchored gsub.
# SET NX comes first: on the uncontended path the script makes four calls, and it
# answers with a status string so the client parses one line.
#: KEYS: lock, state. ARGV: owner_token, ttl_ms (0 = no expiry), the holder's other JSON
#: members ('"owner_token":...,"host":...,"pid":...,"metadata":{...}').
#: Returns the status "FENCE CREATED_MS" when it took a free name; {1, fence, created_ms,
#: expired holder JSON} when it replaced an expired lock; {0, holder token, holder JSON,
#: pttl} on conflict; {2, holder JSON} when this token already holds it (an attempt
#: retried after its reply was lost).
ACQUIRE_SCRIPT = """
local ttl = tonumber(ARGV[2])
local taken
if ttl > 0 then
  taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl)
else
  taken = redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
if not taken then
  local token = redis.call('GET', KEYS[1])
  local holder = redis.call('HGET', KEYS[2], 'holder')
  if token == ARGV[1] then
    return {2, holder}
  end
  return {0, token, holder, redis.call('PTTL', KEYS[1])}
end
local state = redis.call('HMGET', KEYS[2], 'fence', 'holder')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence = tonumber(state[1])
if fence then
  fence = fence + 1
else
  fence = now
end
local expires = 'null'
if ttl > 0 then
  expires = now + ttl
end
redis.call('HSET', KEYS[2], 'fence', fence, 'holder',
  '{"expires_at":' .. expires .. ',"created_at":' .. now .. ',"fencing_token":' .. fence .. ',' .. ARGV[3] .. '}')
if state[2] then
  return {1, fence, now, state[2]}
end
return {ok = fence .. ' ' .. now}
"""

#: KEYS: lock, state. ARGV: owner_token. Returns 1 when the token held the lock.
#: A lease of this token that ran out untaken is cleared from the state hash (so the
#: next holder is not told it expired), but the answer is 0: it was not held until now.
RELEASE_SCRIPT = """
local token = redis.call('GET', KEYS[1])
if token ~= ARGV[1] then
  if not token then
    local holder = redis.call('HGET', KEYS[2], 'holder')
    if holder and string.find(holder, '"owner_token":"' .. ARGV[1] .. '"', 1, true) then
      redis.call('HDEL', KEYS[2], 'holder')
    end
  end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'holder')
redis.call('PUBLISH', KEYS[1] .. ':released', '')
return 1
"""

#: KEYS: lock, state. ARGV: owner_token, ttl_ms (0 = no expiry). Returns the holder JSON or nil.
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local ttl = tonumber(ARGV[2])
local expires = 'null'
if ttl > 0 then
  local t = redis.call('TIME')
  expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
local holder = redis.call('HGET', KEYS[2], 'holder')
if not holder then
  return false
end
holder = string.gsub(holder, '^{"expires_at":[^,]*', '{"expires_at":' .. expires, 1)
redis.call('HSET', KEYS[2], 'holder', holder)
return holder
"""

#: KEYS: lock, state. Returns {token, holder JSON} of the live holder, or nil.
GET_SCRIPT = """
local token = redis.call('GET', KEYS[1])
if not token then
  return false
end
return {token, redis.call('HGET', KEYS[2], 'holder')}
"""

#: KEYS: lock, state. Returns {token, holder JSON} of the holder it removed, or nil.
FORCE_RELEASE_SCRIPT = """
local token = redis.call('GET', KEYS[1])
if not token then
  return false
end
local holder = redis.call('HGET', KEYS[2], 'holder')
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], 'holder')
redis.call('PUBLISH', KEYS[1] .. ':released', '')
return {token, holder}
"""

_SCRIPTS: dict[str, str] = {
    "acquire": ACQUIRE_SCRIPT,
    "release": RELEASE_SCRIPT,
    "renew": RENEW_SCRIPT,
    "get": GET_SCRIPT,
    "force_release": FORCE_RELEASE_SCRIPT,
}
_SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}

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
    if milliseconds is None or milliseconds == "":
        return None
    return datetime.fromtimestamp(int(milliseconds) / 1000, timezone.utc)  # type: ignore[call-overload]


def _record(name: str, token: str | None, holder: str | None) -> LockRecord:
    """A record from the state hash's holder JSON; tolerant of one someone else removed."""
    data: dict[str, Any] = json.loads(holder) if holder else {}
    return LockRecord(
        name=name,
        owner_token=token if token is not None else str(data.get("owner_token", "")),
        fencing_token=int(data.get("fencing_token", 0)),
        host=str(data.get("host", "unknown")),
        pid=int(data.get("pid", 0)),
        created_at=_when(data.get("created_at")) or _EPOCH,
        expires_at=_when(data.get("expires_at")),
        metadata=data.get("metadata") or {},
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
    """A subscription to one name's release channel, confirmed before the first attempt.

    Its connection is lent by the persister and given back unsubscribed at close, so a
    loop of ``lock(wait=...)`` costs one SUBSCRIBE round trip, not a new connection.
    """

    def __init__(self, persister: Redis, channel: str) -> None:
        self._persister = persister
        self._channel = channel
        self._pubsub: Any = None
        with persister._translate("subscribing to releases"):
            pubsub = persister._lend_pubsub()
            try:
                pubsub.subscribe(channel)
                # The confirmation proves the server registered us before we try to acquire,
                # so a release between a failed attempt and wait() is already queued. Replies
                # left from the connection's previous channel come first and are skipped.
                deadline = time.monotonic() + persister.socket_timeout
                while True:
                    message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
                    if message is not None and message["type"] == "subscribe" and message["channel"] == channel:
                        break
                    if time.monotonic() >= deadline:
                        raise persister._driver.exceptions.TimeoutError("no subscription confirmation")
            except BaseException:
                persister._discard_pubsub(pubsub)
                raise
        self._pubsub = pubsub

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._persister._translate("waiting for a release"):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                message = self._pubsub.get_message(timeout=remaining)
                if message is not None and message["type"] == "message" and message["channel"] == self._channel:
                    return

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            self._persister._take_back_pubsub(pubsub, self._channel)


class Redis(Persister):
    """Locks in Redis (standalone or a replicated primary); one Lua round trip per primitive.

    ``url`` accepts ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs as redis-py
    does, plus our query options ``key_prefix``, ``wait_replicas`` and ``wait_timeout_ms``.
    Keyword options override the URL's; other keywords (``ssl_ca_certs``, ``ssl_certfile``,
    ``username``, ``client_name``, ...) go to redis-py's connections unchanged. Left as
    None, ``key_prefix`` is the URL's or ``singleton:`` and each socket timeout the URL's
    or 5 s. Nothing connects here: the first operation opens the pool, which redis-py
    resets after a fork. Release channels are server-wide (pub/sub ignores the database
    number), so stores on other databases can only cause a spurious, harmless wake-up.

    ``wait_replicas``: after each acquire and release, also send ``WAIT`` for that many
    replicas (``wait_timeout_ms`` at most). An acquire that too few replicas confirm is
    given back and raises ``PersisterError``, so a failover right after it is less likely
    to hand the lock to a second holder. It costs a second round trip plus the
    replication lag on every acquire and release, and it is not consensus: replication
    stays asynchronous, so ``WAIT`` narrows the failover window rather than closing it.
    A release that too few replicas confirm is not an error (the worst case after a
    failover is a lock that lives until its TTL). Leave it at 0 on a single server.

    Only ``ConnectionError`` is retried, once (a pooled connection the server closed);
    timeouts are not, so an unreachable server fails within about
    ``socket_connect_timeout`` seconds. A retried acquire is recognised by its owner
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
        self._reset_runtime()
        redis = self._driver
        if scheme_of(url) not in _SCHEMES:
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, not {redact_url(url)!r}")
        self.url = url
        driver_url, query = _split_own_options(url)
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

        for key, value in (("socket_timeout", socket_timeout), ("socket_connect_timeout", socket_connect_timeout)):
            chosen = value if value is not None else options.get(key, 5.0)
            if isinstance(chosen, bool) or not isinstance(chosen, (int, float)) or not 0 < chosen < 3600:
                raise ValueError(f"{key} must be a positive number of seconds below an hour, not {chosen!r}")
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

    def _reset_runtime(self) -> None:
        """Driver handles and connection state: never pickled, rebuilt after unpickling."""
        redis = self._driver = _import_redis()
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._no_script = redis.exceptions.NoScriptError
        self._connection_error = redis.exceptions.ConnectionError
        self._response_error = redis.exceptions.ResponseError
        self._guard = threading.Lock()
        self._redis: Any = None
        self._pool_arguments: tuple[str, ...] = ()
        self._members: tuple[str, int, Mapping[str, str], str] | None = None
        self._idle_pubsubs: list[Any] = []  # subscription connections kept for the next watch
        self._idle_pid = os.getpid()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Redis:
        """The persister for ``url``; keyword options override the URL's query options."""
        return cls(url, **options)

    # -- connection ------------------------------------------------------------------

    def _client(self) -> redis_py.Redis:
        """The shared client; its pool is made at first use and resets itself after fork."""
        with self._guard:
            if self._redis is None:
                pool = self._driver.ConnectionPool(**self._options)
                # redis-py before 5.3 wants a command name here; later versions deprecate it.
                parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
                self._pool_arguments = ("EVALSHA",) if parameter and parameter.default is parameter.empty else ()
                self._redis = self._driver.Redis(connection_pool=pool)
            return self._redis

    def _failure(self, action: str, error: BaseException) -> PersisterError:
        """The one place a redis-py error becomes ``PersisterError``, without the password."""
        detail = f"{type(error).__name__}: {error}"
        if self._password:
            detail = detail.replace(self._password, "***")
        return PersisterError(self.backend, f"{action} failed on {redact_url(self.url)}: {detail}")

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except self._errors as error:
            raise self._failure(action, error) from error

    def _eval(self, script: str, name: str, *args: object) -> Any:
        """One EVALSHA on ``name``'s lock and state keys, loading the script if the server lacks it.

        It talks to a pooled connection directly: redis-py's command wrapper (retry
        object, observability hooks, reply callbacks EVALSHA does not need) costs more
        client time per call than the script does on the server. The retry policy is
        the same: once, on ``ConnectionError`` only.
        """
        lock = f"{self.key_prefix}{{{name}}}"
        pool = (self._redis or self._client()).connection_pool
        try:
            for attempt in (1, 2):
                connection = pool.get_connection(*self._pool_arguments)
                try:
                    connection.send_command("EVALSHA", _SHAS[script], 2, lock, lock + ":state", *args)
                    try:
                        return connection.read_response()
                    except self._no_script:
                        connection.send_command("SCRIPT", "LOAD", _SCRIPTS[script])
                        connection.read_response()
                        connection.send_command("EVALSHA", _SHAS[script], 2, lock, lock + ":state", *args)
                        return connection.read_response()
                except self._connection_error:
                    connection.disconnect()
                    if attempt == 2:
                        raise
                except self._response_error:
                    raise  # an error reply was read whole: the connection stays usable
                except BaseException:
                    connection.disconnect()  # never hand back a connection with a reply unread
                    raise
                finally:
                    pool.release(connection)
            raise AssertionError("unreachable")
        except self._errors as error:
            raise self._failure(f"{script.replace('_', ' ')} of {name!r}", error) from error

    def _wait_for_replicas(self, name: str) -> int:
        with self._translate(f"waiting for replicas after writing {name!r}"):
            return int(self._client().execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms))

    def _holder_members(self, owner: Owner) -> str:
        """The holder's JSON members but the times; host, pid and metadata are cached as they rarely change."""
        token = owner.owner_token
        token_json = f'"{token}"' if token.isalnum() and token.isascii() else json.dumps(token)
        cached = self._members
        if cached is None or cached[0] != owner.host or cached[1] != owner.pid or cached[2] != owner.metadata:
            metadata = dict(owner.metadata)
            text = json.dumps({"host": owner.host, "pid": owner.pid, "metadata": metadata}, separators=(",", ":"))[1:-1]
            self._members = cached = (owner.host, owner.pid, metadata, text)
        return f'"owner_token":{token_json},{cached[3]}'

    # -- primitives ------------------------------------------------------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None) -> AcquireResult:
        ttl_ms = max(1, round(ttl * 1000)) if ttl else 0
        reply = self._eval("acquire", name, owner.owner_token, ttl_ms, self._holder_members(owner))
        expired = None
        if type(reply) is str:  # the uncontended path: "FENCE CREATED_MS"
            fence, _, created = reply.partition(" ")
            record = self._our_record(name, owner, int(fence), int(created), ttl_ms)
        elif reply[0] == 1:
            record = self._our_record(name, owner, reply[1], reply[2], ttl_ms)
            expired = _record(name, None, reply[3])
        elif reply[0] == 2:
            record = _record(name, owner.owner_token, reply[1])
        else:
            pttl = reply[3]
            return AcquireResult(False, _record(name, reply[1], reply[2]), retry_after=pttl / 1000 if pttl >= 0 else None)
        if self.wait_replicas:
            acknowledged = self._wait_for_replicas(name)
            if acknowledged < self.wait_replicas:
                self._eval("release", name, owner.owner_token)
                raise PersisterError(
                    self.backend,
                    f"acquiring {name!r}: only {acknowledged} of {self.wait_replicas} replicas confirmed "
                    f"within {self.wait_timeout_ms} ms; the lock was given back",
                )
        return AcquireResult(True, record, expired=expired)

    @staticmethod
    def _our_record(name: str, owner: Owner, fence: int, created_ms: int, ttl_ms: int) -> LockRecord:
        return LockRecord(
            name=name,
            owner_token=owner.owner_token,
            fencing_token=int(fence),
            host=owner.host,
            pid=owner.pid,
            created_at=datetime.fromtimestamp(created_ms / 1000, timezone.utc),
            expires_at=datetime.fromtimestamp((created_ms + ttl_ms) / 1000, timezone.utc) if ttl_ms else None,
            metadata=dict(owner.metadata),
        )

    def release(self, name: str, owner_token: str) -> bool:
        released = self._eval("release", name, owner_token) == 1
        if released and self.wait_replicas:
            self._wait_for_replicas(name)  # best effort: see the class docstring
        return released

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        ttl_ms = max(1, round(ttl * 1000)) if ttl else 0
        holder = self._eval("renew", name, owner_token, ttl_ms)
        return _record(name, owner_token, holder) if holder else None

    def get(self, name: str) -> LockRecord | None:
        reply = self._eval("get", name)
        return _record(name, reply[0], reply[1]) if reply else None

    def list(self, prefix: str = "") -> list[LockRecord]:
        """SCAN for lock keys (never KEYS), then read each batch in one MULTI/EXEC round trip."""
        pattern = f"{_glob_escape(self.key_prefix)}\\{{{_glob_escape(prefix)}*\\}}"
        start = len(self.key_prefix) + 1
        found: dict[str, LockRecord] = {}  # SCAN may return a key twice
        with self._translate(f"listing locks under {prefix!r}"):
            client = self._client()
            cursor = 0
            while True:
                cursor, found_keys = client.scan(cursor=cursor, match=pattern, count=500)
                keys = cast("list[str]", found_keys)  # decode_responses: keys are str
                if keys:
                    with client.pipeline(transaction=True) as pipe:
                        for key in keys:
                            pipe.get(key)
                            pipe.hget(f"{key}:state", "holder")
                        replies = pipe.execute()
                    for key, token, holder in zip(keys, replies[::2], replies[1::2]):
                        if token is not None:  # None: expired between SCAN and the read
                            name = str(key)[start:-1]
                            found[name] = _record(name, token, holder)
                if cursor == 0:
                    break
        return [found[name] for name in sorted(found)]

    def force_release(self, name: str) -> LockRecord | None:
        reply = self._eval("force_release", name)
        return _record(name, reply[0], reply[1]) if reply else None

    def watch(self, name: str) -> ReleaseWatch:
        return _PubSubWatch(self, f"{self.key_prefix}{{{name}}}:released")

    def _lend_pubsub(self) -> Any:
        with self._guard:
            if self._idle_pid == os.getpid() and self._idle_pubsubs:
                return self._idle_pubsubs.pop()
        return self._client().pubsub()

    def _take_back_pubsub(self, pubsub: Any, channel: str) -> None:
        """Unsubscribe (not waiting for the reply) and keep the connection for the next watch."""
        try:
            pubsub.unsubscribe(channel)
        except self._errors:
            self._discard_pubsub(pubsub)
            return
        with self._guard:
            if self._idle_pid != os.getpid():  # a forked child never reuses its parent's sockets
                self._idle_pubsubs, self._idle_pid = [], os.getpid()
            if len(self._idle_pubsubs) < _IDLE_PUBSUBS:
                self._idle_pubsubs.append(pubsub)
                return
        self._discard_pubsub(pubsub)

    def _discard_pubsub(self, pubsub: Any) -> None:
        # Closing a broken subscription must not mask the caller's outcome.
        with suppress(*self._errors):
            pubsub.close()

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections; the next operation reconnects."""
        with self._guard:
            idle = self._idle_pubsubs if self._idle_pid == os.getpid() else []
            self._idle_pubsubs = []
        for pubsub in idle:
            self._discard_pubsub(pubsub)
        client = self._redis
        if client is not None:
            with self._translate("closing"):
                client.connection_pool.disconnect()

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the configuration only; the copy opens its own pool when first used.
        return {key: value for key, value in self.__dict__.items() if key not in _RUNTIME}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def __repr__(self) -> str:
        return f"Redis({redact_url(self.url)!r}, key_prefix={self.key_prefix!r})"


_RUNTIME = frozenset({
    "_driver", "_errors", "_no_script", "_connection_error", "_response_error", "_guard", "_redis",
    "_pool_arguments", "_members", "_idle_pubsubs", "_idle_pid",
})


def _split_own_options(url: str) -> tuple[str, dict[str, str]]:
    """Our query options apart from redis-py's, which get the rest of the URL unchanged."""
    base, _, query_text = url.partition("?")
    query = parse_qsl(query_text, keep_blank_values=True)
    own = {k: v for k, v in query if k in _OWN_QUERY_OPTIONS}
    rest = [(k, v) for k, v in query if k not in _OWN_QUERY_OPTIONS]
    return (f"{base}?{urlencode(rest)}" if rest else base), own


def _int_option(name: str, value: int | None, query: Mapping[str, str], default: int, *, minimum: int) -> int:
    raw: object = value if value is not None else query.get(name, default)
    number: int | None = None
    if not isinstance(raw, (bool, float)):
        try:
            number = int(raw)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            pass
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {raw!r}")
    return number
