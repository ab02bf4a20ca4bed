"""Shared fixtures: tiny query folders, the shared real data, and an isolated MLflow store."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_QUERIES = REPO.parent / "shared" / "data" / "queries"  # the problem owner's data; not in the repo


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


@pytest.fixture
def shared_queries() -> Path:
    """The real query folder beside the clone; tests that need it skip on a plain clone."""
    if not any(SHARED_QUERIES.glob("*.json")):
        pytest.skip(f"../shared/data/queries not found: {SHARED_QUERIES} (the problem owner's data, not shipped)")
    return SHARED_QUERIES


@pytest.fixture
def query_dir(tmp_path):
    return write_queries(tmp_path / "queries")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts (./mlruns) land in the temp dir too
    return uri


def compose_cfg(overrides=(), tiny=True, config="train"):
    """The training config as `python -m streamml.train` would build it (or another config of
    ``configs/`` built on it, such as ``loop/retrain``), made tiny."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides))
    if tiny:
        with open_dict(cfg):
            cfg.cv.n_folds, cfg.cv.n_repeats = 2, 1
            if "trainer" in cfg:
                cfg.trainer.max_epochs = 5
                cfg.trainer.enable_progress_bar = False
                cfg.trainer.accelerator = "cpu"
    return cfg
