import os
import pickle
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import streamml.online.learner as online
from streamml.online.learner import Catalog, PairwiseSGD, PointwiseSGD, ResidualLearner, sampled_dots, weighted_rows
from streamml.stores import InMemoryStore, Store

RULES = {
    "pointwise": lambda **kw: PointwiseSGD(**kw),
    "pairwise": lambda **kw: PairwiseSGD(**kw),
}


def unit_rows(rng, n, d, dtype=np.float32):
    X = rng.standard_normal((n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(dtype)


def random_state(rule, rng, n_keys, n_items):
    """Buffers with a mix of filled and empty (-1) slots, some fully empty."""
    state = {}
    for name, f in rule.fields().items():
        m = f.shape[-1]
        buf = rng.integers(0, n_items, (n_keys, *f.shape)).astype(np.int32)
        n_filled = rng.integers(0, m + 1, (n_keys, *f.shape[:-1]))
        buf[np.arange(m) >= n_filled[..., None]] = -1  # filled slots come first
        buf[0] = -1  # key 0 has no feedback yet
        state[name] = buf
    return state


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    X = unit_rows(rng, 30, 8, np.float64)
    z = rng.standard_normal(30)
    return rng, Catalog(X, z)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_gradient_matches_finite_differences(name, l2, toy):
    rng, cat = toy
    rule = RULES[name](lr=1.0, l2=l2)
    B = 6
    items = rng.integers(0, 30, B)
    labels = rng.integers(0, 2, B).astype(bool)
    state = random_state(rule, rng, B, 30)
    r = rng.standard_normal((B, 8))
    g = rule.grad(r, items, labels, state, cat)
    eps = 1e-6
    fd = np.zeros_like(r)
    for d in range(8):
        e = np.zeros(8)
        e[d] = eps
        fd[:, d] = (rule.loss(r + e, items, labels, state, cat) - rule.loss(r - e, items, labels, state, cat)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def torch_reference_loss(name, r, items, labels, state, X, z, l2):
    """The losses written directly from their definitions, for autograd."""
    s = X @ r.T  # (n_items, B): every item's score for every key
    losses = []
    for b in range(r.shape[0]):
        sb = s[:, b] + z
        y = bool(labels[b])
        if name == "pointwise":
            loss = torch.nn.functional.softplus(-sb[items[b]] if y else sb[items[b]])
        else:
            opp = [j for j in state["buffer"][b, 0 if y else 1] if j >= 0]  # row 0: rejected
            sign = 1.0 if y else -1.0
            if opp:
                loss = torch.nn.functional.softplus(-sign * (sb[items[b]] - sb[opp])).mean()
            else:
                loss = torch.zeros((), dtype=r.dtype)
        losses.append(loss + 0.5 * l2 * (r[b] ** 2).sum())
    return torch.stack(losses)


@pytest.mark.parametrize("name", sorted(RULES))
def test_gradient_and_loss_match_autograd(name, toy):
    rng, cat = toy
    rule = RULES[name](lr=1.0, l2=0.1)
    B = 8
    items = rng.integers(0, 30, B)
    labels = rng.integers(0, 2, B).astype(bool)
    state = random_state(rule, rng, B, 30)
    r = rng.standard_normal((B, 8))
    rt = torch.tensor(r, requires_grad=True)
    ref = torch_reference_loss(name, rt, items, labels, state, torch.tensor(cat.embeddings), torch.tensor(cat.head), 0.1)
    ref.sum().backward()
    np.testing.assert_allclose(rule.loss(r, items, labels, state, cat), ref.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(rule.grad(r, items, labels, state, cat), rt.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(RULES))
def test_step_is_decayed_gradient_step_then_cap(name, toy):
    rng, cat = toy
    rule = RULES[name](lr=0.7, l2=0.05, decay=0.1, max_norm=2.0)
    B = 8
    items = rng.integers(0, 30, B)
    labels = rng.integers(0, 2, B).astype(bool)
    state = random_state(rule, rng, B, 30)
    r = rng.standard_normal((B, 8)) * np.linspace(0.01, 1.5, B)[:, None]  # some get capped
    expected = (1 - 0.1) * r - 0.7 * rule.grad(r, items, labels, state, cat)
    norm = np.linalg.norm(expected, axis=1, keepdims=True)
    expected = np.where(norm > 2.0, expected * 2.0 / norm, expected)
    got, _ = rule.step(r.copy(), items, labels, state, cat)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert (np.linalg.norm(got, axis=1) <= 2.0 + 1e-12).all()


@pytest.mark.parametrize("name", sorted(RULES))
def test_single_event_path_matches_batched_step(name):
    rng = np.random.default_rng(1)
    cat = Catalog(unit_rows(rng, 40, 16), rng.standard_normal(40).astype(np.float32))
    rule = RULES[name](lr=2.0, l2=0.01, decay=0.02)
    B = 50
    items = rng.integers(0, 40, B)
    labels = rng.integers(0, 2, B).astype(bool)
    state = random_state(rule, rng, B, 40)
    r = rng.standard_normal((B, 16)).astype(np.float32)
    batched, fields = rule.step(r.copy(), items, labels, state, cat)
    for b in range(B):
        row = {k: v[b] for k, v in state.items()}
        one, one_fields = rule.step_one(r[b].copy(), int(items[b]), bool(labels[b]), row, cat)
        np.testing.assert_allclose(one, batched[b], rtol=1e-5, atol=1e-6)
        for k, v in one_fields.items():
            np.testing.assert_array_equal(v, fields[k][b])


def test_pairwise_buffers_keep_the_newest_items_per_label():
    rule = PairwiseSGD(buffer_size=4)
    assert rule.fields()["buffer"].shape == (2, 2)
    state = {"buffer": np.array([[[7, 8], [5, -1]]], np.int32)}  # rejected 7, 8; accepted 5
    cat = Catalog(np.eye(10, dtype=np.float32), np.zeros(10, np.float32))
    _, out = rule.step(np.zeros((1, 10), np.float32), np.array([3]), np.array([0]), state, cat)
    np.testing.assert_array_equal(out["buffer"], [[[3, 7], [5, -1]]])
    _, out = rule.step(np.zeros((1, 10), np.float32), np.array([4]), np.array([1]), out, cat)
    np.testing.assert_array_equal(out["buffer"], [[[3, 7], [4, 5]]])
    one = rule.step_one(np.zeros(10, np.float32), 4, True, {"buffer": np.array([[3, 7], [5, -1]], np.int32)}, cat)
    np.testing.assert_array_equal(one[1]["buffer"], [[3, 7], [4, 5]])


def test_pairwise_without_opposite_items_only_shrinks():
    rule = PairwiseSGD(lr=1.0, l2=0.1, decay=0.2)
    cat = Catalog(np.eye(3, dtype=np.float32), np.zeros(3, np.float32))
    state = {"buffer": np.full((1, 2, 4), -1, np.int32)}
    state["buffer"][0, 1, 0] = 2  # an accepted item, but the new event is an accept too
    r = np.array([[1.0, 2.0, 3.0]], np.float32)
    got, _ = rule.step(r.copy(), np.array([0]), np.array([1]), state, cat)
    np.testing.assert_allclose(got, r * (1 - 0.2 - 1.0 * 0.1), rtol=1e-6)


def test_kernels_agree_between_numpy_and_torch(monkeypatch):
    rng = np.random.default_rng(2)
    X = unit_rows(rng, 100, 32)
    idx = rng.integers(0, 100, (300, 5))
    r = rng.standard_normal((300, 32)).astype(np.float32)
    coef = rng.standard_normal((300, 5)).astype(np.float32)
    monkeypatch.setattr(online, "TORCH_MIN_ROWS", 10**9)
    d_np, w_np = sampled_dots(X, idx, r), weighted_rows(X, idx, coef)
    monkeypatch.setattr(online, "TORCH_MIN_ROWS", 0)
    np.testing.assert_allclose(sampled_dots(X, idx, r), d_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted_rows(X, idx, coef), w_np, rtol=1e-5, atol=1e-6)
    # float64 inputs (as in the gradient checks) go through torch too
    X64, r64, c64 = X.astype(np.float64), r.astype(np.float64), coef.astype(np.float64)
    np.testing.assert_allclose(sampled_dots(X64, idx, r64), np.einsum("bkd,bd->bk", X64[idx], r64), rtol=1e-12)
    np.testing.assert_allclose(weighted_rows(X64, idx, c64), np.einsum("bk,bkd->bd", c64, X64[idx]), rtol=1e-12)
    np.testing.assert_allclose(d_np, np.einsum("bkd,bd->bk", X[idx], r), rtol=1e-6)
    a = (rng.standard_normal(200_000) * 100).astype(np.float32)
    a[:3] = [65519.0, 1e-8, np.float32(1.0009765625 + 2**-12)]  # overflow edge, subnormal, a tie
    np.testing.assert_array_equal(online._cast(a, np.float16), a.astype(np.float16))


# ------------------------------------------------------------------ float16 in the kernels
@numba.njit
def _f16_round_trip(bits, x):
    out_f, out_h = np.empty(len(bits), np.float32), np.empty(len(x), np.uint16)
    for i in range(len(bits)):
        out_f[i] = online._to_f32(bits[i])
    for i in range(len(x)):
        out_h[i] = online._from_f32(x[i], out_h.dtype)
    return out_f, out_h


def float16_cases():
    """Every float16 bit pattern, and float32s around every float16: ties, overflow, subnormals."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = bits.view(np.float16).astype(np.float32)
    f = f[np.isfinite(f)]
    with np.errstate(invalid="ignore"):
        mid = ((f[:-1].astype(np.float64) + f[1:]) / 2).astype(np.float32)  # exact ties (RNE decides)
    x = np.concatenate([f, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, -np.float32(np.inf))])
    rng = np.random.default_rng(0)
    x = np.concatenate([x, (rng.standard_normal(10_000) * 10.0 ** rng.integers(-9, 6, 10_000)).astype(np.float32)])
    x = np.concatenate([x, np.float32([65519.0, 65520.0, 1e30, -1e30, 0.0, -0.0, np.inf, -np.inf])])
    return bits, x


def test_float16_conversions_match_numpy():
    bits, x = float16_cases()
    with np.errstate(over="ignore"):
        want_h = x.astype(np.float16).view(np.uint16)
    want_f = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want_f)  # (the CPU quietens signalling NaNs; numpy keeps their payload)
    got_f, got_h = _f16_round_trip(bits, x)  # what the kernels use on this machine
    np.testing.assert_array_equal(got_f.view(np.uint32)[~nan], want_f.view(np.uint32)[~nan])  # -0 too
    assert np.isnan(got_f[nan]).all()
    np.testing.assert_array_equal(got_h, want_h)
    # the software fallback (CPUs without float16 instructions), element by element
    soft_f = np.array([online._h2f_soft(b) for b in bits.tolist()], np.float32)
    np.testing.assert_array_equal(soft_f.view(np.uint32)[~nan], want_f.view(np.uint32)[~nan])
    assert np.isnan(soft_f[nan]).all()
    soft_h = np.array([online._f2h_soft(v) for v in x[::7].tolist()], np.uint16)
    np.testing.assert_array_equal(soft_h, want_h[::7])


@pytest.mark.slow
def test_kernels_without_float16_instructions(tmp_path):
    """A CPU target without F16C takes the software conversions; the learner still agrees."""
    code = """
import numpy as np, streamml.online as online
from streamml.online import ResidualLearner, PairwiseSGD
assert not online.NATIVE_HALF
rng = np.random.default_rng(0)
X = rng.standard_normal((50, 16)).astype(np.float32)
q, head = np.repeat([0, 1], 25), rng.standard_normal(50)
ev = rng.integers(0, 5, 3000), rng.integers(0, 50, 3000), rng.integers(0, 2, 3000)
out = []
for use in (True, False):
    online.USE_NUMBA = use
    learner = ResidualLearner(X, q, rule=PairwiseSGD(lr=3.0, max_norm=2.0), head_scores=head)
    learner.learn_many(ev[0], q[ev[1]], ev[1], ev[2])
    out.append(learner.store.get_many([(u, v) for u in range(5) for v in (0, 1)])["residual"].astype(np.float32))
np.testing.assert_allclose(out[0], out[1], rtol=2**-10, atol=2**-10)
"""
    repo = os.path.dirname(os.path.dirname(online.__file__))  # this checkout, not an installed copy
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=repo)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


# ------------------------------------------------------------------ learner
class PlainStore(Store):
    """An InMemoryStore behind the bare Store protocol: the learner's generic path,
    the one SQLite and Redis stores will take (no compiled kernel, no row views)."""

    def __init__(self, schema):
        self._inner = InMemoryStore(schema)
        self.schema = self._inner.schema

    def get_many(self, keys):
        return self._inner.get_many(keys)

    def put_many(self, keys, values):
        self._inner.put_many(keys, values)

    def delete_many(self, keys):
        self._inner.delete_many(keys)

    def __contains__(self, key):
        return key in self._inner

    def __len__(self):
        return len(self._inner)


# how learn_one / learn_many run: compiled (one thread, or split over 3 parts), the numpy
# path on an InMemoryStore (row views, waves; numpy or torch gathers), the generic store path
PATHS = ["numba", "numba-parts", "numpy", "numpy-torch", "generic-store"]


def use_path(path, monkeypatch) -> dict:
    """Set the module switches for ``path``; returns extra ResidualLearner kwargs."""
    if path == "numba-parts":
        monkeypatch.setattr(online, "_n_parts", lambda n: 3)  # more parts than threads is fine
    if path.startswith("numpy"):
        monkeypatch.setattr(online, "USE_NUMBA", False)
    if path == "numpy-torch":
        monkeypatch.setattr(online, "TORCH_MIN_ROWS", 0)
    return {"store": PlainStore} if path == "generic-store" else {}


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
def test_learn_many_equals_learn_one_in_order(name, key, path, monkeypatch):
    X, item_query, head = make_catalog()
    rng = np.random.default_rng(3)
    # few users: many repeated keys, interleaved
    users, queries, items, labels = random_events(rng, item_query, 400, users=np.arange(7))
    kw = dict(rule=RULES[name](lr=2.0, l2=0.01, decay=0.01, max_norm=3.0), head_scores=head, key=key)
    kw |= use_path(path, monkeypatch)
    assert isinstance(ResidualLearner(X, item_query, **kw).store, PlainStore) == (path == "generic-store")
    one = ResidualLearner(X, item_query, **kw)
    for u, q, i, y in zip(users, queries, items, labels):
        one.learn_one(u, q, i, y)
    many = ResidualLearner(X, item_query, chunk_size=3, **kw)  # several chunks per wave
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


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_compiled_path_equals_numpy_path(name, dtype, monkeypatch):
    """The numba kernels against the numpy rules, on random events with many repeated keys."""
    X, item_query, head = make_catalog(seed=6, d=64)
    rng = np.random.default_rng(7)
    rule = RULES[name](lr=3.0, l2=0.02, decay=0.01, max_norm=2.0)  # the cap binds on some steps
    kw = dict(rule=rule, head_scores=head, dtype=dtype)
    learners = {path: ResidualLearner(X, item_query, **kw) for path in ("numba", "numba-parts", "numpy")}
    stream = [random_events(rng, item_query, n, users=np.arange(40)) for n in (1, 300, 5, 2000)]
    for path, learner in learners.items():
        with monkeypatch.context() as m:
            use_path(path, m)
            for b, ev in enumerate(stream):
                if b % 2:
                    learner.learn_many(*ev)
                else:
                    for e in zip(*ev):
                        learner.learn_one(*e)
    keys = [(u, q) for u in range(40) for q in (0, 10, 20)]
    want = learners["numpy"].store.get_many(keys)
    assert len(learners["numpy"].store) > 60
    for path in ("numba", "numba-parts"):
        got = learners[path].store.get_many(keys)
        assert len(learners[path].store) == len(learners["numpy"].store)
        tol = 2**-10 if dtype == "float16" else 1e-5  # a few float16 ulps over ~60 steps per key
        np.testing.assert_allclose(got["residual"].astype(np.float32), want["residual"], rtol=tol, atol=tol)
        for field in set(want) - {"residual"}:
            np.testing.assert_array_equal(got[field], want[field])


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


@pytest.mark.parametrize("name", sorted(RULES))
def test_norm_cap_holds_under_adversarial_feedback(name):
    X, item_query, head = make_catalog()
    max_norm = 2.5
    learner = ResidualLearner(X, item_query, rule=RULES[name](lr=1e6, max_norm=max_norm), head_scores=head)
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
    shared = ResidualLearner(X, item_query, key="user")
    per_query = ResidualLearner(X, item_query, key="user_query")
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


def test_event_validation():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query)
    with pytest.raises(ValueError, match="belongs to query"):
        learner.learn_one(0, 10, 0, 1)
    with pytest.raises(ValueError, match="belongs to query"):
        learner.learn_many([0, 0], [0, 10], [0, 1], [1, 0])
    with pytest.raises(ValueError, match="labels"):
        learner.learn_one(0, 0, 0, 2)
    with pytest.raises(IndexError):
        learner.learn_one(0, 0, 999, 1)
    with pytest.raises(ValueError, match="equal length"):
        learner.learn_many([0], [0, 0], [0, 1], [1, 0])
    with pytest.raises(ValueError, match="belongs to query"):
        learner.score(0, 10, np.array([0]))
    learner.learn_many([], [], [], [])  # nothing to do
    assert len(learner.store) == 0


def test_store_injection_and_schema_check():
    X, item_query, _ = make_catalog()
    learner = ResidualLearner(X, item_query, store=lambda schema: InMemoryStore(schema, capacity=10))
    assert learner.store.capacity == 10
    assert set(learner.schema) == {"residual", "buffer"}
    assert learner.schema["residual"].nbytes == 16 * 2  # float16
    with pytest.raises(ValueError, match="schema"):
        ResidualLearner(X, item_query, rule=PointwiseSGD(), store=InMemoryStore(learner.schema))


def test_pickle_round_trip_keeps_the_state():
    X, item_query, head = make_catalog()
    learner = ResidualLearner(X, item_query, head_scores=head)
    learner.learn_many([1, 1, 2], [0, 0, 0], [0, 1, 2], [1, 0, 1])
    clone = pickle.loads(pickle.dumps(learner))
    np.testing.assert_array_equal(clone.score(1, 0, np.arange(20)), learner.score(1, 0, np.arange(20)))


def test_rules_validate_and_build_from_hydra_config():
    with pytest.raises(ValueError):
        PairwiseSGD(buffer_size=3)
    with pytest.raises(ValueError):
        PointwiseSGD(max_norm=float("inf"))
    with pytest.raises(ValueError):
        PointwiseSGD(lr=0)
    with pytest.raises(ValueError, match="overshoot"):
        PairwiseSGD(lr=10, l2=0.1)
    hydra_utils = pytest.importorskip("hydra.utils")
    rule = hydra_utils.instantiate({"_target_": "streamml.online.PairwiseSGD", "lr": 5.0, "buffer_size": 4})
    assert isinstance(rule, PairwiseSGD) and rule.lr == 5.0 and rule.fields()["buffer"].shape == (2, 2)
    assert "lr=5.0" in repr(rule)


def test_standardized_features_match_a_learner_on_prestandardized_items():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(12, 6)) + 3.0).astype(np.float32)
    item_query = np.repeat([0, 1], 6)
    Z = X.copy()
    for q in (0, 1):
        m = item_query == q
        Z[m] = (X[m] - X[m].mean(0)) / (X[m].std(0) * np.sqrt(6))
    a = ResidualLearner(X, item_query, PairwiseSGD(lr=1.0), dtype="float32", features="standardized")
    b = ResidualLearner(Z, item_query, PairwiseSGD(lr=1.0), dtype="float32")
    for learner in (a, b):
        learner.learn_many([1, 1, 1, 2], [0, 0, 0, 1], [0, 1, 2, 7], [1, 0, 0, 1])
    for user, query, ids in ((1, 0, np.arange(6)), (2, 1, np.arange(6, 12))):
        np.testing.assert_allclose(a.score(user, query, ids), b.score(user, query, ids), rtol=1e-5, atol=1e-6)
        # arbitrary embeddings are standardised with the same query statistics
        np.testing.assert_allclose(a.score(user, query, X[ids]), b.score(user, query, Z[ids]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features must be 'raw' or 'standardized'"):
        ResidualLearner(X, item_query, features="whitened")
