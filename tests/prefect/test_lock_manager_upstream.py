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


def on_redis(*_: Any, **__: Any) -> SingletonLockManager:
    """The manager every upstream test builds: ours, on the test Redis."""
    from tests.servers import redis_server

    return SingletonLockManager(redis_server.url())


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
