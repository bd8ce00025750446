"""Locks in Redis: each primitive is one Lua script, so one round trip and one atomic step.

(The one exception: an acquire that does not queue sends a small script for the
common case, which hands over to the full one, having written nothing, when holds
under ``limit`` or its own token are there.)

Works on a single server (``redis://``, ``rediss://``, ``unix://``), on a
Sentinel-managed master (``redis+sentinel://``, ``rediss+sentinel://``) and on a
cluster (``redis+cluster://``, ``rediss+cluster://``). The rules are written
once as steps in ``_redis_steps``; the key layout, the scripts and the fencing
rule are in ``_redis_scripts``; the topologies and the one shared client per
store and process in ``_redis_clients``. Only the sending is written twice
here: sync over ``redis``, async over ``redis.asyncio``.

Expiry is Redis's own key TTL, so an expired lock is simply gone; a ``holder``
still present in the state hash is what tells the next acquire that the lock
expired rather than was released, in the same script. Times come from the
server's ``TIME``, never the client's clock.

With ``limit=N`` (N > 1) a name keeps up to N holds in a sorted set beside the
lock key, under the same hash tag, drawing fencing tokens from the same counter;
a lock taken without ``limit`` is stored exactly as before.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from .._errors import MissingDependency, PersisterError
from .._record import AcquireResult, LockRecord, Owner
from .._urls import redact_url, scheme_of
from . import _redis_scripts as scripts
from ._base import (
    DEFAULT_PURGE_AFTER_SECONDS,
    Persister,
    ReleaseHub,
    ReleaseWatch,
    option_retention,
    option_whole_number,
    positive_seconds,
    retention_seconds,
    whole_number,
)
from ._redis_clients import (
    DEFAULT_MAX_CONNECTIONS,
    SCHEMES,
    PoolExhausted,
    Shared,
    Store,
    leave,
    parse_store,
    shared_for,
)
from ._redis_steps import EVAL, SCAN, Op, Rules, Steps, bulk
from ._steps import adrive, drive

__all__ = ["DEFAULT_MAX_CONNECTIONS", "Redis"]

_DEFAULT_URL = "redis://127.0.0.1:6379/0"
_DEFAULT_PREFIX = "singleton:"
# Options this persister reads from the URL's query string, and how; the rest go to redis-py.
_OWN_QUERY_OPTIONS: dict[str, Callable[[str, str], Any]] = {
    "key_prefix": lambda text, _: text,
    "wait_replicas": option_whole_number,
    "wait_timeout_ms": option_whole_number,
    "purge_after_seconds": option_retention,
}
#: The longest retention the scripts' millisecond expiries take.
_LONGEST_SECONDS = 1e10
# Keywords for redis-py's Sentinel manager and RedisCluster rather than for connections.
_SENTINEL_KEYWORDS = frozenset({"sentinel_kwargs", "min_other_sentinels", "force_master_ip"})
_CLUSTER_KEYWORDS = frozenset({
    "require_full_coverage", "read_from_replicas", "reinitialize_steps", "dynamic_startup_nodes",
    "address_remap", "cluster_error_retry_attempts",
})
# The listener pings this often while idle, so a silent dead server is noticed.
_LISTENER_PING_SECONDS = 5.0
#: The longest the listener blocks before it looks whether it must hear every release again.
_LISTENER_WAIT_SECONDS = 0.1
# Redis echoes a command's arguments (the owner token among them) in some errors.
_ECHOED_ARGUMENTS = re.compile(r",? with args beginning with:.*", re.DOTALL)
_UNSET: Any = object()
#: Keys SCAN asks for per call, and lock keys read per pipelined round trip.
_SCAN_COUNT = 500
_R = TypeVar("_R")


def _import_redis() -> Any:
    try:
        import redis
        import redis.cluster
        import redis.sentinel
    except ImportError as error:
        raise MissingDependency(backend="redis", extra="redis", module="redis") from error
    return redis


@functools.cache
def _connection_option_names(connection_class: type) -> frozenset[str]:
    """The keywords ``connection_class`` takes, read once per class (signatures are slow to read)."""
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None and cls is not object:
            names.update(
                p.name for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
            )
    return frozenset(names)


class Redis(Persister):
    """Locks in Redis: a single server, a Sentinel-managed master or a cluster.

    ``url``: ``redis://``, ``rediss://`` (TLS) and ``unix://`` as redis-py reads them;
    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/DB]`` (and
    ``rediss+sentinel://``), the master found through the sentinels and found again
    after a failover; ``redis+cluster://[[user]:password@]host:port[,host:port...]``
    (and ``rediss+cluster://``). Query options of ours: ``key_prefix``,
    ``wait_replicas``, ``wait_timeout_ms``, ``purge_after_seconds``; the rest
    (``socket_timeout``, ``max_connections``, ``client_name``, ``ssl_*``, ...) go to
    redis-py. Keyword options override the URL's.

    Every persister built from the same URL and options in a process shares one
    client: at most ``max_connections`` (default 10) connections at once, per event
    loop for the async API, plus one pub/sub connection per key prefix while
    someone waits. A call that finds them all busy waits up to ``socket_timeout``
    for one instead of failing. Nothing connects here: the first operation does.

    ``purge_after_seconds`` (default 30 days; None keeps it): a name's state hash
    (its fencing counter) expires that long after the name became free.

    ``wait_replicas``: after each acquire and release, also send ``WAIT`` for that many
    replicas (``wait_timeout_ms`` at most), on the same connection in the same round
    trip. An acquire that too few replicas confirm is given back and raises
    ``PersisterError``, so a failover right after it is less likely to hand the lock
    to a second holder. It is not consensus: replication stays asynchronous, so
    ``WAIT`` narrows the failover window rather than closing it. A release that too
    few replicas confirm is not an error. Not available on a cluster.

    Only ``ConnectionError`` is retried, once (a pooled connection the server closed,
    a master Sentinel replaced); a retried acquire is recognised by its owner token
    and a retried release by the token's hash, so a lost reply never makes us
    conflict with ourselves or report a clean release as a loss.
    """

    backend: ClassVar[str] = "redis"
    clock: ClassVar[str] = "the Redis server's clock (TIME, key TTLs)"
    # Every capability a Persister declares: shared across hosts, woken by pub/sub, a minimum
    # hold, a native async client, a fair queue of waiters, and up to N holds of a name.
    distributed = notifies = supports_min_hold = native_async = fair = limits = True

    @classmethod
    def preload(cls) -> None:
        _connection_option_names(_import_redis().Connection)

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
        purge_after_seconds: float | None = _UNSET,
        **connection_options: Any,
    ) -> None:
        self._reset_runtime()
        redis = self._driver
        scheme = scheme_of(url)
        if scheme not in SCHEMES:
            raise ValueError(
                "a Redis URL starts with redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
                f"redis+cluster:// or rediss+cluster://, not {redact_url(url)!r}"
            )
        #: The store's URL with any password masked; the secret itself is kept private.
        self.url = redact_url(url)
        main_url, own = _split_own_options(url)
        topology, driver_url, nodes, service = parse_store(redis, main_url, scheme)
        self.topology = topology
        try:
            options: dict[str, Any] = redis.connection.parse_url(driver_url)
        except ValueError as error:
            raise ValueError(f"malformed Redis URL {redact_url(url)!r}: {redact_url(str(error))}") from None
        database = urlsplit(driver_url).path.strip("/") if scheme_of(driver_url) != "unix" else ""
        if database and not database.isdigit():  # redis-py reads a path it cannot parse as database 0
            raise ValueError(f"malformed Redis URL {redact_url(url)!r}: the database after the host must be a "
                             f"number, not {database!r}")
        if topology != "standalone":
            options.pop("host", None)
            options.pop("port", None)

        prefix = key_prefix if key_prefix is not None else own.get("key_prefix", _DEFAULT_PREFIX)
        if not isinstance(prefix, str) or any(ord(c) < 32 for c in prefix):
            raise TypeError("key_prefix must be a str without control characters")
        self.key_prefix = prefix
        self.wait_replicas = whole_number(_chosen(wait_replicas, own, "wait_replicas", 0), "wait_replicas", 0)
        self.wait_timeout_ms = whole_number(_chosen(wait_timeout_ms, own, "wait_timeout_ms", 1000), "wait_timeout_ms")
        if self.wait_replicas and topology == "cluster":
            raise ValueError("wait_replicas is not supported on a Redis Cluster (redis+cluster://)")
        purge = own.get("purge_after_seconds", DEFAULT_PURGE_AFTER_SECONDS) if purge_after_seconds is _UNSET else purge_after_seconds
        self.purge_after_seconds = retention_seconds(purge)
        if self.purge_after_seconds is not None and self.purge_after_seconds >= _LONGEST_SECONDS:
            raise ValueError(f"purge_after_seconds must be below {_LONGEST_SECONDS:g} (or None to keep state), not {purge!r}")
        self._purge_ms = max(1, round(self.purge_after_seconds * 1000)) if self.purge_after_seconds else 0

        for key, value in (("socket_timeout", socket_timeout), ("socket_connect_timeout", socket_connect_timeout)):
            chosen = positive_seconds(value if value is not None else options.get(key, 5.0), key)
            if chosen >= 3600:
                raise ValueError(f"{key} must be a positive number of seconds below an hour, not {chosen!r}")
            options[key] = chosen
        pool_size = max_connections if max_connections is not None else options.get("max_connections", DEFAULT_MAX_CONNECTIONS)
        options.pop("max_connections", None)
        self.max_connections = pool_size = whole_number(pool_size, "max_connections")
        if self.wait_replicas and self.wait_timeout_ms / 1000 >= options["socket_timeout"]:
            raise ValueError("wait_timeout_ms must be shorter than socket_timeout")

        extra_names = _SENTINEL_KEYWORDS if topology == "sentinel" else _CLUSTER_KEYWORDS if topology == "cluster" else frozenset()
        extra = {key: connection_options.pop(key) for key in list(connection_options) if key in extra_names}
        options.update(connection_options)
        connection_class = options.get("connection_class", redis.Connection)
        if issubclass(connection_class, redis.sentinel.SentinelManagedConnection):
            raise TypeError("for Redis Sentinel use a redis+sentinel://host:port/SERVICE_NAME URL, not connection_class")
        unknown = set(options) - _connection_option_names(connection_class) - {"connection_class"}
        if unknown:
            raise TypeError(f"unknown Redis connection option(s): {', '.join(sorted(unknown))}")
        options["decode_responses"] = True
        self.socket_timeout: float = options["socket_timeout"]
        #: Waiting for a free connection, connecting, then the reply: the longest one call takes.
        self.call_timeout = 2 * self.socket_timeout + options["socket_connect_timeout"]
        self._password: str | None = options.get("password")
        self._store = Store(topology, SCHEMES[scheme][1], nodes, service, options, pool_size, extra)
        self._rules = self._make_rules()

    def _make_rules(self) -> Rules:
        # Through a weak reference: the rules live on the persister, which a cycle would keep alive.
        persister = weakref.ref(self)

        def notify(name: str, head: str | None) -> None:
            alive = persister()
            if alive is not None:
                alive._notify_local(name, head)

        return Rules(self.key_prefix, self._purge_ms, self.wait_replicas, self.wait_timeout_ms, notify)

    def _reset_runtime(self) -> None:
        """Driver handles and connection state: never pickled, rebuilt after unpickling."""
        redis = self._driver = _import_redis()
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError, PoolExhausted)
        self._no_script = redis.exceptions.NoScriptError
        self._connection_error = redis.exceptions.ConnectionError
        self._response_error = redis.exceptions.ResponseError
        self._guard = threading.Lock()
        self._shared_entry: Shared | None = None
        # redis-py before 5.3 wants a command name for get_connection; later versions deprecate it.
        parameter = inspect.signature(redis.ConnectionPool.get_connection).parameters.get("command_name")
        self._pool_arguments: tuple[str, ...] = ("EVALSHA",) if parameter and parameter.default is parameter.empty else ()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Redis:
        """The persister for ``url``; keyword options override the URL's query options."""
        return cls(url, **options)

    # -- connection ------------------------------------------------------------------

    def _shared(self) -> Shared:
        shared = self._shared_entry
        if shared is None:
            with self._guard:
                if self._shared_entry is None:
                    self._shared_entry = shared_for(self._store, self._driver, self)
                shared = self._shared_entry
        return shared

    def _client(self) -> Any:
        """The shared sync client (a ``Redis`` or a ``RedisCluster``), made at first use."""
        return self._shared().sync_client()

    def _failure(self, action: str, error: BaseException, secret: str | None = None) -> PersisterError:
        """The one place a redis-py error becomes ``PersisterError``, without password or owner token.

        The driver's error stays the ``__cause__`` (tracebacks show it), so it is
        scrubbed in place as well.
        """
        def scrub(text: str) -> str:
            text = _ECHOED_ARGUMENTS.sub("", text)
            for hidden in (self._password, secret):
                if hidden:
                    text = text.replace(hidden, "***")
            return text

        if isinstance(error, PoolExhausted):
            detail = f"{error} (all max_connections={self.max_connections} busy)"
        else:
            if any(isinstance(arg, str) and scrub(arg) != arg for arg in error.args):
                error.args = tuple(scrub(arg) if isinstance(arg, str) else arg for arg in error.args)
            detail = scrub(f"{type(error).__name__}: {error}")
        moved = type(error).__name__ in ("MovedError", "AskError") or str(error).startswith(("MOVED ", "ASK "))
        if self.topology != "cluster" and moved:
            detail += "; this server is a Redis Cluster node: use a redis+cluster:// URL"
        return PersisterError(self.backend, f"{action} failed on {self.url}: {detail}")

    @contextmanager
    def _translate(self, action: str, secret: str | None = None) -> Iterator[None]:
        try:
            yield
        except self._errors as error:
            raise self._failure(action, error, secret) from error

    # -- running the rules: the only I/O, written once per client -----------------------

    def _run(self, verb: str, name: str, steps: Steps[_R], secret: str | None = None) -> _R:
        """Drive ``steps`` with the shared sync client, within one connection slot."""
        shared = self._shared()
        slots = shared.slots
        try:
            slots.acquire(self.socket_timeout)  # not a context manager: this runs on every call
            try:
                client = shared.sync_client()
                return drive(steps, lambda op: self._send(shared, client, op), _unanswered)
            finally:
                slots.release()
        except self._errors as error:
            raise self._failure(f"{verb} {name!r}", error, secret) from error

    def _send(self, shared: Shared, client: Any, op: Op) -> Any:
        if op.kind is EVAL:
            if self.topology != "cluster":
                return self._eval_pooled(shared, client.connection_pool, op)
            # RedisCluster routes by the keys' slot and follows MOVED/ASK itself.
            try:
                return client.evalsha(scripts.SHAS[op.script], *op.keys, *op.args)
            except self._no_script:
                return client.eval(scripts.SCRIPTS[op.script], *op.keys, *op.args)
        if self.topology != "cluster":
            shared.return_idle(client.connection_pool)  # redis-py's own commands take theirs from the pool
        if op.kind is SCAN:
            return [cast(str, key) for key in client.scan_iter(match=op.args[0], count=_SCAN_COUNT)]
        with client.pipeline(transaction=self.topology != "cluster") as pipe:
            _queue_reads(pipe, op.keys)
            return pipe.execute()

    def _eval_pooled(self, shared: Shared, pool: Any, op: Op) -> Any:
        """EVALSHA (and WAIT) on one of the pool's connections, loading the script if the server lacks it.

        It talks to the connection directly: redis-py's command wrapper costs more
        client time per call than the script does on the server. The connection is
        kept for the next call rather than handed back (``Shared.idle_connection``).
        WAIT goes on the same connection, because it confirms the writes of the
        connection it runs on.
        """
        for attempt in (1, 2):
            connection = shared.idle_connection(pool, self._pool_arguments)
            try:
                reply = self._exchange(connection, op)
            except self._connection_error:
                connection.disconnect()
                pool.release(connection)
                shared.return_idle(pool, disconnect=True)  # a restart or a failover: the kept ones are stale too
                if attempt == 2:
                    raise
                continue
            except self._response_error:
                shared.keep(connection)  # an error reply was read whole: the connection stays usable
                raise
            except BaseException:
                connection.disconnect()  # never keep a connection with a reply unread
                pool.release(connection)
                raise
            shared.keep(connection)
            return reply
        raise AssertionError("unreachable")

    def _exchange(self, connection: Any, op: Op) -> Any:
        wait = op.wait
        # Written in the protocol's form here: redis-py's packer costs more per call than the script's
        # own work on the server, and the keys and the constant arguments come encoded once.
        count = 2 + len(op.keys) + len(op.args)  # EVALSHA, the SHA-1, the key count and keys, the arguments
        parts = [b"*%d\r\n" % count, _EVALSHA[op.script], op.packed_keys]
        for arg in op.args:  # each a bulk string (``bulk``, written out: this runs for every argument)
            if type(arg) is not bytes:
                arg = b"%d" % arg
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        connection.send_packed_command([b"".join(parts)])
        if wait:
            connection.send_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        try:
            reply = connection.read_response()
        except self._no_script:
            if wait:
                connection.read_response()
            connection.send_command("EVAL", scripts.SCRIPTS[op.script], *op.keys, *op.args)
            if wait:
                connection.send_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            reply = connection.read_response()
        except self._response_error:
            if wait:
                connection.read_response()
            raise
        if wait:
            return reply, int(connection.read_response())
        return reply

    async def _arun(self, verb: str, name: str, steps: Steps[_R], secret: str | None = None) -> _R:
        """``_run`` for coroutines, on this event loop's client."""
        entry = await self._shared().async_entry()
        try:
            await asyncio.wait_for(entry.semaphore.acquire(), self.socket_timeout)
        except asyncio.TimeoutError:
            error = PoolExhausted(f"no free connection within {self.socket_timeout:g} s")
            raise self._failure(f"{verb} {name!r}", error) from None
        try:
            client = entry.client
            return await adrive(steps, lambda op: self._asend(client, op), _unanswered)
        except self._errors as error:
            raise self._failure(f"{verb} {name!r}", error, secret) from error
        finally:
            entry.semaphore.release()

    async def _asend(self, client: Any, op: Op) -> Any:
        if op.kind is EVAL:
            if op.wait:
                return await self._apipelined(client, op)
            try:
                return await client.evalsha(scripts.SHAS[op.script], *op.keys, *op.args)
            except self._no_script:
                return await client.eval(scripts.SCRIPTS[op.script], *op.keys, *op.args)
        if op.kind is SCAN:
            return [cast(str, key) async for key in client.scan_iter(match=op.args[0], count=_SCAN_COUNT)]
        async with client.pipeline(transaction=self.topology != "cluster") as pipe:
            _queue_reads(pipe, op.keys)
            return await pipe.execute()

    async def _apipelined(self, client: Any, op: Op) -> Any:
        for command, text in (("evalsha", scripts.SHAS[op.script]), ("eval", scripts.SCRIPTS[op.script])):
            async with client.pipeline(transaction=False) as pipe:
                getattr(pipe, command)(text, *op.keys, *op.args)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                reply, acknowledged = await pipe.execute(raise_on_error=False)
            if isinstance(reply, self._no_script) and command == "evalsha":
                continue
            if isinstance(reply, BaseException):
                raise reply
            return reply, int(acknowledged)
        raise AssertionError("unreachable")

    def _wake_channel(self, queue_for: float | None) -> str:
        """Where a release should wake this waiter: its process's listener, when one runs."""
        hub = self._hub() if queue_for is not None else None
        return scripts.wake_channel(self.key_prefix, hub.id) if hub is not None else ""

    def _list_pattern(self, prefix: str) -> str:
        """Every key of the names under ``prefix``: their lock keys and holds keys among them."""
        return f"{scripts.glob_escape(self.key_prefix)}\\{{{scripts.glob_escape(prefix)}*\\}}*"

    # -- primitives: the rules in _redis_steps, sent blocking or awaited ------------------

    def acquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        steps = self._rules.acquire(name, owner, ttl, min_hold, queue_for, self._wake_channel(queue_for), limit)
        return self._run("acquire of", name, steps, owner.owner_token)

    async def aacquire(self, name: str, owner: Owner, ttl: float | None, min_hold: float | None = None, *,
                       queue_for: float | None = None, limit: int = 1) -> AcquireResult:
        steps = self._rules.acquire(name, owner, ttl, min_hold, queue_for, self._wake_channel(queue_for), limit)
        return await self._arun("acquire of", name, steps, owner.owner_token)

    def release(self, name: str, owner_token: str) -> bool:
        return self._run("release of", name, self._rules.release(name, owner_token), owner_token)

    async def arelease(self, name: str, owner_token: str) -> bool:
        return await self._arun("release of", name, self._rules.release(name, owner_token), owner_token)

    def renew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return self._run("renew of", name, self._rules.renew(name, owner_token, ttl), owner_token)

    async def arenew(self, name: str, owner_token: str, ttl: float | None) -> LockRecord | None:
        return await self._arun("renew of", name, self._rules.renew(name, owner_token, ttl), owner_token)

    def get(self, name: str) -> LockRecord | None:
        return self._run("get of", name, self._rules.get(name))

    async def aget(self, name: str) -> LockRecord | None:
        return await self._arun("get of", name, self._rules.get(name))

    def holders(self, name: str) -> builtins.list[LockRecord]:
        return self._run("holders of", name, self._rules.holders(name))

    async def aholders(self, name: str) -> builtins.list[LockRecord]:
        return await self._arun("holders of", name, self._rules.holders(name))

    def force_release(self, name: str) -> LockRecord | None:
        return self._run("force release of", name, self._rules.force_release(name))

    async def aforce_release(self, name: str) -> LockRecord | None:
        return await self._arun("force release of", name, self._rules.force_release(name))

    def leave_queue(self, name: str, owner_token: str) -> None:
        self._run("leave queue of", name, self._rules.leave_queue(name, owner_token), owner_token)

    async def aleave_queue(self, name: str, owner_token: str) -> None:
        await self._arun("leave queue of", name, self._rules.leave_queue(name, owner_token), owner_token)

    def list(self, prefix: str = "") -> list[LockRecord]:
        """SCAN for the names' keys (never KEYS), then read each batch of lock keys in one pipelined
        round trip, and each name with holds under ``limit`` in one script call."""
        return self._run("listing locks under", prefix, self._rules.list(self._list_pattern(prefix)))

    async def alist(self, prefix: str = "") -> builtins.list[LockRecord]:
        return await self._arun("listing locks under", prefix, self._rules.list(self._list_pattern(prefix)))

    # -- waiting: one pub/sub listener per store, key prefix and process ------------------

    def watch(self, name: str, owner_token: str | None = None) -> ReleaseWatch:
        return self._hub(create=True).watch(name, owner_token)  # type: ignore[union-attr]

    def _hub(self, create: bool = False) -> ReleaseHub | None:
        shared = self._shared()
        hub = shared.hubs.get(self.key_prefix)
        if hub is None and create:
            hub = shared.hub(self.key_prefix, lambda: ReleaseHub(
                _Listener(shared, self.key_prefix, self.socket_timeout, self._errors),
                thread_name="singleton-redis-releases",
            ))
        return hub

    def _notify_local(self, name: str, head: str | None) -> None:
        """Our own release wakes this process's next waiter at once, before the PUBLISH comes back."""
        shared = self._shared_entry
        hub = shared.hubs.get(self.key_prefix) if shared is not None else None
        if hub is not None:
            hub.notify(name, head)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the shared client; the last persister using it closes its connections."""
        with self._guard:
            shared, self._shared_entry = self._shared_entry, None
        if shared is not None and leave(shared, self):
            for hub in list(shared.hubs.values()):
                hub.close()
            with self._translate("closing"):
                shared.close_sync()

    async def aclose(self) -> None:
        """Close this event loop's client too when no other persister uses the store."""
        shared = self._shared_entry
        if shared is not None and shared.sole_user(self):
            with self._translate("closing"):
                await shared.close_async()
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the configuration only; the copy opens its own pool when first used.
        return {key: value for key, value in self.__dict__.items() if key not in _RUNTIME}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()
        self._rules = self._make_rules()

    def __repr__(self) -> str:
        return f"Redis({self.url!r}, key_prefix={self.key_prefix!r})"


_RUNTIME = frozenset({
    "_driver", "_errors", "_no_script", "_connection_error", "_response_error", "_guard", "_shared_entry",
    "_pool_arguments", "_rules",
})


class _Listener:
    """Hear releases for one key prefix; run by the ``ReleaseHub`` thread.

    It always subscribes to its hub's own wake channel, where a release that frees a
    name whose queue's head waits in this process names that waiter, so a release
    wakes one process however many wait. It adds the pattern of every name's release
    channel only while a waiter here is not queued (one that watches for a free name).
    """

    def __init__(self, shared: Shared, prefix: str, socket_timeout: float, errors: tuple[type[BaseException], ...]) -> None:
        self._shared = shared
        self._prefix = prefix
        self._pattern = scripts.channel_pattern(prefix)
        self._socket_timeout = socket_timeout
        self._errors = errors
        self._last_node: tuple[str, int] | None = None

    def __call__(self, hub: ReleaseHub, stop: threading.Event) -> None:
        client, node = self._shared.listener_client(avoid=self._last_node)
        self._last_node = node
        pubsub = client.pubsub()
        wake = scripts.wake_channel(self._prefix, hub.id)
        try:
            pubsub.subscribe(wake)
            every_release = hub.wants_every_release
            if every_release:
                pubsub.psubscribe(self._pattern)
            self._confirm(pubsub, 1 + every_release)
            hub.ready()
            pinged_at = last_heard = time.monotonic()
            while not stop.is_set():
                if hub.wants_every_release != every_release:
                    every_release = not every_release
                    if every_release:
                        pubsub.psubscribe(self._pattern)
                    else:
                        pubsub.punsubscribe(self._pattern)
                message = pubsub.get_message(timeout=_LISTENER_WAIT_SECONDS)
                now = time.monotonic()
                if message is not None:
                    last_heard = now
                    self._dispatch(hub, message)
                if now - pinged_at >= _LISTENER_PING_SECONDS:
                    if now - last_heard > _LISTENER_PING_SECONDS + self._socket_timeout:
                        raise TimeoutError("the server stopped answering")
                    if self._shared.master_moved(node):
                        raise ConnectionError("Sentinel names a new master")
                    pubsub.ping()
                    pinged_at = now
        finally:
            self._last_node = node  # a failure here: try another cluster node next time
            try:
                pubsub.close()
                client.close()
            except self._errors:
                pass

    def _confirm(self, pubsub: Any, count: int) -> None:
        """Wait for the subscriptions' confirmations, so no release is missed after ``ready``."""
        deadline = time.monotonic() + self._socket_timeout
        while count:
            message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
            if message is not None and message["type"] in ("subscribe", "psubscribe"):
                count -= 1
            elif time.monotonic() >= deadline:
                raise TimeoutError("no subscription confirmation")

    def _dispatch(self, hub: ReleaseHub, message: Mapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "message":  # our wake channel: the head of a freed name's queue waits here
            parsed = scripts.wake_message(self._prefix, str(message["data"]))
            if parsed is not None:
                hub.notify(parsed[0], parsed[1], unqueued=False)
        elif kind == "pmessage":
            name = scripts.name_from_channel(self._prefix, str(message["channel"]))
            if name is not None:
                hub.notify(name, str(message["data"]) or None)
        elif kind == "psubscribe":  # hearing every release again: an unqueued waiter may have missed one
            hub.notify_all(queued=False)  # the queued heard theirs on the wake channel throughout


#: Each script's EVALSHA and SHA-1, in the protocol's form.
_EVALSHA = {script: bulk(b"EVALSHA") + bulk(sha.encode()) for script, sha in scripts.SHAS.items()}


def _unanswered(error: BaseException) -> bool:
    """The Redis steps answer no client error themselves: every one ends the primitive."""
    return False


def _queue_reads(pipe: Any, keys: tuple[str, ...]) -> None:
    """Each lock key's value (the holder's token) and its holder JSON, for ``Rules.list``."""
    for key in keys:
        pipe.get(key)
        pipe.hget(f"{key}:state", "holder")


def _split_own_options(url: str) -> tuple[str, dict[str, Any]]:
    """Our query options, read, apart from redis-py's, which get the rest of the URL unchanged."""
    base, _, query_text = url.partition("?")
    query = parse_qsl(query_text, keep_blank_values=True)
    own = {key: _OWN_QUERY_OPTIONS[key](text, key) for key, text in query if key in _OWN_QUERY_OPTIONS}
    rest = [(key, text) for key, text in query if key not in _OWN_QUERY_OPTIONS]
    return (f"{base}?{urlencode(rest)}" if rest else base), own


def _chosen(keyword: object, own: Mapping[str, Any], key: str, default: object) -> object:
    """A keyword option when given, else the URL's, else the default."""
    return keyword if keyword is not None else own.get(key, default)
