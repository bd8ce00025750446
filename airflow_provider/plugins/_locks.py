"""The locks of every lock-store connection, and the guarded release, for the admin page and its API.

No FastAPI here: the routes (``_app.py``) authorize and translate, this module reads the
stores. Each store call runs in a worker thread under a deadline, so one store that does
not answer turns into an error row instead of holding the page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_provider._store_url import _STORE_OF_CONN_TYPE, store_url
from airflow_provider.hooks.singleton import cached_persister
from singleton_integrations import redact_url
from singleton_integrations.admin import LockRow, NotHeld, TokenChanged, lock_rows
from singleton_integrations.admin import force_release as release_by_token

if TYPE_CHECKING:
    from airflow.models.connection import Connection
    from sqlalchemy.orm import Session

    from singleton_integrations import LockRecord
    from singleton_integrations.persisters import Persister

__all__ = [
    "LOCK_STORE_CONN_TYPES",
    "STORE_TIMEOUT",
    "ReleaseRefused",
    "StoreUnavailable",
    "force_release",
    "list_locks",
    "lock_row",
    "lock_store_connections",
]

#: Seconds one connection may take to answer (reach the store, then read or release).
STORE_TIMEOUT = 10.0
#: The connection types whose locks are listed: ours (current and earlier names) and the standard
#: redis, postgres, mongo and mysql ones the hook accepts. Airflow's sqlite type is left out: its
#: connections point at SQLite files that are not lock stores.
LOCK_STORE_CONN_TYPES = frozenset(conn_type for conn_type in _STORE_OF_CONN_TYPE if conn_type != "sqlite")
_ENV_PREFIX = "AIRFLOW_CONN_"
#: Stores asked in parallel; more connections than this wait for a free thread within the same deadline.
_MAX_STORES_AT_ONCE = 32

_T = TypeVar("_T")


class StoreUnavailable(Exception):
    """A connection's store could not be read or written in time; the message holds no password."""


class ReleaseRefused(Exception):
    """The guarded release did nothing: the name is free, changed hands, or only keeps its minimum hold."""

    def __init__(self, message: str, current: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.current = current


def lock_row(conn_id: str, record: LockRecord) -> dict[str, Any]:
    """One live lock as the API shows it: ``singleton list --json``'s row (``singleton_integrations.admin``) and its connection.

    ``holder`` names the host and process, and the deployment, DAG, run, task and map
    index when the holder is an Airflow task; ``min_hold_until`` is the minimum hold's end.
    """
    return {"conn_id": conn_id, **LockRow.from_record(record).to_json(), "error": None}


def _error_row(conn_id: str, message: str) -> dict[str, Any]:
    return {"conn_id": conn_id, "name": None, "error": message}


def _scrub(text: str, conn: Connection | None) -> str:
    """``text`` with the connection's password and every URL's password replaced by ``***``."""
    password = getattr(conn, "password", None)
    if password:
        text = text.replace(str(password), "***")
    return redact_url(text)


def _env_connections() -> Iterable[Connection]:
    """The connections defined by ``AIRFLOW_CONN_*`` variables (Airflow's environment secrets backend)."""
    from airflow.secrets.environment_variables import EnvironmentVariablesBackend

    backend = EnvironmentVariablesBackend()
    for key in sorted(os.environ):
        if key.startswith(_ENV_PREFIX) and len(key) > len(_ENV_PREFIX):
            conn_id = key[len(_ENV_PREFIX):].lower()
            try:
                conn = backend.get_connection(conn_id)
            except Exception:  # noqa: BLE001  (a malformed variable is not a lock store; Airflow reports it elsewhere)
                continue
            if conn is not None:
                yield conn


def lock_store_connections(session: Session, conn_id: str | None = None) -> list[tuple[str, Connection | None]]:
    """The lock-store connections: the metadata database's and the environment's (the database wins on a clash).

    Other secrets backends cannot be listed; a connection kept there is read when
    ``conn_id`` names it. ``(conn_id, None)`` means no such connection.
    """
    from airflow.models.connection import Connection
    from sqlalchemy import select

    if conn_id is not None:
        try:
            return [(conn_id, Connection.get_connection_from_secrets(conn_id))]
        except Exception:  # noqa: BLE001  (Airflow raises its not-found error; any failure means none here)
            return [(conn_id, None)]
    found: dict[str, Connection] = {}
    for conn in _env_connections():
        if (conn.conn_type or "").lower() in LOCK_STORE_CONN_TYPES:
            found[str(conn.conn_id)] = conn
    query = select(Connection).where(Connection.conn_type.in_(sorted(LOCK_STORE_CONN_TYPES)))
    for conn in session.scalars(query):
        session.expunge(conn)  # read later, from worker threads, after the session is gone
        found[str(conn.conn_id)] = conn
    return sorted(found.items())


def _store_of(conn: Connection) -> tuple[str, Persister]:
    url = store_url(conn)
    return url, cached_persister(url)


def _list_one(conn_id: str, conn: Connection, prefix: str) -> list[dict[str, Any]]:
    from airflow_provider.hooks._probe import probe

    url, persister = _store_of(conn)
    # A read-only look first: listing through the persister would create its table (or
    # collection) in a database that has none, such as a postgres connection that is not a lock store.
    ok, detail = probe(persister, url)
    if not ok:
        raise StoreUnavailable(detail)
    if "no locks yet" in detail:
        return []
    return [{"conn_id": conn_id, **row.to_json(), "error": None} for row in lock_rows(persister, prefix)]


def _within(executor: ThreadPoolExecutor, deadline: float, call: Callable[..., _T], *args: Any) -> _T:
    future: Future[_T] = executor.submit(call, *args)
    try:
        return future.result(timeout=deadline)
    except FutureTimeout:
        raise StoreUnavailable(f"the store gave no answer within {deadline:g} s") from None


def list_locks(connections: list[tuple[str, Connection | None]], prefix: str = "",
               timeout: float = STORE_TIMEOUT) -> list[dict[str, Any]]:
    """Every live lock of ``connections`` whose name starts with ``prefix``, by connection then name.

    A name held under ``limit=N`` has a row per hold, by fencing token.

    A connection that is missing, is not a lock store, or cannot be read within
    ``timeout`` seconds becomes one row with ``error`` set and ``name`` None; the others still list.
    """
    rows: list[dict[str, Any]] = []
    if not connections:
        return rows
    # Every store is asked at once and shares one deadline, so the answer takes at most ``timeout``.
    executor = ThreadPoolExecutor(max_workers=min(_MAX_STORES_AT_ONCE, len(connections)),
                                  thread_name_prefix="singleton-locks")
    deadline = time.monotonic() + timeout
    try:
        futures = {conn_id: executor.submit(_list_one, conn_id, conn, prefix)
                   for conn_id, conn in connections if conn is not None}
        for conn_id, conn in connections:
            if conn is None:
                rows.append(_error_row(conn_id, f"no connection {conn_id!r}"))
                continue
            try:
                rows.extend(futures[conn_id].result(timeout=max(deadline - time.monotonic(), 0.0)))
            except FutureTimeout:
                rows.append(_error_row(conn_id, f"the store gave no answer within {timeout:g} s"))
            except Exception as error:  # noqa: BLE001  (any failure is this connection's error row, the others still list)
                rows.append(_error_row(conn_id, _scrub(f"{type(error).__name__}: {error}", conn)))
    finally:
        # A store that hangs past its own client deadline must not hold the answer; its thread ends with that deadline.
        executor.shutdown(wait=False, cancel_futures=True)
    return rows


def force_release(conn_id: str, conn: Connection, name: str, fencing_token: int, reason: str,
                  timeout: float = STORE_TIMEOUT) -> dict[str, Any]:
    """Release ``name`` only while the holder still has ``fencing_token``; the previous holder's row.

    Under ``limit=N`` only the hold with ``fencing_token`` is released; the name's other holds stay.

    ``singleton_integrations.admin.force_release`` reads the record, compares the token
    and releases through the store's owner-checked ``release`` with that record's owner
    token: a lock that changed hands between the read and the release is never freed.

    :raises ReleaseRefused: the name is free, holds another token, or only keeps its minimum hold.
    :raises StoreUnavailable: the store could not be reached within ``timeout`` seconds.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="singleton-release")
    try:
        _, persister = _store_of(conn)
        record = _within(executor, timeout, lambda: release_by_token(persister, name, fencing_token, reason=reason))
    except NotHeld as refused:
        current = lock_row(conn_id, refused.record) if refused.record is not None else None
        raise ReleaseRefused(f"connection {conn_id!r}: {refused}", current) from None
    except TokenChanged as refused:
        current = lock_row(conn_id, refused.holder) if refused.holder is not None else None
        raise ReleaseRefused(f"connection {conn_id!r}: {refused}", current) from None
    except (StoreUnavailable, ValueError, TypeError):
        raise
    except Exception as error:  # noqa: BLE001  (translated once, without the password)
        raise StoreUnavailable(_scrub(f"{type(error).__name__}: {error}", conn)) from None
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    return lock_row(conn_id, record)
