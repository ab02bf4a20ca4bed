"""The HTTP app end to end in one process (FastAPI TestClient): every user-facing endpoint,
every bad-input case, the reward window, duplicates (tokens, reload and rollback: test_admin.py)."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import open_dict

from streamml.serve import events as events_mod
from streamml.serve.app import create_app
from streamml.serve.schemas import MAX_ID
from tests.serve.serve_helpers import QUERY, app_client, rank, residuals, serve_cfg, vec


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def client(request, served_models, tmp_path_factory):
    """One app per backend for the module: every test uses users of its own (``user``)."""
    url = None
    if request.param == "redis":
        url = f"redis://127.0.0.1:{request.getfixturevalue('redis_server').port}/0"
    with app_client(request.param, served_models, tmp_path_factory.mktemp("app"), url) as c:
        yield c


def make_client(cfg, **overrides):
    with open_dict(cfg):
        for key, value in overrides.items():
            node, *path = key.split(".")
            target = cfg
            for part in [node, *path][:-1]:
                target = target[part]
            target[[node, *path][-1]] = value
    return TestClient(create_app(cfg))


def metric(client, name: str, labels: str = "") -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------- rank
def test_rank_returns_event_scores_propensities_model_and_policy(client, user):
    out = rank(client, user, k=4)
    assert len(out["event_id"]) in (32, 36) and int(out["event_id"], 16) >= 0  # 36 on Redis: + the user's slot
    assert out["user"] == user and out["query"] == QUERY
    assert [s["position"] for s in out["items"]] == [0, 1, 2, 3]
    assert all(0 < s["propensity"] <= 1 for s in out["items"])
    assert all(s["text"].startswith("topic 0 sentence") for s in out["items"])
    assert out["policy"].startswith("EpsilonSlots") and out["bucket"] == "main"
    assert out["model_version"] == client.get("/v1/model").json()["model_version"]
    assert len({s["item"] for s in out["items"]}) == 4


def test_rank_explicit_items_and_raw_embeddings(client, user):
    items = [s["item"] for s in rank(client, user, k=5)["items"]]
    out = rank(client, user, k=2, items=items[:3])
    assert {s["item"] for s in out["items"]} <= set(items[:3]) and len(out["items"]) == 2
    out = rank(client, user, k=10, embeddings=[vec(seed=1), vec(seed=2)])  # k is capped by the candidates
    assert sorted(s["item"] for s in out["items"]) == [0, 1] and all(s["text"] is None for s in out["items"])


def test_unknown_user_is_a_cold_start_in_head_order(client, user, served_models):
    assert residuals(client, "nobody") == {}
    greedy = serve_cfg(*served_models[:2], overrides=["explore=greedy"])
    with TestClient(create_app(greedy)) as c:
        out = rank(c, user="nobody", k=16)
        scores = [s["score"] for s in out["items"]]
        assert scores == sorted(scores, reverse=True) and out["policy"] == "Greedy()"
        assert all(s["propensity"] == 1.0 for s in out["items"])


# ---------------------------------------------------------------- reward
def test_reward_applies_once_and_the_next_rank_reflects_it(client, user):
    ev = rank(client, user, k=3)
    item = ev["items"][2]["item"]
    before = {s["item"]: s["score"] for s in rank(client, user, k=40)["items"]}
    applied = metric(client, "streamml_updates_applied_total", '{source="reward"}')
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": item, "label": "accepted"}]})
    assert r.status_code == 200 and r.json()["applied"] == 1 and r.json()["results"] == [{"item": item, "status": "applied"}]
    after = {s["item"]: s["score"] for s in rank(client, user, k=40)["items"]}
    assert after[item] > before[item]  # visible on the very next request
    state = residuals(client, user)
    # the same reward again: acknowledged, not applied
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": item, "label": "rejected"}]})
    assert r.status_code == 200 and r.json() == {"event_id": ev["event_id"], "results": [{"item": item, "status": "duplicate"}],
                                                 "applied": 0, "duplicates": 1}
    assert residuals(client, user) == state
    assert metric(client, "streamml_updates_applied_total", '{source="reward"}') == applied + 1



@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_experiments_rule_serves_and_learns_on_a_durable_store(backend, served_models, tmp_path, request):
    """rule=window keeps int32 ids, float32 coefficients, a Gram matrix and a head weight per key."""
    items_dir, tracking_uri, _ = served_models
    cfg = serve_cfg(items_dir, tracking_uri, overrides=["rule=window", "rule.head_var=1.0"], backend=backend)
    with open_dict(cfg):
        if backend == "sqlite":
            cfg.backend.path = str(tmp_path / "serve.db")
        else:
            cfg.backend.url = f"redis://127.0.0.1:{request.getfixturevalue('redis_server').port}/0"
            cfg.backend.prefix = f"win{uuid.uuid4().hex[:8]}"
    with TestClient(create_app(cfg)) as c:
        user = uuid.uuid4().hex
        ev = rank(c, user, k=3)
        item = ev["items"][2]["item"]
        before = {s["item"]: s["score"] for s in rank(c, user, k=40)["items"]}
        r = c.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": item, "label": "accepted"}]})
        assert r.status_code == 200 and r.json()["applied"] == 1
        assert {s["item"]: s["score"] for s in rank(c, user, k=40)["items"]}[item] > before[item]
        learner = c.app.state.lifecycle.current.learner
        assert type(learner.rule).__name__ == "WindowMAP" and learner.rule.head_var == 1.0
        stored = learner.store.get_many([(user, QUERY)])
        assert np.count_nonzero(stored["window"]) == 1 and stored["window"][0, 0] > 0  # one accepted event
        assert stored["head_weight"][0] != 0 and residuals(c, user)[QUERY] > 0

def test_reward_of_several_items_and_a_duplicate_inside_one_request(client, user):
    ev = rank(client, user, k=3)
    a, b = ev["items"][0]["item"], ev["items"][1]["item"]
    body = {"rewards": [{"item": a, "label": "accepted"}, {"item": b, "label": "rejected"}, {"item": a, "label": "accepted"}]}
    out = client.post(f"/v1/events/{ev['event_id']}/reward", json=body).json()
    assert [x["status"] for x in out["results"]] == ["applied", "applied", "duplicate"]


def test_a_reward_on_raw_embeddings_is_learned(client, user):
    x = [vec(seed=1), vec(seed=2)]
    ev = rank(client, user, k=2, embeddings=x)
    before = {s["item"]: s["score"] for s in rank(client, user, k=2, embeddings=x)["items"]}
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": 0, "label": "accepted"}]})
    assert r.status_code == 200 and r.json()["applied"] == 1
    assert residuals(client, user)[QUERY] > 0
    after = {s["item"]: s["score"] for s in rank(client, user, k=2, embeddings=x)["items"]}
    assert after[0] > before[0]  # the accepted vector scores higher on the next request


def test_a_learner_without_learn_vector_refuses_raw_rewards_with_501(client, user, monkeypatch):
    served = client.app.state.lifecycle.current

    class NoVectors:  # the learner as one without learn_vector would be (interfaces.md §2)
        def __init__(self, learner):
            self._learner = learner

        def __getattr__(self, name):
            if name == "learn_vector":
                raise AttributeError(name)
            return getattr(self._learner, name)

    ev = rank(client, user, k=2, embeddings=[vec(seed=1), vec(seed=2)])
    monkeypatch.setattr(served, "learner", NoVectors(served.learner))
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": 0, "label": "accepted"}]})
    assert r.status_code == 501 and "learn_vector" in r.json()["detail"]
    body = {"user": user, "query": QUERY, "embedding": vec(seed=3), "label": "accepted", "event_id": user}
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 501 and "learn_vector" in r.json()["detail"]
    assert residuals(client, user) == {}


def test_late_reward_is_refused_with_410_and_changes_nothing(client, user, monkeypatch):
    ev = rank(client, user, k=2)
    late = metric(client, "streamml_late_rewards_total")
    now = events_mod.time.time()

    class Clock:
        @staticmethod
        def time():
            return now + 601  # the default window is 600 s

    monkeypatch.setattr(events_mod, "time", Clock)
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": ev["items"][0]["item"], "label": "accepted"}]})
    assert r.status_code == 410 and "600 s" in r.json()["detail"]
    assert residuals(client, user) == {}
    assert metric(client, "streamml_late_rewards_total") == late + 1


@pytest.mark.parametrize("body, status, message", [
    ({"rewards": [{"item": 10_000, "label": "accepted"}]}, 422, "was not shown"),
    ({"rewards": [{"item": "SHOWN", "label": "liked"}]}, 422, "accepted"),
    ({"rewards": []}, 422, "at least 1"),
    ({"rewards": [{"item": "SHOWN"}]}, 422, "label"),
])
def test_bad_rewards_are_4xx_and_apply_nothing(client, user, body, status, message):
    ev = rank(client, user, k=2)
    text = json.dumps(body).replace('"SHOWN"', str(ev["items"][0]["item"]))
    # a valid reward next to the bad one is not applied either
    bad = json.loads(text)
    if bad["rewards"] and "label" in bad["rewards"][0] and bad["rewards"][0]["label"] in ("accepted",):
        bad["rewards"].insert(0, {"item": ev["items"][1]["item"], "label": "accepted"})
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json=bad)
    assert r.status_code == status and message in r.text
    assert residuals(client, user) == {}


def test_out_of_range_integers_in_rewards_and_feedback_are_422(client, user):
    ev = rank(client, user, k=2)
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": 2**63, "label": "accepted"}]})
    assert r.status_code == 422 and "less than or equal to 9223372036854775807" in r.text
    body = {"user": user, "query": QUERY, "item": -(2**63) - 1, "label": "accepted", "event_id": user}
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 422 and "greater than or equal to" in r.text
    assert residuals(client, user) == {}


@pytest.mark.parametrize("rule", ["pointwise", "laplace"])
def test_thompson_serves_through_policy_scores(served_models, rule, user):
    """``explore=thompson`` ranks posterior draws (``policy_scores``, as the simulator does): with
    a rule that keeps a posterior the propensities are Monte Carlo estimates; without one, Thompson
    gets the scores as its one draw and shows the greedy slate."""
    cfg = serve_cfg(*served_models[:2], overrides=["explore=thompson", f"rule={rule}"])
    with TestClient(create_app(cfg)) as c:
        out = rank(c, user, k=5)
        assert out["policy"] == "Thompson(n_samples=100)" and len(out["items"]) == 5
        props = [s["propensity"] for s in out["items"]]
        assert all(0.01 <= p <= 1 for p in props)
        if rule == "pointwise":
            assert props == [1.0] * 5 and [s["score"] for s in out["items"]] == sorted((s["score"] for s in out["items"]), reverse=True)
        else:  # a cold user's posterior is wide: the draws disagree on some positions
            assert min(props) < 1.0
        raw = rank(c, user, k=2, embeddings=[vec(seed=1), vec(seed=2), vec(seed=3)])
        assert len(raw["items"]) == 2 and all(0 < s["propensity"] <= 1 for s in raw["items"])
        r = c.post(f"/v1/events/{out['event_id']}/reward", json={"rewards": [{"item": out["items"][0]["item"], "label": "accepted"}]})
        assert r.status_code == 200 and r.json()["applied"] == 1


def test_unknown_event_is_404(client, user):
    r = client.post("/v1/events/nope/reward", json={"rewards": [{"item": 0, "label": "accepted"}]})
    assert r.status_code == 404 and "unknown or expired event 'nope'" in r.json()["detail"]


# ---------------------------------------------------------------- bad rank input
def _rank_cases():
    short, nan, inf = vec()[:10], vec(), vec()
    nan[3], inf[5] = float("nan"), float("inf")
    return [
        ({"embeddings": [vec(), short]}, 422, "embeddings[1] has 10 floats, expected 384"),
        ({"embeddings": [nan]}, 422, "finite number"),
        ({"embeddings": [inf]}, 422, "finite number"),
        ({"embeddings": [[1e39] * 384]}, 422, "overflows float32"),
        ({"query": "weather"}, 404, "unknown query 'weather'"),
        ({"items": [0, 99_999]}, 404, "unknown item 99999"),
        ({"items": [40]}, 404, "unknown item 40 for query 'topic_0'"),  # an item of another query
        ({"items": [0, 0]}, 422, "item 0 is given twice"),
        ({"items": []}, 422, "the candidate list is empty"),
        ({"embeddings": []}, 422, "the candidate list is empty"),
        ({"items": [0], "embeddings": [vec()]}, 422, "at most one of items, embeddings, texts"),
        ({"k": 0}, 422, "greater than or equal to 1"),
        ({"k": 101}, 422, "k=101 is over the limit of 100"),
        ({"user": ""}, 422, "user"),
        ({"user": 1.5}, 422, "user"),
        ({"colour": "red"}, 422, "Extra inputs are not permitted"),
        ({"items": [9223372036854775808]}, 422, "less than or equal to 9223372036854775807"),  # was an OverflowError, 500
        ({"items": [-9223372036854775809]}, 422, "greater than or equal to -9223372036854775808"),
        ({"user": 2**64}, 422, "user"),
        ({"k": 10**30}, 422, "k"),
    ]


@pytest.mark.parametrize("body, status, message", _rank_cases())
def test_bad_rank_requests_are_4xx_and_log_no_event(client, user, body, status, message):
    events_before = metric(client, "streamml_rank_events_total", '{bucket="main"}')
    r = client.post("/v1/rank", content=json.dumps({"user": user, "query": QUERY, "k": 3, **body}),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.text
    assert metric(client, "streamml_rank_events_total", '{bucket="main"}') == events_before


def test_malformed_json_and_oversize_body(cfg):
    with make_client(cfg, **{"limits.max_body_bytes": 2000, "limits.max_candidates": 2}) as c:
        r = c.post("/v1/rank", content=b'{"user": "a", "query": ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON decode error" in r.text
        r = c.post("/v1/rank", json={"user": "a", "query": QUERY, "embeddings": [vec()]})  # ~8 KB
        assert r.status_code == 413 and "over the limit of 2000 bytes" in r.json()["detail"]

        def chunks():  # no content-length: the limit applies to what arrives
            yield b'{"user": "a", "query": "topic_0", "texts": ["'
            for _ in range(10):
                yield b"x" * 500
            yield b'"]}'

        r = c.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/rank", json={"user": "a", "query": QUERY, "items": [0, 1, 2]})
        assert r.status_code == 422 and "3 candidates is over the limit of 2" in r.json()["detail"]


# ---------------------------------------------------------------- feedback
def test_feedback_is_idempotent_on_the_client_event_id(client, user):
    body = {"user": user, "query": QUERY, "item": 3, "label": "accepted", "event_id": user + "client-1"}
    assert client.post("/v1/feedback", json=body).json() == {"event_id": user + "client-1", "status": "applied"}
    state = residuals(client, user)
    assert list(state) == [QUERY] and state[QUERY] > 0
    assert client.post("/v1/feedback", json={**body, "label": "rejected"}).json()["status"] == "duplicate"
    assert residuals(client, user) == state
    assert client.post("/v1/feedback", json={**body, "event_id": user + "client-2"}).json()["status"] == "applied"


def test_a_feedback_event_id_is_per_user_on_every_backend(client, user):
    """User B reusing user A's event id is B's first feedback: applied, never dropped as A's duplicate."""
    other = user + "-b"
    body = {"user": user, "query": QUERY, "item": 3, "label": "accepted", "event_id": "shared-id"}
    assert client.post("/v1/feedback", json=body).json()["status"] == "applied"
    assert client.post("/v1/feedback", json={**body, "user": other}).json()["status"] == "applied"
    assert residuals(client, other) == residuals(client, user) and residuals(client, other)[QUERY] > 0
    assert client.post("/v1/feedback", json={**body, "user": other}).json()["status"] == "duplicate"


@pytest.mark.parametrize("change, status, message", [
    ({"item": 999}, 404, "unknown item 999"),
    ({"query": "weather"}, 404, "unknown query"),
    ({"label": "maybe"}, 422, "accepted"),
    ({"item": None}, 422, "exactly one of item, embedding"),
    ({"embedding": [0.0] * 384}, 422, "exactly one of item, embedding"),
    ({"item": None, "embedding": [0.0] * 3}, 422, "embedding[0] has 3 floats"),
    ({"event_id": ""}, 422, "event_id"),
])
def test_bad_feedback_is_4xx_and_changes_nothing(client, user, change, status, message):
    body = {"user": user, "query": QUERY, "item": 3, "label": "accepted", "event_id": user + "c-9", **change}
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == status and message in r.text
    assert residuals(client, user) == {}
    ok = {"user": user, "query": QUERY, "item": 3, "label": "accepted", "event_id": user + "c-9"}
    assert client.post("/v1/feedback", json=ok).json()["status"] == "applied"  # the id was not used up


# ---------------------------------------------------------------- users
def test_get_and_delete_a_user(client, user):
    cold = [s["score"] for s in rank(client, user=user, k=16, items=list(range(16)))["items"]]
    client.post("/v1/feedback", json={"user": user, "query": QUERY, "item": 5, "label": "rejected", "event_id": user + "x"})
    client.post("/v1/feedback", json={"user": user, "query": "topic_1", "item": 50, "label": "accepted", "event_id": user + "y"})
    body = client.get(f"/v1/users/{user}").json()
    assert sorted(q["query"] for q in body["queries"]) == [QUERY, "topic_1"] and body["bucket"] == "main"
    assert client.delete(f"/v1/users/{user}").json() == {"user": user, "deleted": True}
    assert residuals(client, user) == {}
    after = rank(client, user=user, k=16, items=list(range(16)))["items"]
    assert sorted(s["score"] for s in after) == sorted(cold)  # back to the head's scores
    assert client.delete("/v1/users/never-seen").status_code == 200


def test_an_item_the_user_just_rejected_is_not_shown_again_within_the_window(client, user):
    """Neither an exploration slot nor a greedy one shows a reject of the reward window; another
    user still sees the item, and forgetting the user forgets the rejects too."""
    ev = rank(client, user, k=5)
    by_reward = ev["items"][0]["item"]
    r = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": by_reward, "label": "rejected"}]})
    assert r.status_code == 200 and r.json()["applied"] == 1
    by_feedback = ev["items"][1]["item"]
    body = {"user": user, "query": QUERY, "item": by_feedback, "label": "rejected", "event_id": user + "rej"}
    assert client.post("/v1/feedback", json=body).json()["status"] == "applied"
    for _ in range(15):  # 2 of 5 slots explore 35 candidates: 15 slates would show each item ~3 times
        out = rank(client, user, k=5)
        assert {by_reward, by_feedback}.isdisjoint(s["item"] for s in out["items"])
        assert all(0 < s["propensity"] <= 1 for s in out["items"])
    other = next(i for i in range(40) if i not in (by_reward, by_feedback))
    shown = [s["item"] for s in rank(client, user, k=3, items=[by_reward, by_feedback, other])["items"]]
    assert shown[0] == other and sorted(shown[1:]) == sorted([by_reward, by_feedback])  # only when nothing else is left
    assert by_reward in {s["item"] for s in rank(client, user + "-other", k=40)["items"]}
    assert client.delete("/v1/users", params={"user": user}).status_code == 200
    assert {by_reward, by_feedback} <= {s["item"] for s in rank(client, user, k=40)["items"]}


def test_integer_and_string_user_ids_are_one_user(client, user):
    client.post("/v1/feedback", json={"user": 42, "query": QUERY, "item": 1, "label": "accepted", "event_id": user + "i"})
    assert list(residuals(client, "42")) == [QUERY]


# ---------------------------------------------------------------- ops, token, pages
def test_health_ready_metrics_docs_and_demo(client, user):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    rank(client, user)
    text = client.get("/metrics").text
    for name in ("streamml_request_seconds_bucket", "streamml_updates_applied", "streamml_duplicates",
                 "streamml_late_rewards_total", "streamml_store_errors_total", "streamml_rank_events_total"):
        assert name in text
    assert 'endpoint="/v1/rank"' in text
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/rank", "/v1/events/{event_id}/reward", "/v1/feedback", "/v1/users/{user}", "/v1/admin/reload",
                 "/v1/admin/rollback", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    page = client.get("/")
    assert page.status_code == 200 and "<title>streamml" in page.text
    assert client.get("/v1/queries").json() == {"queries": ["topic_0", "topic_1", "topic_2"]}


def test_rank_raw_texts_through_the_embedder(client, user, monkeypatch):
    import streamml.embed

    seen = []

    def fake_embed(texts):  # the real model is tested in tests/test_embed.py (slow)
        seen.extend(texts)
        return np.array([vec(seed=i) for i in range(len(texts))], np.float32)

    monkeypatch.setattr(streamml.embed, "embed_texts", fake_embed)
    out = rank(client, user, k=2, texts=["a wildfire", "an election"])
    assert seen == ["a wildfire", "an election"]
    assert sorted(s["item"] for s in out["items"]) == [0, 1]
    assert {s["text"] for s in out["items"]} == {"a wildfire", "an election"}


# ---------------------------------------------------------------- any accepted user id can be seen and forgotten
ID_CHARS = st.characters(codec="utf-8")  # every character JSON and UTF-8 can carry (no lone surrogates)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.one_of(
    st.text(ID_CHARS, min_size=1, max_size=MAX_ID),
    st.sampled_from(["a/b", "/", "//x/", ".", "..", "../x", "a%2Fb", "?x=1#y", "ü/ß/ℤ", "x" * MAX_ID, " ", "\x00"]),
))
def test_any_accepted_user_id_round_trips_through_get_and_delete(client, user):
    """A user id that rank and feedback accept can be read and forgotten: ``?user=`` carries
    any of them, where a path segment cannot (``/``, ``..``, ``%2F`` are rewritten before routing)."""
    body = {"user": user, "query": QUERY, "item": 3, "label": "accepted", "event_id": uuid.uuid4().hex}
    assert client.post("/v1/feedback", json=body).json()["status"] == "applied"
    got = client.get("/v1/users", params={"user": user})
    assert got.status_code == 200, got.text
    assert got.json()["user"] == user and [q["query"] for q in got.json()["queries"]] == [QUERY]
    gone = client.delete("/v1/users", params={"user": user})
    assert gone.status_code == 200 and gone.json() == {"user": user, "deleted": True}
    assert client.get("/v1/users", params={"user": user}).json()["queries"] == []


def test_the_user_path_route_carries_slashes_and_refuses_what_it_cannot(client):
    user = f"team/{uuid.uuid4().hex}/ü"
    body = {"user": user, "query": QUERY, "item": 3, "label": "accepted", "event_id": user}
    assert client.post("/v1/feedback", json=body).json()["status"] == "applied"
    path = "/v1/users/" + quote(user, safe="")  # a%2Fb: the server decodes it to a/b before routing
    assert client.get(path).json()["user"] == user and client.get(path).json()["queries"] != []
    assert client.delete(path).json() == {"user": user, "deleted": True}
    assert client.get("/v1/users", params={"user": user}).json()["queries"] == []
    too_long = client.get("/v1/users", params={"user": "x" * (MAX_ID + 1)})
    assert too_long.status_code == 422 and "256" in too_long.text
    assert client.get("/v1/users", params={"user": ""}).status_code == 422
    assert client.get("/v1/users").status_code == 422  # no id: refused, not "every user"
