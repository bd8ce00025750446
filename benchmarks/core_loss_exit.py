"""Issue 14 figures for the core: how early ``lost`` fires before the lease ends, and exit time on a hung store.

Item 2: a lock with ``auto_renew`` on a throwaway redis-server that is then frozen
with SIGSTOP; the figure is (lease end by the store's clock, from the last renewal
it confirmed) minus (wall time ``lost`` fired). Positive means early, as required.

Item 3: a child process holds 5 locks, the store hangs (redis: SIGSTOP; PostgreSQL
and MongoDB: a loopback proxy that swallows traffic), the child exits; the figure
is how long the exit took.

    python benchmarks/core_loss_exit.py [--trials 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from singleton_integrations import Singleton, persisters
from tests.reliability._proxy import TcpProxy, through
from tests.servers import mongodb_server, postgres_server, redis_server

_HOLDER = textwrap.dedent("""
    import sys
    from singleton_integrations import Singleton, persisters
    store = persisters.from_url(sys.argv[1])
    locks = [Singleton(f"{sys.argv[2]}-{i}", store, lock_expire_seconds=120) for i in range(int(sys.argv[3]))]
    assert all(lock.lock() for lock in locks)
    print("held", flush=True)
    sys.stdin.readline()
""")


def loss_lead(ttl: float, trials: int) -> dict[str, object]:
    leads = []
    margin = 0.0
    for _ in range(trials):
        server = redis_server.start_throwaway()
        try:
            store = persisters.from_url(server.url)
            singleton = Singleton(
                f"bench-{uuid.uuid4().hex}", store, lock_expire_seconds=ttl, auto_renew=True, release_on_sigterm=False
            )
            margin = singleton.loss_margin
            confirmed: list[datetime] = []
            fired = threading.Event()
            lost_at: list[datetime] = []
            singleton.on("renewed", lambda _m, c=confirmed, s=singleton: c.append(s._state.hold.expires_at))
            singleton.on("lost", lambda _m, at=lost_at, f=fired: (at.append(datetime.now(timezone.utc)), f.set()))
            assert singleton.lock()
            confirmed.append(singleton.record.expires_at)
            time.sleep(ttl / 3 + 0.3)  # one renewal gets through
            os.kill(server.process.pid, signal.SIGSTOP)
            fired.wait(ttl + 30)
            os.kill(server.process.pid, signal.SIGCONT)
            leads.append((confirmed[-1] - lost_at[0]).total_seconds())
            singleton.release()
            store.close()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
            server.stop()
    return {"ttl": ttl, "margin": margin, "lead_seconds": leads, "min": min(leads), "median": statistics.median(leads)}


def exit_time(url: str, freeze: callable, count: int = 5) -> float:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url, f"bench-{uuid.uuid4().hex}", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    freeze()
    started = time.monotonic()
    process.communicate("exit\n", timeout=120)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict[str, object] = {"loss": [loss_lead(ttl, args.trials) for ttl in (4.0, 30.0)]}

    exits: dict[str, float] = {}
    server = redis_server.start_throwaway()
    try:
        exits["redis (SIGSTOP), 5 locks"] = exit_time(server.url, lambda: os.kill(server.process.pid, signal.SIGSTOP))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
    for label, url in (("postgres", postgres_server.url()), ("mongodb", mongodb_server.url())):
        parts = urlsplit(url)
        proxy = TcpProxy(
            parts.hostname or "127.0.0.1", parts.port or {"postgres": 5432, "mongodb": 27017}[label]
        ).start()
        try:
            exits[f"{label} (partitioned), 5 locks"] = exit_time(through(url, proxy.port), proxy.partition)
        finally:
            proxy.stop()
    results["exit_seconds"] = exits
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
