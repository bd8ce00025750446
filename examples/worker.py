"""A plain Python worker: one instance exports at a time, and every write carries the fencing token.

    SINGLETON_URL=redis://127.0.0.1:6379/0 python examples/worker.py --batches 5

It shares the lock name ``nightly-export`` with ``examples/cron/nightly-export.sh``
and the Airflow and Prefect examples, so it never runs alongside them. Exit codes
follow the ``singleton`` CLI: 0 done, 75 another holder has the lock.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time

from singleton_integrations import LockConflict, Singleton

LOCK_NAME = "nightly-export"
EX_TEMPFAIL = 75


class StaleWriter(Exception):
    """The resource has seen a newer fencing token: this writer's lease ended while it was paused."""


def open_output(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS export_state (id INTEGER PRIMARY KEY, fencing_token INTEGER, batch INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS exported (fencing_token INTEGER, batch INTEGER)")
    db.execute("INSERT OR IGNORE INTO export_state VALUES (1, 0, -1)")
    return db


def export_batch(db: sqlite3.Connection, fencing_token: int, batch: int) -> None:
    """Write one batch, refusing it if a newer holder has written already (the fencing check)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        updated = db.execute(
            "UPDATE export_state SET fencing_token = ?, batch = ? WHERE id = 1 AND fencing_token <= ?",
            (fencing_token, batch, fencing_token),
        ).rowcount
        if updated == 0:
            raise StaleWriter(f"fencing token {fencing_token} is older than the last writer's")
        db.execute("INSERT INTO exported VALUES (?, ?)", (fencing_token, batch))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds of 'work' per batch")
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "nightly-export.sqlite3"),
                        help="the SQLite file the export writes (default: in the temp directory)")
    args = parser.parse_args(argv)

    # None: $SINGLETON_URL is unset, so the embedded SQLite store in the user's state directory.
    job = Singleton(LOCK_NAME, os.environ.get("SINGLETON_URL"), lock_expire_seconds=30, auto_renew=True,
                    metadata={"source": "worker"})
    db = open_output(args.output)
    try:
        with job:  # LockConflict when another holder has it; released on exit, on error and on SIGTERM
            print(f"holding {LOCK_NAME!r} with fencing token {job.fencing_token}", flush=True)
            for batch in range(args.batches):
                export_batch(db, job.fencing_token, batch)
                print(f"batch {batch} written", flush=True)
                time.sleep(args.pause)
    except LockConflict as conflict:
        print(f"skipped: {conflict}", flush=True)
        return EX_TEMPFAIL
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
