"""The FastAPI app mounted at ``/singleton`` on the api-server: the locks API and the page that calls it.

Authentication and authorization are Airflow's own: a bearer token from ``/auth/token``
or the UI's session cookie (``GetUserDep``), and the auth manager's rights on
connections: reading them to list locks, editing them to release one. Each lock is
listed, and released, only for a connection the user may read, or edit.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import ConnectionDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_connection
from airflow.models.log import Log
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from airflow_provider.plugins import _locks

__all__ = ["AUDIT_EVENT", "create_app"]

#: The audit log's event for a release from the page or the API (``/api/v2/eventLogs?event=...``).
AUDIT_EVENT = "singleton.force_release"

router = APIRouter()


class ReleaseBody(BaseModel):
    """Which lock to release, the fencing token it must still hold, and why (for the audit log)."""

    conn_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    fencing_token: int
    reason: str = Field(min_length=1, max_length=2000)


def _may(user: Any, method: str, conn_id: str) -> bool:
    details = ConnectionDetails(conn_id=conn_id)
    return bool(get_auth_manager().is_authorized_connection(method=method, details=details, user=user))


@router.get("/locks", dependencies=[Depends(requires_access_connection("GET"))])
def get_locks(
    user: GetUserDep,
    session: SessionDep,
    conn_id: str | None = Query(None, description="only this connection (any secrets backend)"),
    prefix: str = Query("", description="only names that start with this"),
) -> dict[str, Any]:
    """The live locks of every lock-store connection the user may read; an unreachable store is an error row."""
    connections = [(cid, conn) for cid, conn in _locks.lock_store_connections(session, conn_id)
                   if _may(user, "GET", cid)]
    if conn_id is not None and not connections:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"no read access to connection {conn_id!r}")
    rows = _locks.list_locks(connections, prefix)
    return {"locks": rows, "connections": [cid for cid, _ in connections], "total_entries": len(rows)}


@router.post("/locks/release", dependencies=[Depends(requires_access_connection("PUT"))])
def release_lock(body: ReleaseBody, user: GetUserDep, session: SessionDep) -> dict[str, Any]:
    """Release a lock only while its holder still has ``fencing_token``; 409 and nothing released otherwise."""
    if not _may(user, "PUT", body.conn_id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"no edit access to connection {body.conn_id!r}")
    ((_, conn),) = _locks.lock_store_connections(session, body.conn_id)
    if conn is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no connection {body.conn_id!r}")
    reason = body.reason.strip()
    if not reason:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "a reason is required")
    try:
        previous = _locks.force_release(body.conn_id, conn, body.name, body.fencing_token, reason)
    except _locks.ReleaseRefused as refused:
        raise HTTPException(status.HTTP_409_CONFLICT, {"message": str(refused), "current": refused.current}) from None
    except _locks.StoreUnavailable as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None
    except (ValueError, TypeError) as error:  # not a lock-store connection, or a bad name (no password in either)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
    name = user.get_name()
    session.add(Log(
        event=AUDIT_EVENT,
        owner=name,
        owner_display_name=name,
        extra=json.dumps({"conn_id": body.conn_id, "name": body.name, "fencing_token": body.fencing_token,
                          "reason": reason, "previous_holder": previous}),
    ))
    session.commit()
    return {"released": True, "conn_id": body.conn_id, "name": body.name, "previous_holder": previous}


def _page() -> str:
    return resources.files("airflow_provider.plugins").joinpath("locks.html").read_text(encoding="utf-8")


def create_app() -> FastAPI:
    """The app the plugin mounts: ``/api/v1/...`` for the API, ``/locks`` for the page."""
    app = FastAPI(
        title="Singleton locks",
        description="The live locks of the singleton-integrations provider's connections, and a guarded release. "
        "Authenticate as for Airflow's REST API (a bearer token from /auth/token, or the UI session).",
    )
    app.include_router(router, prefix="/api/v1")

    @app.get("/locks", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        # The page holds no data: it calls the API with the browser's session, which authorizes each call.
        return HTMLResponse(_page())

    return app
