"""Helpers of the service tests (a module of its own: ``conftest`` names clash across test folders)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from streamml.serve.app import create_app
from tests.conftest import write_queries  # noqa: F401  (re-exported for the service tests)

REPO = Path(__file__).resolve().parents[2]


def serve_cfg(items_dir, tracking_uri, overrides=(), backend="memory"):
    """The service config as `python -m streamml.serve` composes it, on a test catalog and MLflow store."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("serve/default", overrides=[f"serve/backend@backend={backend}", *overrides])
    with open_dict(cfg):
        cfg.items_dir, cfg.tracking_uri = str(items_dir), tracking_uri
    return cfg


def vec(dim=384, seed=0) -> list[float]:
    x = np.random.default_rng(seed).normal(size=dim)
    return (x / np.linalg.norm(x)).tolist()


QUERY = "topic_0"  # a query of the catalog that serve_fixtures writes


def app_client(backend, served_models, tmp_path, redis_url=None):
    """A TestClient of the service on ``backend`` (its SQLite file under ``tmp_path``, its Redis
    keys under a prefix of its own), serving the newest of ``served_models``."""
    items_dir, tracking_uri, _ = served_models
    cfg = serve_cfg(items_dir, tracking_uri, backend=backend)
    with open_dict(cfg):
        if backend == "sqlite":
            cfg.backend.path = str(tmp_path / "serve.db")
        if backend == "redis":
            cfg.backend.url, cfg.backend.prefix = redis_url, f"app{uuid.uuid4().hex[:8]}"
    return TestClient(create_app(cfg))


def rank(client, user, k=3, **body):
    r = client.post("/v1/rank", json={"user": user, "query": QUERY, "k": k, **body})
    assert r.status_code == 200, r.text
    return r.json()


def residuals(client, user) -> dict[str, float]:
    r = client.get(f"/v1/users/{user}")
    assert r.status_code == 200, r.text
    return {q["query"]: q["residual_norm"] for q in r.json()["queries"]}
