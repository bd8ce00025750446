"""singleton-process 0.5.1's MongoDB protocol, emulated in Python, run as its own process.

Written from the protocol as issue 13 describes it (the seed's ``lib/``), not from
this package, so the migration tests meet the seed's behaviour rather than ours:

* every call first runs ``ensureIndex({name: 1}, {unique: true})`` on ``singletons``;
* ``lock``: insert ``{name, created: <client clock>}``; a duplicate key (11000) is a
  conflict, and the seed reads the existing document's ``created``; with
  ``lockExpireSeconds`` it treats the conflict as expired when its own clock is past
  ``created + lockExpireSeconds``, removes ``{name}``, emits ``expired`` and inserts
  once more;
* ``release``: remove ``{name}``, no owner check; on SIGTERM it releases and exits;
* ``exists``: ``findOne({name})``.

Driven over stdin/stdout, one JSON object per line::

    python -m tests.seed_emulator URL DATABASE COLLECTION NAME [--expire S] [--clock-offset S]
    > {"cmd": "lock"}            < {"locked": true, "expired": false, "id": "...", "conflict_created": null}
    > {"cmd": "lock", "at": T}   (sleeps until epoch T first: for races)
    > {"cmd": "release"}         < {"released": true}
    > {"cmd": "exists"}          < {"exists": false}
    > {"cmd": "quit"}

Any command may carry ``"name"`` to act on another name from then on.

It prints ``{"ready": true}`` once connected. ``--clock-offset`` shifts its client
clock (a host whose clock is wrong, or a lock created long ago).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
from pymongo.errors import DuplicateKeyError


class SeedProcess:
    """One seed ``Singleton(name, new MongoDb(url), {lockExpireSeconds})``."""

    def __init__(self, url: str, database: str, collection: str, name: str,
                 expire: float | None, clock_offset: float) -> None:  # fmt: skip
        self.client: pymongo.MongoClient[Any] = pymongo.MongoClient(url, serverSelectionTimeoutMS=10000, tz_aware=True)
        self.collection = self.client[database][collection]
        self.name, self.expire, self.clock_offset = name, expire, clock_offset
        self.events: list[str] = []

    def now(self) -> datetime:
        # The seed stores JavaScript Dates: millisecond precision, from the client's clock.
        moment = datetime.now(timezone.utc) + timedelta(seconds=self.clock_offset)
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def _ensure_index(self) -> None:
        self.collection.create_index([("name", 1)], unique=True)

    def _insert(self) -> Any:
        return self.collection.insert_one({"name": self.name, "created": self.now()}).inserted_id

    def lock(self) -> dict[str, Any]:
        self.events.append("locking")
        self._ensure_index()
        expired = False
        try:
            inserted = self._insert()
        except DuplicateKeyError:
            existing = self.collection.find_one({"name": self.name})
            created = existing.get("created") if existing else None
            if self.expire is not None and created is not None and self.now() > created + timedelta(seconds=self.expire):
                self.collection.delete_many({"name": self.name})
                self.events.append("expired")
                expired = True
                try:
                    inserted = self._insert()
                except DuplicateKeyError:
                    self.events.append("conflict")
                    return {"locked": False, "expired": True, "id": None, "conflict_created": None}
            else:
                self.events.append("conflict")
                return {"locked": False, "expired": False, "id": None,
                        "conflict_created": created.isoformat() if created else None}  # fmt: skip
        self.events.append("locked")
        return {"locked": True, "expired": expired, "id": str(inserted), "conflict_created": None}

    def release(self) -> dict[str, Any]:
        self.events.append("releasing")
        self._ensure_index()
        self.collection.delete_many({"name": self.name})
        self.events.append("released")
        return {"released": True}

    def exists(self) -> dict[str, Any]:
        self._ensure_index()
        return {"exists": self.collection.find_one({"name": self.name}) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("database")
    parser.add_argument("collection")
    parser.add_argument("name")
    parser.add_argument("--expire", type=float, default=None, help="lockExpireSeconds")
    parser.add_argument("--clock-offset", type=float, default=0.0)
    args = parser.parse_args(argv)
    seed = SeedProcess(args.url, args.database, args.collection, args.name, args.expire, args.clock_offset)
    held = False

    def on_sigterm(signum: int, frame: Any) -> None:  # the seed: release, then process.exit()
        if held:
            seed.release()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    seed.client.admin.command("ping")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        kind = command["cmd"]
        if kind == "quit":
            break
        seed.name = command.get("name", seed.name)
        if "at" in command:
            time.sleep(max(0.0, command["at"] - time.time()))
        if kind == "lock":
            reply = seed.lock()
            held = held or reply["locked"]
        elif kind == "release":
            reply = seed.release()
            held = False
        elif kind == "exists":
            reply = seed.exists()
        else:
            reply = {"error": f"unknown command {kind!r}"}
        reply["events"] = list(seed.events)
        seed.events.clear()
        print(json.dumps(reply), flush=True)
    seed.client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
