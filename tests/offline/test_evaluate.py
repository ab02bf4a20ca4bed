"""streamml.offline.evaluate: packed CV equals fitting each split on its own; summaries."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import write_queries
from streamml.data import cv_splits, load_queries, nested_splits
from streamml.offline.baselines import SklearnLR
from streamml.offline.evaluate import METRICS, cross_validate, evaluate, nested_cross_validate, summarize


@pytest.fixture
def data(tmp_path):
    return load_queries(write_queries(tmp_path, n_queries=3, n_per_class=10), min_per_class=1)


def test_packed_cv_matches_one_fit_per_split(data):
    splits = cv_splits(data, n_folds=5, n_repeats=1)
    table = cross_validate(SklearnLR(C=0.1), data, splits)
    assert len(table) == 5 * 3 and list(table.columns) == ["split", "query_id", *METRICS]
    for k, (train, test) in enumerate(splits):
        learner = SklearnLR(C=0.1).fit(data.X[train], data.y[train], data.query[train])
        scores = learner.score_rows(data.X[test], data.query[test])
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


def test_nested_cv_scores_inner_folds_on_outer_train_and_outer_folds_on_held_out_rows(data):
    outer, inner = nested_splits(data, n_folds=3, n_repeats=1, inner_folds=2)
    table = nested_cross_validate(SklearnLR(C=0.1), data, outer, inner)
    assert list(table.columns) == ["split", "inner", "query_id", *METRICS]
    assert len(table) == (3 + 3 * 2) * 3
    plain = cross_validate(SklearnLR(C=0.1), data, outer)
    held_out = table[table.inner == -1].drop(columns="inner").reset_index(drop=True)
    pd.testing.assert_frame_equal(held_out, plain)
    for k in range(3):
        for j, (train, test) in enumerate(inner[k]):
            scores = SklearnLR(C=0.1).fit(data.X[train], data.y[train], data.query[train]).score_rows(data.X[test], data.query[test])
            m = data.query[test] == 0
            got = table.query("split == @k and inner == @j and query_id == @data.query_ids[0]")["auc"].item()
            assert got == pytest.approx(roc_auc_score(data.y[test][m], scores[m]))


def test_summarize_nested_names_the_tuning_and_the_held_out_figures():
    rows = [(0, -1, 0.9), (0, 0, 0.7), (0, 1, 0.8), (1, -1, 0.6), (1, 0, 0.5), (1, 1, 0.4)]
    table = pd.DataFrame({"split": [r[0] for r in rows], "inner": [r[1] for r in rows], "query_id": "a",
                          **{m: [r[2] for r in rows] for m in METRICS}})
    metrics, _ = summarize(table)
    assert metrics["auc"] == pytest.approx(0.75)  # held-out rows only
    assert metrics["split_auc.0"] == pytest.approx(0.9) and metrics["split_auc.1"] == pytest.approx(0.6)
    assert metrics["split_tuning_auc.0"] == pytest.approx(0.75) and metrics["split_tuning_auc.1"] == pytest.approx(0.45)
    assert metrics["tuning_auc"] == pytest.approx(0.6)
    assert metrics["tuning_auc_std"] == pytest.approx(np.std([0.75, 0.45], ddof=1))


class RecordsBlocks(SklearnLR):
    def fit(self, X, y, groups, blocks=None, callbacks=()):
        self.pairs_ = set(zip(groups.tolist(), blocks.tolist()))
        return super().fit(X, y, groups)


def test_every_split_is_its_own_block_so_learners_share_only_within_a_split(data):
    learner = RecordsBlocks()
    evaluate(learner, data, n_folds=2, n_repeats=1, nested=True, inner_folds=2)
    n_splits = 2 + 2 * 2
    assert learner.pairs_ == {(k * 3 + q, k) for k in range(n_splits) for q in range(3)}
