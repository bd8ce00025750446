"""Fencing guards: a protected resource refuses writes from a holder whose lock was taken over.

A lock alone cannot stop a holder that paused (GC, SIGSTOP, a slow VM) past its
lease from writing after someone else took the lock. The resource must check
the fencing token itself: each guard here records the highest token it has
seen per resource and admits a write only when the caller's token is at least
that high, in the same atomic statement as the bookkeeping. Equal tokens are
admitted so one holder can write many times.

>>> import sqlite3
>>> db = sqlite3.connect(":memory:", isolation_level=None)
>>> fence = SqlFence()
>>> fence.create_table(db)
>>> fence.admit(db, "report", 7)
True
>>> fence.admit(db, "report", 6)
False
"""

from __future__ import annotations

import re
from typing import Any

from ._errors import SingletonError

__all__ = ["MongoFence", "SqlFence", "StaleFencingToken"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class StaleFencingToken(SingletonError):
    """A write carried a fencing token lower than one the resource already accepted."""

    def __init__(self, resource: str, token: int, message: str | None = None) -> None:
        self.resource = resource
        self.token = token
        super().__init__(message or f"fencing token {token} for {resource!r} is stale: a newer holder has written")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.resource, self.token, str(self)))


def _check_token(token: object) -> int:
    if isinstance(token, bool) or not isinstance(token, int):
        raise TypeError(f"a fencing token must be an int, not {type(token).__name__}")
    if token < 1:
        raise ValueError(f"a fencing token must be positive, not {token}")
    return token


def _check_resource(resource: object) -> str:
    if not isinstance(resource, str):
        raise TypeError(f"a resource name must be a str, not {type(resource).__name__}")
    if not resource:
        raise ValueError("a resource name must not be empty")
    return resource


class SqlFence:
    """A token table for SQLite (3.24+) and PostgreSQL, used inside the caller's transaction.

    Call ``admit`` (or ``check``) in the same transaction as the protected write:
    the upsert row-locks the resource's token, so a stale holder's write and a
    newer holder's write cannot both commit.
    """

    def __init__(self, table: str = "singleton_fences") -> None:
        if not isinstance(table, str) or not _IDENTIFIER.match(table):
            raise ValueError("table must be a plain SQL identifier (letters, digits, underscore)")
        self.table = table

    @staticmethod
    def _placeholder(connection: Any) -> str:
        module = type(connection).__module__.split(".")[0]
        return "?" if module in ("sqlite3", "_sqlite3") else "%s"

    def create_table(self, connection: Any) -> None:
        """Create the token table if it is missing."""
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (resource TEXT PRIMARY KEY, fencing_token BIGINT NOT NULL)"
        )

    def admit(self, connection: Any, resource: str, token: int) -> bool:
        """Record ``token`` for ``resource`` unless a higher one was recorded; True when admitted."""
        resource, token = _check_resource(resource), _check_token(token)
        p = self._placeholder(connection)
        cursor = connection.execute(
            f"INSERT INTO {self.table} (resource, fencing_token) VALUES ({p}, {p}) "
            f"ON CONFLICT (resource) DO UPDATE SET fencing_token = excluded.fencing_token "
            f"WHERE {self.table}.fencing_token <= excluded.fencing_token",
            (resource, token),
        )
        return bool(cursor.rowcount == 1)

    def check(self, connection: Any, resource: str, token: int) -> None:
        """Like ``admit``, but raise ``StaleFencingToken`` (roll back the transaction) when refused."""
        if not self.admit(connection, resource, token):
            raise StaleFencingToken(resource, token)


class MongoFence:
    """A guarded update for a MongoDB document: applied only if its stored token is not higher.

    The document keeps the highest token under ``field``. A stale token matches
    no document, and its upsert collides with the existing ``_id``: refused.
    """

    def __init__(self, collection: Any, field: str = "fencing_token") -> None:
        if not isinstance(field, str) or not field or field.startswith("$") or "." in field:
            raise ValueError("field must be a plain field name (no '$' prefix, no '.')")
        self.collection = collection
        self.field = field

    def update(self, resource: str, token: int, values: dict[str, Any] | None = None) -> bool:
        """Set ``values`` (and the token) on document ``resource``; False when the token is stale."""
        from pymongo.errors import DuplicateKeyError

        resource, token = _check_resource(resource), _check_token(token)
        fields = dict(values or {})
        if any(not isinstance(k, str) or k.startswith("$") or k == "_id" for k in fields):
            raise ValueError("values must be plain field names, without '_id' or '$' operators")
        fields[self.field] = token
        try:
            result = self.collection.update_one(
                {"_id": resource, self.field: {"$lte": token}}, {"$set": fields}, upsert=True
            )
        except DuplicateKeyError:
            return False
        return result.matched_count == 1 or result.upserted_id is not None

    def check(self, resource: str, token: int, values: dict[str, Any] | None = None) -> None:
        """Like ``update``, but raise ``StaleFencingToken`` when refused."""
        if not self.update(resource, token, values):
            raise StaleFencingToken(resource, token)
