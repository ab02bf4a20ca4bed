"""A schema-driven fuzzer (schemathesis) against the app's own OpenAPI spec, in process (ASGI):
no input, valid or not, gets a 5xx, and a 4xx leaves the user it names unchanged.

The app runs on the memory backend, so every 503 would be a bug, not a store outage."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the dev extra: pip install -e '.[dev]'")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from streamml.serve.app import create_app  # noqa: E402
from tests.serve.serve_helpers import serve_cfg  # noqa: E402


@pytest.fixture(scope="module")
def api(served_models):
    app = create_app(serve_cfg(*served_models[:2]))
    spec = schemathesis.openapi.from_asgi("/openapi.json", app)
    # valid and invalid inputs; deterministic, so a CI failure reproduces
    spec.config.generation.update(modes=list(schemathesis.GenerationMode), deterministic=True, max_examples=60)
    from schemathesis.python.asgi import get_client

    with get_client(app) as client:  # starts the app (its lifespan loads the model)
        EVENT_IDS.append(client.post("/v1/rank", json={"user": "fuzz", "query": "topic_0", "k": 5}).json()["event_id"])

    return spec


schema = schemathesis.pytest.from_fixture("api")
EVENT_IDS: list[str] = []
KINDS = ("items", "embeddings", "texts")


# Random strings rarely name a catalog query or a logged event, and the spec cannot say "at most one of
# items, embeddings, texts": without these hooks the checks behind them (item ids, rewards) go untested.
@schemathesis.hook
def flatmap_body(context, body):
    if not isinstance(body, dict) or "query" not in body:
        return st.just(body)
    given = [k for k in KINDS if k in body]
    return st.builds(lambda query, keep: {k: v for k, v in {**body, "query": query}.items() if k not in KINDS or k == keep},
                     st.sampled_from([body["query"], "topic_0"]), st.sampled_from(given or [None]))


@schemathesis.hook
def flatmap_path_parameters(context, params):
    if isinstance(params, dict) and "event_id" in params and EVENT_IDS:
        return st.sampled_from([params, {**params, "event_id": EVENT_IDS[0]}])
    return st.just(params)


def _user_of(case) -> str | None:
    body = case.body if isinstance(case.body, dict) else {}
    user = body.get("user")
    return str(user) if isinstance(user, (str, int)) and not isinstance(user, bool) and str(user) else None


def _client(case):
    from schemathesis.python.asgi import get_client

    return get_client(case.operation.app)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_5xx_and_a_4xx_changes_nothing(case):
    user = _user_of(case)
    with _client(case) as client:
        before = client.get("/v1/users", params={"user": user}).json() if user else None
        response = case.call(session=client)
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
        if user and 400 <= response.status_code < 500:
            after = client.get("/v1/users", params={"user": user}).json()
            assert after == before, f"a {response.status_code} changed the state of user {json.dumps(user)}"
