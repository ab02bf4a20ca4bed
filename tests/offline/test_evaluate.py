"""streamml.offline.evaluate: packed CV equals fitting each split on its own; summaries."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import write_queries
from streamml.offline.baselines import SklearnLR
from streamml.data import cv_splits, load_queries
from streamml.offline.evaluate import METRICS, cross_validate, summarize


@pytest.fixture
def data(tmp_path):
    return load_queries(write_queries(tmp_path, n_queries=3, n_per_class=10), min_per_class=1)


def test_packed_cv_matches_one_fit_per_split(data):
    splits = cv_splits(data, n_folds=5, n_repeats=1)
    table = cross_validate(SklearnLR(C=0.1), data, splits)
    assert len(table) == 5 * 3 and list(table.columns) == ["split", "query_id", *METRICS]
    for k, (train, test) in enumerate(splits):
        learner = SklearnLR(C=0.1).fit(data.X[train], data.y[train], data.query[train])
        scores = learner.score(data.X[test], data.query[test])
        for q, query_id in enumerate(data.query_ids):
            m = data.query[test] == q
            expected = roc_auc_score(data.y[test][m], scores[m])
            got = table.query("split == @k and query_id == @query_id")["auc"].item()
            assert got == pytest.approx(expected)


def test_summarize_means_over_queries_and_spread_over_splits():
    table = pd.DataFrame(
        {"split": [0, 0, 1, 1], "query_id": ["a", "b", "a", "b"], **{m: [1.0, 0.5, 0.8, 0.7] for m in METRICS}}
    )
    metrics, per_query = summarize(table)
    assert metrics["auc"] == pytest.approx((0.9 + 0.6) / 2)
    assert metrics["auc.a"] == pytest.approx(0.9) and metrics["auc.b"] == pytest.approx(0.6)
    assert metrics["auc_std"] == pytest.approx(np.std([0.75, 0.75], ddof=1))
    assert per_query.set_index("query_id").loc["a", "auc_std"] == pytest.approx(np.std([1.0, 0.8], ddof=1))
