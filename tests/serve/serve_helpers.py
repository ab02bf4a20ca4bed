"""Helpers of the service tests (a module of its own: ``conftest`` names clash across test folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

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

