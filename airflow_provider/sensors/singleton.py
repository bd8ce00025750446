"""``SingletonSensor``: wait until a lock is free, without taking it.

Poke and reschedule modes look at the store from the worker; ``deferrable=True``
hands the waiting to ``SingletonTrigger``, which only observes. A lock that was
taken again between the trigger's event and the task's resumption sends the
task back to waiting. With ``limit=N``, "free" means fewer than N live holds: a
slot is open for a task that takes the name with the same limit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseSensorOperator, conf
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout, AirflowSkipException

from airflow_provider.hooks.singleton import SingletonHook
from singleton_integrations import validate_limit

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["SingletonSensor"]


class SingletonSensor(BaseSensorOperator):
    """Succeed once ``lock_name`` has no live holder (under ``limit=N``, fewer than N live holds).

    :param lock_name: the lock to watch (templated).
    :param singleton_conn_id: the connection naming the store.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param limit: succeed while fewer than this many holds of the name are live (the ``limit``
        the tasks that take the name use); 1, the default, waits until nobody holds it.

    The usual sensor arguments apply: ``mode``, ``poke_interval``, ``timeout``, ``soft_fail``.
    """

    template_fields: ClassVar[tuple[str, ...]] = ("lock_name",)
    ui_color: ClassVar[str] = "#e8d7f5"

    def __init__(
        self,
        *,
        lock_name: str,
        singleton_conn_id: str = SingletonHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poke_interval: float = 30.0,
        limit: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        self.lock_name = lock_name
        self.singleton_conn_id = singleton_conn_id
        self.deferrable = deferrable
        self.limit = validate_limit(limit)

    def poke(self, context: Context) -> bool:
        hook = SingletonHook(singleton_conn_id=self.singleton_conn_id)
        try:
            if self.limit > 1:
                return self._fewer_than_limit(hook)
            holder = hook.holder(self.lock_name)
        finally:
            hook.close()
        if holder is None:
            self.log.info("Lock %r is free", self.lock_name)
            return True
        self.log.info("Lock %r is held by %s", self.lock_name, holder.describe())
        return False

    def _fewer_than_limit(self, hook: SingletonHook) -> bool:
        holds = hook.holders(self.lock_name)
        if len(holds) < self.limit:
            self.log.info("Lock %r has a free slot: %d of %d held", self.lock_name, len(holds), self.limit)
            return True
        self.log.info("Lock %r is at its limit, %d of %d held: %s", self.lock_name, len(holds), self.limit,
                      "; ".join(hold.describe() for hold in holds))
        return False

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if self.poke(context):
            return None
        self._defer(time.time() + self.timeout)
        return None

    def execute_complete(self, context: Context, event: dict[str, Any]) -> None:
        """Resume after the trigger; the skip or failure is raised here so dag.test and the triggerer agree."""
        status = event.get("status")
        if status == "timeout":
            held = (f"at its limit, {event.get('held', self.limit)} of {self.limit} held: {event.get('holder')},"
                    if self.limit > 1 else f"held by {event.get('holder')}")
            message = f"lock {self.lock_name!r} was still {held} after {self.timeout:g} s"
            if self.soft_fail:
                raise AirflowSkipException(message)
            raise AirflowSensorTimeout(message)
        if status != "free":
            raise AirflowException(f"watching lock {self.lock_name!r} failed: {event.get('message', event)}")
        if not self.poke(context):  # taken again before we resumed
            self._defer(event.get("deadline"))

    def _defer(self, deadline: float | None) -> None:
        from airflow_provider.triggers.singleton import SingletonTrigger  # only when deferring: see the operator's

        self.defer(
            trigger=SingletonTrigger(lock_name=self.lock_name, singleton_conn_id=self.singleton_conn_id,
                                     poll_interval=self.poke_interval, deadline=deadline, limit=self.limit),
            method_name="execute_complete",
        )
