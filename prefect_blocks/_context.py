"""What the current Prefect run is, for holder metadata and event related resources."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["RunInfo", "current_run", "prefect_handles_sigterm", "run_logger"]

_fallback_logger = logging.getLogger("prefect_blocks")


@dataclass(frozen=True)
class RunInfo:
    """The flow run and task run we are inside, if any (ids as strings)."""

    flow_run_id: str | None = None
    flow_run_name: str | None = None
    flow_name: str | None = None
    deployment_id: str | None = None
    deployment_name: str | None = None
    task_run_id: str | None = None
    task_run_name: str | None = None

    def metadata(self) -> dict[str, str]:
        """Holder metadata: who holds a lock shows up in every conflict message and in ``singleton list``."""
        fields = {
            "prefect_flow_run_id": self.flow_run_id,
            "prefect_flow_run_name": self.flow_run_name,
            "prefect_flow_name": self.flow_name,
            "prefect_deployment_id": self.deployment_id,
            "prefect_deployment_name": self.deployment_name,
            "prefect_task_run_id": self.task_run_id,
            "prefect_task_run_name": self.task_run_name,
        }
        return {key: value[:1024] for key, value in fields.items() if value}

    def related(self) -> list[dict[str, str]]:
        """The runs as related resources, attached explicitly so events sent from renewal threads keep them."""
        related = []
        if self.flow_run_id:
            resource = {"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}", "prefect.resource.role": "flow-run"}
            if self.flow_run_name:
                resource["prefect.resource.name"] = self.flow_run_name
            related.append(resource)
        if self.task_run_id:
            resource = {"prefect.resource.id": f"prefect.task-run.{self.task_run_id}", "prefect.resource.role": "task-run"}
            if self.task_run_name:
                resource["prefect.resource.name"] = self.task_run_name
            related.append(resource)
        if self.deployment_id:
            related.append({"prefect.resource.id": f"prefect.deployment.{self.deployment_id}", "prefect.resource.role": "deployment"})
        return related


def current_run() -> RunInfo:
    """The run context of the calling thread; empty outside flows and tasks."""
    from prefect.context import FlowRunContext, TaskRunContext

    flow_context = FlowRunContext.get()
    task_context = TaskRunContext.get()
    flow_run: Any = getattr(flow_context, "flow_run", None)
    flow: Any = getattr(flow_context, "flow", None)
    task_run: Any = getattr(task_context, "task_run", None)
    flow_run_id = getattr(flow_run, "id", None) or getattr(task_run, "flow_run_id", None)
    deployment_id = _text(getattr(flow_run, "deployment_id", None))
    return RunInfo(
        flow_run_id=_text(flow_run_id),
        flow_run_name=_text(getattr(flow_run, "name", None)),
        flow_name=_text(getattr(flow, "name", None)),
        deployment_id=deployment_id,
        deployment_name=_deployment_name(deployment_id, flow_run),
        task_run_id=_text(getattr(task_run, "id", None)),
        task_run_name=_text(getattr(task_run, "name", None)),
    )


_deployment_names: dict[str, str | None] = {}


def _deployment_name(deployment_id: str | None, flow_run: Any) -> str | None:
    """The deployment's name, once per process (a conflict message names it, not its UUID).

    The process that Prefect started for the run has it in its environment; else one API read.
    """
    if deployment_id is None:
        return None
    if deployment_id not in _deployment_names:
        from_environment = _started_for(flow_run)
        if from_environment is not None:
            _deployment_names[deployment_id] = from_environment
            return from_environment
        try:
            from prefect.runtime import deployment

            _deployment_names[deployment_id] = _text(deployment.name)
        except Exception:  # the name is for humans: never let it break locking
            _fallback_logger.debug("could not read the name of deployment %s", deployment_id, exc_info=True)
            return None
    return _deployment_names[deployment_id]


def _started_for(flow_run: Any) -> str | None:
    """The name of the deployment whose run this process was started for, when ``flow_run`` is that run.

    Served deployments, ``prefect.engine`` and workers set ``PREFECT__DEPLOYMENT_NAME`` in the
    run's process, and Prefect's run loggers read it under the same rule: a run of a deployment
    that is not a subflow. ``PREFECT__FLOW_RUN_ID``, where set, must name this run.
    """
    name = os.environ.get("PREFECT__DEPLOYMENT_NAME")
    if not name or getattr(flow_run, "parent_task_run_id", None) is not None:
        return None
    started_for = os.environ.get("PREFECT__FLOW_RUN_ID")
    if started_for and started_for != _text(getattr(flow_run, "id", None)):
        return None
    return name


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger (its lines show in the Prefect UI), or a plain one outside runs."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_logger


def prefect_handles_sigterm() -> bool:
    """Whether Prefect's SIGTERM bridge is installed: then ``TerminationSignal`` unwinds our
    context managers, and installing our own handler would hide Prefect's from its runner."""
    try:
        from prefect.utilities.engine import is_prefect_sigterm_handler_installed
    except ImportError:  # older Prefect 3: any flow run installs the bridge
        from prefect.context import FlowRunContext

        return FlowRunContext.get() is not None
    return is_prefect_sigterm_handler_installed()
