"""Contract tests that every baseline learner must pass (fit/score per group)."""

import pickle

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from streamml.offline.baselines import RiverStack, SklearnLR, feature_dicts, river_pipeline

D = 16

LEARNERS = {
    "sklearn_lr": lambda: SklearnLR(),
    "river_stack": lambda: RiverStack(seed=0),
}


@pytest.fixture(params=list(LEARNERS), ids=list(LEARNERS))
def make_learner(request):
    return LEARNERS[request.param]


def make_group(rng, n, direction):
    """n items (half accepted) whose label shifts the embedding along ``direction``."""
    y = np.arange(n) % 2
    X = rng.normal(size=(n, D)) + 1.5 * np.outer(2 * y - 1, direction)
    return X.astype(np.float32), y


def two_groups(seed, n=60):
    """Groups 3 and 8 with orthogonal signal directions, so neither can borrow from the other."""
    rng = np.random.default_rng(seed)
    Xa, ya = make_group(rng, n, np.eye(D)[0])
    Xb, yb = make_group(rng, n, np.eye(D)[1])
    X = np.concatenate([Xa, Xb])
    y = np.concatenate([ya, yb])
    groups = np.repeat([3, 8], n)
    return X, y, groups


@pytest.fixture(scope="module")
def train():
    return two_groups(seed=0)


def test_ranks_held_out_positives_above_negatives(make_learner, train):
    X_test, y_test, g_test = two_groups(seed=1)
    s = make_learner().fit(*train).score_rows(X_test, g_test)
    for g in (3, 8):
        m = g_test == g
        assert roc_auc_score(y_test[m], s[m]) > 0.9


def test_groups_are_independent(make_learner, train):
    X, y, groups = train
    flipped = np.where(groups == 8, 1 - y, y)
    a = groups == 3
    s1 = make_learner().fit(X, y, groups).score_rows(X[a], groups[a])
    s2 = make_learner().fit(X, flipped, groups).score_rows(X[a], groups[a])
    np.testing.assert_array_equal(s1, s2)


def test_group_model_ignores_other_groups_presence(make_learner, train):
    X, y, groups = train
    a = groups == 3
    s_both = make_learner().fit(X, y, groups).score_rows(X[a], groups[a])
    s_alone = make_learner().fit(X[a], y[a], groups[a]).score_rows(X[a], groups[a])
    np.testing.assert_array_equal(s_both, s_alone)


def test_seeded_fits_are_identical(make_learner, train):
    X, y, groups = train
    s1 = make_learner().fit(X, y, groups).score_rows(X, groups)
    s2 = make_learner().fit(X, y, groups).score_rows(X, groups)
    np.testing.assert_array_equal(s1, s2)


def test_pickle_round_trip(make_learner, train):
    X, y, groups = train
    learner = make_learner().fit(X, y, groups)
    restored = pickle.loads(pickle.dumps(learner))
    np.testing.assert_array_equal(learner.score_rows(X, groups), restored.score_rows(X, groups))


def test_unseen_group_raises(make_learner, train):
    X, _, groups = train
    learner = make_learner().fit(*train)
    with pytest.raises(ValueError, match="group 5 "):
        learner.score_rows(X[:2], np.array([3, 5]))


def test_single_class_group_scores_constant(make_learner, train):
    X, y, groups = train
    y = np.where(groups == 8, 1, y)  # group 8: accepted only
    learner = make_learner().fit(X, y, groups)
    s = learner.score_rows(X, groups)
    b = groups == 8
    assert np.all(s[b] == learner.neutral_score)
    # group 3 still has two classes and still ranks
    assert roc_auc_score(y[~b], s[~b]) > 0.9


def test_score_before_fit_raises(make_learner, train):
    X, _, groups = train
    with pytest.raises(ValueError, match="not fitted"):
        make_learner().score_rows(X, groups)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(y=np.full(120, 2)), "0 \\(rejected\\) and 1"),
        (dict(groups=np.zeros(119, dtype=int)), "groups must have shape"),
        (dict(groups=np.zeros(120)), "groups must be integers"),
    ],
)
def test_fit_rejects_bad_inputs(make_learner, train, bad, match):
    kwargs = dict(zip(("X", "y", "groups"), train)) | bad
    with pytest.raises(ValueError, match=match):
        make_learner().fit(**kwargs)


def test_score_rejects_wrong_width(make_learner, train):
    X, _, groups = train
    learner = make_learner().fit(*train)
    with pytest.raises(ValueError, match="features"):
        learner.score_rows(X[:, :-1], groups)


def test_river_epochs_change_the_fit(train):
    X, y, groups = train
    s1 = RiverStack(epochs=1).fit(X, y, groups).score_rows(X, groups)
    s2 = RiverStack(epochs=2).fit(X, y, groups).score_rows(X, groups)
    assert not np.array_equal(s1, s2)


def test_river_seed_changes_the_order(train):
    X, y, groups = train
    s1 = RiverStack(seed=0).fit(X, y, groups).score_rows(X, groups)
    s2 = RiverStack(seed=1).fit(X, y, groups).score_rows(X, groups)
    assert not np.array_equal(s1, s2)


def test_river_pipeline_is_fresh_each_call():
    first, second = river_pipeline(), river_pipeline()
    first.learn_one({0: 1.0}, True)
    x = {0: 1.0}
    assert first.predict_proba_one(x)[True] != second.predict_proba_one(x)[True]


def test_feature_dicts_keeps_values():
    X = np.array([[0.25, -2.0], [1.0, 0.0]], dtype=np.float32)
    assert feature_dicts(X) == [{0: 0.25, 1: -2.0}, {0: 1.0, 1: 0.0}]
