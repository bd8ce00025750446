"""The guarded group's lease as it crosses tasks: renewed by each guarded task, released by the teardown.

``with SingletonOperator(...)`` makes a setup task that takes the lock and a teardown
that releases it; the tasks in between run in other processes, possibly on other
hosts. Three rules keep the group exclusive across those processes:

- **Each guarded task holds a marker lease** (``<lock>#guarded:<run>:<task>``) in the
  same store while it runs, renewed with the group's lease and released only after
  its work has stopped. The teardown waits until no marker of its run is live before
  it releases the group's lock, so a task that Airflow marked failed or cleared, and
  whose process still runs, never overlaps the next holder. A SIGKILLed task's marker
  ends with its lease (``MARKER_SECONDS``).
- **A guarded task stops on SIGTERM** (Airflow 3 only calls ``on_kill`` and lets plain
  tasks run on until its SIGKILL): the work ends at once, then the marker is released.
- **The teardown says only what the store and the guarded tasks know.** Each guarded
  task reports, when it stops, until when it had renewed the lease and when it
  stopped. A takeover is a loss; a lease that ended after the guarded work had
  stopped is a warning; a record that vanished before its lease could end was
  force-released (or lost by the store).

Under ``limit=N`` the name has several holds: the acquire task's XCom says N, and
every task finds the group's hold among them by its fencing token. Other holds of
the name are other groups' (or other tools'), never a takeover of this one.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowTaskTerminated

from airflow_provider._holders import deployment_name, describe_holder, holder_metadata
from airflow_provider._stats import recording_stats
from airflow_provider.exceptions import SingletonLockLost
from airflow_provider.hooks.singleton import SingletonHook
from singleton_integrations import Lease, Singleton

if TYPE_CHECKING:
    from airflow.sdk import Context

    from singleton_integrations import LockRecord
    from singleton_integrations.persisters import Persister

__all__ = ["LEASE_REPORT_KEY", "MARKER_SECONDS", "XCOM_KEY", "GuardedTaskLease", "SingletonReleaseOperator",
           "guarded_prefix", "hold_with_token", "take_back_from_earlier_try", "wait_for_guarded_tasks"]

#: The XCom key under which an acquire task hands its hold to the release task.
XCOM_KEY = "singleton_lock"
#: The XCom key under which each guarded task reports, when it stops, how long it had kept the lease.
LEASE_REPORT_KEY = "singleton_lease_report"
#: A guarded task's marker lease. A task whose process was SIGKILLed delays the teardown's
#: release by at most this long; a live task renews it every third of it.
MARKER_SECONDS = 60.0
#: While the teardown waits for guarded tasks to stop, it says so this often.
_WAIT_ANNOUNCE_SECONDS = 60.0
#: How often the teardown renews the group while it waits, when the group's lease never ends.
_WAIT_RECHECK_SECONDS = 5.0


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:16]


def guarded_prefix(lock_name: str, dag_id: str, run_id: str) -> str:
    """The name prefix of the markers of one DAG run's guarded tasks (within the 255-character name limit)."""
    base = lock_name if len(lock_name) <= 200 else f"{lock_name[:180]}~{_digest(lock_name)}"
    return f"{base}#guarded:{_digest(deployment_name(), dag_id, run_id)}:"


def _marker_name(prefix: str, task_id: str, map_index: int) -> str:
    return f"{prefix}{_digest(task_id, map_index)}"


def hold_with_token(persister: Persister, name: str, fencing_token: int, limit: int) -> LockRecord | None:
    """The live hold of ``name`` with ``fencing_token``; with one holder (``limit`` 1), whoever holds the name now.

    One holder: a different token there is a takeover, so the caller gets that record to say so.
    Under ``limit=N`` other holds are other holders', so only the hold with the token is returned.
    """
    if limit == 1:
        return persister.get(name)
    return next((record for record in persister.holders(name) if record.fencing_token == fencing_token), None)


def _own_hold(lease: Lease) -> LockRecord | None:
    """The lease's own live hold as the store shows it, among the name's several under ``limit``."""
    records = [lease.holder()] if lease.limit == 1 else lease.holders()
    return next((record for record in records if record is not None and not record.released
                 and record.owner_token == lease.owner_token), None)


def _live(records: Iterable[LockRecord]) -> list[LockRecord]:
    return [record for record in records if not getattr(record, "released", False)]


def wait_for_guarded_tasks(persister: Persister, prefix: str, log: Any, keep_alive: Callable[[], None],
                           keep_alive_every: float, why: str) -> None:
    """Return once no guarded task of the run still holds its marker; ``keep_alive`` meanwhile renews the group.

    Each marker is waited for through the core's own wait (woken by its release, looking
    again when its lease ends). Bounded without a deadline of its own: a dead task's
    marker ends with its lease on the store's clock, and Airflow SIGKILLs a task that
    outlives its SIGTERM grace.
    """
    announced = -math.inf
    while True:
        live = _live(persister.list(prefix))
        if not live:
            return
        now = time.monotonic()
        if now - announced >= _WAIT_ANNOUNCE_SECONDS:
            announced = now
            log.info("Waiting for %d guarded task(s) to stop %s: %s", len(live), why,
                     "; ".join(describe_holder(record) for record in live))
        Lease(live[0].name, persister).wait_until_free(wait=keep_alive_every)
        keep_alive()


class GuardedTaskLease:
    """Runs inside each guarded task: its marker, the group's renewal, and stopping on SIGTERM.

    Attached as execute and end-of-task callbacks, so it works for any operator. It finds
    the hold from the acquire task's XCom (lock name and fencing token) and the owner
    token from the store's record, never from XCom.
    """

    _running: ClassVar[dict[tuple[str, str, str, int], GuardedTaskLease._Running]] = {}

    class _Running:
        def __init__(self, hold: Mapping[str, Any], marker: Singleton | None, stop: threading.Event,
                     sigterm: Any) -> None:
            self.hold = hold
            self.marker = marker
            self.stop = stop
            self.sigterm = sigterm
            self.renewed_until: float | None = None

    def __init__(self, acquire_task_id: str, singleton_conn_id: str, lock_expire_seconds: float | None) -> None:
        self.acquire_task_id = acquire_task_id
        self.singleton_conn_id = singleton_conn_id
        self.lock_expire_seconds = lock_expire_seconds

    @classmethod
    def attach(cls, task: Any, acquire_task_id: str, singleton_conn_id: str,
               lock_expire_seconds: float | None) -> None:
        lease = cls(acquire_task_id, singleton_conn_id, lock_expire_seconds)
        task.on_execute_callback = [*_callbacks(task.on_execute_callback), lease.start]
        for kind in ("on_success_callback", "on_failure_callback", "on_retry_callback", "on_skipped_callback"):
            setattr(task, kind, [*_callbacks(getattr(task, kind)), lease.stop])

    @staticmethod
    def _key(context: Any) -> tuple[str, str, str, int]:
        ti = context["ti"]
        return (str(ti.dag_id), str(ti.run_id), str(ti.task_id), int(ti.map_index if ti.map_index is not None else -1))

    def start(self, context: Any) -> None:
        ti, log = context["ti"], context["task"].log
        hold = ti.xcom_pull(task_ids=self.acquire_task_id, key=XCOM_KEY)
        if not hold:
            return  # the acquire task holds nothing for this run (skipped, or not a group run)
        hook = SingletonHook(singleton_conn_id=self.singleton_conn_id)
        limit = int(hold.get("limit", 1))
        record = hold_with_token(hook.get_conn(), hold["lock_name"], hold["fencing_token"], limit)
        if record is None or record.fencing_token != hold["fencing_token"] or record.released:
            log.error("Lock %r (fencing token %s) is no longer the group's: %s", hold["lock_name"],
                      hold["fencing_token"], f"now {describe_holder(record)}" if record else "it expired")
            return
        # The owner token comes from the store's record of the hold with this fencing token, never from XCom.
        group = Lease(hold["lock_name"], hook.get_conn(), owner_token=record.owner_token,
                      lock_expire_seconds=self.lock_expire_seconds, limit=limit)
        self.stop(context)  # a previous start of this task instance in this process (a retry in-process)
        marker = self._take_marker(context, hook, hold)
        running = self._Running(hold, marker, threading.Event(), self._stop_on_sigterm(hold["lock_name"]))
        if record.expires_at is not None:  # the lease as this task found it, until its first renewal lands
            running.renewed_until = record.expires_at.timestamp()
        self._running[self._key(context)] = running
        if self.lock_expire_seconds is None:
            return  # a group lease that never ends needs no renewal
        ttl = float(self.lock_expire_seconds)
        thread = threading.Thread(target=self._renew, args=(group, running, log),
                                  name=f"singleton-group-lease-{hold['lock_name']}", daemon=True)
        thread.start()
        # The first renewal is at once: it covers the gap between the previous task and this one.
        log.info("Renewing the group's lock %r (fencing token %s) every %.0f s while this task runs",
                 hold["lock_name"], hold["fencing_token"], ttl / 3)

    def stop(self, context: Any) -> None:
        """The task's work has ended: stop renewing, report the lease, then free the marker."""
        running = self._running.pop(self._key(context), None)
        if running is None:
            return
        running.stop.set()
        if running.sigterm is not None and signal.getsignal(signal.SIGTERM) is running.sigterm[0]:
            signal.signal(signal.SIGTERM, running.sigterm[1])
        report = {"fencing_token": running.hold["fencing_token"], "renewed_until": running.renewed_until,
                  "stopped_at": time.time()}
        try:
            context["ti"].xcom_push(key=LEASE_REPORT_KEY, value=report)
        except Exception as error:  # noqa: BLE001  (the teardown then says it cannot tell)
            context["task"].log.warning("Could not report the group lease to the teardown: %s", error)
        if running.marker is not None:
            try:
                running.marker.release()
            except Exception as error:  # noqa: BLE001  (the marker's lease ends by itself)
                context["task"].log.warning("Could not release this task's marker on %r: %s; it ends within %g s",
                                            running.hold["lock_name"], error, MARKER_SECONDS)

    def _take_marker(self, context: Any, hook: SingletonHook, hold: Mapping[str, Any]) -> Singleton | None:
        """This task's marker: the teardown does not release the group while it is held."""
        ti, log = context["ti"], context["task"].log
        prefix = guarded_prefix(hold["lock_name"], str(ti.dag_id), str(ti.run_id))
        map_index = int(ti.map_index if ti.map_index is not None else -1)
        # Not released on SIGTERM: only once the work has stopped (stop(), or at exit).
        marker = Singleton(_marker_name(prefix, str(ti.task_id), map_index), hook.get_conn(),
                           lock_expire_seconds=MARKER_SECONDS, auto_renew=True, release_on_sigterm=False,
                           metadata=holder_metadata(context, {"guards": hold["lock_name"]}))
        if marker.lock():
            return marker
        earlier = marker.last_holder
        if earlier is not None and earlier.metadata.get("try_number") == str(ti.try_number):
            # This same try ran before in a process that has ended (a deferral or a reschedule
            # resumed here) and left its marker to its lease: take its place at once.
            Lease(marker.name, hook.get_conn(), owner_token=earlier.owner_token).release()
            if marker.lock():
                return marker
        # An earlier try of this task instance (cleared while running) has not stopped yet.
        log.warning("An earlier try of this task still runs under lock %r: %s; waiting for it to stop",
                    hold["lock_name"], describe_holder(marker.last_holder))
        if marker.lock(wait=MARKER_SECONDS * 2):
            return marker
        log.error("An earlier try of this task still held its marker on %r after %g s; running without one",
                  hold["lock_name"], MARKER_SECONDS * 2)
        return None

    @staticmethod
    def _stop_on_sigterm(lock_name: str) -> tuple[Any, Any] | None:
        """Make SIGTERM stop the work (after Airflow's own handler calls ``on_kill``); None off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            if callable(previous):
                previous(signum, frame)
            raise AirflowTaskTerminated(f"SIGTERM received: this guarded task stops before the group's lock "
                                        f"{lock_name!r} can be released")

        signal.signal(signal.SIGTERM, on_sigterm)
        return on_sigterm, previous

    @staticmethod
    def _renew(group: Lease, running: GuardedTaskLease._Running, log: Any) -> None:
        interval = max(float(group.lock_expire_seconds or 0) / 3, 0.05)
        while not running.stop.is_set():
            try:
                record = group.renew()
            except Exception as error:  # noqa: BLE001  (a store hiccup: the next renewal may get through)
                log.warning("Renewing the group's lock %r failed: %s", group.name, error)
            else:
                if record is None:
                    log.error("The group's lock %r (fencing token %s) could not be renewed: it expired or was "
                              "released; exclusivity is not guaranteed for the rest of this task",
                              group.name, running.hold["fencing_token"])
                    return
                if record.expires_at is not None:
                    running.renewed_until = record.expires_at.timestamp()
            if running.stop.wait(interval):
                return


class SingletonReleaseOperator(BaseOperator):
    """The teardown that releases a lock a ``SingletonOperator`` acquired for a group of tasks.

    It reads the hold from the acquire task's XCom, waits until every guarded task of
    the run has stopped (their markers), and releases by owner token, so it never frees
    a lock that expired and now belongs to someone else, nor one whose guarded work may
    still run. A takeover fails it (exclusivity was lost); a lease that ended after the
    guarded work stopped only warns.
    """

    ui_color: ClassVar[str] = "#f5e0d7"

    def __init__(self, *, acquire_task_id: str, singleton_conn_id: str = SingletonHook.default_conn_name,
                 lock_expire_seconds: float | None = None, guarded_task_ids: Iterable[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acquire_task_id = acquire_task_id
        self.singleton_conn_id = singleton_conn_id
        self.lock_expire_seconds = lock_expire_seconds
        self.guarded_task_ids = list(guarded_task_ids)

    @recording_stats
    def execute(self, context: Context) -> None:
        from airflow.sdk.log import mask_secret

        ti = context["ti"]
        hold = ti.xcom_pull(task_ids=self.acquire_task_id, key=XCOM_KEY)
        if not hold:
            self.log.info("Task %r holds no lock for this run; nothing to release", self.acquire_task_id)
            return
        name, token, limit = hold["lock_name"], hold["fencing_token"], int(hold.get("limit", 1))
        hook = SingletonHook(singleton_conn_id=self.singleton_conn_id)
        persister = hook.get_conn()
        # The store's record says whether the hold is still the group's: fencing tokens only
        # rise, so a matching token is this very hold, and its owner token releases it.
        group = Lease.adopt(name, persister, fencing_token=token, lock_expire_seconds=self.lock_expire_seconds)
        if group is not None:
            mask_secret(group.owner_token)
            ttl = self.lock_expire_seconds

            def keep_alive() -> None:
                if ttl is not None and group.renew() is None:
                    self.log.error("The group's lock %r could not be renewed while waiting for its guarded tasks",
                                   name)

            wait_for_guarded_tasks(persister, guarded_prefix(name, str(ti.dag_id), str(ti.run_id)), self.log,
                                   keep_alive, (ttl or 3 * _WAIT_RECHECK_SECONDS) / 3,
                                   f"before releasing lock {name!r}")
            if group.release():  # owner-checked in the store
                self.log.info("Released lock %r (fencing token %s)", name, token)
                return
        self._judge_missing_hold(context, name, token, hold_with_token(persister, name, token, limit))

    def _judge_missing_hold(self, context: Context, name: str, token: int, holder: LockRecord | None) -> None:
        """The hold was not there to release: fail on a takeover or an early removal, warn on a late expiry."""
        if holder is not None and holder.fencing_token == token:
            self.log.info("Lock %r (fencing token %s) was already released; it stays held for its minimum hold",
                          name, token)
            return
        if holder is not None:
            raise SingletonLockLost(name, f"exclusivity on lock {name!r} (fencing token {token}) was lost: it is now "
                                          f"held by {describe_holder(holder)}, which took it over")
        reports = [report for report in self._reports(context) if report.get("fencing_token") == token]
        renewed = [float(report["renewed_until"]) for report in reports if report.get("renewed_until") is not None]
        if not reports or not renewed:
            raise SingletonLockLost(name, f"lock {name!r} (fencing token {token}) was no longer held when the "
                                          "teardown ran, and no guarded task reported how long it kept the lease: "
                                          "exclusivity cannot be confirmed")
        lease_end = max(renewed)
        stopped = max(float(report["stopped_at"]) for report in reports)
        if time.time() < lease_end:
            raise SingletonLockLost(name, f"lock {name!r} (fencing token {token}) was removed before its lease could "
                                          f"end (the guarded tasks had renewed it until {_iso(lease_end)}): it was "
                                          "force-released, or the store lost it")
        if stopped > lease_end:
            raise SingletonLockLost(name, f"exclusivity on lock {name!r} (fencing token {token}) was lost: its lease "
                                          f"ended at {_iso(lease_end)} while a guarded task ran until "
                                          f"{_iso(stopped)} (its renewals did not get through)")
        self.log.warning("Lock %r (fencing token %s) had already expired at %s, after the guarded tasks stopped "
                         "(the last at %s): this teardown ran late; nobody's exclusivity was broken",
                         name, token, _iso(lease_end), _iso(stopped))

    def _reports(self, context: Context) -> list[Mapping[str, Any]]:
        if not self.guarded_task_ids:
            return []
        pulled = context["ti"].xcom_pull(task_ids=self.guarded_task_ids, key=LEASE_REPORT_KEY)
        values = pulled if isinstance(pulled, list) else [pulled]
        return [value for value in values if isinstance(value, Mapping)]


def take_back_from_earlier_try(persister: Persister, record: LockRecord, context: Context, log: Any,
                               ttl: float | None, limit: int = 1) -> LockRecord | None:
    """Adopt a hold left by an earlier try of this setup task, once that try's guarded tasks have stopped.

    Clearing a running guarded task clears the group's setup and teardown too, so the
    earlier try's hold has nobody left to release it. The new try continues that hold
    (same owner and fencing token) instead of releasing and racing for it again: no
    other holder can slip in between, and a minimum hold is kept. None when the hold
    ended meanwhile.
    """
    ti = context["ti"]
    log.warning("Lock %r is held by an earlier try of this task (%s), left behind when the run was cleared; "
                "taking it over once that try's guarded tasks have stopped", record.name, describe_holder(record))

    earlier = Lease(record.name, persister, owner_token=record.owner_token, lock_expire_seconds=ttl, limit=limit)

    def keep_alive() -> None:
        if ttl is not None:
            earlier.renew()

    wait_for_guarded_tasks(persister, guarded_prefix(record.name, str(ti.dag_id), str(ti.run_id)), log, keep_alive,
                           (ttl or 3 * _WAIT_RECHECK_SECONDS) / 3, f"before taking over lock {record.name!r}")
    if ttl is None:
        return _own_hold(earlier)
    return earlier.renew()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _callbacks(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
