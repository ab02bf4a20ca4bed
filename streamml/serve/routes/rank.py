"""Rank, reward, feedback, and the catalog's queries (the logic is :mod:`streamml.serve.events`)."""

from __future__ import annotations

from fastapi import APIRouter

from streamml.serve import events, schemas
from streamml.serve.deps import BackendDep, ServedDep, ServiceDep, UserAuth

router = APIRouter(prefix="/v1", dependencies=[UserAuth])


@router.post("/rank", response_model=schemas.RankResponse, tags=["rank"])
async def rank(req: schemas.RankRequest, service: ServiceDep, served: ServedDep, backend: BackendDep):
    bucket = service.bucket(str(req.user))
    policy, name = service.policies[bucket]
    return events.rank(served, req, service.limits, backend.events, policy, name, bucket, service.rng)


@router.post("/events/{event_id}/reward", response_model=schemas.RewardResponse, tags=["rank"])
async def reward(event_id: str, req: schemas.RewardRequest, service: ServiceDep, served: ServedDep, backend: BackendDep):
    return events.reward(served, event_id, req, service.limits, backend)


@router.post("/feedback", response_model=schemas.FeedbackResponse, tags=["rank"])
async def feedback(req: schemas.FeedbackRequest, service: ServiceDep, served: ServedDep, backend: BackendDep):
    return events.feedback(served, req, service.limits, backend)


@router.get("/queries", tags=["catalog"])
async def queries(served: ServedDep):
    return {"queries": sorted(served.queries)}
