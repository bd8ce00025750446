"""The holder's deployment name: from the environment Prefect gives the run's process, else one API read (issue 22)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prefect import flow, get_client
from prefect.client.schemas.objects import FlowRun

from prefect_blocks import _context


@flow
def deployed() -> None:
    pass


@dataclass
class Deployed:
    name: str
    run: FlowRun


@pytest.fixture
def deployed_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployed]:
    """A flow run of a real deployment on the test server; the process's cache of names is empty."""
    monkeypatch.setattr(_context, "_deployment_names", {})
    monkeypatch.delenv("PREFECT__DEPLOYMENT_NAME", raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    name = f"context-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(deployed)
        deployment_id = client.create_deployment(flow_id=flow_id, name=name)
        yield Deployed(name, client.create_flow_run_from_deployment(deployment_id))


def name_of(run: FlowRun) -> str | None:
    return _context._deployment_name(str(run.deployment_id), run)


def test_the_name_prefect_put_in_the_environment_needs_no_api_read(deployed_run: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT__DEPLOYMENT_NAME", "as-started")
    assert name_of(deployed_run.run) == "as-started"  # the saved one is deployed_run.name: no read was made
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(deployed_run.run.id))  # a worker's run process names its run too
    monkeypatch.setattr(_context, "_deployment_names", {})
    assert name_of(deployed_run.run) == "as-started"


def test_without_it_the_name_is_read_from_the_api(deployed_run: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(deployed_run.run.id))  # how prefect.runtime finds the run outside it
    assert name_of(deployed_run.run) == deployed_run.name


def test_the_environment_of_another_run_or_a_subflow_is_not_trusted(deployed_run: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    run = deployed_run.run
    monkeypatch.setenv("PREFECT__DEPLOYMENT_NAME", "someone-else")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(uuid.uuid4()))
    assert _context._started_for(run) is None
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(run.id))
    assert _context._started_for(run) == "someone-else"
    assert _context._started_for(run.model_copy(update={"parent_task_run_id": uuid.uuid4()})) is None
    monkeypatch.setattr(_context, "_deployment_names", {})
    monkeypatch.delenv("PREFECT__DEPLOYMENT_NAME")
    assert name_of(run) == deployed_run.name
