"""The served head: what it is (user token), reload and rollback (admin token, :mod:`streamml.serve.deps`)."""

from __future__ import annotations

from fastapi import APIRouter

from streamml.serve import events, schemas
from streamml.serve.deps import AdminAuth, Service, ServiceDep, UserAuth

router = APIRouter(prefix="/v1", tags=["model"])


def _info(service: Service) -> schemas.ModelInfo:
    s, record = service.served(), service.backend.control.get() or {}
    return schemas.ModelInfo(model_version=s.version, model_uri=s.head.uri, previous_uri=record.get("previous"),
                             registry_version=s.registry_version, queries=sorted(s.queries))


async def _swap(service: Service, uri: str | None) -> schemas.ModelInfo:
    try:
        await service.load(uri, publish=True)
    except (LookupError, ValueError, OSError, ImportError) as err:
        raise events.ServeError(422, f"model {uri or '(latest run)'} cannot be served, the current one stays: {err}")
    except Exception as err:  # mlflow raises its own exception types for bad URIs
        if type(err).__module__.startswith("mlflow"):
            raise events.ServeError(422, f"model {uri or '(latest run)'} cannot be loaded, the current one stays: {err}")
        raise
    return _info(service)


@router.get("/model", response_model=schemas.ModelInfo, dependencies=[UserAuth])
async def model(service: ServiceDep):
    return _info(service)


@router.post("/admin/reload", response_model=schemas.ModelInfo, dependencies=[AdminAuth])
async def reload(service: ServiceDep, req: schemas.ReloadRequest | None = None):
    return await _swap(service, req.model if req else None)


@router.post("/admin/rollback", response_model=schemas.ModelInfo, dependencies=[AdminAuth])
async def rollback(service: ServiceDep):
    previous = (service.backend.control.get() or {}).get("previous")
    if not previous:
        raise events.ServeError(409, "there is no previous model to roll back to")
    return await _swap(service, previous)
