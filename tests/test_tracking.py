"""streamml.tracking: params, FAILED runs, run names, the experiment a fresh store shows,
the pyfunc model (input checks, signature, where it is listed, serving) and load_model."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import REPO, compose_cfg
from streamml import tracking
from streamml.offline.baselines import SklearnLR
from tests.helpers import free_port, wait_until_answering


def test_flatten_nested_config():
    assert tracking._flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": "1", "a.c.d": "None", "e": "[1, 2]"}


def test_a_run_that_raises_ends_failed_with_its_config_logged(mlflow_uri):
    cfg = compose_cfg()
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.start_run(cfg, tags={"data_fingerprint": "abc"}) as run:
            raise RuntimeError("boom")
    logged = mlflow.MlflowClient(mlflow_uri).get_run(run.info.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.params["cv.n_folds"] == "2" and logged.data.tags["data_fingerprint"] == "abc"
    assert "git_commit" in logged.data.tags


def test_query_scorer_scores_and_names_bad_input():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 4)).astype("float32"), np.tile([0, 1], 10)
    learner = SklearnLR().fit(X, y, np.repeat([0, 1], 10))
    scorer = tracking.QueryScorer(learner, ["news", "sport"], embedding_dim=4)
    frame = pd.DataFrame({"query_id": ["sport", "news"], "embedding": [X[0].tolist(), X[1].tolist()]})
    np.testing.assert_allclose(scorer.predict(None, frame), [learner.score_rows(X[:1], [1])[0], learner.score_rows(X[1:2], [0])[0]])
    with pytest.raises(ValueError, match="unknown query_id 'weather'"):
        scorer.predict(None, frame.assign(query_id=["weather", "news"]))
    with pytest.raises(ValueError, match="needs a 'embedding' column"):
        scorer.predict(None, frame[["query_id"]])
    with pytest.raises(ValueError, match="4 floats each; got shape \\(2, 3\\)"):
        scorer.predict(None, frame.assign(embedding=[[0.0] * 3] * 2))


@pytest.fixture
def hydra_overrides():
    """Sets HydraConfig as `python -m streamml.train <overrides>` would; yields a setter."""
    def set_overrides(overrides):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            HydraConfig.instance().set_config(compose("train", overrides=overrides, return_hydra_config=True))
    yield set_overrides
    HydraConfig.instance().cfg = None


def test_run_names_carry_the_overrides_the_base_name_does_not_say(hydra_overrides):
    assert tracking.run_name_with_overrides("linear-ranknet") == "linear-ranknet"  # outside Hydra
    hydra_overrides(["+experiment=linear_ranknet", "learner=linear", "learner.optimizer.weight_decay=0.1",
                     "data.dir=/home/me/shared/data/queries", "trainer=cpu"])
    assert tracking.run_name_with_overrides("linear-ranknet") == (
        "linear-ranknet[optimizer.weight_decay=0.1,data.dir=…/queries,trainer=cpu]")
    # an Optuna trial: full-precision floats, its study and number; the params keep the full values
    hydra_overrides(["learner.optimizer.lr=0.012345678901234", "learner.optimizer.weight_decay=1.23456789e-05",
                     "trainer.max_epochs=87", "++optuna.study=offline_heads", "++optuna.trial=12"])
    assert tracking.run_name_with_overrides("linear-ranknet") == (
        "linear-ranknet[optimizer.lr=0.0123,optimizer.weight_decay=1.23e-05,trainer.max_epochs=87,optuna.trial=12]")
    hydra_overrides([f"cv.seed={'9' * 400}"])
    name = tracking.run_name_with_overrides("linear-ranknet")
    assert len(name) == tracking.MAX_RUN_NAME and name.endswith("…]")


def test_a_fresh_store_shows_the_project_experiment_and_no_empty_default(mlflow_uri):
    for name in ("linear_ranknet", "mlp_ranknet"):
        with tracking.start_run(compose_cfg([f"name={name}"])):
            pass
    client = mlflow.MlflowClient(mlflow_uri)
    assert [e.name for e in client.search_experiments(order_by=["name"])] == ["linear_ranknet", "mlp_ranknet"]
    assert client.get_experiment("0").name == "linear_ranknet"


def test_a_default_experiment_with_runs_is_kept(mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run(experiment_id="0"):
        pass
    with tracking.start_run(compose_cfg(["name=mine"])):
        pass
    names = {e.name for e in mlflow.MlflowClient(mlflow_uri).search_experiments()}
    assert names == {"Default", "mine"}


def log_tiny_model(query_dir):
    from streamml.data import load_queries

    data = load_queries(query_dir, min_per_class=1)
    learner = SklearnLR().fit(data.X, data.y, data.query)
    example = pd.DataFrame({"query_id": [data.query_ids[q] for q in data.query[:2]], "embedding": data.X[:2].tolist()})
    with tracking.start_run(compose_cfg(["name=models"])) as run:
        tracking.log_model(learner, data.query_ids, 384, input_example=example)
    return run.info.run_id, data, learner


def test_the_model_has_a_signature_an_example_and_is_listed_with_the_run(mlflow_uri, query_dir):
    run_id, data, learner = log_tiny_model(query_dir)
    client = mlflow.MlflowClient(mlflow_uri)
    assert "model" in {a.path for a in client.list_artifacts(run_id)}  # the run's artifact list
    assert {"model/MLmodel", "model/input_example.json"} <= {a.path for a in client.list_artifacts(run_id, "model")}
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.inputs.input_names() == ["query_id", "embedding"]
    assert [mlflow.get_logged_model(m.model_id).name for m in client.search_logged_models(["0"])] == ["model"]
    rows = pd.DataFrame({"query_id": data.frame.query_id, "embedding": list(data.X)})
    scores = tracking.load_model(f"runs:/{run_id}/model").predict(rows)
    np.testing.assert_allclose(scores, learner.score_rows(data.X, data.query), rtol=1e-6)


def test_load_model_names_the_store_it_searched_and_creates_none(mlflow_uri, tmp_path, monkeypatch, query_dir):
    run_id, _, _ = log_tiny_model(query_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    with pytest.raises(FileNotFoundError, match=f"no MLflow store at {elsewhere / 'mlflow.db'} .*set MLFLOW_TRACKING_URI="):
        tracking.load_model(f"runs:/{run_id}/model")
    assert list(elsewhere.iterdir()) == []
    with pytest.raises(LookupError, match=f"run 0123abc not found in the MLflow store {mlflow_uri}; .*MLFLOW_TRACKING_URI"):
        tracking.load_model("runs:/0123abc/model", tracking_uri=mlflow_uri)
    assert tracking.load_model(f"runs:/{run_id}/model", tracking_uri=mlflow_uri).metadata.run_id == run_id  # the run asked for
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_documented_request(mlflow_uri, query_dir, tmp_path):
    run_id, data, learner = log_tiny_model(query_dir)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"), start_new_session=True)
    try:
        wait_until_answering(server, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log")
        # the request the README documents
        body = {"dataframe_split": {"columns": ["query_id", "embedding"],
                                    "data": [[data.query_ids[1], data.X[0].tolist()], [data.query_ids[0], data.X[1].tolist()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        expected = learner.score_rows(data.X[:2], np.array([1, 0]))
        np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
