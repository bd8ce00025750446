"""``persisters.preload``: a store's driver is imported before its first use, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from singleton_integrations import persisters
from tests.servers import redis_server

_PROBE = """
import json, sys
from singleton_integrations import persisters
import singleton_integrations.persisters.redis, singleton_integrations.persisters.postgres
import singleton_integrations.persisters.mongodb
before = {m: m in sys.modules for m in ("redis", "psycopg", "pymongo")}
persisters.preload(*sys.argv[1:])
after = {m: m in sys.modules for m in ("redis", "psycopg", "pymongo")}
print(json.dumps([before, after]))
"""


def _modules(*stores: str) -> tuple[dict[str, bool], dict[str, bool]]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *stores], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    before, after = json.loads(out)
    return before, after


def test_importing_a_persister_does_not_import_its_driver_but_preload_does() -> None:
    before, after = _modules("redis", "postgresql://127.0.0.1/test")
    assert before == {"redis": False, "psycopg": False, "pymongo": False}
    assert after == {"redis": True, "psycopg": True, "pymongo": False}


def test_preload_takes_schemes_and_urls_and_needs_no_server() -> None:
    _, after = _modules("mongodb://127.0.0.1:1/never", "sqlite", "memory")
    assert after["pymongo"] and not after["redis"]


def test_preload_of_an_unknown_store_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"no persister for scheme 'nosuch'.*known schemes: .*redis"):
        persisters.preload("nosuch")


# -- what a fresh process imports: each orchestrator task starts one, and pays for every import ------------

# Loaded on first use only: the plug-in scan (importlib.metadata), the embedded and in-process stores,
# OpenTelemetry (at the first measurement) and the orchestrators' store sources.
_LAZY_MODULES = (
    "importlib.metadata", "sqlite3", "opentelemetry", "singleton_integrations.stores",
    "singleton_integrations.persisters.sqlite", "singleton_integrations.persisters.memory",
    "singleton_integrations.persisters.postgres", "singleton_integrations.persisters.mysql",
    "singleton_integrations.persisters.mongodb",
)
# Loaded by the async API only (the executor for sync-only stores comes from concurrent.futures).
_ASYNC_MODULES = ("asyncio", "concurrent.futures")


def _fresh(code: str, *args: str) -> object:
    """What ``code`` prints as JSON, run in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_importing_the_package_loads_nothing_a_sync_lock_does_not_need() -> None:
    loaded = _fresh("""
        import json, sys
        watched = json.loads(sys.argv[1])
        seen = lambda: sorted(m for m in watched if m in sys.modules)
        import singleton_integrations
        bare = seen() + sorted(m for m in ("singleton_integrations._singleton", "singleton_integrations.persisters")
                               if m in sys.modules)
        from singleton_integrations import Singleton, persisters
        print(json.dumps([bare, seen()]))
    """, json.dumps(_LAZY_MODULES))
    assert loaded == [[], []]


def test_the_sync_api_does_not_load_asyncio() -> None:
    # Each built-in persister's module imports asyncio itself (and so do the Redis and MongoDB drivers).
    loaded = _fresh("""
        import json, sys
        from singleton_integrations import Lease, Singleton, persisters
        print(json.dumps(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)))
    """, json.dumps(_ASYNC_MODULES))
    assert loaded == []


def test_a_sync_redis_lock_loads_no_module_beyond_the_drivers() -> None:
    # Whatever redis-py itself imports (some versions import asyncio, importlib.metadata or
    # OpenTelemetry) is the driver's; the package must add none of the lazily loaded modules.
    added = _fresh("""
        import json, sys
        watched = json.loads(sys.argv[1])
        url, name = sys.argv[2], sys.argv[3]
        import redis
        before = {m for m in watched if m in sys.modules}
        new = lambda: sorted(m for m in watched if m in sys.modules and m not in before)
        from singleton_integrations import Singleton, persisters
        lock = Singleton(name, persisters.from_url(url))
        built = new()
        assert lock.lock() and lock.release()
        print(json.dumps([built, new()]))
    """, json.dumps([*_LAZY_MODULES, *_ASYNC_MODULES]), redis_server.url(), f"fresh-{uuid.uuid4().hex}")
    # OpenTelemetry, when installed, is imported at the first measurement (the lock), by design.
    assert added == [[], []] or (added[0] == [] and set(added[1]) <= {"opentelemetry"}), added


def test_every_exported_name_resolves_and_dir_lists_it() -> None:
    import singleton_integrations

    for module in (singleton_integrations, persisters):
        assert sorted(module.__all__) == sorted(set(module.__all__)), "a name is listed twice"
        for exported in module.__all__:
            assert getattr(module, exported) is not None, exported
        assert set(module.__all__) <= set(dir(module))
    namespace: dict[str, object] = {}
    exec("from singleton_integrations import *", namespace)
    assert set(singleton_integrations.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        singleton_integrations.nosuch  # noqa: B018
