"""One contract suite over every online learner (river's ``checks`` in miniature).

Each case builds a learner over the same small catalog; a learner given a head must rank
a new user exactly as the head does, one without a head (the learners that start from
nothing) must score a new user's candidates all alike.
"""

import copy
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from streamml.online import DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, ResidualLearner, WindowMAP
from streamml.online.baselines import HeadOnly, RiverOnline, SklearnRefitOnline
from streamml.online.contract import OnlineLearner
from streamml.online.mixed import MixedLearner
from streamml.online.peers import ReferenceBayes, SklearnRefitHead, VowpalWabbitOnline


@dataclass(frozen=True)
class Case:
    make: Callable  # (items, item_query, head_scores) -> learner
    has_head: bool = True
    adapts: bool = True


CASES = {
    "residual-pointwise": Case(lambda X, q, h: ResidualLearner(X, q, rule=PointwiseSGD(), head_scores=h)),
    "residual-pairwise": Case(lambda X, q, h: ResidualLearner(X, q, rule=PairwiseSGD(), head_scores=h)),
    "residual-laplace": Case(lambda X, q, h: ResidualLearner(X, q, rule=DiagonalLaplace(), head_scores=h)),
    "residual-laplace-iso": Case(lambda X, q, h: ResidualLearner(X, q, rule=IsotropicLaplace(), head_scores=h)),
    "residual-window": Case(lambda X, q, h: ResidualLearner(X, q, rule=WindowMAP(window=4, head_var=1.0), head_scores=h)),
    "residual-window-interaction": Case(lambda X, q, h: ResidualLearner(
        X, q, rule=WindowMAP(window=4, head_var=1.0), head_scores=h, features="centered", head_interaction=2.0)),
    "residual-user-key": Case(lambda X, q, h: ResidualLearner(X, q, head_scores=h, key="user")),
    "head_only": Case(HeadOnly, adapts=False),
    "river": Case(RiverOnline, has_head=False),
    "sklearn_refit": Case(SklearnRefitOnline, has_head=False),
    "mixed": Case(lambda X, q, h: MixedLearner(X, q, h, k=3)),
    "mixed-ungated": Case(lambda X, q, h: MixedLearner(X, q, h, k=3, gate=False)),
    "mixed-diagonal": Case(lambda X, q, h: MixedLearner(X, q, h, k=3, covariance="diagonal", bias_var=0.0)),
    "sklearn_refit_head": Case(SklearnRefitHead),
    "reference": Case(lambda X, q, h: ReferenceBayes(X, q, h, k=2).fit_population(population())),
    "vw": Case(lambda X, q, h: VowpalWabbitOnline(X, q, h, bits=18)),
}


def catalog():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 8)).astype(np.float32)
    item_query = np.repeat([0, 1, 2], 20)
    head = rng.standard_normal(60) * 3 + 1
    return X, item_query, head


def stream(seed, n=60, users=(0, 1, 2)):
    """Events of a few users on query 0 and 1, a hidden preference along X[:, 0]."""
    X, item_query, _ = catalog()
    rng = np.random.default_rng(seed)
    items = rng.choice(np.flatnonzero(item_query < 2), n)
    return rng.choice(users, n), item_query[items], items, (X[items, 0] > 0).astype(int)


def population():
    """Events of 40 other users (the population a learner's ``fit_population`` sees)."""
    import pandas as pd

    _, _, head = catalog()
    users, queries, items, _ = stream(11, n=800, users=range(100, 140))
    labels = (head[items] > 1).astype(int)  # the population agrees with the head, so its slope is positive
    return pd.DataFrame({"user": users, "query": queries, "item": items, "label": labels, "time": np.arange(len(users))})


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param, CASES[request.param]


def fresh(case):
    X, item_query, head = catalog()
    return case[1].make(X, item_query, head if case[1].has_head else None)


def feed(learner, events):
    for u, q, i, y in zip(*events):
        learner.learn_one(u.item(), q.item(), int(i), int(y))


def all_scores(learner, users=(0, 1, 2, 3)):
    _, item_query, _ = catalog()
    return {(u, q): np.asarray(learner.score(u, q, np.flatnonzero(item_query == q)), np.float64)
            for u in users for q in (0, 1, 2)}


def assert_same(a, b, **tol):
    for key in a:
        np.testing.assert_allclose(a[key], b[key], err_msg=str(key), **tol)


def test_follows_the_protocol(case):
    assert isinstance(fresh(case), OnlineLearner)


def test_cold_start_ranks_as_the_prior(case):
    learner = fresh(case)
    _, item_query, head = catalog()
    for q in (0, 1, 2):
        ids = np.flatnonzero(item_query == q)
        s = learner.score(7, q, ids)
        assert s.shape == (20,)
        if case[1].has_head:
            np.testing.assert_array_equal(learner.rank(7, q, ids), ids[np.argsort(-head[ids], kind="stable")])
        else:
            assert np.ptp(s) == 0
            np.testing.assert_array_equal(learner.rank(7, q, ids), ids)


def test_feedback_changes_only_its_own_user(case):
    learner = fresh(case)
    cold = all_scores(learner)
    feed(learner, stream(1, users=(0,)))
    warm = all_scores(learner)
    assert np.allclose(warm[(0, 0)], cold[(0, 0)]) != case[1].adapts
    assert_same({k: v for k, v in warm.items() if k[0] != 0}, {k: v for k, v in cold.items() if k[0] != 0}, rtol=0, atol=0)


def test_learn_many_equals_learn_one_in_order(case):
    one, many = fresh(case), fresh(case)
    events = stream(2)
    feed(one, events)
    many.learn_many(*events)
    assert_same(all_scores(many), all_scores(one), rtol=1e-6, atol=1e-6)


def test_forget_restores_the_prior(case):
    learner = fresh(case)
    cold = all_scores(learner)
    feed(learner, stream(3))
    learner.forget(1)
    warm = all_scores(learner)
    assert_same({k: v for k, v in warm.items() if k[0] == 1}, {k: v for k, v in cold.items() if k[0] == 1}, rtol=0, atol=0)
    assert np.allclose(warm[(0, 0)], cold[(0, 0)]) != case[1].adapts  # other users keep theirs
    learner.forget(99)  # a user never seen: nothing to do


def test_same_stream_same_scores(case):
    a, b = fresh(case), fresh(case)
    for learner in (a, b):
        feed(learner, stream(4))
    assert_same(all_scores(a), all_scores(b), rtol=0, atol=0)


def test_pickle_and_deepcopy_round_trip(case):
    learner = fresh(case)
    feed(learner, stream(5))
    for clone in (pickle.loads(pickle.dumps(learner)), copy.deepcopy(learner)):
        assert_same(all_scores(clone), all_scores(learner), rtol=0, atol=0)
        more = stream(6)
        feed(clone, more)
        if case[1].adapts:  # independent state
            assert not np.allclose(all_scores(clone)[(0, 0)], all_scores(learner)[(0, 0)])
    feed(learner, more)
    assert_same(all_scores(clone), all_scores(learner), rtol=0, atol=0)  # and the same learning


def test_bad_input_is_refused_and_changes_nothing(case):
    learner = fresh(case)
    feed(learner, stream(7))
    before = all_scores(learner)
    with pytest.raises(ValueError, match="item 0 belongs to query 0, not 1"):
        learner.learn_one(0, 1, 0, 1)
    with pytest.raises(ValueError, match="query 9 is unknown"):
        learner.learn_one(0, 9, 0, 1)
    with pytest.raises(ValueError, match="query 9 is unknown"):
        learner.rank(0, 9, np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must be .*3"):
        learner.learn_one(0, 0, 0, 3)
    with pytest.raises(IndexError, match="600"):
        learner.learn_one(0, 0, 600, 1)
    with pytest.raises(ValueError):
        learner.learn_many([0, 0], [0, 0], [0, 1], [1, 5])  # the whole batch is refused
    with pytest.raises(ValueError):
        learner.learn_many([0, 0], [0, 0], [0, 1], [1])
    assert_same(all_scores(learner), before, rtol=0, atol=0)
