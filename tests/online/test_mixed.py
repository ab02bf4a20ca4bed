"""The mixed learner: its kernel against the reference step, evidence that accumulates, the gate,
the budget of its state, and its store round trips."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from streamml.online.mixed import MixedLearner, _events, _events_diagonal, adf_step, diagonalized
from streamml.online.population import Population
from streamml.stores import Field, SQLiteStore


def world(n_items=60, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_items, dim)).astype(np.float32)
    return X, np.repeat([0, 1], n_items // 2), rng.standard_normal(n_items)


def unpack(packed: np.ndarray, d: int) -> np.ndarray:
    S = np.zeros((d, d))
    S[np.tril_indices(d)] = packed  # row-major lower triangle, as the kernel stores it
    return S + np.tril(S, -1).T


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_kernel_agrees_with_the_reference_step(covariance):
    rng = np.random.default_rng(1)
    d, n_items, n_keys, n_events = 5, 30, 4, 300
    F = np.hstack([np.ones((n_items, 1)), rng.standard_normal((n_items, d - 1))])
    o = rng.standard_normal(n_items)
    A = rng.standard_normal((d, d))
    prior = A @ A.T / d + 0.1 * np.eye(d)
    diagonal = covariance == "diagonal"
    if diagonal:
        prior = np.diag(np.diag(prior))
    rows, items = rng.integers(0, n_keys, n_events), rng.integers(0, n_items, n_events)
    labels = rng.random(n_events) < 0.5
    mean, cov = np.zeros((n_keys, d), np.float32), np.zeros((n_keys, d if diagonal else d * (d + 1) // 2), np.float32)
    bias, gain = np.zeros((n_keys, 2), np.float32), np.zeros(n_keys, np.float32)
    kernel, prior_arg = (_events_diagonal, np.diag(prior).copy()) if diagonal else (_events, F @ prior)
    kernel(mean, cov, bias, gain, rows, items, labels, F, prior_arg, o, float(prior[0, 0]), 0, 1)
    ref = [dict(mean=np.zeros(d), cov=np.zeros(d if diagonal else (d, d)), bias=np.zeros(2), gain=0.0)
           for _ in range(n_keys)]
    for r, i, y in zip(rows, items, labels):
        s = ref[r]
        s["gain"] = adf_step(s["mean"], s["cov"], s["bias"], s["gain"], F[i], o[i], y, prior, prior[0, 0])
    for r in range(n_keys):
        np.testing.assert_allclose(mean[r], ref[r]["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cov[r] if diagonal else unpack(cov[r], d), ref[r]["cov"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bias[r], ref[r]["bias"], rtol=1e-4, atol=1e-5)
        assert gain[r] == pytest.approx(ref[r]["gain"], rel=1e-4, abs=1e-4)


def map_estimate(F, y, o, prior):
    """The exact posterior maximum of Bayesian logistic regression (Newton), for comparison."""
    P, w = np.linalg.inv(prior), np.zeros(F.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-(o + F @ w)))
        w += np.linalg.solve(F.T @ (F * (p * (1 - p))[:, None]) + P, F.T @ (y - p) - P @ w)
    return w


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_evidence_accumulates_to_the_exact_posterior(covariance):
    """Many events of one key: the filtered mean approaches the batch MAP (and the truth), and the
    posterior variance only shrinks: no event's pull is frozen or lost. With uncorrelated factors
    (as a query's principal directions are) the diagonal posterior gets there too."""
    rng = np.random.default_rng(2)
    d, n = 4, 2000
    F = np.hstack([np.ones((n, 1)), rng.standard_normal((n, d - 1))])
    truth = np.array([0.3, 1.0, -0.8, 0.5])
    y = (rng.random(n) < 1 / (1 + np.exp(-(F @ truth)))).astype(float)
    prior = np.eye(d)
    cov = np.zeros(d) if covariance == "diagonal" else np.zeros((d, d))
    state = dict(mean=np.zeros(d), cov=cov, bias=np.zeros(2), gain=0.0)
    traces = []
    for t in range(n):
        state["gain"] = adf_step(state["mean"], state["cov"], state["bias"], state["gain"], F[t], 0.0, y[t], prior, 1.0)
        traces.append(np.trace(prior) + state["cov"].sum() if covariance == "diagonal" else np.trace(prior + state["cov"]))
    assert np.all(np.diff(traces) <= 1e-12)
    exact = map_estimate(F, y, np.zeros(n), prior)
    np.testing.assert_allclose(state["mean"], exact, atol=0.05)
    np.testing.assert_allclose(state["mean"], truth, atol=0.15)
    assert state["gain"] > 50  # these answers depart from a bias-only model by far


def test_a_user_who_follows_the_population_keeps_its_ranking_and_one_who_departs_gets_theirs():
    X, q, head = world(n_items=80, seed=3)
    learner = MixedLearner(X, q, head, k=4)
    F = learner._F[:, 1:]
    ids = np.flatnonzero(q == 0)
    from sklearn.metrics import roc_auc_score

    cold = roc_auc_score(F[ids, 0] > 0, learner.score("bob", 0, ids))
    rng = np.random.default_rng(4)
    # "ann" answers as the head says (with noise): her factor term stays damped
    for i in rng.choice(ids, 40):
        learner.learn_one("ann", 0, int(i), int(rng.random() < 1 / (1 + math.exp(-learner._offset[i]))))
    # "bob" likes what the first factor says, whatever the head
    for i in rng.choice(ids, 40):
        learner.learn_one("bob", 0, int(i), int(F[i, 0] > 0))
    gain = {u: float(learner._state(u, 0)["gain"]) for u in ("ann", "bob")}
    assert gain["bob"] > 5 > gain["ann"]
    bob = roc_auc_score(F[ids, 0] > 0, learner.score("bob", 0, ids))
    ann_corr = np.corrcoef(learner.score("ann", 0, ids), learner._offset[ids])[0, 1]
    assert bob > cold + 0.25 and ann_corr > 0.9


def test_the_state_fits_the_budget():
    X, q, head = world(dim=32)
    learner = MixedLearner(X, q, head, k=16, trust=True)
    per_key = sum(f.nbytes for f in learner.schema.values())
    assert per_key == 4 * (18 + 18 * 19 // 2 + 2 + 1) <= 1024


def test_a_diagonal_posterior_fits_every_direction_of_a_small_query_in_the_budget():
    X, q, head = world(dim=64)
    learner = MixedLearner(X, q, None, k=48, covariance="diagonal", bias_var=0.0)
    assert sum(f.nbytes for f in learner.schema.values()) == 4 * (49 + 49 + 2 + 1) <= 1024


def test_the_diagonal_posterior_takes_the_full_posteriors_first_step():
    """From a diagonal prior the two agree on the first event of a key (the covariance is still the
    prior's), and differ after more: the diagonal drops what the events correlate."""
    X, q, head = world()
    full, diag = (MixedLearner(X, q, head, k=4, covariance=c) for c in ("full", "diagonal"))
    for learner in (full, diag):
        learner.learn_one("ann", 0, item=3, label=1)
    np.testing.assert_allclose(diag.score("ann", 0, np.arange(30)), full.score("ann", 0, np.arange(30)), rtol=1e-5)
    for learner in (full, diag):
        learner.learn_many(["ann"] * 6, [0] * 6, [4, 5, 6, 7, 8, 9], [1, 0, 1, 0, 0, 1])
    assert np.abs(diag.score("ann", 0, np.arange(30)) - full.score("ann", 0, np.arange(30))).max() > 1e-3


def test_bias_var_zero_keeps_no_per_key_bias():
    X, q, head = world()
    learner = MixedLearner(X, q, head, k=4, bias_var=0.0, covariance="diagonal")
    learner.learn_many(["ann"] * 8, [0] * 8, np.arange(8), [1] * 8)  # all accepted: a bias would take it
    state = learner._state("ann", 0)
    assert state["mean"][0] == 0 and state["bias"][0] == 0 and state["mean"][1:].any()


def test_with_no_head_the_gate_changes_no_ranking():
    """What ``mixed_coldstart`` relies on to turn the gate off: with no head and no population every
    item ties under the global model, and the gate's weight scales a key's whole factor term."""
    X, q, _ = world()
    gated, ungated = (MixedLearner(X, q, None, k=4, gate=g) for g in (True, False))
    rng = np.random.default_rng(8)
    for item, label in zip(rng.integers(0, 30, 12), rng.integers(0, 2, 12)):
        for learner in (gated, ungated):
            learner.learn_one("ann", 0, int(item), int(label))
        np.testing.assert_array_equal(gated.rank("ann", 0, np.arange(30)), ungated.rank("ann", 0, np.arange(30)))
    assert not np.allclose(gated.score("ann", 0, np.arange(30)), ungated.score("ann", 0, np.arange(30)))


def test_diagonalized_turns_the_factors_so_the_prior_is_diagonal_and_scores_stay():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((4, 4))
    prior = A @ A.T + np.eye(4)
    pop = Population(1.0, 0.0, np.zeros(20), rng.standard_normal((20, 3)).astype(np.float32), prior, 0, "x")
    turned = diagonalized(pop)
    P = turned.prior_cov
    np.testing.assert_array_equal(P, np.diag(np.diag(P)))
    assert P[0, 0] == prior[0, 0]
    # the factor term's prior predictive covariance over items is the same in both bases
    np.testing.assert_allclose(turned.factors @ P[1:, 1:] @ turned.factors.T, pop.factors @ prior[1:, 1:] @ pop.factors.T,
                               rtol=1e-4, atol=1e-4)
    assert diagonalized(turned) is turned


def test_a_diagonal_learner_takes_a_fitted_population():
    X, q, head = world()
    rng = np.random.default_rng(7)
    users, items = rng.integers(100, 140, 800), rng.integers(0, 30, 800)
    events = pd.DataFrame({"user": users, "query": 0, "item": items, "label": (head[items] > 0).astype(int),
                           "time": np.arange(800)})
    diag = MixedLearner(X, q, head, k=2, factors="svd", covariance="diagonal").fit_population(events)
    P = diag.population.prior_cov
    np.testing.assert_array_equal(P, np.diag(np.diag(P)))
    diag.learn_many(["ann"] * 10, [0] * 10, np.arange(10), [0, 1] * 5)
    assert np.isfinite(diag.score("ann", 0, np.arange(30))).all()
    assert not np.allclose(diag.score("ann", 0, np.arange(30)), diag.score("bob", 0, np.arange(30)))


def test_a_full_learner_learns_the_same_scores_in_the_diagonalized_basis():
    """The factor term's prior is the same in the turned basis: with no bias-factor covariance (the
    one thing ``diagonalized`` drops) a full learner learns exactly the same scores from both."""
    X, q, head = world()
    rng = np.random.default_rng(9)
    A = rng.standard_normal((3, 3))
    prior = np.zeros((4, 4))
    prior[0, 0], prior[1:, 1:] = 0.5, A @ A.T + 0.1 * np.eye(3)
    learner = MixedLearner(X, q, head, k=3)
    pop = learner.population
    pop = replace(pop, factors=rng.standard_normal(pop.factors.shape).astype(np.float32), prior_cov=prior)
    a, b = (MixedLearner(X, q, head, k=3).set_population(p) for p in (pop, diagonalized(pop)))
    assert not np.allclose(a.population.factors, b.population.factors)  # the basis did turn
    items, labels = rng.permutation(30)[:12], rng.integers(0, 2, 12)
    for learner in (a, b):
        learner.learn_many(["ann"] * 12, [0] * 12, items, labels)
    ids = np.arange(30)
    assert np.ptp(a.score("ann", 0, ids) - a.score("bob", 0, ids)) > 0.05  # the events moved ann's scores
    np.testing.assert_allclose(b.score("ann", 0, ids), a.score("ann", 0, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, message", [(dict(k=0), "k must be >= 1"), (dict(prior_var=0), "prior_var > 0"),
                                         (dict(factors="pca"), "factors must be 'svd', 'als' or 'embedding'"),
                                         (dict(covariance="low-rank"), "covariance must be 'full' or 'diagonal'"),
                                         (dict(bias_var=-1.0), "bias_var must be finite and >= 0"),
                                         (dict(threads=0), "threads must be >= 1")])
def test_bad_settings_are_named(kw, message):
    X, q, head = world()
    with pytest.raises(ValueError, match=message):
        MixedLearner(X, q, head, **kw)


def test_fit_population_refuses_bad_events_and_changes_nothing():
    X, q, head = world()
    learner = MixedLearner(X, q, head, k=2)
    before = learner.score("ann", 0, np.arange(30))
    with pytest.raises(ValueError, match=r"lack column\(s\) \['label'\]"):
        learner.fit_population(pd.DataFrame({"user": [1], "query": [0], "item": [0]}))
    with pytest.raises(ValueError, match="item 40 belongs to query 1, not 0"):
        learner.fit_population(pd.DataFrame({"user": [1], "query": [0], "item": [40], "label": [1]}))
    with pytest.raises(ValueError, match="labels must be 1"):
        learner.fit_population(pd.DataFrame({"user": [1], "query": [0], "item": [4], "label": [2]}))
    np.testing.assert_array_equal(learner.score("ann", 0, np.arange(30)), before)


def test_adapt_false_is_the_population_model_alone():
    X, q, head = world()
    learner = MixedLearner(X, q, head, k=2, adapt=False)
    before = learner.score("ann", 0, np.arange(30))
    learner.learn_many(["ann"] * 10, [0] * 10, np.arange(10), [1, 0] * 5)
    np.testing.assert_array_equal(learner.score("ann", 0, np.arange(30)), before)


def test_a_sqlite_store_gives_the_in_memory_scores(tmp_path):
    X, q, head = world()
    memory = MixedLearner(X, q, head, k=3)
    on_disk = MixedLearner(X, q, head, k=3, store=lambda schema: SQLiteStore(schema, tmp_path / "state.db"))
    rng = np.random.default_rng(5)
    users, items = rng.choice(["a", "b/c", "d"], 50), rng.integers(0, 30, 50)
    labels = rng.integers(0, 2, 50)
    for learner in (memory, on_disk):
        learner.learn_many(users, np.zeros(50, int), items, labels)
    for u in ("a", "b/c", "d"):
        np.testing.assert_allclose(on_disk.score(u, 0, np.arange(30)), memory.score(u, 0, np.arange(30)), rtol=1e-6)
    assert isinstance(on_disk.schema["cov"], Field)
