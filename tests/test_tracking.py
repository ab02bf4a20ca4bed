"""streamml.tracking: params, FAILED runs, and the pyfunc model's input checks."""

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg
from streamml import tracking
from streamml.offline.baselines import SklearnLR


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
    np.testing.assert_allclose(scorer.predict(None, frame), [learner.score(X[:1], [1])[0], learner.score(X[1:2], [0])[0]])
    with pytest.raises(ValueError, match="unknown query_id 'weather'"):
        scorer.predict(None, frame.assign(query_id=["weather", "news"]))
    with pytest.raises(ValueError, match="needs a 'embedding' column"):
        scorer.predict(None, frame[["query_id"]])
    with pytest.raises(ValueError, match="4 floats each; got shape \\(2, 3\\)"):
        scorer.predict(None, frame.assign(embedding=[[0.0] * 3] * 2))
