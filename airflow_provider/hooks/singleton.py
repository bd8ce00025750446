"""``SingletonHook``: a lock store (persister) built from an Airflow connection.

Our connection types (``singleton``, ``singletonredis``, ``singletonmongodb``,
``singletonpostgres``, ``singletonsqlite``; no ``_``, which RFC 3986 forbids in the
URI scheme Airflow makes of a type) and the standard ``redis``, ``mongo`` and
``postgres`` ones all work, so ``singleton_conn_id="redis_default"`` reuses an
existing connection. Connections of the earlier types (``singleton_redis`` ...) keep
working. The ``singleton`` type keeps its whole store URL in the password field, the
one field Airflow always redacts; a legacy ``url`` extra still works, but Airflow
shows it back in clear, so move it.

Persisters are cached per process and store URL, so a guarded task looks its
connection up once and reuses one client pool.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from airflow.sdk import BaseHook

from airflow_provider._store_url import store_url
from singleton_integrations import Lease, Singleton, persisters, redact_url

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from typing_extensions import Unpack

    from singleton_integrations import AcquireResult, LockRecord
    from singleton_integrations.persisters import Persister

__all__ = [
    "LeaseOptions",
    "SingletonHook",
    "SingletonMongoDbHook",
    "SingletonPostgresHook",
    "SingletonRedisHook",
    "SingletonSqliteHook",
    "cached_persister",
    "store_url",
]


_cache_guard = threading.Lock()
_persisters: dict[str, Persister] = {}


def cached_persister(url: str) -> Persister:
    """One persister per store URL and process, so every task and trigger in it shares one client pool."""
    persister = _persisters.get(url)
    if persister is None:
        with _cache_guard:
            persister = _persisters.get(url)
            if persister is None:
                persister = _persisters[url] = persisters.from_url(url)
    return persister


@atexit.register
def _close_cached() -> None:
    with _cache_guard:
        cached = list(_persisters.values())
        _persisters.clear()
    for persister in cached:
        # Exiting: a store that cannot close has nothing more to lose.
        with contextlib.suppress(Exception):
            persister.close()


class LeaseOptions(TypedDict, total=False):
    """``SingletonHook.lease``'s keywords that ``acquire`` passes on."""

    lock_expire_seconds: float | None
    metadata: Mapping[str, str] | None
    min_hold_seconds: float | None
    limit: int


class SingletonHook(BaseHook):
    """Acquire, release and inspect locks in the store a connection points at.

    :param singleton_conn_id: the connection naming the store (any type listed in this module).
    """

    conn_name_attr: ClassVar[str] = "singleton_conn_id"
    default_conn_name: ClassVar[str] = "singleton_default"
    conn_type: ClassVar[str] = "singleton"
    hook_name: ClassVar[str] = "Singleton lock store (URL)"

    def __init__(self, singleton_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.singleton_conn_id = singleton_conn_id
        self._persister: Persister | None = None
        self._url: str | None = None

    # -- the store ---------------------------------------------------------------------

    @staticmethod
    def persister_from_connection(conn: Connection) -> Persister:
        """The process's persister for ``conn`` (shared, not connected yet); triggers pass an async-fetched connection."""
        return cached_persister(store_url(conn))

    def _store_url(self) -> str:
        if self._url is None:  # one connection lookup per hook
            self._url = store_url(self.get_connection(self.singleton_conn_id))
        return self._url

    def get_conn(self) -> Persister:
        """The persister for this connection, shared by every hook on the same store in this process."""
        if self._persister is None:
            self._persister = cached_persister(self._store_url())
        return self._persister

    def close(self) -> None:
        """Forget this hook's persister; the shared one keeps its pool for the process's next task (closed at exit)."""
        self._persister = None

    def describe_store(self) -> str:
        """The connection id and its store URL with any password redacted, for logs.

        The id comes first because Airflow masks a "Store URL" connection's whole
        password field, so where the URL has no password of its own, the log shows it as ``***``.
        """
        return f"connection {self.singleton_conn_id!r} ({redact_url(self._store_url())})"

    # -- locks -----------------------------------------------------------------------------

    def singleton(self, lock_name: str, **options: Any) -> Singleton:
        """A ``Singleton`` on this store; ``options`` are its keyword arguments (``lock_expire_seconds``, ...)."""
        return Singleton(lock_name, self.get_conn(), **options)

    def lease(
        self,
        lock_name: str,
        *,
        lock_expire_seconds: float | None = 300.0,
        metadata: Mapping[str, str] | None = None,
        min_hold_seconds: float | None = None,
        owner_token: str | None = None,
        limit: int = 1,
    ) -> Lease:
        """A lease on ``lock_name`` that outlives this process: taken here, renewed or released by its owner token.

        :param min_hold_seconds: keep the name held at least this long after the acquisition, even once released.
        :param limit: up to this many leases may hold the name at once, each with its own owner and fencing token.
        """
        return Lease(lock_name, self.get_conn(), owner_token=owner_token, lock_expire_seconds=lock_expire_seconds,
                     metadata=metadata, min_hold_seconds=min_hold_seconds, limit=limit)

    def acquire(self, lock_name: str, *, wait: float | None = None, **options: Unpack[LeaseOptions]) -> AcquireResult:
        """Take ``lock_name`` (with ``wait``, waiting in the store's queue); keep ``result.record.owner_token`` to release it.

        ``options`` are ``lease``'s: ``lock_expire_seconds``, ``metadata``, ``min_hold_seconds``, ``limit``.
        Under ``limit=N`` a refusal's ``result.holders`` lists every live hold.
        """
        return self.lease(lock_name, **options).take(wait=wait)

    def release(self, lock_name: str, owner_token: str) -> bool:
        """Release ``lock_name`` only if ``owner_token`` still holds it; True when it did."""
        return self.get_conn().release(lock_name, owner_token)

    def exists(self, lock_name: str) -> bool:
        """Whether a live lock exists for ``lock_name``, whoever holds it."""
        return self.get_conn().get(lock_name) is not None

    def holder(self, lock_name: str) -> LockRecord | None:
        """The live holder of ``lock_name`` (host, pid, metadata, since when), if any; one of them under ``limit``."""
        return self.get_conn().get(lock_name)

    def holders(self, lock_name: str) -> list[LockRecord]:
        """Every live hold of ``lock_name``, by fencing token (several when tasks use ``limit``)."""
        return self.get_conn().holders(lock_name)

    def force_release(self, lock_name: str) -> LockRecord | None:
        """Administrative release regardless of owner, of every hold; returns the one with the lowest fencing token.

        To free one hold of several, use ``singleton_integrations.admin.force_release`` with its fencing token.
        """
        return self.get_conn().force_release(lock_name)

    def test_connection(self) -> tuple[bool, str]:
        """The UI's "Test" button: reach the store and read, never write (no table, file or index is created).

        Airflow tests a copy of the form under a random connection id, so messages say
        "this connection" rather than name that id.
        """
        from airflow_provider.hooks._probe import probe

        try:
            url = store_url(self.get_connection(self.singleton_conn_id), label="this connection")
            description = redact_url(url)
            persister = persisters.from_url(url)  # not the cached one: the form may change between tests
            try:
                ok, detail = probe(persister, url)
            finally:
                persister.close()
        except Exception as error:  # noqa: BLE001  (any failure is the Test button's answer; never with a password)
            text = redact_url(f"{type(error).__name__}: {error}").replace(repr(self.singleton_conn_id), "this connection")
            return False, text
        detail = redact_url(detail)
        if not ok:
            return False, f"Lock store at {description}: {detail}"
        return True, f"Lock store at {description}: {detail}"

    # -- connection form for Airflow 3.0/3.1 (3.2+ reads conn-fields from get_provider_info) --

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return _legacy_behaviour(cls.conn_type)

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return _legacy_widgets(cls.conn_type)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Airflow before 3.2 only reads these two methods from the hook's own __dict__.
        super().__init_subclass__(**kwargs)
        for method in ("get_ui_field_behaviour", "get_connection_form_widgets"):
            if method not in cls.__dict__:
                setattr(cls, method, classmethod(getattr(SingletonHook, method).__func__))


class SingletonRedisHook(SingletonHook):
    """``SingletonHook`` for the ``singletonredis`` connection type (``singleton_redis`` before)."""

    conn_type: ClassVar[str] = "singletonredis"
    hook_name: ClassVar[str] = "Singleton lock store: Redis"


class SingletonMongoDbHook(SingletonHook):
    """``SingletonHook`` for the ``singletonmongodb`` connection type (``singleton_mongodb`` before)."""

    conn_type: ClassVar[str] = "singletonmongodb"
    hook_name: ClassVar[str] = "Singleton lock store: MongoDB"


class SingletonPostgresHook(SingletonHook):
    """``SingletonHook`` for the ``singletonpostgres`` connection type (``singleton_postgres`` before)."""

    conn_type: ClassVar[str] = "singletonpostgres"
    hook_name: ClassVar[str] = "Singleton lock store: PostgreSQL"


class SingletonSqliteHook(SingletonHook):
    """``SingletonHook`` for the ``singletonsqlite`` connection type (``singleton_sqlite`` before) (one host only)."""

    conn_type: ClassVar[str] = "singletonsqlite"
    hook_name: ClassVar[str] = "Singleton lock store: SQLite (one host only)"


def _declared(conn_type: str) -> dict[str, Any]:
    from airflow_provider.get_provider_info import CONNECTION_TYPES

    return next(entry for entry in CONNECTION_TYPES if entry["connection-type"] == conn_type)


def _legacy_behaviour(conn_type: str) -> dict[str, Any]:
    behaviour = _declared(conn_type).get("ui-field-behaviour", {})
    return {
        "hidden_fields": list(behaviour.get("hidden-fields", [])),
        "relabeling": dict(behaviour.get("relabeling", {})),
        "placeholders": dict(behaviour.get("placeholders", {})),
    }


def _legacy_widgets(conn_type: str) -> dict[str, Any]:
    """WTForms fields built from the same declarations, for Airflow versions before 3.2."""
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget  # type: ignore[import-not-found]
    from wtforms import BooleanField, PasswordField, StringField  # type: ignore[import-not-found]

    widgets: dict[str, Any] = {}
    for name, field in _declared(conn_type).get("conn-fields", {}).items():
        schema = field.get("schema", {})
        label = field.get("label", name)
        types = schema.get("type", [])
        if "boolean" in types:
            widgets[name] = BooleanField(label, default=schema.get("default", False))
        elif schema.get("format") == "password":
            widgets[name] = PasswordField(label, widget=BS3PasswordFieldWidget())
        else:
            widgets[name] = StringField(label, widget=BS3TextFieldWidget())
    return widgets
