"""Helpers of the service tests (a module of its own: ``conftest`` names clash across test folders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[2]


def write_queries(folder: Path, n_queries=3, n_per_class=8, dim=384, seed=0) -> Path:
    """Query files whose preference is a different random direction per query."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for q in range(n_queries):
        direction = rng.normal(size=dim)
        rows = []
        for i in range(2 * n_per_class):
            label = "accepted" if i < n_per_class else "rejected"
            x = rng.normal(size=dim) + (1.5 if label == "accepted" else -1.5) * direction / np.linalg.norm(direction)
            rows.append({"text": f"topic {q} sentence {i}", "label": label, "embedding": (x / np.linalg.norm(x)).tolist()})
        (folder / f"topic_{q}.json").write_text(json.dumps(rows))
    return folder


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

