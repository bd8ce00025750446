"""The Singleton API beyond the lock rules: validation, seed parity, events, errors."""

from __future__ import annotations

import logging
import math
import pickle
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import pytest

from singleton_integrations import (
    DEFAULT_LOCK_EXPIRE_SECONDS,
    LockConflict,
    LockLost,
    LockRecord,
    MissingDependency,
    PersisterError,
    Singleton,
    SingletonError,
    persisters,
)


@pytest.fixture
def store() -> persisters.Memory:
    return persisters.Memory()


def make(name: str = "job", store: persisters.Persister | None = None, **options: object) -> Singleton:
    return Singleton(name, store or persisters.Memory(), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (None, TypeError),
        (b"bytes", TypeError),
        ({"$gt": ""}, TypeError),
        (42, TypeError),
        ("", ValueError),
        ("x" * 256, ValueError),
        ("x" * 100_000, ValueError),
        ("nul\x00byte", ValueError),
        ("new\nline", ValueError),
        ("tab\there", ValueError),
        ("del\x7f", ValueError),
        ("lone \ud800 surrogate", ValueError),
    ],
)
def test_bad_names_are_refused_at_construction(bad: object, error: type[Exception]) -> None:
    store = persisters.Memory()
    with pytest.raises(error):
        Singleton(bad, store)  # type: ignore[arg-type]
    assert store.list() == []


def test_longest_name_is_accepted() -> None:
    assert make("x" * 255).lock()


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, -math.inf, 1e12])
def test_bad_ttl_values(bad: float) -> None:
    with pytest.raises(ValueError):
        make(lock_expire_seconds=bad)


@pytest.mark.parametrize("bad", ["5", True, [5], b"5"])
def test_bad_ttl_types(bad: object) -> None:
    with pytest.raises(TypeError):
        make(lock_expire_seconds=bad)


def test_default_ttl_and_none() -> None:
    assert make().lock_expire_seconds == DEFAULT_LOCK_EXPIRE_SECONDS == 300
    assert make(lock_expire_seconds=None).lock_expire_seconds is None
    with pytest.raises(ValueError, match="auto_renew"):
        make(lock_expire_seconds=None, auto_renew=True)


@pytest.mark.parametrize(("wait", "error"), [(-1, ValueError), (math.nan, ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_wait(wait: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        make().lock(wait=wait)  # type: ignore[arg-type]


def test_seed_options_object() -> None:
    singleton = Singleton("job", persisters.Memory(), {"lockExpireSeconds": 12})
    assert singleton.lock_expire_seconds == 12
    with pytest.raises(ValueError, match="unknown options"):
        Singleton("job", persisters.Memory(), {"lockExpireSecs": 12})


def test_persister_may_be_a_url_or_default(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(Singleton("job", "memory://shared").persister, persisters.Memory)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    default = Singleton("job").persister
    assert isinstance(default, persisters.Sqlite)
    assert default.path == tmp_path / "singleton-integrations" / "locks.sqlite3"
    with pytest.raises(TypeError):
        Singleton("job", 42)  # type: ignore[arg-type]


def test_metadata_is_validated() -> None:
    with pytest.raises(TypeError):
        make(metadata=["a"])
    with pytest.raises(TypeError):
        make(metadata={"a": 1})
    with pytest.raises(ValueError):
        make(metadata={"$set": "x"})
    assert make(metadata={"dag_id": "d"}).metadata == {"dag_id": "d"}


def test_callbacks_follow_the_seed(store: persisters.Memory) -> None:
    calls: list[tuple] = []
    first, second = make(store=store), make(store=store)
    assert first.lock(lambda err, ok: calls.append(("lock", err, ok))) is True
    assert second.lock(lambda err, ok: calls.append(("lock", err, ok))) is False
    assert second.exists(lambda err, found: calls.append(("exists", err, found))) is True
    assert first.release(lambda err: calls.append(("release", err))) is True
    assert calls == [("lock", None, True), ("lock", None, False), ("exists", None, True), ("release", None)]


class BrokenStore(persisters.Memory):
    backend = "broken"

    def acquire(self, *args: object) -> None:  # type: ignore[override]
        raise ConnectionError("store went away")

    def get(self, name: str) -> None:
        raise PersisterError(self.backend, "cannot read")


def test_errors_reach_callback_event_and_caller() -> None:
    singleton = Singleton("job", BrokenStore())
    seen: list[object] = []
    singleton.on("error", seen.append)
    calls: list[tuple] = []
    with pytest.raises(PersisterError, match="broken: ConnectionError: store went away") as caught:
        singleton.lock(lambda err, ok: calls.append((err, ok)))
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert calls == [(caught.value, None)] and seen == [caught.value]
    with pytest.raises(PersisterError):
        singleton.exists(lambda err, found: calls.append((err, found)))
    assert calls[-1][1] is None and isinstance(calls[-1][0], PersisterError)


def test_events_carry_messages_and_are_logged(store: persisters.Memory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="singleton_integrations")
    singleton = make(store=store)
    seen: list[tuple[str, object]] = []
    for event in ("locking", "locked", "releasing", "released"):
        singleton.on(event, lambda message, event=event: seen.append((event, message)))
    singleton.lock()
    singleton.release()
    assert [event for event, _ in seen] == ["locking", "locked", "releasing", "released"]
    assert all(isinstance(message, str) and "'job'" in message for _, message in seen)
    assert any("locked 'job'" in record.getMessage() for record in caplog.records)


def test_event_registration_is_checked(store: persisters.Memory) -> None:
    singleton = make(store=store)
    with pytest.raises(ValueError, match="unknown event"):
        singleton.on("lockd", print)
    with pytest.raises(TypeError):
        singleton.on("locked", "not callable")  # type: ignore[arg-type]
    calls: list[str] = []
    singleton.once("locked", calls.append)
    singleton.on("locked", lambda message: 1 / 0)  # a broken handler must not break locking
    assert singleton.lock() and singleton.release() and singleton.lock()
    assert len(calls) == 1


def test_lock_twice_is_idempotent(store: persisters.Memory) -> None:
    singleton = make(store=store)
    assert singleton.lock() and singleton.lock()
    assert singleton.fencing_token == 1
    assert singleton.release() and not singleton.release()


def test_repr_and_state(store: persisters.Memory) -> None:
    singleton = make(store=store)
    assert "free" in repr(singleton)
    singleton.lock()
    assert "held" in repr(singleton) and "'job'" in repr(singleton)


def record() -> LockRecord:
    now = datetime.now(timezone.utc)
    return LockRecord("job", "secret-token", 7, "host-a", 123, now, now, {"dag_id": "d"})


@pytest.mark.parametrize(
    "error",
    [
        LockConflict("job", record()),
        LockConflict("job"),
        LockLost("job"),
        PersisterError("redis", "connection refused"),
        MissingDependency("redis", "redis", "redis"),
    ],
)
def test_exceptions_pickle(error: SingletonError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert isinstance(copy, SingletonError)
    if isinstance(error, LockConflict) and error.holder:
        assert copy.holder == error.holder
    if isinstance(error, PersisterError):
        assert copy.backend == error.backend


def test_conflict_message_names_the_holder_without_its_token() -> None:
    message = str(LockConflict("job", record()))
    assert "host-a pid 123" in message and "dag_id=d" in message and "fencing token 7" in message
    assert "secret-token" not in message and "secret-token" not in repr(record())


def test_from_url_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="no persister for scheme 'ftp'"):
        persisters.from_url("ftp://user:hunter2@host/x")
    try:
        persisters.from_url("ftp://user:hunter2@host/x")
    except ValueError as error:
        assert "hunter2" not in str(error)
    for bad in ("", "   ", "no-scheme", "redis:/\x00/x"):
        with pytest.raises(ValueError):
            persisters.from_url(bad)
    with pytest.raises(TypeError):
        persisters.from_url(None)  # type: ignore[arg-type]
    assert {"memory", "sqlite", "redis", "rediss", "mongodb", "mongodb+srv", "postgresql"} <= set(persisters.schemes())


def test_memory_urls_name_shared_stores() -> None:
    name = uuid.uuid4().hex
    assert persisters.from_url(f"memory://{name}") is persisters.from_url(f"memory://{name}")
    assert persisters.from_url(f"memory://{name}") is not persisters.from_url("memory://other")


def test_sqlite_urls(tmp_path) -> None:
    assert persisters.from_url(f"sqlite:///{tmp_path}/a.db").path == tmp_path / "a.db"
    assert str(persisters.from_url("sqlite:///relative.db").path) == "relative.db"
    with pytest.raises(ValueError):
        persisters.from_url("sqlite://somehost/a.db")


def test_sqlite_unwritable_path_is_a_persister_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    singleton = Singleton("job", persisters.Sqlite(blocker / "sub" / "locks.db"))
    with pytest.raises(PersisterError, match="sqlite"):
        singleton.lock()


@pytest.mark.parametrize(("url", "extra", "module"), [
    ("redis://127.0.0.1:6379/0", "redis", "redis"),
    ("mongodb://127.0.0.1:27017/db", "mongodb", "pymongo"),
    ("postgresql://127.0.0.1/test", "postgres", "psycopg"),
])
def test_missing_extra_names_what_to_install(url: str, extra: str, module: str) -> None:
    script = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from singleton_integrations import persisters, MissingDependency\n"
        "try:\n"
        f"    persisters.from_url({url!r})\n"
        "except MissingDependency as error:\n"
        "    print(error)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert f"pip install 'singleton-integrations[{extra}]'" in output.stdout, output.stderr


def test_core_imports_no_driver() -> None:
    script = (
        "import sys, singleton_integrations\n"
        "from singleton_integrations import persisters\n"
        "print(sorted(m for m in ('redis', 'pymongo', 'psycopg', 'airflow', 'prefect') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert output.stdout.strip() == "[]", output.stderr


@pytest.mark.parametrize("url", [
    "redis://:hunter2@127.0.0.1:1/0",
    "postgresql://user:hunter2@127.0.0.1:1/test",
    "mongodb://user:hunter2@127.0.0.1:1/test",
])
def test_unreachable_store_fails_fast_without_leaking_the_password(url: str, caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    persister = persisters.from_url(url)  # constructing never touches the network
    assert time.monotonic() - started < 2
    assert "hunter2" not in repr(persister)
    singleton = Singleton("job", persister)
    assert "hunter2" not in repr(singleton)
    started = time.monotonic()
    with pytest.raises(PersisterError) as caught:
        singleton.lock()
    assert time.monotonic() - started < 15, "an unreachable store must fail within the timeouts"
    assert "hunter2" not in str(caught.value)
    assert all("hunter2" not in record.getMessage() for record in caplog.records)
    persister.close()
