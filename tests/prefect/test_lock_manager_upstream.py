"""Prefect's own lock-manager tests, run against ``SingletonLockManager`` on the real Redis.

The tests are fetched at test time from PyPI sdists with their Apache-2.0 LICENSE
(``upstream.py``), not copied into this project:

- prefect's ``tests/test_locking.py`` (``TestMemoryLockManager``, ``TestFileSystemLockManager``)
  from the prefect 3.2.2 sdist, the newest prefect sdist that ships ``tests/``: later ones,
  3.9.1 included, ship ``src/`` only;
- prefect-redis's ``tests/test_locking.py`` (``TestRedisLockManager``) from the sdist of
  the installed prefect-redis.

Each upstream class runs unchanged, except that the lock manager it builds
(``MemoryLockManager()``, ``FileSystemLockManager(lock_files_directory=...)``,
``RedisLockManager()``) is a ``SingletonLockManager`` on Redis. The cases in
``LEFT_OUT`` test another manager's own construction, not the ``LockManager``
contract, and are skipped with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from prefect_blocks import SingletonLockManager

from .upstream import installed_version, load_test_module

#: The newest prefect release whose sdist ships tests/ (3.2.3 and later do not).
PREFECT_TESTS_RELEASE = "3.2.2"

LEFT_OUT = {
    ("TestMemoryLockManager", "test_singleton"):
        "MemoryLockManager() returns one instance per process; SingletonLockManager is a value per configuration",
    ("TestRedisLockManager", "test_init"):
        "checks RedisLockManager's host, port, db, username, password and ssl attributes (the Redis client's wiring)",
    ("TestRedisLockManager", "test_configure_from_block"):
        "builds RedisLockManager from prefect-redis's RedisDatabase block (the Redis client's wiring)",
    ("TestRedisLockManager", "test_pickle_unpickle_and_use_lock_manager"):
        "asserts RedisLockManager's own client, async_client and _locks attributes are rebuilt on unpickling "
        "(the Redis client's wiring); test_lock_manager.py::test_pickles_configuration_not_clients pickles ours",
}

prefect_tests = load_test_module("prefect", PREFECT_TESTS_RELEASE, "tests/test_locking.py")
redis_tests = load_test_module("prefect-redis", installed_version("prefect-redis"), "tests/test_locking.py")


#: Every key the upstream tests make starts with this: they hold locks that never expire and
#: do not always release them, so the module deletes its keys when it ends.
KEY_PREFIX = f"upstream-{uuid.uuid4().hex[:12]}:"


def _store_url() -> str:
    from tests.servers import redis_server

    url = redis_server.url()
    return f"{url}{'&' if '?' in url else '?'}key_prefix={KEY_PREFIX}"


def on_redis(*_: Any, **__: Any) -> SingletonLockManager:
    """The manager every upstream test builds: ours, on the test Redis."""
    return SingletonLockManager(_store_url())


@pytest.fixture(scope="module", autouse=True)
def _forget_the_upstream_locks() -> Iterator[None]:
    yield
    import redis

    from tests.servers import redis_server

    client = redis.Redis.from_url(redis_server.url(), socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


prefect_tests.MemoryLockManager = on_redis
prefect_tests.FileSystemLockManager = on_redis
redis_tests.RedisLockManager = on_redis


def adapted(upstream: type) -> type:
    """The upstream class, its tests and fixtures as they are, with the ``LEFT_OUT`` cases skipped."""
    skipped = {name: pytest.mark.skip(reason=f"left out: {why}")(getattr(upstream, name))
               for (owner, name), why in LEFT_OUT.items() if owner == upstream.__name__}
    return type(upstream.__name__, (upstream,), {**skipped, "__doc__": f"{upstream.__module__}.{upstream.__name__} on ours"})


TestMemoryLockManager = adapted(prefect_tests.TestMemoryLockManager)
TestFileSystemLockManager = adapted(prefect_tests.TestFileSystemLockManager)
TestRedisLockManager = adapted(redis_tests.TestRedisLockManager)
