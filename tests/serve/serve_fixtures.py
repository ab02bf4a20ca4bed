"""Service fixtures (a pytest plugin, see the root conftest.py): a tiny catalog and two logged heads
in a private MLflow store. A plugin, not a tests/serve/conftest.py, which would shadow
tests/conftest.py for ``from conftest import``."""

from __future__ import annotations

import uuid

import mlflow
import pytest
import torch

from streamml import tracking
from streamml.data import load_queries
from streamml.offline.module import HeadLearner
from tests.serve.serve_helpers import app_client, serve_cfg, write_queries


def _fitted(data, seed: int) -> HeadLearner:
    """Random heads (training is not what is tested here)."""
    torch.manual_seed(seed)
    return HeadLearner.from_linear_weights(torch.randn(len(data.query_ids), data.X.shape[1]).numpy())


@pytest.fixture(scope="session")
def served_models(tmp_path_factory):
    """(items_dir, tracking_uri, [uri of run 0, uri of run 1]): run 1 is the newer."""
    root = tmp_path_factory.mktemp("serve")
    items_dir = write_queries(root / "queries", n_queries=3, n_per_class=20)
    data = load_queries(items_dir, min_per_class=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("default", artifact_location=str(root / "artifacts"))
    mlflow.set_experiment("default")
    uris = []
    for seed in (0, 1):
        with mlflow.start_run():
            tracking.log_model(_fitted(data, seed), data.query_ids, data.X.shape[1])
        run_id = mlflow.last_active_run().info.run_id
        uris.append(f"runs:/{run_id}/model")
    return items_dir, uri, uris


@pytest.fixture
def cfg(served_models):
    items_dir, tracking_uri, _ = served_models
    return serve_cfg(items_dir, tracking_uri)


@pytest.fixture
def fresh(served_models, tmp_path):
    """An app of this test alone on SQLite (it changes the served model)."""
    with app_client("sqlite", served_models, tmp_path) as c:
        yield c


@pytest.fixture
def user():
    """A user id of this test alone (the apps are shared within a module)."""
    return uuid.uuid4().hex
