"""Health, readiness, metrics and the demo page."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response

from streamml.serve import metrics
from streamml.serve.deps import ServiceDep, UserAuth

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep):
    """503 while no head is loaded or when no request could reach the store; 200 ``ready``, or 200
    ``degraded`` when only some cluster slots are down: every instance shares the store, so a load
    balancer draining them all would turn an outage of some users into an outage of everyone."""
    if service.lifecycle.current is None:
        return JSONResponse({"status": "loading"}, 503)
    try:
        health = service.backend.health()
    except (service.backend.errors or ()) as err:
        return JSONResponse({"status": "backend unavailable", "detail": str(err)}, 503)
    return {**health, "model_version": service.lifecycle.current.version}


@router.get("/metrics", dependencies=[UserAuth])
async def prometheus():
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/demo", response_class=HTMLResponse, include_in_schema=False)
async def demo():
    return HTMLResponse(resources.files("streamml.serve").joinpath("static/demo.html").read_text())
