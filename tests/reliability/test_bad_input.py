"""Bad input at every public entry point: a clear ValueError/TypeError/PersisterError, never a lock left behind."""

from __future__ import annotations

import math
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from singleton_integrations import AsyncSingleton, PersisterError, Singleton, persisters
from singleton_integrations._record import validate_name
from tests.conftest import store_url_for

from .conftest import STORES

BAD_NAMES = [None, b"job", 42, 4.2, ["job"], {"$gt": ""}, "", "x" * 256, "x" * 100_000, "a\x00b", "line\nbreak",
             "tab\tname", "\x1b[31mred", "del\x7f", "\x85nel", "lone\ud800surrogate", "a\u2028b"]
BAD_TTLS = [0, -1, math.nan, math.inf, -math.inf, "300", True, b"1", [], 1e12]
BAD_WAITS = [-1, math.nan, "5", True, []]
BAD_METADATA = ["text", ["a"], {"$where": "x"}, {"a.b": "x"}, {"k": 1}, {1: "v"}, {"k": "x" * 5000},
                {f"k{i}": "v" for i in range(100)}, {"k": "a\x00b"}]
OPERATOR_NAMES = ["$where", "$gt", '{"$ne": null}', "a.b", "../x", "'; DROP TABLE singleton_locks; --", "*", "?",
                  "[a]", "\\", "%", "_", "singleton:{x}", "{x}:state", "a b", "ünï ✓ 名前"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def store(kind: str, url: str) -> Any:
    store = persisters.from_url(url)
    yield store
    store.close()


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda v: repr(v)[:20])
def test_bad_names_refused_before_io(kind: str, store: Any, name: object) -> None:
    """Wrong types, empty, over-long, control characters, lone surrogates: refused at construction, nothing written."""
    prefix = f"reliability-bad-{uuid.uuid4().hex[:8]}"
    candidate = prefix + name if isinstance(name, str) and name else name
    with pytest.raises((TypeError, ValueError)):
        Singleton(candidate, store)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        AsyncSingleton(candidate, store)  # type: ignore[arg-type]
    assert store.list(prefix) == []


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_bad_lease_lengths_refused(ttl: object) -> None:
    """Zero, negative, NaN, infinite, strings, bools and absurd lease lengths are refused."""
    with pytest.raises((TypeError, ValueError)):
        Singleton("reliability-bad-ttl", persisters.Memory(), lock_expire_seconds=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=lambda v: repr(v)[:20])
def test_bad_metadata_refused(metadata: object) -> None:
    """Holder metadata that is not a small mapping of plain str keys to short str values is refused."""
    with pytest.raises((TypeError, ValueError)):
        Singleton("reliability-bad-metadata", persisters.Memory(), metadata=metadata)  # type: ignore[arg-type]


@pytest.mark.parametrize("wait", BAD_WAITS, ids=repr)
def test_bad_waits_refused_without_locking(wait: object) -> None:
    """A bad ``wait`` is refused before any attempt, so no lock is taken."""
    store = persisters.Memory()
    job = Singleton("reliability-bad-wait", store)
    with pytest.raises((TypeError, ValueError)):
        job.lock(wait=wait)  # type: ignore[arg-type]
    assert store.get("reliability-bad-wait") is None and not job.held


@pytest.mark.parametrize(
    "options",
    [{"auto_renew": "yes"}, {"auto_renew": True, "lock_expire_seconds": None}, {"renew_interval": 0},
     {"renew_interval": "1"}],
    ids=repr,
)
def test_bad_options_refused(options: dict[str, Any]) -> None:
    """Contradictory or mistyped Singleton options are refused."""
    with pytest.raises((TypeError, ValueError)):
        Singleton("reliability-bad-options", persisters.Memory(), **options)


@pytest.mark.parametrize("persister", [42, b"redis://x", object(), ["memory://"], {"url": "memory://"}], ids=lambda value: type(value).__name__ if type(value) is object else repr(value))
def test_bad_persister_objects_refused(persister: object) -> None:
    """Anything but a Persister, a URL string or None is refused as a persister."""
    with pytest.raises((TypeError, ValueError)):
        Singleton("reliability-bad-persister", persister)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [lambda: persisters.Redis(42), lambda: persisters.Redis(b"redis://127.0.0.1"), lambda: persisters.Redis("http://x"),
     lambda: persisters.Postgres(42), lambda: persisters.Postgres(b"postgresql://x"),
     lambda: persisters.MongoDb(42), lambda: persisters.MongoDb("http://x"), lambda: persisters.MongoDb(b"mongodb://x"),
     lambda: persisters.Sqlite(42), lambda: persisters.Sqlite(b"/tmp/x")],
    ids=["redis-int", "redis-bytes", "redis-http", "postgres-int", "postgres-bytes", "mongodb-int", "mongodb-http",
         "mongodb-bytes", "sqlite-int", "sqlite-bytes"],
)
def test_persister_constructors_refuse_wrong_types(make: Any) -> None:
    """Each persister class refuses wrong types and foreign schemes at construction."""
    with pytest.raises((TypeError, ValueError, PersisterError)):
        make()


MALFORMED_URLS = [None, 42, b"redis://x", "", "   ", "redis", "127.0.0.1:6379", "nosuch://host/x", "redis://a\nb/0",
                  "redis://127.0.0.1:notaport/0", "redis://127.0.0.1:99999/0", "postgresql://[::1", "mongodb://",
                  "mongodb://127.0.0.1:27017/db?notAnOption=1&w=banana", "sqlite://host/x", "http://x", "x" * 10_000,
                  "redis://127.0.0.1:6379/0?socket_timeout=abc", "postgresql://127.0.0.1:5432/test?connect_timeout=-3"]


@pytest.mark.parametrize("url", MALFORMED_URLS, ids=lambda v: repr(v)[:30])
def test_malformed_urls_fail_clearly(url: object) -> None:
    """Refused at construction, or (for a URL only the server can judge) a PersisterError on first use, fast."""
    try:
        store = persisters.from_url(url)  # type: ignore[arg-type]
    except (TypeError, ValueError, PersisterError):
        return
    started = time.monotonic()
    with pytest.raises((PersisterError, ValueError)):
        Singleton(f"reliability-bad-url-{uuid.uuid4().hex[:8]}", store).lock()
    assert time.monotonic() - started < 15
    store.close()


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_operator_shaped_names_are_plain(kind: str, store: Any, name: str) -> None:
    """Operator-, pattern- and SQL-shaped names lock exactly their own name and nothing else."""
    suffix = uuid.uuid4().hex[:8]
    full = f"{name}{suffix}"
    job = Singleton(full, store, lock_expire_seconds=30)
    other = Singleton(f"{name}{suffix}-other", store, lock_expire_seconds=30)
    assert job.lock()
    assert other.lock(), "a different name was blocked: the name was treated as a pattern"
    holder = job.holder()
    assert holder is not None and holder.name == full
    assert [r.name for r in store.list(full)] == sorted([full, f"{full}-other"])
    assert job.release() and other.release()
    assert store.get(full) is None


def _isolated_url(kind: str, url: str) -> tuple[str, Any]:
    """The same server in a private namespace, so random names cannot meet other tests' locks."""
    tag = f"reltest_{uuid.uuid4().hex[:10]}"
    joiner = "&" if "?" in url else "?"
    if kind == "redis":
        def delete_keys() -> None:
            import redis

            with redis.Redis.from_url(url, socket_timeout=10) as client:
                for key in client.scan_iter(match=f"{tag}:*"):
                    client.delete(key)

        return f"{url}{joiner}key_prefix={tag}:", delete_keys
    if kind == "mongodb":
        def drop_collection() -> None:
            import pymongo

            from singleton_integrations.persisters.mongodb import DEFAULT_DATABASE

            with pymongo.MongoClient(url, serverSelectionTimeoutMS=10000) as client:
                client.get_default_database(DEFAULT_DATABASE).drop_collection(tag)

        return f"{url}{joiner}collection={tag}", drop_collection
    if kind == "postgres":
        def drop() -> None:
            import psycopg

            with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
                connection.execute(f"DROP TABLE IF EXISTS {tag}")

        return f"{url}{joiner}table={tag}", drop
    return url, None


valid_names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=255).filter(
    lambda text: not any(c in text for c in "\u2028\u2029")
)


@pytest.mark.parametrize("kind", STORES)
def test_valid_names_round_trip(kind: str, tmp_path: Path) -> None:
    """Property: every valid name locks, reads back as itself from the store, and releases (hypothesis)."""
    url, cleanup = _isolated_url(kind, store_url_for(kind, tmp_path))
    store = persisters.from_url(url)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=valid_names)
    @example(name="$where")
    @example(name="a.b")
    @example(name="x" * 255)
    @example(name="名" * 255)
    @example(name="'; --")
    @example(name="\U0001f512 lock")
    def check(name: str) -> None:
        assert validate_name(name) == name
        job = Singleton(name, store, lock_expire_seconds=30)
        assert job.lock()
        try:
            holder = job.holder()
            assert holder is not None and holder.name == name
            assert any(record.name == name for record in store.list(name))
        finally:
            assert job.release()
        assert store.get(name) is None

    try:
        check()
    finally:
        store.close()
        if cleanup is not None:
            cleanup()
