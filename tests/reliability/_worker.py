"""Child processes for the reliability tests: ``python _worker.py MODE JSON``.

Each mode speaks JSON lines on stdout so the parent can follow it. Times are
``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process on a Linux
host, so holds logged by different processes can be compared directly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from singleton_integrations import Singleton, persisters
from singleton_integrations.fencing import MongoFence, SqlFence


def say(**fact: Any) -> None:
    sys.stdout.write(json.dumps(fact) + "\n")
    sys.stdout.flush()


def fenced_write(resource: dict[str, Any], token: int, writer: str) -> bool:
    """Write ``writer`` into the protected resource if ``token`` is not stale; True when admitted."""
    kind = resource["kind"]
    if kind == "sqlite":
        import sqlite3

        connection = sqlite3.connect(resource["path"], timeout=10, isolation_level=None)
        try:
            fence = SqlFence(resource["table"])
            connection.execute("BEGIN IMMEDIATE")
            fence.create_table(connection)
            connection.execute(f"CREATE TABLE IF NOT EXISTS {resource['table']}_data (writer TEXT, token INTEGER)")
            admitted = fence.admit(connection, resource["name"], token)
            if admitted:
                connection.execute(f"INSERT INTO {resource['table']}_data VALUES (?, ?)", (writer, token))
            connection.execute("COMMIT")
            return admitted
        finally:
            connection.close()
    if kind == "postgres":
        import psycopg

        with psycopg.connect(resource["dsn"], connect_timeout=10) as connection:
            fence = SqlFence(resource["table"])
            fence.create_table(connection)
            connection.execute(f"CREATE TABLE IF NOT EXISTS {resource['table']}_data (writer TEXT, token BIGINT)")
            connection.commit()
            admitted = fence.admit(connection, resource["name"], token)
            if admitted:
                connection.execute(f"INSERT INTO {resource['table']}_data VALUES (%s, %s)", (writer, token))
            connection.commit()
            return admitted
    if kind == "mongodb":
        import pymongo

        with pymongo.MongoClient(resource["url"], serverSelectionTimeoutMS=10000) as client:
            collection = client.get_default_database("singleton_test")[resource["table"]]
            return MongoFence(collection).update(resource["name"], token, {"writer": writer})
    raise ValueError(f"unknown resource kind {kind!r}")


def overlap(config: dict[str, Any]) -> None:
    """Loop acquire / work / release until ``until``; log each hold as ``start end token pid``."""
    lock = Singleton(config["name"], persisters.from_url(config["url"]), lock_expire_seconds=config["ttl"])
    lock.exists()  # connect before the start, so slow interpreter start-up eats no test time
    say(event="ready")
    window = json.loads(sys.stdin.readline())  # the parent starts everyone at once
    holds = conflicts = errors = 0
    pid = os.getpid()
    with open(config["log"], "w", encoding="utf-8") as log:
        while time.monotonic() < window["start_at"]:
            time.sleep(0.005)
        while time.monotonic() < window["until"]:
            try:
                acquired = lock.lock(wait=config["wait"])
            except Exception as error:  # counted and shown; the parent asserts there are none
                errors += 1
                log.write(f"# error {type(error).__name__}: {error}\n")
                time.sleep(0.05)
                continue
            if not acquired:
                conflicts += 1
                continue
            start = time.monotonic()
            token = lock.fencing_token
            time.sleep(config["work"])
            end = time.monotonic()
            try:
                lock.release()
            except Exception as error:
                errors += 1
                log.write(f"# error {type(error).__name__}: {error}\n")
            log.write(f"{start!r} {end!r} {token} {pid}\n")
            holds += 1
        log.write(f"# summary {holds} {conflicts} {errors}\n")


def hold(config: dict[str, Any]) -> None:
    """Take the lock, report it, then live until killed (or ``linger`` seconds)."""
    if config.get("previous_handler"):
        def previous(signum: int, frame: Any) -> None:
            say(event="previous handler ran")
            os._exit(3)

        signal.signal(signal.SIGTERM, previous)
    lock = Singleton(config["name"], persisters.from_url(config["url"]), lock_expire_seconds=config["ttl"])
    if not lock.lock(wait=config.get("wait", 10)):
        say(event="conflict")
        return
    say(event="locked", token=lock.fencing_token, pid=os.getpid(), at=time.monotonic())
    time.sleep(config.get("linger", 3600))


def fenced(config: dict[str, Any]) -> None:
    """Hold with auto-renew, write the resource, wait for ``go`` (the parent pauses us), write again."""
    lock = Singleton(config["name"], persisters.from_url(config["url"]), lock_expire_seconds=config["ttl"],
                     auto_renew=True, renew_interval=config["renew_interval"])
    lost = threading.Event()
    lock.on("lost", lambda message: lost.set())
    if not lock.lock(wait=10):
        say(event="conflict")
        return
    token = lock.fencing_token
    assert token is not None
    say(event="locked", token=token, first_write=fenced_write(config["resource"], token, "paused holder, before"))
    sys.stdin.readline()  # "go": sent after the parent resumed us with SIGCONT
    admitted = fenced_write(config["resource"], token, "paused holder, after")
    lost.wait(config["ttl"] * 3 + 10)
    released = lock.release()
    say(event="resumed", second_write=admitted, lost=lost.is_set(), lost_property=lock.lost, released=released)


_kept: list[Singleton] = []  # held locks the way a program keeps them: still referenced at exit


def hold_many(config: dict[str, Any]) -> None:
    """Hold ``count`` locks, say so, then on ``exit`` return (exit releases them) or wait for a signal."""
    store = persisters.from_url(config["url"])
    locks = _kept
    locks += [Singleton(f"{config['name']}-{index}", store, lock_expire_seconds=config.get("ttl", 300))
             for index in range(config["count"])]
    assert all(lock.lock() for lock in locks)
    say(event="locked", count=len(locks))
    command = sys.stdin.readline().strip()
    if command == "exit":
        return  # the interpreter's exit releases every held lock
    time.sleep(3600)


if __name__ == "__main__":
    {"overlap": overlap, "hold": hold, "fenced": fenced, "hold_many": hold_many}[sys.argv[1]](json.loads(sys.argv[2]))
