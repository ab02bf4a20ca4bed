"""The population fit: the global model, item effects, factors for every item, and an EM prior
that recovers a known random-effects variance."""

import numpy as np
import pandas as pd
import pytest

from streamml.online.population import fit_population, standardized_head, text_ids


def synthetic_population(n_users=300, n_items=80, k=2, user_var=1.0, seed=0):
    """Users with random effects ``w ~ N(0, user_var I)`` on known item factors; one query."""
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((n_items, k))
    X = np.hstack([V, rng.standard_normal((n_items, 6))]).astype(np.float32)  # the embedding carries the factors
    head = rng.standard_normal(n_items)
    rows = []
    for u in range(n_users):
        w = rng.standard_normal(k) * np.sqrt(user_var)
        for i in rng.choice(n_items, 40, replace=False):
            p = 1 / (1 + np.exp(-(0.8 * head[i] + V[i] @ w)))
            rows.append((f"u{u}", 0, int(i), int(rng.random() < p)))
    events = pd.DataFrame(rows, columns=["user", "query", "item", "label"])
    return events, X, np.zeros(n_items, np.int64), standardized_head(head, np.zeros(n_items, np.int64)), V


def test_the_em_prior_grows_with_the_users_spread():
    fits = {}
    for var in (0.1, 2.0):
        events, X, q, z, _ = synthetic_population(user_var=var, seed=1)
        fits[var] = fit_population(events, X, q, z, k=2, factors="svd")
        assert 0 < len(fits[var].history["prior_trace"]) < 200  # converged
    small, large = (np.trace(fits[v].prior_cov[1:, 1:]) for v in (0.1, 2.0))
    assert large > 4 * small  # the prior follows the population's spread, with no grid


def test_the_global_slope_comes_from_the_labels():
    events, X, q, z, _ = synthetic_population(seed=2)
    pop = fit_population(events, X, q, z, k=2)
    assert pop.slope > 0.3  # the labels follow the head
    flipped = fit_population(events.assign(label=1 - events.label), X, q, z, k=2)
    assert flipped.slope < -0.3


def test_items_without_events_still_get_factors_and_effects():
    events, X, q, z, _ = synthetic_population(seed=3)
    unseen = [3, 7]
    pop = fit_population(events[~events.item.isin(unseen)], X, q, z, k=2, factors="als")
    assert np.isfinite(pop.factors).all() and np.isfinite(pop.item_effect).all()
    assert pop.factors.shape == (80, 2)


def test_item_effects_shrink_with_fewer_events():
    events, X, q, z, _ = synthetic_population(seed=4)
    rare = events[events.item == 5].head(2)
    fewer = pd.concat([events[events.item != 5], rare.assign(label=1)])
    many = pd.concat([events[events.item != 5]] + [rare.assign(label=1, user=f"x{j}") for j in range(100)])
    small, large = (fit_population(e, X, q, z, k=2).item_effect[5] for e in (fewer, many))
    assert 0 < small < large


def test_trust_puts_the_global_model_first():
    events, X, q, z, _ = synthetic_population(seed=5)
    pop = fit_population(events, X, q, z, k=2, trust=True)
    o = pop.offset(z)
    assert pop.factors.shape[1] == 3
    assert np.corrcoef(pop.factors[:, 0], o)[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_equal_embeddings_are_one_text():
    X = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    ids = text_ids(X)
    assert ids[0] == ids[2] != ids[1]


def test_bad_populations_are_refused():
    events, X, q, z, _ = synthetic_population(n_users=5, seed=6)
    with pytest.raises(ValueError, match="empty"):
        fit_population(events.head(0), X, q, z)
    with pytest.raises(ValueError, match="both accepts and rejects"):
        fit_population(events.assign(label=1), X, q, z)
    with pytest.raises(ValueError, match="factors must be one of"):
        fit_population(events, X, q, z, factors="pca")


def test_embedding_factors_are_each_querys_principal_directions():
    events, X, q, z, _ = synthetic_population(seed=7)
    pop = fit_population(events, X, q, z, k=3, factors="embedding")
    Xc = X - X.mean(0)
    _, _, vt = np.linalg.svd(Xc.astype(np.float64), full_matrices=False)
    for j in range(3):  # each factor is a principal coordinate (up to sign), whatever the labels say
        assert abs(np.corrcoef(pop.factors[:, j], Xc @ vt[j])[0, 1]) == pytest.approx(1.0, abs=1e-4)
    assert np.sqrt((pop.factors.astype(np.float64) ** 2).sum(1).mean()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("factors", ["als", "svd"])
def test_a_population_that_shares_no_text_falls_back_to_the_embeddings_directions(factors):
    """Collaborative factors need two users on one text; without any, the factors are the
    embedding's principal directions, and the prior is still estimated on them."""
    events, X, q, z, _ = synthetic_population(n_users=60, n_items=2400, seed=8)
    events = events.drop_duplicates("item")  # every item answered by one user only
    assert events.groupby("item").user.nunique().max() == 1
    pop = fit_population(events, X, q, z, k=3, factors=factors)
    same = fit_population(events, X, q, z, k=3, factors="embedding")
    assert pop.history["factors"] == "embedding"
    np.testing.assert_allclose(pop.factors, same.factors)
    np.testing.assert_allclose(pop.prior_cov, same.prior_cov)
    shared = fit_population(synthetic_population(seed=8)[0], X[:80], q[:80], z[:80], k=3, factors=factors)
    assert shared.history["factors"] == factors  # texts answered by many users: the factors are learned
