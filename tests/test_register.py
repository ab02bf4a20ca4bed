"""streamml.register: the step the README's serve example needs (``models:/streamml@champion``)."""

import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, compose_cfg
from streamml import register, tracking
from streamml.offline.baselines import SklearnLR


def log_model_run(query_dir, name="default") -> tuple[str, object, object]:
    from streamml.data import load_queries

    data = load_queries(query_dir, min_per_class=1)
    learner = SklearnLR().fit(data.X, data.y, data.query)
    with tracking.start_run(compose_cfg([f"name={name}"])) as run:
        tracking.log_model(learner, data.query_ids, 384)
    return run.info.run_id, data, learner


def test_the_alias_loads_the_newest_model_run_moves_with_a_new_registration_and_serves(mlflow_uri, query_dir):
    """One store for the whole story (creating an MLflow store and logging a model take seconds)."""
    first, data, _ = log_model_run(query_dir)
    with tracking.start_run(compose_cfg(["name=default"])):  # newer, but without a model: skipped
        pass
    assert register.register(tracking_uri=mlflow_uri) == ("1", "models:/streamml@champion")
    client = mlflow.MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    assert client.get_model_version_by_alias("streamml", "champion").run_id == first
    second, _, learner = log_model_run(query_dir)
    assert register.register(second, tracking_uri=mlflow_uri)[0] == "2"
    assert client.get_model_version_by_alias("streamml", "champion").run_id == second
    model = tracking.load_model("models:/streamml@champion", tracking_uri=mlflow_uri)
    scores = model.predict(pd.DataFrame({"query_id": data.frame.query_id, "embedding": list(data.X)}))
    np.testing.assert_allclose(scores, learner.score_rows(data.X, data.query), rtol=1e-6)
    pytest.importorskip("fastapi")
    from streamml.serve.model import load_head  # what `python -m streamml.serve model=models:/streamml@champion` loads

    head = load_head("models:/streamml@champion", mlflow_uri)
    assert head.query_ids == data.query_ids
    np.testing.assert_allclose(head.score(data.query_ids[0], data.X[:3]), learner.score_rows(data.X[:3], np.zeros(3, int)), rtol=1e-5)


def test_a_failure_exits_1_with_one_line_and_the_traceback_in_the_log(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = subprocess.run([sys.executable, "-m", "streamml.register", "0123abcd"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: no MLflow store at ")
    assert "Traceback" in (tmp_path / "outputs" / "register.log").read_text()
    assert not (tmp_path / "mlflow.db").exists()  # no empty store left behind


def test_an_unknown_run_or_a_run_without_a_model_is_named(mlflow_uri, query_dir):
    with tracking.start_run(compose_cfg(["name=default"])) as run:
        pass
    with pytest.raises(LookupError, match="logged no model"):
        register.register(run.info.run_id, tracking_uri=mlflow_uri)
    with pytest.raises(LookupError, match="not found"):
        register.register("0" * 32, tracking_uri=mlflow_uri)
    with pytest.raises(LookupError, match="no FINISHED run with a model"):
        register.register(tracking_uri=mlflow_uri)
