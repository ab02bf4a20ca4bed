"""Request and response bodies of the service (pydantic), which are also its OpenAPI docs.

Shape checks that need the configuration (embedding length, candidate cap, ``k`` cap)
happen in :mod:`streamml.serve.events`, so the same limits apply to every entry point;
what pydantic checks here is what any request must satisfy: types, labels, finite floats.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

MAX_ID = 256  # characters of a user, query or client event id
# every integer the service takes fits int64 (item ids are numpy int64): a larger one is a 422, not an OverflowError
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID)] | Int64
# GET/DELETE of a user: the same ids as a string (an integer id 42 is the user "42")
UserQuery = Annotated[str, Query(min_length=1, max_length=MAX_ID, description="the user id, any accepted string")]
UserPath = Annotated[str, Path(min_length=1, max_length=MAX_ID, description="the user id; prefer ?user= for ids with '/'")]
QueryId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID)]
Label = Literal["accepted", "rejected"]
# NaN and inf are refused here: JSON parsers accept the literals NaN and Infinity
Vector = list[Annotated[float, Field(allow_inf_nan=False)]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RankRequest(_Body):
    """Rank candidates for a user and a query. Give at most one of ``items``,
    ``embeddings`` or ``texts``; none ranks every catalog item of the query."""

    user: UserId = Field(description="any string or integer; an unknown user is a cold start")
    query: QueryId
    k: int = Field(10, ge=1, le=2**31, description="how many items to show (at most limits.max_k)")
    items: list[Int64] | None = Field(None, description="catalog item ids of the query")
    embeddings: list[Vector] | None = Field(None, description="raw candidate embeddings")
    texts: list[str] | None = Field(None, description="raw candidate texts (needs the text extra)")

    @model_validator(mode="after")
    def _one_kind(self):
        given = [name for name in ("items", "embeddings", "texts") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of items, embeddings, texts; got {given}")
        return self


class Shown(BaseModel):
    item: int = Field(description="catalog item id, or for raw candidates their index in the request")
    position: int = Field(description="0 is the top")
    score: float
    propensity: float = Field(description="probability that the policy shows this item at this position")
    text: str | None = None


class RankResponse(BaseModel):
    event_id: str
    user: str
    query: str
    items: list[Shown]
    policy: str
    bucket: str
    model_version: str


class Reward(_Body):
    item: Int64 = Field(description="an item of the event, as returned by rank")
    label: Label


class RewardRequest(_Body):
    rewards: list[Reward] = Field(min_length=1)


class Outcome(BaseModel):
    item: int
    status: Literal["applied", "duplicate"]


class RewardResponse(BaseModel):
    event_id: str
    results: list[Outcome]
    applied: int
    duplicates: int


class FeedbackRequest(_Body):
    """Feedback from a caller that did not rank through the service."""

    user: UserId
    query: QueryId
    label: Label
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID)] = Field(
        description="the caller's own event id; a repeat is acknowledged and not applied again"
    )
    item: Int64 | None = Field(None, description="catalog item id")
    embedding: Vector | None = Field(None, description="raw embedding of an item outside the catalog")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.item is None) == (self.embedding is None):
            raise ValueError("give exactly one of item, embedding")
        return self


class FeedbackResponse(BaseModel):
    event_id: str
    status: Literal["applied", "duplicate"]


class QueryState(BaseModel):
    query: str
    residual_norm: float


class UserState(BaseModel):
    user: str
    model_version: str
    bucket: str
    queries: list[QueryState] = Field(description="queries with stored state; absent ones are at cold start")


class ReloadRequest(_Body):
    model: str | None = Field(None, description="MLflow model URI; null: the latest finished run")


class ModelInfo(BaseModel):
    model_version: str
    model_uri: str
    previous_uri: str | None = None
    registry_version: str | None = None  # served as a registry alias (models:/name@alias): the version it points at
    queries: list[str]
