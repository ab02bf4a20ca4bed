"""streamml.online.baselines: the online contract (score/rank/learn_one/learn_many/learn_vector/forget)."""

import numpy as np
import pytest

from streamml.online.baselines import HeadOnly, RiverOnline, SklearnRefitOnline

X = np.eye(4, dtype=np.float32)
QUERY = np.array(["a", "a", "b", "b"])
HEAD = np.array([0.0, 1.0, 3.0, 2.0])

MAKERS = {
    "head_only": lambda: HeadOnly(X, QUERY, HEAD),
    "river": lambda: RiverOnline(X, QUERY, HEAD),
    "sklearn_refit": lambda: SklearnRefitOnline(X, QUERY, HEAD),
}
LEARNING = [name for name in MAKERS if name != "head_only"]


@pytest.mark.parametrize("name", LEARNING)
def test_feedback_moves_the_ranking_toward_the_answers(name):
    model = MAKERS[name]()
    model.learn_many(["ann", "ann"], ["a", "a"], [0, 1], [1, 0])
    assert model.rank("ann", "a", [1, 0]).tolist() == [0, 1]
    assert model.rank("ann", "a", np.array([0, 1])).tolist() == [0, 1]


def test_head_only_ranks_by_the_head_whatever_the_feedback():
    model = MAKERS["head_only"]()
    model.learn_many(["ann"] * 2, ["b"] * 2, [2, 3], [0, 1])
    assert model.rank("ann", "b", [2, 3]).tolist() == [2, 3]
    np.testing.assert_array_equal(model.score("ann", "b", X[2:], head=np.array([5.0, 7.0])), [5.0, 7.0])


@pytest.mark.parametrize("name", LEARNING)
def test_learn_many_equals_learn_one_in_order(name):
    one, many = MAKERS[name](), MAKERS[name]()
    events = [("ann", "a", 0, 1), ("bob", "b", 2, 0), ("ann", "a", 1, 0), ("bob", "b", 3, 1), ("ann", "a", 0, 1)]
    for event in events:
        one.learn_one(*event)
    many.learn_many(*map(list, zip(*events)))
    for user, query, ids in [("ann", "a", [0, 1]), ("bob", "b", [2, 3])]:
        np.testing.assert_allclose(one.score(user, query, ids), many.score(user, query, ids))


@pytest.mark.parametrize("name", LEARNING)
def test_catalog_ids_and_their_embeddings_score_alike(name):
    model = MAKERS[name]()
    model.learn_many(["ann"] * 2, ["a"] * 2, [0, 1], [1, 0])
    np.testing.assert_allclose(model.score("ann", "a", [0, 1]), model.score("ann", "a", X[:2]))


@pytest.mark.parametrize("name", LEARNING)
def test_learn_vector_equals_learning_the_catalog_item(name):
    by_id, by_vector = MAKERS[name](), MAKERS[name]()
    by_id.learn_many(["ann"] * 2, ["a"] * 2, [0, 1], [1, 0])
    by_vector.learn_vector("ann", "a", X[0], HEAD[0], 1)
    by_vector.learn_vector("ann", "a", X[1], HEAD[1], 0)
    np.testing.assert_allclose(by_id.score("ann", "a", [0, 1]), by_vector.score("ann", "a", [0, 1]))


@pytest.mark.parametrize("name", LEARNING)
def test_forget_one_user_or_one_query(name):
    model = MAKERS[name]()
    for user, query, items in [("ann", "a", [0, 1]), ("ann", "b", [2, 3]), ("bob", "a", [0, 1])]:
        model.learn_many([user] * 2, [query] * 2, items, [1, 0])
    fresh_a, fresh_b = MAKERS[name]().score("x", "a", [0, 1]), MAKERS[name]().score("x", "b", [2, 3])
    model.forget("ann", "a")
    np.testing.assert_array_equal(model.score("ann", "a", [0, 1]), fresh_a)
    assert not np.array_equal(model.score("ann", "b", [2, 3]), fresh_b)
    model.forget("ann")
    np.testing.assert_array_equal(model.score("ann", "b", [2, 3]), fresh_b)
    assert not np.array_equal(model.score("bob", "a", [0, 1]), fresh_a)
    model.learn_one("ann", "a", 0, 1)  # the feedback is forgotten too, not only the fitted model
    if name == "sklearn_refit":
        np.testing.assert_array_equal(model.score("ann", "a", [0, 1]), fresh_a)


@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_input_names_what_is_wrong(name):
    model = MAKERS[name]()
    with pytest.raises(ValueError, match="item 2 belongs to query 'b', not 'a'"):
        model.learn_one("ann", "a", 2, 1)
    with pytest.raises(IndexError, match=r"item 9 is not a catalog id: ids are in \[0, 4\)"):
        model.score("ann", "a", [9])
    with pytest.raises(ValueError, match="query 'c' is unknown"):
        model.rank("ann", "c", [0])
    with pytest.raises(ValueError, match=r"labels must be 1 \(accepted\) or 0 \(rejected\), got 3"):
        model.learn_one("ann", "a", 0, 3)
    with pytest.raises(ValueError, match=r"embeddings \(n, 4\)"):
        model.score("ann", "a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="one length"):
        model.learn_many(["ann"], ["a", "a"], [0, 1], [1, 0])


@pytest.mark.parametrize("name", list(MAKERS))
def test_empty_candidates_score_empty(name):
    assert MAKERS[name]().score("ann", "a", np.array([], np.int64)).shape == (0,)
