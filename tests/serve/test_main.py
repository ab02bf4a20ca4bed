"""``python -m streamml.serve``: the config composes, and ``command=load_items`` fills the catalog."""

from __future__ import annotations

from omegaconf import open_dict

from streamml.serve.__main__ import load_items
from streamml.serve.backend import SQLiteBackend
from tests.serve.serve_helpers import serve_cfg


def test_default_config_serves_sqlite_and_load_items_fills_its_catalog(served_models, tmp_path, capsys):
    items_dir, tracking_uri, _ = served_models
    cfg = serve_cfg(items_dir, tracking_uri, backend="sqlite", overrides=["command=load_items"])
    assert cfg.backend._target_ == "streamml.serve.backend.SQLiteBackend" and cfg.workers == 1
    assert cfg.model is None and cfg.experiment == "default"
    with open_dict(cfg):
        cfg.backend.path = str(tmp_path / "serve.db")
    assert load_items(cfg) == 120
    assert "loaded 120 items of 3 queries" in capsys.readouterr().out
    assert SQLiteBackend(tmp_path / "serve.db", checkpoint_interval_s=0).catalog.queries() == ["topic_0", "topic_1", "topic_2"]


def test_redis_config_swaps_only_the_backend(served_models):
    cfg = serve_cfg(*served_models[:2], backend="redis")
    assert cfg.backend._target_ == "streamml.serve.backend.RedisBackend" and cfg.backend.timeout_s == 0.5
    assert cfg.online._target_ == "streamml.online.ResidualLearner"


def test_serve_refuses_a_taken_port_before_loading_anything(served_models, monkeypatch):
    import socket

    import pytest

    import streamml.serve.lifecycle
    from streamml.serve.__main__ import serve

    monkeypatch.setattr(streamml.serve.lifecycle, "bootstrap", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = serve_cfg(*served_models[:2], overrides=[f"port={taken.getsockname()[1]}"])
        with pytest.raises(SystemExit, match=f"cannot serve on 127.0.0.1:{taken.getsockname()[1]}: Address already in use"):
            serve(cfg)


def test_serve_refuses_a_uri_without_a_model_before_publishing_it(served_models, monkeypatch):
    import pytest

    import streamml.serve.lifecycle
    from streamml.serve.__main__ import ModelNotFound, serve

    monkeypatch.setattr(streamml.serve.lifecycle, "bootstrap", lambda *a, **k: pytest.fail("the bad URI was published"))
    items_dir, tracking_uri, uris = served_models
    run_id = uris[0].split("/")[1]
    for uri, cause in [("runs:/0123456789abcdef/model", "Run with id=0123456789abcdef not found"),
                       (f"runs:/{run_id}/no_model_here", "Failed to download artifacts"),
                       ("models:/nope@champion", "Registered Model with name=nope not found")]:
        cfg = serve_cfg(items_dir, tracking_uri, overrides=[f"model={uri}", "port=0"])
        with pytest.raises(ModelNotFound, match=f"^no MLflow model at {uri} in {tracking_uri}: {cause}"):
            serve(cfg)


def test_the_cli_tells_a_bad_model_uri_in_one_line_and_keeps_the_traceback_in_its_log(served_models, tmp_path):
    import os
    import subprocess
    import sys

    from tests.serve.serve_helpers import REPO

    items_dir, tracking_uri, _ = served_models
    out = subprocess.run([sys.executable, "-m", "streamml.serve", "model=models:/nope@champion", f"tracking_uri={tracking_uri}",
                          f"items_dir={items_dir}", f"backend.path={tmp_path / 'serve.db'}", "port=0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines() == [
        f"error: no MLflow model at models:/nope@champion in {tracking_uri}: Registered Model with name=nope not found "
        "(register one: python -m streamml.register RUN_ID --alias ALIAS) (traceback in outputs/serve.log)"]
    assert "Traceback" in (tmp_path / "outputs" / "serve.log").read_text()
    assert not (tmp_path / "serve.db").exists()  # failed before the backend was opened, so nothing was published
