"""Redis topologies and the one shared client per store and process.

A ``Store`` is what a Redis URL names once parsed: a single server
(``redis://``, ``rediss://``, ``unix://``), a Sentinel-managed master
(``redis+sentinel://``, ``rediss+sentinel://``) or a cluster
(``redis+cluster://``, ``rediss+cluster://``), with the connection options.
Every persister built from the same store in one process shares one
``Shared``: one bounded sync client, one async client per event loop, and one
release listener per key prefix. The registry key holds the secrets, so two
users with different passwords never share; it is never shown.

Callers take a slot before each call (at most ``max_connections`` at once per
client) and wait for one within the call's deadline instead of failing at the
pool's cap.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from .._urls import redact_url
from ._base import ClientRegistry

__all__ = ["DEFAULT_MAX_CONNECTIONS", "SCHEMES", "PoolExhausted", "Shared", "Store", "leave", "parse_store", "shared_for"]

#: Connections one persister's shared client opens at most (per event loop for async). Each call
#: holds one for a single round trip (waits are on the shared subscription), so ten carry
#: thousands of calls a second; 50 made a burst of 100 async waiters open 50 connections at
#: once, which stalled their event loop for 65-74 ms where ten cost about 20 ms.
DEFAULT_MAX_CONNECTIONS = 10
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379

#: scheme -> (topology, TLS)
SCHEMES: dict[str, tuple[str, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


class PoolExhausted(Exception):
    """No connection slot came free within the call's deadline."""


@dataclass(frozen=True)
class Store:
    """A parsed Redis URL: where to connect and how, secrets included (never printed)."""

    topology: str
    tls: bool
    nodes: tuple[tuple[str, int], ...]  # sentinels, or cluster seed nodes; empty for standalone
    service: str | None
    options: Mapping[str, Any] = field(compare=False)  # redis-py connection options
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # Sentinel/RedisCluster keywords

    def key(self) -> tuple[Any, ...]:
        return (self.topology, self.tls, self.nodes, self.service, self.max_connections,
                _freeze(self.options), _freeze(self.extra))


def _freeze(options: Mapping[str, Any]) -> tuple[Any, ...]:
    """A hashable, order-free view by value: equal option dicts built twice share one client."""
    return tuple((str(key), _frozen(value)) for key, value in sorted(options.items()))


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("map", _freeze(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_frozen(item) for item in value]
        return ("seq", tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items))
    try:
        hash(value)
    except TypeError:  # an opaque mutable object: the same one shares, another does not
        return ("id", id(value))
    return (type(value).__name__, value)


def _host_port(text: str, default_port: int, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"a host is missing in {redact_url(url)!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in {redact_url(url)!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port} in {redact_url(url)!r}")
    return host, port


def parse_store(redis: Any, url: str, scheme: str) -> tuple[str, str, tuple[tuple[str, int], ...], str | None]:
    """Split a URL into (topology, redis-py URL for the options, nodes, service name).

    For Sentinel and Cluster URLs the redis-py URL is a stand-in on ``localhost``
    that carries the credentials, database and query options, so redis-py's own
    parser types them; the hosts come back as ``nodes``.
    """
    topology, tls = SCHEMES[scheme]
    if topology == "standalone":
        return topology, url, (), None
    rest = url.split("://", 1)[1]
    rest, question, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    default_port = _SENTINEL_PORT if topology == "sentinel" else _REDIS_PORT
    nodes = tuple(_host_port(part.strip(), default_port, url) for part in hosts.split(",") if part.strip())
    if not nodes:
        raise ValueError(f"a {scheme}:// URL needs at least one host:port, got {redact_url(url)!r}")
    parts = [part for part in path.split("/") if part]
    service: str | None = None
    if topology == "sentinel":
        if not parts or len(parts) > 2:
            raise ValueError(f"a {scheme}:// URL needs /SERVICE_NAME[/DB] after the hosts, got {redact_url(url)!r}")
        service = parts[0]
        db = parts[1] if len(parts) == 2 else "0"
    else:
        if len(parts) > 1 or (parts and parts[0] != "0"):
            raise ValueError(f"a Redis Cluster has only database 0; {redact_url(url)!r} names another")
        db = "0"
    if not db.isdigit():
        raise ValueError(f"the database in {redact_url(url)!r} must be a number")
    stand_in = f"{'rediss' if tls else 'redis'}://{userinfo}{at}localhost/{db}{question}{query}"
    return topology, stand_in, nodes, service


# -- slots: wait for a connection within the deadline -----------------------------------


class _Slots:
    """At most ``size`` calls at once on one sync client; the rest wait up to their deadline.

    A free slot is an entry of a list, taken and given back by ``pop`` and ``append``,
    which are atomic: an uncontended call takes no lock (``threading.Semaphore`` is
    written in Python and costs each call a lock and a condition twice). Only a
    caller that finds none waits on the condition; a release wakes one when any waits.
    """

    def __init__(self, size: int) -> None:
        self._free = [True] * size
        self._changed = threading.Condition(threading.Lock())
        self._waiting = 0

    def acquire(self, timeout: float) -> None:
        """Take a slot within ``timeout`` seconds (``release`` gives it back), or raise ``PoolExhausted``."""
        free = self._free
        if free:
            try:
                free.pop()
                return
            except IndexError:  # another thread took the last one in between
                pass
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiting += 1  # before looking again: a release after this look notifies us
            try:
                while True:
                    try:
                        free.pop()
                        return
                    except IndexError:
                        pass
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PoolExhausted(f"no free connection within {timeout:g} s")
                    self._changed.wait(left)
            finally:
                self._waiting -= 1

    def release(self) -> None:
        self._free.append(True)
        if self._waiting:  # read after the append: a waiter counted later finds the slot itself
            with self._changed:
                self._changed.notify()

    @contextmanager
    def take(self, timeout: float) -> Iterator[None]:
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()


class _AsyncEntry:
    """One event loop's client and its slots, closed when the loop shuts down.

    ``asyncio.run`` (and every loop runner that calls ``shutdown_asyncgens``)
    finalizes the async generators still suspended on the loop before closing
    it; ``closer`` is one, so the client's sockets are closed on their own loop
    instead of being left to the garbage collector after the loop is gone.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any, size: int) -> None:
        self.loop_ref = weakref.ref(loop)
        self.client = client
        self.semaphore = asyncio.Semaphore(size)
        self.closer: AsyncGenerator[None, None] | None = None
        self.on_close: Callable[[], None] = lambda: None

    async def arm(self) -> None:
        """Start ``closer`` on the running loop (held here: the loop keeps only a weak reference)."""
        self.closer = self._close_at_shutdown()
        await self.closer.asend(None)

    async def _close_at_shutdown(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self.on_close()
            with suppress(Exception):  # a dead server must not spoil the loop's shutdown
                await self.client.aclose()

    async def close(self) -> None:
        closer, self.closer = self.closer, None
        if closer is not None:
            await closer.aclose()
        else:
            await self.client.aclose()


# -- the shared client ------------------------------------------------------------------


class Shared:
    """One store's clients in this process, shared by every persister built for it."""

    def __init__(self, store: Store, redis: Any) -> None:
        self.store = store
        self._redis = redis
        self._guard = threading.Lock()
        self._sync: Any = None
        self._sentinel: Any = None
        self.slots = _Slots(store.max_connections)
        #: Sync connections kept out of the pool between script calls (see ``idle_connection``).
        self.idle: list[Any] = []
        self._async: dict[int, _AsyncEntry] = {}
        self.hubs: dict[str, Any] = {}  # key prefix -> ReleaseHub
        self._users: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- users: the pool is closed when the last persister using it closes --

    def attach(self, user: object) -> None:
        with self._guard:
            self._users.add(user)

    def sole_user(self, user: object) -> bool:
        with self._guard:
            return set(self._users) <= {user}

    def hub(self, prefix: str, make: Callable[[], Any]) -> Any:
        """The one release hub for ``prefix`` on this store, made by ``make`` on first use."""
        with self._guard:
            hub = self.hubs.get(prefix)
            if hub is None:
                hub = self.hubs[prefix] = make()
            return hub

    def detach(self, user: object) -> bool:
        """Forget ``user``; True when nobody else uses this store (so it may be closed)."""
        with self._guard:
            self._users.discard(user)
            return not self._users

    # -- sync --

    def sync_client(self) -> Any:
        with self._guard:
            if self._sync is None:
                self._sync = self._build_sync()
            return self._sync

    def _build_sync(self) -> Any:
        redis, store = self._redis, self.store
        options = _named(redis, dict(store.options))
        options.setdefault("retry", _retry(redis.retry.Retry, redis.backoff.ExponentialBackoff, redis.exceptions.ConnectionError))
        if store.topology == "standalone":
            pool = redis.ConnectionPool(max_connections=store.max_connections, **options)
            return redis.Redis(connection_pool=pool)
        options.pop("connection_class", None)
        if store.topology == "sentinel":
            self._sentinel = self._build_sentinel(redis.sentinel.Sentinel, options)
            if store.tls:
                options["ssl"] = True
            return self._sentinel.master_for(store.service, max_connections=store.max_connections, **options)
        options.pop("db", None)
        options.pop("retry", None)
        if store.tls:
            options["ssl"] = True
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in store.nodes],
            max_connections=store.max_connections,
            retry=_retry(redis.retry.Retry, redis.backoff.ExponentialBackoff, redis.exceptions.ConnectionError, retries=3),
            **options, **store.extra,
        )

    def _build_sentinel(self, sentinel_class: type, options: Mapping[str, Any]) -> Any:
        store = self.store
        sentinel_kwargs: dict[str, Any] = {
            key: options[key] for key in ("socket_timeout", "socket_connect_timeout") if key in options
        }
        if "driver_info" in options:
            sentinel_kwargs["driver_info"] = options["driver_info"]
        if store.tls:
            sentinel_kwargs["ssl"] = True
            sentinel_kwargs.update({key: value for key, value in options.items() if key.startswith("ssl_")})
        extra = dict(store.extra)
        sentinel_kwargs.update(extra.pop("sentinel_kwargs", None) or {})
        return sentinel_class(list(store.nodes), sentinel_kwargs=sentinel_kwargs, **extra)

    # -- the script calls' own connections, outside the pool's bookkeeping --

    def idle_connection(self, pool: Any, pool_arguments: tuple[str, ...]) -> Any:
        """A connection for one script call: one kept from an earlier call, else one from ``pool``.

        Taking and giving back a pooled connection costs redis-py a lock, a socket
        poll and its metrics on every call; the script calls skip that by keeping
        their connections (``keep``). They stay checked out of the pool, so they
        count against its ``max_connections`` as busy ones, and the slots bound
        how many calls run at once, so no call finds the pool exhausted. Other
        commands on the pool are sent after ``return_idle``.
        """
        try:
            return self.idle.pop()
        except IndexError:
            return pool.get_connection(*pool_arguments)

    def keep(self, connection: Any) -> None:
        """Keep ``connection`` for the next script call; its reply was read whole."""
        self.idle.append(connection)

    def return_idle(self, pool: Any, disconnect: bool = False) -> None:
        """Hand the kept connections back to ``pool`` (closed first with ``disconnect``: after a
        connection error, or a failover, the others may be as stale)."""
        while True:
            try:
                connection = self.idle.pop()
            except IndexError:
                return
            if disconnect:
                connection.disconnect()
            pool.release(connection)

    def close_sync(self) -> None:
        """Disconnect the sync pool(s); the next call reconnects."""
        with self._guard:
            client = self._sync
        if client is None:
            return
        if self.store.topology != "cluster":
            self.return_idle(client.connection_pool)
        if self.store.topology == "cluster":
            for node in client.get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()
        else:
            client.connection_pool.disconnect()

    # -- the listener's own connection, outside the pool --

    def listener_client(self, avoid: tuple[str, int] | None = None) -> tuple[Any, tuple[str, int] | None]:
        """A one-connection client for PSUBSCRIBE and the node it talks to.

        Standalone: the server. Sentinel: the current master (PUBLISH is
        replicated, but the master is where every release is published first).
        Cluster: any node, preferring one other than ``avoid`` (classic pub/sub
        messages are broadcast to every node of a cluster).
        """
        redis, store = self._redis, self.store
        options = _named(redis, dict(store.options))
        options.pop("retry", None)
        options["health_check_interval"] = 0
        if store.topology == "standalone":
            return redis.Redis(connection_pool=redis.ConnectionPool(max_connections=1, **options)), None
        if store.topology == "sentinel":
            self.sync_client()  # builds the Sentinel manager
            address = self._sentinel.discover_master(store.service)
        else:
            client = self.sync_client()
            candidates = [(node.host, node.port) for node in client.get_nodes()] or list(store.nodes)
            others = [candidate for candidate in candidates if candidate != avoid]
            address = (others or candidates)[os.getpid() % len(others or candidates)]
            options.pop("db", None)
        host, port = address
        return redis.Redis(connection_pool=redis.ConnectionPool(max_connections=1, host=host, port=port, **options)), address

    def master_moved(self, address: tuple[str, int] | None) -> bool:
        """True when Sentinel now names another master than the listener's."""
        if self.store.topology != "sentinel" or address is None or self._sentinel is None:
            return False
        try:
            return tuple(self._sentinel.discover_master(self.store.service)) != tuple(address)
        except self._redis.exceptions.RedisError:
            return False

    # -- async: one client per event loop --

    async def async_entry(self) -> _AsyncEntry:
        loop = asyncio.get_running_loop()
        with self._guard:
            entry = self._async.get(id(loop))
            if entry is not None and entry.loop_ref() is loop:
                return entry
            # Forget clients of loops that are gone or closed without a shutdown (ids of
            # dead loops get reused); their sockets cannot be closed on a closed loop.
            for key, old in list(self._async.items()):
                old_loop = old.loop_ref()
                if old_loop is None or old_loop.is_closed() or old_loop is loop:
                    del self._async[key]
            entry = _AsyncEntry(loop, self._build_async(), self.store.max_connections)
            self._async[id(loop)] = entry
        entry.on_close = lambda: self._forget(loop, entry)
        await entry.arm()
        return entry

    def _forget(self, loop: asyncio.AbstractEventLoop, entry: _AsyncEntry) -> None:
        with self._guard:
            if self._async.get(id(loop)) is entry:
                del self._async[id(loop)]

    def _build_async(self) -> Any:
        import redis.asyncio as aioredis
        import redis.asyncio.connection as aioconnection

        store, redis = self.store, self._redis
        options = _named(redis, dict(store.options))
        options.pop("retry", None)
        cls = options.pop("connection_class", redis.Connection)
        retry = _retry(aioredis.retry.Retry, redis.backoff.ExponentialBackoff, redis.exceptions.ConnectionError)
        if store.topology == "standalone":
            if issubclass(cls, redis.UnixDomainSocketConnection):
                options["connection_class"] = aioconnection.UnixDomainSocketConnection
            elif issubclass(cls, redis.SSLConnection):
                options["connection_class"] = aioconnection.SSLConnection
            else:
                options["connection_class"] = aioconnection.Connection
            pool = aioredis.ConnectionPool(max_connections=store.max_connections, retry=retry, **options)
            return aioredis.Redis(connection_pool=pool)
        if store.topology == "sentinel":
            import redis.asyncio.sentinel as aiosentinel

            sentinel = self._build_sentinel(aiosentinel.Sentinel, options)
            if store.tls:
                options["ssl"] = True
            return sentinel.master_for(store.service, max_connections=store.max_connections, retry=retry, **options)
        import redis.asyncio.cluster as aiocluster

        options.pop("db", None)
        if store.tls:
            options["ssl"] = True
        return aiocluster.RedisCluster(
            startup_nodes=[aiocluster.ClusterNode(host, port) for host, port in store.nodes],
            max_connections=store.max_connections,
            retry=_retry(aioredis.retry.Retry, redis.backoff.ExponentialBackoff, redis.exceptions.ConnectionError, retries=3),
            **options, **store.extra,
        )

    async def close_async(self) -> None:
        """Close this loop's client (the others belong to their loops)."""
        loop = asyncio.get_running_loop()
        with self._guard:
            entry = self._async.pop(id(loop), None)
        if entry is not None and entry.loop_ref() is loop:
            await entry.close()

    # -- process lifecycle --

    def _after_fork(self) -> None:
        # The parent's threads may hold slots and its loops are not ours; redis-py
        # pools reset their own sockets on first use in the child.
        self._guard = threading.Lock()
        self.slots = _Slots(self.store.max_connections)
        self.idle = []  # the parent's sockets: never write to them here
        self._async = {}


def _named(redis: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with what ``CLIENT SETINFO`` tells the server: redis-py's version as the module
    says it, and this library as its upstream driver, so ``CLIENT LIST`` shows who holds the
    connection. Given here, redis-py does not read every installed package's metadata for its
    own version at the first connection (about 15 ms in each fresh task process). Left alone when
    the caller chose ``driver_info``, ``lib_name`` or ``lib_version``, or on a redis-py without
    ``DriverInfo`` (before 7.1)."""
    if options.keys() & {"driver_info", "lib_name", "lib_version"}:
        return options
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return options
    from .. import __version__

    options["driver_info"] = DriverInfo(lib_version=redis.__version__).add_upstream_driver(
        "singleton-integrations", __version__)
    return options


def _retry(retry_class: Callable[..., Any], backoff_class: Callable[..., Any], error: type, retries: int = 1) -> Any:
    """Retry only a connection the server dropped, at once: a timeout is not retried."""
    return retry_class(backoff_class(cap=0.05, base=0.01), retries=retries, supported_errors=(error,))


#: One ``Shared`` per store in this process; a forked child resets each (the persisters keep theirs).
_registry: ClientRegistry[tuple[Any, ...], Shared] = ClientRegistry(after_fork=Shared._after_fork)


def shared_for(store: Store, redis: Any, user: object) -> Shared:
    """This process's shared clients for ``store``, made on first use; ``user`` is counted in."""
    shared = _registry.get(store.key(), lambda: Shared(store, redis))
    shared.attach(user)
    return shared


def leave(shared: Shared, user: object) -> bool:
    """Count ``user`` out; True when it was the last, and the store left the registry (close it)."""
    if not shared.detach(user):
        return False
    key = shared.store.key()
    current = _registry.pop(key)
    if current is not None and current is not shared:  # another store's entry since: keep it
        _registry.get(key, lambda: current)
    return True


def _close_all_at_exit() -> None:
    for shared in _registry.values():
        with suppress(Exception):  # the process is ending; a dead server must not show
            shared.close_sync()


atexit.register(_close_all_at_exit)
