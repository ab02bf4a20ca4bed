"""What the routes share, declared once as ``Annotated[..., Depends(...)]`` aliases.

:class:`Service` holds one worker's wiring (backend, model lifecycle, policies, limits,
tokens), built by :func:`streamml.serve.app.create_app` and kept in ``app.state.service``.
Routes take ``ServiceDep``, ``BackendDep`` or ``ServedDep`` as typed parameters and guard
themselves with ``UserAuth`` (the user token) or ``AdminAuth`` (the admin token) in their
router's dependencies: no closures, no globals.

Tokens: with ``STREAMML_TOKEN`` (``auth.token_env``) set, every route but the health checks
and the static pages needs ``Authorization: Bearer <token>``. Reload and rollback change what
every user is served, so they need the admin token (``auth.admin_token_env``,
``STREAMML_ADMIN_TOKEN``): the user token never grants them. With a user token and no admin
token they are refused (403); with neither (a local run) everything is open.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import Depends, Header, Request
from starlette.exceptions import HTTPException

from streamml.serve import events
from streamml.serve.backend import Backend
from streamml.serve.lifecycle import Lifecycle, Served

__all__ = ["Service", "ServiceDep", "BackendDep", "ServedDep", "UserAuth", "AdminAuth"]


@dataclass
class Service:
    """One worker's service: everything a request needs besides its body."""

    backend: Backend
    lifecycle: Lifecycle
    limits: events.Limits
    policies: dict[str, tuple[object, str]]  # bucket -> (policy, its name)
    shares: list[tuple[str, float]]  # bucket -> share of the users
    salt: str
    token: str | None
    admin_token: str | None
    gc_freeze: bool = True
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    swap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def bucket(self, user: str) -> str:
        return events.bucket_of(user, self.shares, self.salt)

    def served(self) -> Served:
        if self.lifecycle.current is None:
            raise events.ServeError(503, "no model loaded yet")
        return self.lifecycle.current

    async def load(self, uri: str | None, publish: bool) -> dict | None:
        """Load and check a head off the event loop, swap it in, and (``publish``) tell the other workers."""
        async with self.swap_lock:
            prepared = await asyncio.to_thread(self.lifecycle.prepare, uri)
            self.lifecycle.activate(prepared)
            if self.gc_freeze:
                gc.freeze()
            return self.lifecycle.publish(prepared.head.uri) if publish else None


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_backend(service: ServiceDep) -> Backend:
    return service.backend


def get_served(service: ServiceDep) -> Served:
    """The bundle (head, learner, catalog) this request uses throughout, even if a reload swaps it meanwhile."""
    return service.served()


BackendDep = Annotated[Backend, Depends(get_backend)]
ServedDep = Annotated[Served, Depends(get_served)]


def _check(expected: str, authorization: str | None, what: str) -> None:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, f"missing or wrong {what}", headers={"WWW-Authenticate": "Bearer"})


# async: a plain ``def`` dependency would run in FastAPI's thread pool, one thread hand-off per request
async def user_auth(service: ServiceDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    if service.token is not None:
        _check(service.token, authorization, "bearer token")


async def admin_auth(service: ServiceDep, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    if service.admin_token is not None:
        _check(service.admin_token, authorization, "admin bearer token")
    elif service.token is not None:
        raise HTTPException(403, "reload and rollback need the admin token: set STREAMML_ADMIN_TOKEN (auth.admin_token_env) "
                                 "for the service and send it as the bearer token; the user token does not grant them")


UserAuth = Depends(user_auth)
AdminAuth = Depends(admin_auth)
