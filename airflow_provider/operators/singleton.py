"""``SingletonOperator``: run a callable under a lock, or guard a group of tasks with it.

Lock outcomes become native task states (``on_conflict``):

============================  =====================================================
``skip`` (default)            skipped; the log names the holder (deployment, DAG, run, task)
``fail``                      failed, no retries (``AirflowFailException``)
``retry``                     up_for_retry (``SingletonLockConflict``; retries apply)
``wait``                      deferred, up_for_reschedule or blocking, until free or
                              ``wait_timeout`` (then ``SingletonWaitTimeout``)
============================  =====================================================

An expired lock taken over is logged with its previous holder; a lock lost while the
callable ran fails the task (``SingletonLockLost``); SIGTERM, ``on_kill`` and
``execution_timeout`` release the lock before the task stops.

As a context manager, ``with SingletonOperator(task_id="guard", lock_name=...):`` makes
itself an Airflow setup task that acquires the lock and adds a teardown task
(``<task_id>_release``) that releases it, so the release runs even when a guarded
task fails. Every task inside the block renews the group's lease while it runs, so a
long group keeps the lock and a dead one loses it after one lease. The acquire task
passes only the lock name and fencing token through XCom (readable in the UI and
API); the owner token, which can release the lock, never leaves the store. The
release task reads the store's record and releases only if its fencing token is
still the group's, so it never frees a lock someone else took.

A mapped task's default lock name ends in ``[map_index]``: each map index is its own
lock. Pass ``lock_name`` to share one lock between all of them.

``limit=N`` lets up to N tasks hold the name at once, in any deployment (or cron job,
or Prefect flow) sharing the store: each holds a lease of its own, with its own
fencing token. Every ``on_conflict`` outcome applies when all N are held, and the log
names each holder; a deferred wait resumes on any holder's release.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import conf
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSkipException,
    AirflowTaskTerminated,
)

from airflow_provider._holders import (
    deployment_name,
    describe_conflict,
    describe_holder,
    holder_metadata,
    same_task_earlier_try,
)
from airflow_provider._stats import recording_stats
from airflow_provider.exceptions import SingletonLockConflict, SingletonLockLost, SingletonWaitTimeout
from airflow_provider.hooks.singleton import SingletonHook
from airflow_provider.operators._guarded_group import (
    XCOM_KEY,
    GuardedTaskLease,
    SingletonReleaseOperator,
    take_back_from_earlier_try,
)
from singleton_integrations import validate_limit

if TYPE_CHECKING:
    from airflow.sdk import Context

    from singleton_integrations import AcquireResult, LockRecord, Singleton

__all__ = ["DEFAULT_LOCK_NAME", "ON_CONFLICT", "XCOM_KEY", "SingletonOperator", "SingletonReleaseOperator",
           "check_choices", "deployment_name", "describe_holder"]

#: What a task does when another holder has the lock.
ON_CONFLICT = ("skip", "fail", "retry", "wait")
#: Unique within a DAG and the same in every deployment: the default lock name. A mapped
#: task instance adds its map index, so instances of one mapped task never skip each other.
DEFAULT_LOCK_NAME = (
    "{{ dag.dag_id }}.{{ task.task_id }}"
    "{% if ti.map_index is not none and ti.map_index >= 0 %}[{{ ti.map_index }}]{% endif %}"
)


#: on_conflict="fail" fails for good (AirflowFailException): said at parse time and in the task log.
_FAIL_IGNORES_RETRIES = ("{task_id}: on_conflict='fail' fails the task without retrying, so retries={retries} is "
                         "never used on a conflict; use on_conflict='retry' to retry while the lock is held")


def _warn_at_the_dag_file(message: str) -> None:
    """Warn at the DAG file's line that built the operator, past Airflow's and this provider's frames.

    Operators are built through Airflow's wrappers (``@dag``, ``@task``, default arguments),
    so a fixed ``stacklevel`` would name a line of Airflow's instead of the user's.
    """
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _OUR_SIDE:
        frame = frame.f_back
    registry = frame.f_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"), registry=registry)


#: Modules whose frames stand between a DAG file and the operator it builds.
_OUR_SIDE = frozenset({"airflow", "airflow_provider", "importlib", "functools", "contextlib"})


def _hold_for_group() -> None:
    """Placeholder callable: the task only acquires, and a release task frees the lock later."""


def _seconds(value: float | timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{what} must be a non-negative number of seconds or a timedelta, not {value!r}")
    return float(value)


def check_choices(options: Mapping[str, Any]) -> None:
    """Refuse a bad ``on_conflict``, ``mode`` or ``limit`` among an operator's arguments.

    Run when the DAG file is parsed: by the constructor, and by ``partial`` and
    ``@task.singleton`` for a mapped task, whose operator Airflow builds only when it runs.
    """
    on_conflict = options.get("on_conflict", "skip")
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, not {on_conflict!r}")
    mode = options.get("mode", "poke")
    if mode not in ("poke", "reschedule"):
        raise ValueError(f"mode must be 'poke' or 'reschedule', not {mode!r}")
    validate_limit(options.get("limit", 1))


class SingletonOperator(PythonOperator):
    """Run ``python_callable`` only while holding ``lock_name``, across every deployment sharing the store.

    :param lock_name: the lock (templated); defaults to ``"<dag_id>.<task_id>"``, plus ``"[<map_index>]"``
        for a mapped task instance (one lock per map index). A name you pass is shared by all map indexes.
    :param singleton_conn_id: the connection naming the store.
    :param python_callable: the work; it may accept a ``singleton`` argument (the held ``Singleton``,
        e.g. for its ``fencing_token``). Omit it when using the operator as a context manager; without a
        callable outside a ``with`` block, the task acquires and leaves the lock to a
        ``SingletonReleaseOperator(acquire_task_id=...)`` (or to its lease's end).
    :param on_conflict: ``skip``, ``fail``, ``retry`` or ``wait`` (see the module docstring).
    :param lock_expire_seconds: lease length; a crashed holder frees the lock after this long.
    :param auto_renew: renew the lease while the callable runs (a refused renewal fails the task).
    :param wait_timeout: with ``wait``, give up after this long (None waits without limit).
    :param poll_interval: with ``wait``, seconds between looks when the store cannot notify.
    :param deferrable: with ``wait``, free the worker slot by deferring to an observe-only trigger.
    :param mode: with ``wait`` and not deferrable: ``poke`` blocks in the worker, ``reschedule``
        frees the slot between looks (up_for_reschedule).
    :param lock_metadata: extra holder details shown in conflicts, e.g. ``{"team": "billing"}``
        (``deployment`` defaults to ``[singleton] deployment``, else ``[api] base_url``).
    :param min_hold_seconds: keep the lock at least this long after acquiring it, even once the task
        released it, so a late run of the same slot in another deployment skips (ShedLock's lockAtLeastFor).
        Judged by the store's clock. Template the lock name with the slot, e.g.
        ``"{{ dag.dag_id }}.load.{{ ds }}"``, to run each logical date once across deployments.
    :param limit: up to this many tasks (or other holders: cron jobs, Prefect flows, other deployments)
        may hold ``lock_name`` at once, each with its own lease and fencing token; ``on_conflict``
        applies when all of them are held. Needs a store that keeps several holds (every built-in one).
        Each attempt counts every live hold of the name, whatever limit its holder gave.
    """

    template_fields: ClassVar[tuple[str, ...]] = ("lock_name", *PythonOperator.template_fields)
    ui_color: ClassVar[str] = "#e8d7f5"

    def __init__(
        self,
        *,
        lock_name: str = DEFAULT_LOCK_NAME,
        singleton_conn_id: str = SingletonHook.default_conn_name,
        python_callable: Callable[..., Any] | None = None,
        on_conflict: str = "skip",
        lock_expire_seconds: float | None = 300.0,
        auto_renew: bool = True,
        wait_timeout: float | timedelta | None = None,
        poll_interval: float | timedelta = 5.0,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        mode: str = "poke",
        lock_metadata: Mapping[str, str] | None = None,
        min_hold_seconds: float | timedelta | None = None,
        limit: int = 1,
        **kwargs: Any,
    ) -> None:
        self._requested_task_id = kwargs.get("task_id")
        super().__init__(python_callable=python_callable or _hold_for_group, **kwargs)
        check_choices({"on_conflict": on_conflict, "mode": mode, "limit": limit})
        if auto_renew and lock_expire_seconds is None:
            raise ValueError("auto_renew needs a lock_expire_seconds: a lock that never expires has nothing to renew")
        if on_conflict == "fail" and self.retries:
            _warn_at_the_dag_file(_FAIL_IGNORES_RETRIES.format(task_id=self.task_id, retries=self.retries))
        self.lock_name = lock_name
        self.singleton_conn_id = singleton_conn_id
        self.on_conflict = on_conflict
        self.lock_expire_seconds = lock_expire_seconds
        self.auto_renew = auto_renew
        self.wait_timeout = _seconds(wait_timeout, "wait_timeout")
        self.poll_interval = _seconds(poll_interval, "poll_interval") or 5.0
        self.deferrable = deferrable
        self.mode = mode
        self.lock_metadata = dict(lock_metadata or {})
        self.min_hold_seconds = _seconds(min_hold_seconds, "min_hold_seconds") or None
        self.limit = limit
        self.release_task: SingletonReleaseOperator | None = None
        self._guarded_before: set[str] | None = None
        self._singleton: Singleton | None = None
        self._conflict_holder: str | None = None
        self._conflict_message: str | None = None
        self._conflict_holders: tuple[LockRecord, ...] = ()

    # -- construction helpers ----------------------------------------------------------

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """``BaseOperator.partial``, with this operator's arguments checked now rather than when a mapped instance runs."""
        check_choices(kwargs)
        return super().partial(**kwargs)

    @property
    def holds_for_group(self) -> bool:
        """True when this task only acquires and a release task frees the lock."""
        return self.python_callable is _hold_for_group

    @property
    def hook(self) -> SingletonHook:
        hook = self.__dict__.get("_hook")
        if hook is None:
            hook = self.__dict__["_hook"] = SingletonHook(singleton_conn_id=self.singleton_conn_id)
        return hook

    def __enter__(self) -> Any:
        """Become the setup (acquire) task and add the teardown (release) task around the block."""
        if not self.holds_for_group:
            raise ValueError(f"{self.task_id}: a SingletonOperator used with 'with' guards the tasks inside it; "
                             "do not pass python_callable")
        if self.release_task is None:
            label = self._requested_task_id or self.task_id
            self.release_task = SingletonReleaseOperator(
                task_id=f"{label}_release",
                acquire_task_id=self.task_id,
                singleton_conn_id=self.singleton_conn_id,
                lock_expire_seconds=self.lock_expire_seconds,
                dag=self.dag,
                task_group=self.task_group,
            )
            self.release_task.as_teardown(setups=self)
        self._guarded_before = set(self.dag.task_dict) if self.dag is not None else set()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        """Every task defined inside the block renews the group's lease while it runs."""
        result = super().__exit__(*exc)
        if self.dag is not None and self._guarded_before is not None:
            skip = {self.task_id, self.release_task.task_id if self.release_task else ""}
            guarded_ids = [task_id for task_id in self.dag.task_dict
                           if task_id not in self._guarded_before and task_id not in skip]
            for task_id in guarded_ids:
                GuardedTaskLease.attach(self.dag.task_dict[task_id], self.task_id, self.singleton_conn_id,
                                        self.lock_expire_seconds)
            if self.release_task is not None:
                self.release_task.guarded_task_ids = guarded_ids
        self._guarded_before = None
        return result

    # -- execution -------------------------------------------------------------------------

    @recording_stats
    def execute(self, context: Context) -> Any:
        deadline = self._deadline(context)
        acquired = self._try_acquire(context)
        if not acquired and self.on_conflict == "wait" and not self.deferrable and self.mode == "poke":
            # Said before the wait, as deferring and rescheduling say it: whom this task waits for.
            self.log.info("Waiting for lock %r: %s; waiting in this worker until a release", self.lock_name,
                          self._conflict_message)
            remaining = math.inf if deadline is None else max(deadline - time.time(), 0.0)
            acquired = self._try_acquire(context, wait=remaining)
        if acquired:
            return self._work(context)
        return self._on_conflict(context, deadline)

    @recording_stats
    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger: race for the lock, and wait again if someone else won."""
        status = event.get("status")
        if status == "timeout":
            held = (f"at its limit, {event.get('held', self.limit)} of {self.limit} held: {event.get('holder')},"
                    if self.limit > 1 else f"held by {event.get('holder')}")
            raise SingletonWaitTimeout(self.lock_name, event.get("holder"),
                                       f"lock {self.lock_name!r} was still {held} after waiting {self.wait_timeout:g} s",
                                       limit=self.limit)
        if status != "free":
            raise AirflowException(f"watching lock {self.lock_name!r} failed: {event.get('message', event)}")
        if event.get("observed_at"):
            self.log.info("The trigger saw lock %r free at %.3f; the task resumed %.3f s later", self.lock_name,
                          event["observed_at"], time.time() - float(event["observed_at"]))
        if self._try_acquire(context):
            return self._work(context)
        self.log.info("Lock %r was taken before this task could acquire it; waiting again", self.lock_name)
        return self._on_conflict(context, event.get("deadline"))

    def on_kill(self) -> None:
        """Release the lock at once: the supervisor kills the process a few seconds later."""
        self._release("the task was killed")

    # -- internals -------------------------------------------------------------------------

    def _deadline(self, context: Context) -> float | None:
        if self.on_conflict != "wait" or self.wait_timeout is None:
            return None
        start = datetime.now(timezone.utc)
        if self.mode == "reschedule" and not self.deferrable:
            start = context["ti"].get_first_reschedule_date(context) or start
        return start.timestamp() + self.wait_timeout

    def _try_acquire(self, context: Context, wait: float = 0.0) -> bool:
        """One attempt (or a blocking wait); remembers the hold, or the holder for the conflict message."""
        metadata = holder_metadata(context, self.lock_metadata)
        if self.holds_for_group:
            return self._acquire_for_group(context, metadata, wait)
        options: dict[str, Any] = {}
        if self.min_hold_seconds is not None:
            options["min_hold_seconds"] = self.min_hold_seconds
        singleton = self.hook.singleton(
            self.lock_name,
            lock_expire_seconds=self.lock_expire_seconds,
            auto_renew=self.auto_renew,
            metadata=metadata,
            release_on_sigterm=False,  # this operator's own handler releases, then stops the task
            limit=self.limit,
            **options,
        )
        singleton.on("expired", lambda message: self.log.warning("Expired lock taken over: %s", message))
        singleton.on("lost", lambda message: self.log.error("%s", message))
        singleton.on("error", lambda error: self.log.warning("Lock store error on %r: %s", self.lock_name, error))
        if singleton.lock(wait=wait or None):
            self._singleton = singleton
            self.log.info("Acquired lock %r (fencing token %s) on %s", self.lock_name, singleton.fencing_token,
                          self.hook.describe_store())  # no second lookup: the hook keeps its store URL
            return True
        self._note_conflict(singleton.last_holder, singleton.last_holders)
        return False

    def _note_conflict(self, holder: LockRecord | None, holders: tuple[LockRecord, ...]) -> None:
        """Remember whom a refused attempt saw: the holder, or every hold under ``limit``, in Airflow's terms."""
        ours = deployment_name()
        self._conflict_holder = describe_holder(holder, ours=ours)
        self._conflict_holders = holders
        self._conflict_message = describe_conflict(self.lock_name, holder, holders, self.limit, ours=ours)

    def _acquire_for_group(self, context: Context, metadata: dict[str, str], wait: float) -> bool:
        """Take the group's lease, waiting through the core's loop (the store's queue, woken by the release)."""
        lease = self.hook.lease(self.lock_name, lock_expire_seconds=self.lock_expire_seconds, metadata=metadata,
                                min_hold_seconds=self.min_hold_seconds, limit=self.limit)
        deadline = time.monotonic() + wait
        result = lease.take()
        earlier = self._earlier_try_hold(result, context)
        if earlier is not None:
            adopted = take_back_from_earlier_try(lease.persister, earlier, context, self.log,
                                                 self.lock_expire_seconds, limit=self.limit)
            if adopted is not None:
                self._hand_over(context, adopted)
                return True
            result = lease.take()  # it ended meanwhile: race for it as anyone would
        if not result.acquired and wait > 0:
            result = lease.take(wait=max(deadline - time.monotonic(), 0.0))
        if not result.acquired:
            self._note_conflict(result.record, result.holders)
            return False
        assert result.record is not None
        if result.expired is not None:
            self.log.warning("Expired lock taken over: lock %r held by %s had expired",
                             self.lock_name, result.expired.describe())
        self._hand_over(context, result.record)
        return True

    @staticmethod
    def _earlier_try_hold(result: AcquireResult, context: Context) -> LockRecord | None:
        """The hold an earlier try of this setup task left behind, among those a refused attempt saw."""
        if result.acquired:
            return None
        seen = result.holders or ((result.record,) if result.record is not None else ())
        return next((record for record in seen if same_task_earlier_try(record, context)), None)

    def _hand_over(self, context: Context, record: LockRecord) -> None:
        from airflow.sdk.log import mask_secret

        mask_secret(record.owner_token)  # the token releases the lock: keep it out of every log
        # Only what identifies the hold: XCom is readable in the UI and the API, and the owner
        # token would let any reader release the lock. The fencing token names this hold alone.
        # Under limit=N the guarded tasks and the teardown find this hold among the name's several.
        hold: dict[str, Any] = {"lock_name": record.name, "fencing_token": record.fencing_token}
        if self.limit > 1:
            hold["limit"] = self.limit
        context["ti"].xcom_push(key=XCOM_KEY, value=hold)
        until = record.expires_at.isoformat(timespec="seconds") if record.expires_at else "released"
        self.log.info("Acquired lock %r (fencing token %s) for the guarded tasks; held until %s or released by %s",
                      record.name, record.fencing_token, until,
                      self.release_task.task_id if self.release_task else "a SingletonReleaseOperator")

    def _on_conflict(self, context: Context, deadline: float | None) -> Any:
        holder = self._conflict_holder or "another process"
        message = self._conflict_message or f"lock {self.lock_name!r} is held by {holder}"
        holders, limit = self._conflict_holders, self.limit
        if self.on_conflict == "skip":
            raise AirflowSkipException(f"Skipping: {message}")
        if self.on_conflict == "fail":
            if self.retries:
                self.log.warning(_FAIL_IGNORES_RETRIES.format(task_id=self.task_id, retries=self.retries))
            raise AirflowFailException(f"Failing without retry: {message}")
        if self.on_conflict == "retry":
            raise SingletonLockConflict(self.lock_name, holder, message, holders=holders, limit=limit)
        if deadline is not None and time.time() >= deadline:
            raise SingletonWaitTimeout(self.lock_name, holder, f"{message} after waiting {self.wait_timeout:g} s",
                                       holders=holders, limit=limit)
        if self.deferrable:
            # Imported here: airflow.triggers.base costs every task process that parses this DAG file ~8 ms.
            from airflow_provider.triggers.singleton import SingletonTrigger

            self.log.info("Waiting for lock %r: %s; deferring", self.lock_name, message)
            self.defer(
                trigger=SingletonTrigger(lock_name=self.lock_name, singleton_conn_id=self.singleton_conn_id,
                                         poll_interval=self.poll_interval, deadline=deadline, limit=self.limit),
                method_name="execute_complete",
            )
        if self.mode == "reschedule":
            self.log.info("Waiting for lock %r: %s; rescheduling", self.lock_name, message)
            raise AirflowRescheduleException(datetime.now(timezone.utc) + timedelta(seconds=self.poll_interval))
        raise SingletonWaitTimeout(self.lock_name, holder, f"{message} after waiting {self.wait_timeout or 0:g} s",
                                   holders=holders, limit=limit)

    def _work(self, context: Context) -> Any:
        if self.holds_for_group:
            return None
        singleton = self._singleton
        assert singleton is not None
        context["singleton"] = singleton  # type: ignore[typeddict-unknown-key]  # callables may ask for it
        with self._sigterm_releases():
            try:
                result = super().execute(context)
            finally:
                self._release("the task ended")  # owner-checked: a lock taken over is left alone, and marked lost
        if singleton.lost:
            raise SingletonLockLost(
                self.lock_name,
                f"exclusivity on lock {self.lock_name!r} was lost while the task ran (the lease expired or was "
                f"taken over; renewal was refused); its work may have overlapped another holder's",
            )
        return result

    def _release(self, reason: str) -> bool:
        singleton = self._singleton
        if singleton is None or not singleton.held:
            return False
        try:
            released = singleton.release()
        except Exception as error:  # noqa: BLE001  (the lease still ends by itself: say so, do not mask the task's outcome)
            self.log.error("Releasing lock %r failed (%s): it frees itself when its lease ends", self.lock_name, error)
            return False
        if released:
            self.log.info("Released lock %r (%s)", self.lock_name, reason)
        return released

    @contextmanager
    def _sigterm_releases(self) -> Iterator[None]:
        """While the callable runs, SIGTERM releases the lock first, then stops the task."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            self._release("SIGTERM")
            if callable(previous):
                previous(signum, frame)  # the task runner's handler calls on_kill
            raise AirflowTaskTerminated(f"SIGTERM received; lock {self.lock_name!r} was released")

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
