import pickle

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from streamml.online import DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, ResidualLearner, WindowMAP
from streamml.stores import InMemoryStore, Store

RULES = {
    "pointwise": lambda: PointwiseSGD(lr=2.0, l2=0.01, decay=0.01, max_norm=3.0),
    "pairwise": lambda: PairwiseSGD(lr=2.0, l2=0.01, decay=0.01, max_norm=3.0),
    "laplace": lambda: DiagonalLaplace(prior_var=2.0),
    "laplace_iso": lambda: IsotropicLaplace(prior_var=2.0),
    "window": lambda: WindowMAP(prior_var=2.0, window=4, head_var=0.5),
}


def unit_rows(rng, n, d, dtype=np.float32):
    X = rng.standard_normal((n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(dtype)


# ------------------------------------------------------------------ learner
class PlainStore(Store):
    """An InMemoryStore behind the bare Store protocol: the learner's generic path, the one
    SQLite and Redis stores take. Its reads are read-only, as ``np.frombuffer``'s are."""

    def __init__(self, schema):
        self._inner = InMemoryStore(schema)
        self.schema = self._inner.schema

    def get_many(self, keys):
        out = self._inner.get_many(keys)
        for v in out.values():
            v.flags.writeable = False
        return out

    def put_many(self, keys, values):
        self._inner.put_many(keys, values)

    def delete_many(self, keys):
        self._inner.delete_many(keys)

    def __contains__(self, key):
        return key in self._inner

    def __len__(self):
        return len(self._inner)


PATHS = {"memory": {}, "generic-store": {"store": PlainStore}, "memory-threads": {"threads": 2}}


def make_catalog(seed=0, n_queries=3, per_query=20, d=16):
    rng = np.random.default_rng(seed)
    X = unit_rows(rng, n_queries * per_query, d)
    item_query = np.repeat(np.arange(n_queries) * 10, per_query)  # query ids 0, 10, 20
    head = rng.standard_normal(len(X)) * 5 + 3  # a head on its own scale
    return X, item_query, head


def random_events(rng, item_query, n, users):
    items = rng.integers(0, len(item_query), n)
    return rng.choice(users, n), item_query[items], items, rng.integers(0, 2, n)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("key", ["user_query", "user"])
@pytest.mark.parametrize("path", PATHS)
def test_learn_many_equals_learn_one_in_order(name, key, path):
    X, item_query, head = make_catalog()
    rng = np.random.default_rng(3)
    # few users: many repeated keys, interleaved
    users, queries, items, labels = random_events(rng, item_query, 400, users=np.arange(7))
    kw = dict(rule=RULES[name](), head_scores=head, key=key) | PATHS[path]
    assert isinstance(ResidualLearner(X, item_query, **kw).store, PlainStore) == (path == "generic-store")
    one = ResidualLearner(X, item_query, **kw)
    for u, q, i, y in zip(users, queries, items, labels):
        one.learn_one(u, q, i, y)
    many = ResidualLearner(X, item_query, chunk_size=7, **kw)  # several chunks, keys repeated in each
    many.learn_many(users, queries, items, labels)
    for u in range(7):
        for q in (0, 10, 20):
            np.testing.assert_allclose(
                many.score(u, q, np.flatnonzero(item_query == q)),
                one.score(u, q, np.flatnonzero(item_query == q)),
                rtol=1e-3,
                atol=1e-3,
            )
    keys = list(one.store.get_many([]).keys())
    probe = [(u, q) for u in range(7) for q in (0, 10, 20)] if key == "user_query" else list(range(7))
    a, b = one.store.get_many(probe), many.store.get_many(probe)
    for k in keys:
        if k != "residual":
            np.testing.assert_array_equal(a[k], b[k])
    assert len(one.store) == len(many.store)


def test_learn_many_with_string_ids_matches_int_ids():
    X, item_query, head = make_catalog()
    rng = np.random.default_rng(4)
    users, queries, items, labels = random_events(rng, item_query, 200, users=np.arange(5))
    a = ResidualLearner(X, item_query, head_scores=head)
    a.learn_many(users, queries, items, labels)
    b = ResidualLearner(X, np.array([f"q{q}" for q in item_query]), head_scores=head)
    b.learn_many([f"u{u}" for u in users], [f"q{q}" for q in queries], items, labels)
    for u in range(5):
        ids = np.flatnonzero(item_query == 10)
        np.testing.assert_allclose(a.score(u, 10, ids), b.score(f"u{u}", "q10", ids), rtol=1e-6)


@pytest.mark.parametrize("rule", [PointwiseSGD, PairwiseSGD])
def test_norm_cap_holds_under_adversarial_feedback(rule):
    X, item_query, head = make_catalog()
    max_norm = 2.5
    learner = ResidualLearner(X, item_query, rule=rule(lr=1e6, max_norm=max_norm), head_scores=head)
    # 10,000 accepts of one item, with the rejection of another between them so the pairwise rule moves too
    n = 10_000
    items = np.where(np.arange(n) % 2 == 0, 0, 1)
    learner.learn_many(np.zeros(n, int), np.zeros(n, int), items, (np.arange(n) % 2 == 0).astype(int))
    for i in range(200):
        learner.learn_one(0, 0, 0, 1)
        learner.learn_one(1, 0, 0, 1)  # a fresh key, accept-only
    for user in (0, 1):
        r = learner.store.get_many([(user, 0)])["residual"][0].astype(np.float64)
        assert np.isfinite(r).all()
        assert np.linalg.norm(r) <= max_norm * (1 + 2**-10)  # float16 rounding of a capped vector
        cold = ResidualLearner(X, item_query, head_scores=head).score(user, 0, np.arange(20))
        assert np.abs(learner.score(user, 0, np.arange(20)) - cold).max() <= max_norm * (1 + 1e-3)
    assert np.linalg.norm(learner.store.get_many([(0, 0)])["residual"][0].astype(np.float64)) > 0.9 * max_norm


def test_cold_start_scores_exactly_as_the_standardised_head():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query, head_scores=head)
    learner.learn_one(user=1, query=0, item=0, label=1)  # someone else's feedback changes nothing
    learner.learn_one(user=1, query=0, item=1, label=0)
    for q in (0, 10, 20):
        ids = np.flatnonzero(item_query == q)
        h = head[ids]
        expected = ((h - h.mean()) / h.std()).astype(np.float32)
        np.testing.assert_array_equal(learner.score(99, q, ids), expected)
        np.testing.assert_array_equal(learner.rank(99, q, ids), ids[np.argsort(-h, kind="stable")])
        # arbitrary embeddings with raw head scores: the query's catalog statistics
        np.testing.assert_allclose(learner.score(99, q, X[ids], head=h), expected, rtol=1e-6)
    assert len(learner.store) == 1  # scoring never creates state


def test_no_head_and_unstandardised_head():
    X, item_query, head = make_catalog()
    np.testing.assert_array_equal(ResidualLearner(X, item_query).score(0, 0, np.arange(5)), 0)
    raw = ResidualLearner(X, item_query, head_scores=head, standardize=False)
    np.testing.assert_allclose(raw.score(0, 0, np.arange(5)), head[:5], rtol=1e-6)
    const = ResidualLearner(X, item_query, head_scores=np.ones(len(X)))  # std 0: kept finite
    np.testing.assert_array_equal(const.score(0, 0, np.arange(5)), 0)
    with pytest.raises(ValueError, match="no head_scores"):
        ResidualLearner(X, item_query).score(0, 0, X[:2], head=np.zeros(2))


def test_forget_resets_one_query_or_all():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query, head_scores=head)
    cold = {q: learner.score(5, q, np.flatnonzero(item_query == q)) for q in (0, 10, 20)}
    for q, a, b in ((0, 0, 1), (10, 20, 21), (20, 40, 41)):
        learner.learn_many([5, 5, 6], [q, q, q], [a, b, a], [1, 0, 1])
    assert len(learner.store) == 6
    assert not np.array_equal(learner.score(5, 0, np.arange(20)), cold[0])
    learner.forget(5, query=0)
    np.testing.assert_array_equal(learner.score(5, 0, np.arange(20)), cold[0])
    assert not np.array_equal(learner.score(5, 10, np.arange(20, 40)), cold[10])
    learner.forget(5)
    for q in (0, 10, 20):
        np.testing.assert_array_equal(learner.score(5, q, np.flatnonzero(item_query == q)), cold[q])
    assert len(learner.store) == 3  # user 6 untouched


def test_key_user_shares_the_residual_across_queries():
    X, item_query, head = make_catalog()
    shared = ResidualLearner(X, item_query, key="user", features="raw")
    per_query = ResidualLearner(X, item_query, key="user_query", features="raw")
    for learner in (shared, per_query):
        learner.learn_one(1, 0, 0, 1)
        learner.learn_one(1, 0, 1, 0)
    other = np.flatnonzero(item_query == 10)
    np.testing.assert_array_equal(per_query.score(1, 10, other), 0)
    r = shared.store.get_many([1])["residual"][0].astype(np.float32)
    assert np.abs(r).sum() > 0
    np.testing.assert_allclose(shared.score(1, 10, other), X[other] @ r, rtol=1e-6)
    # the buffer is shared too: a rejection under query 10 pairs with the accept under query 0
    shared.learn_one(1, 10, int(other[0]), 0)
    assert shared.store.get_many([1])["buffer"][0, 0, :2].tolist() == [other[0], 1]
    with pytest.raises(ValueError):
        shared.forget(1, query=0)
    shared.forget(1)
    assert len(shared.store) == 0


@pytest.mark.parametrize("name", sorted(RULES))
def test_learning_improves_auc_on_a_synthetic_preference(name):
    """Users like items on one side of a hidden direction; the head knows nothing."""
    rng = np.random.default_rng(5)
    d, n = 16, 200
    X = unit_rows(rng, n, d)
    learner = ResidualLearner(X, np.zeros(n, int), rule=RULES[name]())
    prefs = unit_rows(rng, 20, d)
    train, test = np.arange(100), np.arange(100, 200)
    before, after = [], []
    for u, p in enumerate(prefs):
        y = (X @ p > 0).astype(int)
        before.append(roc_auc_score(y[test], learner.score(u, 0, test) + rng.standard_normal(100) * 1e-9))
        shown = rng.choice(train, 60, replace=False)
        learner.learn_many(np.full(60, u), np.zeros(60, int), shown, y[shown])
        after.append(roc_auc_score(y[test], learner.score(u, 0, test)))
    assert np.mean(after) > 0.85, np.mean(after)
    assert np.mean(after) > np.mean(before) + 0.3


def test_event_validation_names_plain_values():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query)
    with pytest.raises(ValueError, match=r"^item 0 belongs to query 0, not 10$"):
        learner.learn_one(0, 10, 0, 1)
    with pytest.raises(ValueError, match=r"^item 1 belongs to query 0, not 10$"):
        learner.learn_many(np.array([0, 0]), np.array([0, 10]), np.array([0, 1]), [1, 0])
    with pytest.raises(ValueError, match=r"^item 0 belongs to query 0, not 10$"):
        learner.score(0, np.int64(10), np.array([0]))
    with pytest.raises(ValueError, match=r"^query 99 is unknown; known queries: \[0, 10, 20\]$"):
        learner.rank(0, 99, np.array([0, 1]))
    with pytest.raises(ValueError, match="query 99 is unknown"):
        learner.learn_one(0, np.int64(99), 0, 1)
    with pytest.raises(ValueError, match="query 99 is unknown"):
        learner.learn_many([0], [99], [0], [1])
    with pytest.raises(ValueError, match="query 'x' is unknown"):
        learner.forget(0, "x")
    with pytest.raises(ValueError, match=r"labels must be 1 \(accepted\) or 0 \(rejected\), got 2$"):
        learner.learn_one(0, 0, 0, 2)
    with pytest.raises(ValueError, match="got 2$"):
        learner.learn_many([0], [0], [0], np.array([2]))
    with pytest.raises(IndexError, match=r"^item 999 is not a catalog id: ids are in \[0, 60\)$"):
        learner.learn_one(0, 0, 999, 1)
    with pytest.raises(IndexError, match="item 999 is not"):
        learner.learn_many([0], [0], np.array([999]), [1])
    with pytest.raises(TypeError, match="item must be a catalog id"):
        learner.learn_one(0, 0, 1.0, 1)
    with pytest.raises(ValueError, match="equal length"):
        learner.learn_many([0], [0, 0], [0, 1], [1, 0])
    for message in ("np.int64", "np.str_"):
        try:
            learner.learn_many(np.array([0]), np.array([10]), np.array([0]), [1])
        except ValueError as e:
            assert message not in str(e)
    learner.learn_many([], [], [], [])  # nothing to do
    assert len(learner.store) == 0
    with pytest.raises(ValueError, match="threads"):
        ResidualLearner(X, item_query, threads=0)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("store", ["memory", "generic-store"])
def test_learn_vector_equals_learn_one_on_a_catalog_item(name, store):
    X, item_query, head = make_catalog()
    rng = np.random.default_rng(8)
    kw = dict(rule=RULES[name](), head_scores=head, dtype="float32") | PATHS[store]
    a = ResidualLearner(X, item_query, **kw)
    users, queries, items, labels = random_events(rng, item_query, 120, users=np.arange(3))
    a.learn_many(users, queries, items, labels)  # some history first, so the buffers and evidence are not empty
    for item, label in ((25, 1), (31, 0), (22, 1)):
        b = pickle.loads(pickle.dumps(a))
        a.learn_one(1, 10, item, label)
        before = b.score(1, 10, np.array([item]))[0]
        window = b.store.get_many([(1, 10)]).get("window")
        b.learn_vector(1, 10, X[item], head[item], label)
        if name == "window":  # a catalog item joins the window's joint solve; a vector takes a solve of its own
            assert (b.score(1, 10, np.array([item]))[0] - before) * (1 if label else -1) > 0
            np.testing.assert_array_equal(b.store.get_many([(1, 10)])["window"], window)
            continue
        np.testing.assert_allclose(b.score(1, 10, np.arange(20, 40)), a.score(1, 10, np.arange(20, 40)),
                                   rtol=1e-5, atol=1e-5)
        if name == "pairwise":  # the vector has no catalog id to remember
            assert item not in b.store.get_many([(1, 10)])["buffer"]
            assert item in a.store.get_many([(1, 10)])["buffer"]
    # a vector outside the catalog, with a head score from elsewhere: it moves the scores of similar items
    x = X[33] + 0.1 * rng.standard_normal(16).astype(np.float32)
    before = b.score(2, 10, X[33][None], head=[0.0])
    for _ in range(5):
        b.learn_vector(2, 10, x, 0.0, 1)
    assert b.score(2, 10, X[33][None], head=[0.0]) > before
    with pytest.raises(ValueError, match=r"x must be one embedding of shape \(16,\)"):
        b.learn_vector(2, 10, X[:2], 0.0, 1)
    with pytest.raises(ValueError, match="NaN"):
        b.learn_vector(2, 10, np.full(16, np.nan), 0.0, 1)
    with pytest.raises(ValueError, match="query 5 is unknown"):
        b.learn_vector(2, 5, x, 0.0, 1)


def test_sample_scores_draw_from_the_laplace_posterior():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query, rule=DiagonalLaplace(prior_var=1.0), head_scores=head)
    ids = np.arange(20)
    cold = learner.sample_scores(4, 0, ids, 4000, rng=0)
    assert cold.shape == (4000, 20)
    np.testing.assert_allclose(cold.mean(0), learner.score(4, 0, ids), atol=0.08)  # 5 standard errors
    np.testing.assert_allclose(cold.std(0), np.linalg.norm(learner.catalog.embeddings[ids], axis=1), rtol=0.1)  # prior var 1
    learner.learn_many(np.full(200, 4), np.zeros(200, int), np.arange(200) % 20, np.arange(200) % 20 < 5)
    warm = learner.sample_scores(4, 0, ids, 4000, rng=0)
    np.testing.assert_allclose(warm.mean(0), learner.score(4, 0, ids), atol=0.08)  # 5 standard errors
    assert (warm.std(0) < 0.9 * cold.std(0)).all()  # evidence narrows the posterior
    np.testing.assert_array_equal(learner.sample_scores(4, 0, ids, 3, rng=1), learner.sample_scores(4, 0, ids, 3, rng=1))
    with pytest.raises(TypeError, match="PairwiseSGD keeps no posterior"):
        ResidualLearner(X, item_query).sample_scores(4, 0, ids, 3)


def test_store_injection_and_schema_check():
    X, item_query, _ = make_catalog()
    learner = ResidualLearner(X, item_query, store=lambda schema: InMemoryStore(schema, capacity=10))
    assert learner.store.capacity == 10
    assert set(learner.schema) == {"residual", "buffer"}
    assert set(ResidualLearner(X, item_query, rule=DiagonalLaplace()).schema) == {"residual", "evidence"}
    assert learner.schema["residual"].nbytes == 16 * 2  # float16
    with pytest.raises(ValueError, match="schema"):
        ResidualLearner(X, item_query, rule=PointwiseSGD(), store=InMemoryStore(learner.schema))


def test_pickle_round_trip_keeps_the_state():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query, head_scores=head)
    learner.learn_many([1, 1, 2], [0, 0, 0], [0, 1, 2], [1, 0, 1])
    clone = pickle.loads(pickle.dumps(learner))
    np.testing.assert_array_equal(clone.score(1, 0, np.arange(20)), learner.score(1, 0, np.arange(20)))


def _prestandardized(X, item_query, features):
    Z = X.copy()
    for q in np.unique(item_query):
        m = item_query == q
        C = X[m] - X[m].mean(0)
        Z[m] = C / (X[m].std(0) * np.sqrt(X.shape[1])) if features == "standardized" else C / np.sqrt((C ** 2).sum(1).mean())
    return Z


@pytest.mark.parametrize("features", ["standardized", "centered"])
def test_features_match_a_learner_on_pretransformed_items(features):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(12, 6)) * rng.uniform(0.1, 3.0, 6) + 3.0).astype(np.float32)
    item_query = np.repeat([0, 1], 6)
    Z = _prestandardized(X, item_query, features)
    if features == "centered":  # one scale per query: the catalog's centered vectors have unit mean square norm
        np.testing.assert_allclose((Z[:6] ** 2).sum(1).mean(), 1.0, rtol=1e-5)
    a = ResidualLearner(X, item_query, PairwiseSGD(lr=1.0), dtype="float32", features=features)
    b = ResidualLearner(Z, item_query, PairwiseSGD(lr=1.0), dtype="float32", features="raw")
    for learner in (a, b):
        learner.learn_many([1, 1, 1, 2], [0, 0, 0, 1], [0, 1, 2, 7], [1, 0, 0, 1])
    for user, query, ids in ((1, 0, np.arange(6)), (2, 1, np.arange(6, 12))):
        np.testing.assert_allclose(a.score(user, query, ids), b.score(user, query, ids), rtol=1e-5, atol=1e-6)
        # arbitrary embeddings are standardised with the same query statistics
        np.testing.assert_allclose(a.score(user, query, X[ids]), b.score(user, query, Z[ids]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features must be 'raw', 'standardized' or 'centered'"):
        ResidualLearner(X, item_query, features="whitened")


def test_head_interaction_acts_on_the_features_and_their_product_with_the_head():
    """A query with fewer items than D/2 keeps its whole catalog through the projection, so a
    rule that sees only inner products (WindowMAP) scores as it does on ``[x̃, c z x̃]`` unprojected."""
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(12, 16)) + 2.0).astype(np.float32)
    item_query, head = np.repeat([0, 1], 6), rng.normal(size=12) * 3 + 1
    Z = _prestandardized(X, item_query, "centered")
    z = np.concatenate([(h - h.mean()) / h.std() for h in np.split(head, 2)])
    rule = lambda: WindowMAP(prior_var=2.0, window=4, head_var=0.5)  # noqa: E731
    a = ResidualLearner(X, item_query, rule(), head_scores=head, dtype="float32", features="centered", head_interaction=1.5)
    b = ResidualLearner(np.hstack([Z, 1.5 * z[:, None] * Z]), item_query, rule(), head_scores=head, dtype="float32", features="raw")
    assert a.store.schema["residual"].shape == (16,) and a.dim == 16
    events = ([1] * 5 + [2] * 3, [0] * 5 + [1] * 3, [0, 1, 2, 3, 4, 7, 8, 9], [1, 0, 0, 1, 1, 0, 1, 0])
    for learner in (a, b):
        learner.learn_many(*events)
    for user, query, ids in ((1, 0, np.arange(6)), (2, 1, np.arange(6, 12)), (3, 0, np.arange(6))):
        np.testing.assert_allclose(a.score(user, query, ids), b.score(user, query, ids), rtol=1e-4, atol=1e-4)
        # embeddings with their raw head scores take the catalog's transform and projection
        np.testing.assert_allclose(a.score(user, query, X[ids], head=head[ids]), a.score(user, query, ids), rtol=1e-4, atol=1e-4)
    plain = ResidualLearner(X, item_query, rule(), head_scores=head, dtype="float32", features="centered")
    plain.learn_many(*events)
    assert not np.allclose(a.score(1, 0, np.arange(6)), plain.score(1, 0, np.arange(6)), atol=1e-3)  # it changes what is learned
    with pytest.raises(ValueError, match="head_interaction > 0 needs head_scores"):
        ResidualLearner(X, item_query, head_interaction=1.0)
    with pytest.raises(ValueError, match="would mix their coordinates: use key='user_query'"):
        ResidualLearner(X, item_query, head_scores=head, head_interaction=1.0, key="user")
    with pytest.raises(ValueError, match="head_interaction must be finite and >= 0"):
        ResidualLearner(X, item_query, head_scores=head, head_interaction=-1.0)


def test_config_defaults_equal_code_defaults():
    import inspect
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "online" / "residual.yaml").read_text())
    assert cfg.pop("_target_") == "streamml.online.ResidualLearner" and cfg.pop("_partial_") is True
    assert cfg.pop("rule") == "${rule}"
    defaults = {k: p.default for k, p in inspect.signature(ResidualLearner).parameters.items()}
    assert cfg == {k: defaults[k] for k in cfg}
    assert set(defaults) - set(cfg) == {"items", "item_query", "rule", "head_scores", "store"}
