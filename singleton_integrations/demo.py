"""The two-minute tour, ``python -m singleton_integrations.demo`` (``nox -s demo`` sets up Airflow and Prefect).

On a throwaway SQLite store it shows, as a timeline: processes racing for one
lock, a SIGKILLed holder's lock expiring and being taken over, a fencing token
refusing a paused holder's late write, two deployments started seconds apart of
which the second skips the slot the first already ran (a minimum hold), and an
Airflow task and a Prefect flow yielding to a cron-style ``singleton run`` that
holds the same name. Every child
runs in its own process group and is killed on exit, so nothing is left running.
The Airflow and Prefect parts run in the interpreters named by
``SINGLETON_DEMO_AIRFLOW_PYTHON`` and ``SINGLETON_DEMO_PREFECT_PYTHON`` (they pin
incompatible FastAPI releases, so each has its own virtual environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["main"]

#: The Airflow DAG and the Prefect flow the demo runs: shipped inside the package, so an
#: installed package runs the whole demo, not only its core scenes.
SCENES = Path(__file__).resolve().parent / "demo_scenes"
RESULT_PREFIX = "SINGLETON_DEMO_RESULT "
EVENT_PREFIX = "@@demo "
SHARED_NAME = "nightly-export"  # the one name the cron job, the DAG and the flow share
SLOT_NAME = "nightly-report"  # the minimum-hold scene's name
SLOT_HOLD = 5.0  # seconds: how long the slot stays taken after the run starts
SLOT_LAG = 1.5  # seconds: how late the second deployment's scheduler starts the same job
ORCHESTRATOR_TIMEOUT = 300.0


@dataclass
class Event:
    t: float
    actor: str
    text: str
    kind: str = "note"
    name: str = ""
    token: int | None = None
    target: str = ""  # for the demo's own actions: whom it did them to



@dataclass
class Timeline:
    """Every actor's events, printed per section relative to the demo's start."""

    start: float = field(default_factory=time.time)
    events: list[Event] = field(default_factory=list)
    printed: int = 0
    failures: list[str] = field(default_factory=list)
    checks: list[tuple[bool, str]] = field(default_factory=list)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def add(self, event: Event) -> None:
        with self.guard:
            self.events.append(event)

    def note(self, actor: str, text: str, kind: str = "note", name: str = "", target: str = "") -> None:
        self.add(Event(time.time(), actor, text, kind, name, target=target))

    def flush(self) -> None:
        """Print the events so far in time order, then the checks made on them."""
        with self.guard:
            fresh = sorted(self.events[self.printed:], key=lambda e: e.t)
            self.events[self.printed:] = fresh
            self.printed = len(self.events)
            checks, self.checks = self.checks, []
        for event in fresh:
            print(f"  {1000 * (event.t - self.start):+8.0f} ms  {event.actor:<10} {event.text}", flush=True)
        for ok, claim in checks:
            print(f"  {'ok' if ok else 'FAILED'}: {claim}", flush=True)

    def check(self, ok: bool, claim: str) -> None:
        with self.guard:
            self.checks.append((ok, claim))
            if not ok:
                self.failures.append(claim)


class Actor:
    """A child process in its own process group, whose ``@@demo`` stdout lines become events."""

    registry: ClassVar[list[Actor]] = []

    def __init__(self, timeline: Timeline, label: str, argv: list[str], env: dict[str, str],
                 log: Path | None = None, stdin: bool = False) -> None:
        self.label = label
        self.timeline = timeline
        self.kinds: queue.Queue[Event] = queue.Queue()
        self.log = log
        output = open(log, "wb") if log else subprocess.PIPE  # noqa: SIM115 - closed by the child's exit
        self.process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT if log else None,
                                        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                        start_new_session=True)
        if log:
            output.close()  # type: ignore[union-attr]
        Actor.registry.append(self)
        if not log:
            threading.Thread(target=self._read, name=f"demo-{label}", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                try:
                    data = json.loads(line[len(EVENT_PREFIX):])
                except ValueError:  # not ours after all: keep reading, the checks will tell
                    print(f"  ({self.label} printed an unreadable event line: {line[:80]!r})", flush=True)
                    continue
                event = Event(data["t"], self.label, data["text"], data["kind"], data.get("name", ""),
                              data.get("token"))
                if event.kind != "ready":  # a barrier detail, not a lock event
                    self.timeline.add(event)
                self.kinds.put(event)

    def wait_for(self, kind: str, timeout: float = 60.0) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.kinds.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.label} did not report {kind!r} within {timeout:g} s") from None
            if event.kind == kind:
                return event

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    @classmethod
    def kill_all(cls) -> list[int]:
        """SIGKILL every child's process group; returns the groups still alive afterwards."""
        for actor in cls.registry:
            _killpg(actor.process.pid, signal.SIGKILL)
            _killpg(actor.process.pid, signal.SIGCONT)
        survivors = []
        for actor in cls.registry:
            try:
                actor.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                survivors.append(actor.process.pid)
            deadline = time.monotonic() + 5
            while _group_alive(actor.process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(actor.process.pid):
                survivors.append(actor.process.pid)
        return survivors


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the parts ------------------------------------------------------------------------------


class Demo:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.url = f"sqlite:///{workdir / 'locks.sqlite3'}"
        self.timeline = Timeline()
        self.args = args
        self.env = {**os.environ, "SINGLETON_URL": self.url, "PYTHONUNBUFFERED": "1"}
        self.env.pop("SINGLETON_DEBUG", None)

    def child(self, label: str, role: str, name: str, *extra: str, stdin: bool = False) -> Actor:
        argv = [sys.executable, "-m", "singleton_integrations.demo", "--child", role, "--name", name,
                "--actor", label, *extra]
        return Actor(self.timeline, label, argv, self.env, stdin=stdin)

    def race(self, racers: int = 4) -> None:
        print(f"\n1. {racers} processes race for 'demo.race'; the winner holds it for a second", flush=True)
        actors = [self.child(f"racer-{i}", "racer", "demo.race", stdin=True) for i in range(1, racers + 1)]
        for actor in actors:
            actor.wait_for("ready")
        for actor in actors:  # released together, as close to simultaneously as a pipe write allows
            actor.send("go")
        codes = [actor.finish() for actor in actors]
        winners = [e for e in self.timeline.events if e.name == "demo.race" and e.kind == "locked"]
        conflicts = [e for e in self.timeline.events if e.name == "demo.race" and e.kind == "conflict"]
        self.timeline.check(len(winners) == 1 and len(conflicts) == racers - 1 and codes.count(0) == racers,
                            f"exactly one of {racers} won; the others saw the lock held and who held it")
        self.timeline.flush()

    def crash(self) -> None:
        print("\n2. A holder is killed with SIGKILL; its 2 s lease expires and another process takes over", flush=True)
        holder = self.child("holder", "crasher", "demo.crash", "--ttl", "2")
        first = holder.wait_for("locked")
        time.sleep(0.3)
        holder.process.send_signal(signal.SIGKILL)
        self.timeline.note("demo", f"SIGKILL holder (pid {holder.process.pid}): no release, no cleanup",
                           kind="SIGKILL", name="demo.crash", target="holder")
        holder.finish()
        taker = self.child("taker", "taker", "demo.crash", "--wait", "30")
        second = taker.wait_for("locked")
        taker.finish()
        expired = [e for e in self.timeline.events if e.name == "demo.crash" and e.kind == "expired"]
        self.timeline.check(bool(expired) and (second.token or 0) > (first.token or 0),
                            f"the 'expired' event fired; the fencing token rose {first.token} -> {second.token}")
        self.timeline.flush()

    def fencing(self) -> None:
        print("\n3. A holder pauses (SIGSTOP) past its lease; its late write is refused by fencing token", flush=True)
        ledger = self.workdir / "ledger.json"
        slow = self.child("paused", "writer", "demo.fencing", "--ttl", "1.5", "--ledger", str(ledger),
                          "--writes", "1000")
        slow.wait_for("wrote")
        slow.process.send_signal(signal.SIGSTOP)
        self.timeline.note("demo", f"SIGSTOP paused (pid {slow.process.pid}), like a long GC pause or a frozen VM",
                           kind="SIGSTOP", name="demo.fencing", target="paused")
        fresh = self.child("fresh", "writer", "demo.fencing", "--ttl", "1.5", "--ledger", str(ledger),
                           "--writes", "1", "--wait", "30")
        fresh.finish()
        slow.process.send_signal(signal.SIGCONT)
        self.timeline.note("demo", "SIGCONT paused: it resumes believing it still holds the lock",
                           kind="SIGCONT", name="demo.fencing", target="paused")
        refused = slow.wait_for("refused")
        slow.finish()
        tokens = [e.token or 0 for e in self.timeline.events if e.name == "demo.fencing" and e.kind == "locked"]
        self.timeline.check(len(tokens) == 2 and tokens[1] > tokens[0] and refused.token == tokens[0],
                            f"fencing tokens rose {' -> '.join(map(str, tokens))}; the stale write was refused")
        self.timeline.flush()

    def slot(self) -> None:
        print(f"\n4. Two deployments start '{SLOT_NAME}' {SLOT_LAG:g} s apart; with `--min-hold {SLOT_HOLD:g}` the "
              "second skips the slot the first already ran", flush=True)
        first = self._deployment("deploy-a")
        ran = first.wait_for("locked")
        code = first.finish()
        self.timeline.add(Event(time.time(), "deploy-a", f"job done, `singleton run` exited {code}: released into "
                                f"the {SLOT_HOLD:g} s minimum hold, so the name stays taken", kind="ran",
                                name=SLOT_NAME))
        hold_until = self._hold_until()  # read now, well inside the hold, however slow the machine
        time.sleep(max(0.0, ran.t + SLOT_LAG - time.time()))
        second = self._deployment("deploy-b")
        skipped = second.finish()
        said = _last_line(second.log)
        self.timeline.add(Event(time.time(), "deploy-b", f"exit {skipped}: {said.removeprefix('singleton: ')}",
                                kind="skipped", name=SLOT_NAME))
        self.timeline.check(skipped == 75 and "already ran this slot" in said and "deployment=a" in said
                            and not (self.workdir / "deploy-b.ran").exists() and hold_until is not None,
                            "deploy-b exited 75 without running: the slot already ran on deploy-a")
        if hold_until is not None:
            time.sleep(max(0.0, hold_until - time.time()) + 0.05)
            self.timeline.add(Event(hold_until, "deploy-a", "minimum hold over: the next slot may run",
                                    kind="released", name=SLOT_NAME))
        later = self._deployment("deploy-b", next_slot=True)
        following = later.wait_for("locked")
        later.finish()
        self.timeline.add(Event(time.time(), "deploy-b", "next slot done: released into its own minimum hold",
                                kind="ran", name=SLOT_NAME))
        self.timeline.check((following.token or 0) > (ran.token or 0),
                            f"the next slot ran after the hold, fencing token {ran.token} -> {following.token}")
        self.timeline.flush()

    def _hold_until(self) -> float | None:
        """When the minimum hold on SLOT_NAME ends, from ``singleton status --json``."""
        status = subprocess.run([sys.executable, "-m", "singleton_integrations", "status", SLOT_NAME, "--json"],
                                check=False, env=self.env, capture_output=True, text=True, timeout=60)
        holder = (json.loads(status.stdout or "{}").get("holder") or {}) if status.returncode == 0 else {}
        return datetime.fromisoformat(holder["hold_until"]).timestamp() if holder.get("hold_until") else None

    def _deployment(self, label: str, next_slot: bool = False) -> Actor:
        """``singleton run --min-hold`` as each deployment's scheduler would start it."""
        argv = [sys.executable, "-m", "singleton_integrations", "run", SLOT_NAME, "--min-hold", f"{SLOT_HOLD:g}",
                "--metadata", f"deployment={label[-1]}", "--", sys.executable, "-m", "singleton_integrations.demo",
                "--child", "slot-job", "--name", SLOT_NAME, "--actor", label, "--go", str(self.workdir / f"{label}.ran")]
        log = None if next_slot or label == "deploy-a" else self.workdir / f"{label}.log"
        return Actor(self.timeline, label, argv, self.env, log=log)

    def orchestrators(self) -> None:
        print(f"\n5. A cron-style `singleton run {SHARED_NAME}` holds the name; Airflow and Prefect yield to it",
              flush=True)
        go = self.workdir / "cron-may-finish"
        cron_argv = [sys.executable, "-m", "singleton_integrations", "run", SHARED_NAME, "--ttl", "30",
                     "--metadata", "actor=cron", "--", sys.executable, "-m", "singleton_integrations.demo",
                     "--child", "cron-job", "--name", SHARED_NAME, "--actor", "cron", "--go", str(go)]
        cron = Actor(self.timeline, "cron", cron_argv, self.env)
        cron.wait_for("locked")
        parts = [threading.Thread(target=self._guarded, args=(part,), daemon=True)
                 for part in (self._airflow, self._prefect)]
        for part in parts:
            part.start()
        for part in parts:
            part.join()
        go.touch()
        code = cron.finish()
        self.timeline.note("cron", f"`singleton run` exited {code}: the lock is released", kind="released",
                           name=SHARED_NAME)
        self.timeline.flush()

    def _guarded(self, part: Any) -> None:
        try:
            part()
        except Exception as error:  # noqa: BLE001 - reported as a failed check; the other part carries on
            self.timeline.check(False, f"{part.__name__.strip('_')}: {type(error).__name__}: {error}")

    def _interpreter(self, which: str, probe: tuple[str, ...]) -> str | None:
        variable = f"SINGLETON_DEMO_{which.upper()}_PYTHON"
        python = getattr(self.args, f"{which}_python") or os.environ.get(variable)
        if not python:
            self.timeline.note(which, f"skipped: {variable} is not set (`nox -s demo` sets it up)", kind="skipped")
            return None
        script = SCENES / which / "nightly_export.py"
        if not script.exists():
            self.timeline.note(which, f"skipped: {script} is missing from this installation", kind="skipped")
            return None
        # find_spec, not import: a quick look that costs no Airflow or Prefect start-up.
        code = f"import importlib.util as u; print(' '.join(m for m in {probe!r} if u.find_spec(m) is None))"
        try:
            found = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, env=self.env)
        except OSError as error:
            self.timeline.note(which, f"skipped: cannot start {python} ({error.strerror})", kind="skipped")
            return None
        missing = found.stdout.strip() if found.returncode == 0 else "its interpreter failed"
        if missing:
            self.timeline.note(which, f"skipped: {python} lacks {missing}", kind="skipped")
            return None
        return python

    def _airflow(self) -> None:
        python = self._interpreter("airflow", ("airflow", "airflow_provider"))
        if python is None:
            return
        home = self.workdir / "airflow"
        env = {**self.env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(SCENES / "airflow"),
               "AIRFLOW_CONN_SINGLETON_DEFAULT": json.dumps({"conn_type": "singleton", "extra": {"url": self.url}}),
               "SINGLETON_LOCK_NAME": SHARED_NAME}
        self.timeline.note("airflow", "airflow db migrate (Airflow's own SQLite metadata DB)")
        migrate = Actor(self.timeline, "airflow", [python, "-m", "airflow", "db", "migrate"], env,
                        log=self.workdir / "airflow-migrate.log")
        if migrate.finish(ORCHESTRATOR_TIMEOUT) != 0:
            self.timeline.check(False, f"airflow db migrate failed; see {migrate.log}")
            return
        self.timeline.note("airflow", "dag.test() of nightly_export: @task.singleton(on_conflict='skip')")
        log = self.workdir / "airflow-dag.log"
        run = Actor(self.timeline, "airflow", [python, str(SCENES / "airflow" / "nightly_export.py")], env, log=log)
        run.finish(ORCHESTRATOR_TIMEOUT)
        result = _result(log)
        state = (result or {}).get("tasks", {}).get("export")
        if result:
            self.timeline.add(Event(result["t"], "airflow", f"task 'export' ended {state}: the cron job holds "
                                    f"{SHARED_NAME!r}", kind="airflow-state", name=SHARED_NAME))
        self.timeline.check(state == "skipped", f"the Airflow task was skipped (state {state!r}; log {log.name})")

    def _prefect(self) -> None:
        python = self._interpreter("prefect", ("prefect", "prefect_blocks"))
        if python is None:
            return
        env = {**self.env, "PREFECT_HOME": str(self.workdir / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(int(ORCHESTRATOR_TIMEOUT)),
               "SINGLETON_LOCK_NAME": SHARED_NAME}
        env.pop("PREFECT_API_URL", None)  # Prefect's ephemeral server, never the user's
        self.timeline.note("prefect", "flow nightly-export: @singleton(on_conflict='skip'), ephemeral server")
        log = self.workdir / "prefect-flow.log"
        run = Actor(self.timeline, "prefect", [python, str(SCENES / "prefect" / "nightly_export.py")], env, log=log)
        run.finish(ORCHESTRATOR_TIMEOUT)
        result = _result(log)
        name = (result or {}).get("name")
        if result:
            self.timeline.add(Event(result["t"], "prefect", f"flow run ended {result['type']}/{name!r}: "
                                    f"the cron job holds {SHARED_NAME!r}", kind="prefect-state", name=SHARED_NAME))
        self.timeline.check(name == "Skipped" and (result or {}).get("type") == "COMPLETED",
                            f"the Prefect flow ended 'Skipped' (state {name!r}; log {log.name})")


def _last_line(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _result(log: Path | None) -> dict[str, Any] | None:
    if log is None or not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return result
    return None


# -- the children ------------------------------------------------------------------------------


_emit_guard = threading.Lock()


def _emit(kind: str, text: str, name: str = "", token: int | None = None) -> None:
    payload = {"t": time.time(), "kind": kind, "text": text, "name": name, "token": token}
    with _emit_guard:  # event handlers run on the renewal thread too: one whole line at a time
        sys.stdout.write(EVENT_PREFIX + json.dumps(payload) + "\n")
        sys.stdout.flush()


def _child(args: argparse.Namespace) -> int:
    import logging

    from . import Singleton

    logging.getLogger("singleton_integrations").addHandler(logging.NullHandler())  # events arrive as timeline lines
    url = os.environ["SINGLETON_URL"]
    name = args.name
    if args.child == "slot-job":  # a short job under `singleton run --min-hold`
        given = int(os.environ["SINGLETON_FENCING_TOKEN"])
        Path(args.go).touch()  # proof that it ran
        _emit("locked", f"runs the slot under `singleton run --min-hold {SLOT_HOLD:g}` (fencing token {given})",
              name, given)
        time.sleep(0.5)
        return 0
    if args.child == "cron-job":  # runs under `singleton run`, which hands it the fencing token
        given = int(os.environ["SINGLETON_FENCING_TOKEN"])
        _emit("locked", f"cron job runs under `singleton run` (fencing token {given})", name, given)
        deadline = time.monotonic() + ORCHESTRATOR_TIMEOUT * 2
        while not Path(args.go).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return 0
    lock = Singleton(name, url, lock_expire_seconds=args.ttl, auto_renew=args.child == "writer",
                     metadata={"actor": args.actor})
    lock.on("expired", lambda message: _emit("expired", "'expired' event: the previous holder's lease ran out; "
                                             "taken over", name))
    if args.child == "racer":
        _emit("ready", "ready", name)
        sys.stdin.readline()
    if not lock.lock(wait=args.wait):
        holder = lock.last_holder
        who = holder.metadata.get("actor", f"pid {holder.pid}") if holder else "someone"
        _emit("conflict", f"conflict: held by {who} (fencing token {holder.fencing_token if holder else '?'})", name)
        return 0
    token = lock.fencing_token
    _emit("locked", f"locked {name!r} (fencing token {token})", name, token)
    if args.child == "crasher":
        while True:  # works until SIGKILL; never releases
            time.sleep(1)
    if args.child == "racer":
        time.sleep(1.0)
    if args.child == "writer":
        lock.on("lost", lambda message: _emit("lost", "'lost' event: its lease ended while it was paused", name))
        for attempt in range(args.writes):
            if not _fenced_write(Path(args.ledger), token, args.actor):
                _emit("refused", f"write with fencing token {token} refused: the ledger has seen a newer one",
                      name, token)
                break
            if attempt == 0:
                _emit("wrote", f"write with fencing token {token} accepted", name, token)
            time.sleep(0.1)
    if lock.release():
        _emit("released", f"released {name!r}", name, token)
    else:
        _emit("released", "release found the lock no longer ours and left it to its new holder", name, token)
    return 0


def _fenced_write(ledger: Path, token: int | None, actor: str) -> bool:
    """The protected resource: it remembers the highest token and refuses older ones."""
    import fcntl

    with open(ledger.with_suffix(".lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        seen: dict[str, Any] = json.loads(ledger.read_text()) if ledger.exists() else {"highest": 0, "writes": []}
        if token is None or token < seen["highest"]:
            return False
        seen["highest"] = token
        seen["writes"].append({"actor": actor, "token": token})
        ledger.write_text(json.dumps(seen))
        return True


# -- the chart ---------------------------------------------------------------------------------

_COLOURS = ("#6a4c93", "#1982c4", "#8ac926", "#ff924c", "#c5283d")
_MARKS = {"conflict": ("#888888", "conflict"), "refused": ("#c5283d", "write refused"),
          "wrote": ("#2a9d55", "write ok"), "skipped": ("#888888", "slot already ran: skipped"),
          "ran": ("#555555", "done; held for the minimum hold"), "SIGKILL": ("#c5283d", "SIGKILL"), "SIGSTOP": ("#c5283d", "SIGSTOP"),
          "SIGCONT": ("#2a9d55", "SIGCONT"), "expired": ("#ff924c", "expired: taken over"),
          "airflow-state": ("#ff924c", "task skipped"), "prefect-state": ("#ff924c", "flow Skipped")}


def _svg(timeline: Timeline, path: Path) -> None:
    """Who held each lock when, one panel per lock on its own time scale; drawn by hand, no plotting library."""
    events = sorted((e for e in timeline.events if e.name), key=lambda e: e.t)
    names = list(dict.fromkeys(e.name for e in events))
    width, left, right, row_h = 900, 150, 870, 26
    parts: list[str] = []
    y = 46
    for index, name in enumerate(names):
        mine = [e for e in events if e.name == name]
        rows = list(dict.fromkeys(e.target or e.actor for e in mine if (e.target or e.actor) != "demo"))
        begin, end = mine[0].t, mine[-1].t
        pad = max(end - begin, 0.5) * 0.05
        begin, end = begin - pad, end + pad * 4

        def x(t: float, begin: float = begin, end: float = end) -> float:
            return left + (t - begin) / (end - begin) * (right - left)

        colour = _COLOURS[index % len(_COLOURS)]
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{_xml(name)}</text>')
        y += 8
        label_end: dict[str, float] = {}
        for row, actor in enumerate(rows):
            top = y + row * row_h
            parts.append(f'<text x="20" y="{top + 17}">{_xml(actor)}</text>')
            parts.append(f'<line x1="{left}" y1="{top + row_h / 2}" x2="{right}" y2="{top + row_h / 2}" '
                         'stroke="#eeeeee"/>')
            for start, stop, alive_until in _holds(mine, actor):
                parts.append(f'<rect x="{x(start):.1f}" y="{top + 5}" width="{max(x(alive_until) - x(start), 2):.1f}" '
                             f'height="{row_h - 10}" fill="{colour}"/>')
                if stop > alive_until:  # the holder is dead or frozen, but its lease still stands
                    parts.append(f'<rect x="{x(alive_until):.1f}" y="{top + 5}" '
                                 f'width="{max(x(stop) - x(alive_until), 1):.1f}" height="{row_h - 10}" '
                                 f'fill="{colour}" fill-opacity="0.3"/>')
        for event in mine:
            mark = _MARKS.get(event.kind)
            row_actor = event.target or event.actor
            if mark is None or row_actor not in rows:
                continue
            top = y + rows.index(row_actor) * row_h
            cx = x(event.t)
            fill, label = mark
            shift = 11 if label_end.get(row_actor, 0) > cx else 0
            parts.append(f'<circle cx="{cx:.1f}" cy="{top + row_h / 2}" r="4" fill="{fill}"/>')
            if cx + 6 + 5.5 * len(label) > width - 5:  # it would run off the chart: end it at the mark instead
                parts.append(f'<text x="{cx - 6:.1f}" y="{top + 10 + shift}" font-size="10" fill="{fill}" '
                             f'text-anchor="end">{_xml(label)}</text>')
            else:
                parts.append(f'<text x="{cx + 6:.1f}" y="{top + 10 + shift}" font-size="10" fill="{fill}">'
                             f'{_xml(label)}</text>')
            label_end[row_actor] = cx + 6 + 5.5 * len(label)
        y += len(rows) * row_h
        for tick in _ticks(begin - timeline.start, end - timeline.start):
            tx = x(timeline.start + tick)
            parts.append(f'<text x="{tx:.1f}" y="{y + 12}" font-size="10" fill="#777" text-anchor="middle">'
                         f'{tick:g} s</text>')
        y += 38
    header = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y - 10}" font-family="sans-serif" '
              'font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
              '<text x="10" y="16" font-size="13" font-weight="bold">singleton-integrations demo: who held each lock '
              '(time since the demo started)</text>']
    path.write_text("\n".join([*header, *parts, "</svg>"]) + "\n")


def _holds(events: list[Event], actor: str) -> list[tuple[float, float, float]]:
    """(start, end of lease, end of the holder's life) for each hold by ``actor``."""
    holds: list[tuple[float, float, float]] = []
    start: float | None = None
    alive_until: float | None = None
    for event in events:
        if event.actor == actor and event.kind == "locked":
            start, alive_until = event.t, None
        elif start is None:
            continue
        elif (event.target == actor and event.kind in ("SIGKILL", "SIGSTOP")) or (
                event.actor == actor and event.kind == "ran"):
            alive_until = event.t  # dead, frozen, or done but holding the name for its minimum hold
        elif (event.actor == actor and event.kind in ("released", "refused", "lost")) or (
                event.actor != actor and event.kind == "expired"):
            holds.append((start, event.t, alive_until if alive_until is not None else event.t))
            start = None
    if start is not None and alive_until is not None:  # done, still holding for its minimum hold at the end
        holds.append((start, max(events[-1].t, alive_until), alive_until))
    return holds


def _ticks(low: float, high: float) -> list[float]:
    span = max(high - low, 0.001)
    step = next(s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120) if span / s <= 8)
    first = step * (int(low / step) + 1)
    return [round(first + i * step, 3) for i in range(int((high - first) / step) + 1)]


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- entry point --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m singleton_integrations.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--airflow-python", help="interpreter with Airflow (default $SINGLETON_DEMO_AIRFLOW_PYTHON)")
    parser.add_argument("--prefect-python", help="interpreter with Prefect (default $SINGLETON_DEMO_PREFECT_PYTHON)")
    parser.add_argument("--svg", type=Path, help="also draw the holders' timeline as an SVG chart here")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (store, logs)")
    child = parser.add_argument_group("internal: the demo's child processes")
    child.add_argument("--child", choices=("racer", "crasher", "taker", "writer", "slot-job", "cron-job"),
                       help=argparse.SUPPRESS)
    child.add_argument("--name", help=argparse.SUPPRESS)
    child.add_argument("--actor", help=argparse.SUPPRESS)
    child.add_argument("--ttl", type=float, default=10.0, help=argparse.SUPPRESS)
    child.add_argument("--wait", type=float, default=0.0, help=argparse.SUPPRESS)
    child.add_argument("--ledger", help=argparse.SUPPRESS)
    child.add_argument("--writes", type=int, default=1, help=argparse.SUPPRESS)
    child.add_argument("--go", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    workdir = Path(tempfile.mkdtemp(prefix="singleton-demo-"))
    demo = Demo(workdir, args)
    print(f"singleton-integrations demo: lock store {demo.url}", flush=True)
    failed = False
    try:
        demo.race()
        demo.crash()
        demo.fencing()
        demo.slot()
        demo.orchestrators()
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        failed = True
    except (TimeoutError, subprocess.TimeoutExpired) as error:
        demo.timeline.check(False, str(error))
        demo.timeline.flush()
        failed = True
    finally:
        survivors = Actor.kill_all()
        count = len(Actor.registry)
        print(f"\n{count} child processes started; "
              + (f"still running: {survivors}" if survivors else "none left running"), flush=True)
        if args.svg:
            _svg(demo.timeline, args.svg)
            print(f"timeline chart: {args.svg}")
        if args.keep or failed or demo.timeline.failures:
            print(f"working directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = failed or bool(demo.timeline.failures) or bool(survivors)
    print(f"{time.time() - demo.timeline.start:.1f} s, " + ("some checks FAILED" if failed else "every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
