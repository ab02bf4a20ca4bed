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
