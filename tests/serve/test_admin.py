"""The service's operator side (FastAPI TestClient): the bearer tokens, reload and rollback of
the served model, A/B buckets, and /readyz following SQLite's write lock."""

from __future__ import annotations

from fastapi.testclient import TestClient
from omegaconf import open_dict

from streamml.serve import events as events_mod
from streamml.serve.app import create_app
from tests.serve.serve_helpers import QUERY, rank, residuals, serve_cfg


def test_bearer_token_guards_everything_but_health(cfg, monkeypatch):
    monkeypatch.setenv("STREAMML_TOKEN", "s3cret")
    with TestClient(create_app(cfg)) as c:
        body = {"user": "a", "query": QUERY}
        for method, path, kw in [("post", "/v1/rank", {"json": body}), ("get", "/v1/users/a", {}),
                                 ("delete", "/v1/users/a", {}), ("get", "/metrics", {}),
                                 ("post", "/v1/feedback", {"json": {}}),
                                 ("post", "/v1/events/x/reward", {"json": {}}), ("get", "/v1/model", {})]:
            r = getattr(c, method)(path, **kw)
            assert r.status_code == 401, path
            r = getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}, **kw)
            assert r.status_code == 401, path
        assert c.post("/v1/rank", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        r = c.post("/v1/admin/rollback", headers={"Authorization": "Bearer s3cret"})  # the user token is not an admin's
        assert r.status_code == 403 and "STREAMML_ADMIN_TOKEN" in r.json()["detail"]


def test_reload_and_rollback_need_the_admin_token(cfg, monkeypatch):
    monkeypatch.setenv("STREAMML_TOKEN", "s3cret")
    monkeypatch.setenv("STREAMML_ADMIN_TOKEN", "adm1n")
    with TestClient(create_app(cfg)) as c:
        for headers in ({}, {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer wrong"}):
            for path in ("/v1/admin/rollback", "/v1/admin/reload"):
                r = c.post(path, headers=headers)
                assert r.status_code == 401 and "admin bearer token" in r.json()["detail"], (path, headers)
        r = c.post("/v1/admin/rollback", headers={"Authorization": "Bearer adm1n"})
        assert r.status_code == 409 and "no previous model" in r.json()["detail"]  # past the guard
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_reload_and_rollback(fresh, user, served_models):
    client = fresh
    _, _, (old_uri, new_uri) = served_models
    first = client.get("/v1/model").json()
    assert first["model_uri"] == new_uri  # the newest finished run by default
    client.post("/v1/feedback", json={"user": user, "query": QUERY, "item": 2, "label": "accepted", "event_id": user + "d1"})
    learned = residuals(client, user)
    ev = rank(client, user=user)

    r = client.post("/v1/admin/reload", json={"model": old_uri})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["model_uri"] == old_uri and info["previous_uri"] == new_uri and info["model_version"] != first["model_version"]
    assert rank(client, user)["model_version"] == info["model_version"]
    assert residuals(client, user) == {}  # residuals are per head: never reused across heads
    # a reward on an event ranked by the previous head applies to the current one
    out = client.post(f"/v1/events/{ev['event_id']}/reward", json={"rewards": [{"item": ev["items"][0]["item"], "label": "accepted"}]})
    assert out.json()["applied"] == 1

    r = client.post("/v1/admin/rollback")
    assert r.status_code == 200 and r.json()["model_uri"] == new_uri and r.json()["previous_uri"] == old_uri
    assert r.json()["model_version"] == first["model_version"]
    assert residuals(client, user) == learned  # the old head's residuals are where it left them


def test_a_bad_reload_keeps_the_current_model(fresh, user):
    client = fresh
    first = client.get("/v1/model").json()
    r = client.post("/v1/admin/reload", json={"model": "runs:/0123456789abcdef/model"})
    assert r.status_code == 422 and "the current one stays" in r.json()["detail"]
    assert client.get("/v1/model").json() == first
    assert rank(client, user)["model_version"] == first["model_version"]


def test_rollback_without_a_previous_model_is_409(cfg):
    with TestClient(create_app(cfg)) as c:
        r = c.post("/v1/admin/rollback")
        assert r.status_code == 409 and "no previous model" in r.json()["detail"]


def test_ab_buckets_are_stable_and_logged_on_every_event(served_models):
    cfg = serve_cfg(*served_models[:2], overrides=[
        "ab.buckets.main.share=0.5",
        "+ab.buckets.greedy={share: 0.5, explore: {_target_: streamml.online.policies.Greedy}}",
    ])
    with TestClient(create_app(cfg)) as c:
        seen = {}
        for u in range(40):
            out = rank(c, user=f"user{u}", k=2)
            seen[f"user{u}"] = out["bucket"]
            assert out["policy"] == ("Greedy()" if out["bucket"] == "greedy" else "EpsilonSlots(n_explore=2, slots='random')")
            assert rank(c, user=f"user{u}", k=2)["bucket"] == out["bucket"]
            assert c.get(f"/v1/users/user{u}").json()["bucket"] == out["bucket"]
        assert set(seen.values()) == {"main", "greedy"}
        assert events_mod.bucket_of("user3", [("main", 0.5), ("greedy", 0.5)], "streamml") == seen["user3"]


def test_readyz_on_sqlite_follows_the_write_lock(served_models, tmp_path):
    """/readyz answers 503 exactly while requests would fail: here another process holds the
    SQLite write lock past the busy timeout, so every rank (which logs its event) fails too."""
    import sqlite3

    cfg = serve_cfg(*served_models[:2], backend="sqlite")
    with open_dict(cfg):
        cfg.backend.path, cfg.backend.busy_timeout_s = str(tmp_path / "serve.db"), 0.2
    with TestClient(create_app(cfg)) as c:
        assert c.get("/readyz").json()["status"] == "ready"
        holder = sqlite3.connect(tmp_path / "serve.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "locked" in ready.json()["detail"]
            r = c.post("/v1/rank", json={"user": "a", "query": QUERY})
            assert r.status_code == 503 and "locked" in r.json()["detail"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.post("/v1/rank", json={"user": "a", "query": QUERY}).status_code == 200
