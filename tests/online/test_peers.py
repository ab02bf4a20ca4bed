"""The replay's peers: each starts from the head, learns the way its docstring says, and keeps
catalog items that share a text apart."""

import numpy as np
import pandas as pd
import pytest

from streamml.online.peers import ReferenceBayes, SklearnRefitHead, VowpalWabbitOnline

PEERS = {"vw": lambda X, q, h: VowpalWabbitOnline(X, q, h, bits=18), "refit": SklearnRefitHead, "reference": ReferenceBayes}


def catalog():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    X[1] = X[0]  # two items with one text: a peer must still tell their heads apart
    return X, np.zeros(40, int), rng.standard_normal(40)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_new_key_ranks_by_the_head_even_where_texts_repeat(name):
    X, q, head = catalog()
    peer = PEERS[name](X, q, head)
    np.testing.assert_array_equal(peer.rank("ann", 0, np.arange(40)), np.argsort(-head, kind="stable"))


@pytest.mark.parametrize("name", ["vw", "refit"])
def test_feedback_against_the_head_turns_the_ranking(name):
    X, q, head = catalog()
    peer = PEERS[name](X, q, head)
    top, bottom = int(np.argmax(head)), int(np.argmin(head))
    for _ in range(30):
        peer.learn_many(["ann", "ann"], [0, 0], [top, bottom], [0, 1])
    s = peer.score("ann", 0, np.array([top, bottom]))
    assert s[1] > s[0]


def test_vw_population_margins_hold_the_items_effects():
    X, q, head = catalog()
    loved = int(np.argmin(head))
    others = [i for i in range(40) if i != loved] * 3
    events = pd.DataFrame({"user": range(100 + len(others)), "query": 0, "item": [loved] * 100 + others,
                           "label": [1] * 100 + [0] * len(others), "time": range(100 + len(others))})
    assert peer_rank_of(VowpalWabbitOnline(X, q, head, bits=18), loved) > 30  # the head puts it last
    peer = VowpalWabbitOnline(X, q, head, bits=18, population=True).fit_population(events)
    assert peer_rank_of(peer, loved) < 5  # from last to the top few (one pass of adaptive steps)


def peer_rank_of(peer, item):
    return int(np.flatnonzero(peer.rank("new user", 0, np.arange(40)) == item)[0])


def test_the_reference_gate_opens_only_for_answers_that_its_factors_predict():
    X, q, head = catalog()
    rng = np.random.default_rng(1)
    users = rng.integers(0, 100, 3000)
    factor = X[:, 0]
    items = rng.integers(0, 40, 3000)
    labels = (rng.random(3000) < 1 / (1 + np.exp(-np.where(users % 2, 2, -2) * factor[items]))).astype(int)
    ref = ReferenceBayes(X, q, head, k=2).fit_population(pd.DataFrame(
        {"user": users, "query": 0, "item": items, "label": labels, "time": range(3000)}))
    for i in np.argsort(-factor)[:10]:
        ref.learn_one("fan", 0, int(i), 1)
    for i in np.argsort(factor)[:10]:
        ref.learn_one("fan", 0, int(i), 0)
    assert ref.gain_[("fan", 0)] > 0
    assert np.corrcoef(ref.score("fan", 0, np.arange(40)), factor)[0, 1] > 0.5


@pytest.mark.parametrize("name", sorted(PEERS))
def test_new_embeddings_are_refused_with_a_reason(name):
    X, q, head = catalog()
    with pytest.raises(ValueError, match="catalog item ids only"):
        PEERS[name](X, q, head).score("ann", 0, X[:2])
