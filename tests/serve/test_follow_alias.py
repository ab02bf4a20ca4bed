"""The service follows a registry alias: move ``@champion`` in MLflow and it serves the new version, no restart."""

from __future__ import annotations

import mlflow
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from streamml.serve.app import create_app  # noqa: E402
from streamml.serve.model import load_head  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.serve.serve_helpers import serve_cfg  # noqa: E402


def _registered(tracking_uri: str, name: str, uris: list[str]) -> tuple[mlflow.MlflowClient, list[str]]:
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(name)
    versions = [client.create_model_version(name, uri, run_id=uri.split("/")[1]).version for uri in uris]
    return client, [str(v) for v in versions]


def test_moving_the_alias_reloads_the_service_without_a_restart(served_models):
    items_dir, tracking_uri, (old, new) = served_models
    name = "follow_alias"  # its own registered model: the session's store is shared with other tests
    client, (v_old, v_new) = _registered(tracking_uri, name, [old, new])
    client.set_registered_model_alias(name, "champion", v_old)
    alias = f"models:/{name}@champion"
    cfg = serve_cfg(items_dir, tracking_uri, [f"model={alias}", "reload.follow_alias_s=0.05"])
    heads = {uri: load_head(uri, tracking_uri).version for uri in (old, new)}
    assert heads[old] != heads[new]
    with TestClient(create_app(cfg)) as c:
        info = c.get("/v1/model").json()
        assert (info["model_uri"], info["registry_version"], info["model_version"]) == (alias, v_old, heads[old])
        client.set_registered_model_alias(name, "champion", v_new)
        info = wait_until(lambda: (i := c.get("/v1/model").json())["registry_version"] == v_new and i,
                          "the service serves the new champion", timeout_s=60, every_s=0.02)
        assert (info["model_uri"], info["model_version"]) == (alias, heads[new])
        ranked = c.post("/v1/rank", json={"user": "u", "query": "topic_0", "k": 3}).json()
        assert ranked["model_version"] == heads[new]  # requests are scored by the new head
        client.set_registered_model_alias(name, "champion", v_old)  # a rollback is followed the same way
        wait_until(lambda: c.get("/v1/model").json()["model_version"] == heads[old],
                   "the service serves the old champion again", timeout_s=60, every_s=0.02)


def test_follow_alias_s_0_keeps_the_loaded_version(served_models):
    items_dir, tracking_uri, (old, new) = served_models
    name = "follow_alias_off"
    client, (v_old, v_new) = _registered(tracking_uri, name, [old, new])
    client.set_registered_model_alias(name, "champion", v_old)
    cfg = serve_cfg(items_dir, tracking_uri, [f"model=models:/{name}@champion", "reload.follow_alias_s=0"])
    app = create_app(cfg)
    with TestClient(app) as c:
        client.set_registered_model_alias(name, "champion", v_new)
        lifecycle = app.state.lifecycle
        assert lifecycle.alias_moved() == f"models:/{name}@champion"  # the registry says it moved ...
        assert c.get("/v1/model").json()["registry_version"] == v_old  # ... and nothing polls it
        # an explicit reload of the alias picks up where it points now
        assert c.post("/v1/admin/reload", json={"model": f"models:/{name}@champion"}).json()["registry_version"] == v_new
