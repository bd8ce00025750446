"""``@task.singleton``: a TaskFlow task that runs only while it holds its lock.

Registered as a task decorator in ``get_provider_info``; import ``singleton_task``
directly for typing or where ``task.singleton`` is not discovered.

    @task.singleton(lock_name="{{ dag.dag_id }}-load", on_conflict="skip")
    def load(singleton=None):
        ...  # singleton.fencing_token guards writes downstream
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from airflow_provider.operators.singleton import SingletonOperator, check_choices

if TYPE_CHECKING:
    from airflow.sdk.bases.decorator import TaskDecorator

__all__ = ["singleton_task"]


class _SingletonDecoratedOperator(DecoratedOperator, SingletonOperator):
    """The operator behind ``@task.singleton``: ``SingletonOperator`` with the callable's arguments captured."""

    template_fields: ClassVar[Sequence[str]] = ("lock_name", "templates_dict", "op_args", "op_kwargs")
    template_fields_renderers: ClassVar[dict[str, str]] = {"templates_dict": "json", "op_args": "py", "op_kwargs": "py"}
    custom_operator_name: ClassVar[str] = "@task.singleton"

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Any, op_kwargs: Any, **kwargs: Any) -> None:
        super().__init__(
            kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs},
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """After a deferred wait, handle the return value as ``execute`` does (assets in outlets)."""
        return self._handle_output(return_value=super().execute_complete(context, event))


def singleton_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """Wrap a function into a ``SingletonOperator`` task; keyword arguments are the operator's.

    :param python_callable: the function (when used without parentheses).
    :param multiple_outputs: unroll a returned dict into several XComs.
    """
    check_choices(kwargs)  # now: a mapped task's operator is built only when an instance runs
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_SingletonDecoratedOperator,
        **kwargs,
    )
