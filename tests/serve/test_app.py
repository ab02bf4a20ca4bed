"""The HTTP app: every endpoint, bad input, the token, the demo page (TestClient, in-memory backend)."""

from fastapi.testclient import TestClient

from serve_helpers import vec
from streamml.serve.app import create_app


def test_smoke(cfg):
    with TestClient(create_app(cfg)) as client:
        r = client.post("/v1/rank", json={"user": "u", "query": "topic_0", "k": 3})
        print(r.json())
        assert r.status_code == 200
        ev = r.json()["event_id"]
        item = r.json()["items"][0]["item"]
        r = client.post(f"/v1/events/{ev}/reward", json={"rewards": [{"item": item, "label": "accepted"}]})
        print(r.json())
        r = client.get("/v1/users/u")
        print(r.json())
