"""See and forget a user.

The id travels as a query parameter: a path segment cannot carry every accepted id (``a/b``,
``..``, ``%2F`` are rewritten before routing). The path routes stay for the ids they can carry
(``{user:path}`` also takes ids with ``/``)."""

from __future__ import annotations

from fastapi import APIRouter

from streamml.serve import events, schemas
from streamml.serve.deps import BackendDep, ServedDep, ServiceDep, UserAuth

router = APIRouter(prefix="/v1/users", tags=["users"], dependencies=[UserAuth])


@router.get("", response_model=schemas.UserState)
async def get_user_by_query(user: schemas.UserQuery, service: ServiceDep, served: ServedDep):
    return events.user_state(served, user, service.bucket(user))


@router.delete("")
async def delete_user_by_query(user: schemas.UserQuery, served: ServedDep, backend: BackendDep):
    events.forget(served, user, backend.events)
    return {"user": user, "deleted": True}


@router.get("/{user:path}", response_model=schemas.UserState)
async def get_user(user: schemas.UserPath, service: ServiceDep, served: ServedDep):
    return events.user_state(served, user, service.bucket(user))


@router.delete("/{user:path}")
async def delete_user(user: schemas.UserPath, served: ServedDep, backend: BackendDep):
    events.forget(served, user, backend.events)
    return {"user": user, "deleted": True}
