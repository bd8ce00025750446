"""A holder paused past its lease must find its writes refused and learn it lost the lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from singleton_integrations import Singleton, persisters
from singleton_integrations.fencing import MongoFence, SqlFence, StaleFencingToken

from ._worker import fenced_write
from .conftest import read_fact, spawn, stop


def resource_for(kind: str, url: str, tmp_path: Path) -> dict[str, Any]:
    """The protected resource: the same kind of store as the lock where it can be, else a SQLite file."""
    table = f"fenced_{uuid.uuid4().hex[:10]}"
    if kind == "postgres":
        return {"kind": "postgres", "dsn": url, "table": table, "name": "report"}
    if kind == "mongodb":
        return {"kind": "mongodb", "url": url, "table": table, "name": "report"}
    return {"kind": "sqlite", "path": str(tmp_path / "resource.sqlite3"), "table": table, "name": "report"}


def test_sigstop_past_ttl_then_write_is_refused(kind: str, url: str, tmp_path: Path, figures: dict[str, Any]) -> None:
    """SIGSTOP the holder past its TTL; another process takes the lock and writes; the resumed holder's write is refused and ``lost`` fires."""
    name = f"reliability-fence-{uuid.uuid4().hex[:12]}"
    resource = resource_for(kind, url, tmp_path)
    ttl = 1.5
    holder = spawn("fenced", {"url": url, "name": name, "ttl": ttl, "renew_interval": 0.3, "resource": resource},
                   stdin=True)
    try:
        first = read_fact(holder)
        assert first["event"] == "locked" and first["first_write"] is True
        os.kill(holder.pid, signal.SIGSTOP)
        paused_at = time.monotonic()
        successor = Singleton(name, persisters.from_url(url), lock_expire_seconds=30)
        assert successor.lock(wait=ttl + 10), "the paused holder's lease never ran out"
        taken_after = time.monotonic() - paused_at
        assert successor.fencing_token is not None and successor.fencing_token > first["token"]
        assert fenced_write(resource, successor.fencing_token, "successor") is True
        os.kill(holder.pid, signal.SIGCONT)
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        outcome = read_fact(holder, timeout=ttl * 3 + 30)
        # The successor still holds: the stale holder's release left its lock alone.
        current = successor.holder()
        assert current is not None and current.owner_token == successor.record.owner_token
        successor_token = successor.fencing_token
        assert successor.release() is True
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
        stop(holder)
    figures.update(persister=kind, resource=resource["kind"], stale_token=first["token"],
                   successor_token=successor_token,
                   lease_taken_over_after_s=round(taken_after, 3), stale_write_admitted=outcome["second_write"],
                   lost_event=outcome["lost"], stale_release_removed_lock=outcome["released"])
    assert outcome["second_write"] is False, "the resource admitted a write from a paused, superseded holder"
    assert outcome["lost"] is True and outcome["lost_property"] is True
    assert outcome["released"] is False


def test_sql_fence_guards_in_transaction(tmp_path: Path) -> None:
    """A refused token rolls the caller's transaction back: the protected row keeps the newer write."""
    db = sqlite3.connect(tmp_path / "r.sqlite3", isolation_level=None)
    fence = SqlFence()
    fence.create_table(db)
    db.execute("CREATE TABLE report (body TEXT)")
    for token, body in ((3, "third"), (2, "second, stale"), (3, "third again"), (4, "fourth")):
        db.execute("BEGIN IMMEDIATE")
        try:
            fence.check(db, "report", token)
            db.execute("INSERT INTO report VALUES (?)", (body,))
            db.execute("COMMIT")
        except StaleFencingToken as error:
            db.execute("ROLLBACK")
            assert error.token == 2 and "stale" in str(error)
    assert [row[0] for row in db.execute("SELECT body FROM report")] == ["third", "third again", "fourth"]
    assert db.execute("SELECT fencing_token FROM singleton_fences WHERE resource = 'report'").fetchone() == (4,)


@pytest.mark.parametrize("token", [0, -1, True, 1.5, "7", None])
def test_fences_refuse_bad_tokens(token: object, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "r.sqlite3", isolation_level=None)
    SqlFence().create_table(db)
    with pytest.raises((TypeError, ValueError)):
        SqlFence().admit(db, "report", token)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        MongoFence(collection=None).update("report", token)  # type: ignore[arg-type]


@pytest.mark.parametrize("table", ["", "a b", "x; DROP TABLE y", "1abc", None])
def test_sql_fence_refuses_bad_table_names(table: object) -> None:
    with pytest.raises(ValueError):
        SqlFence(table)  # type: ignore[arg-type]
