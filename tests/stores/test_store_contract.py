"""One contract suite for every per-key state store: memory, SQLite, Redis, Redis Cluster.

``make_store(schema)`` returns an empty store of the parametrised kind: a fresh
file for SQLite, a fresh key prefix on the session's server for Redis. Stores
shared between processes (all but memory) also pass the multi-process atomicity
test and bind a head fingerprint.
"""

from __future__ import annotations

import multiprocessing
import uuid

import numpy as np
import pytest

from streamml.stores import Field, HeadMismatch, InMemoryStore, SQLiteStore, Store
from tests.stores.conformance import assert_conforms

SCHEMA = {
    "residual": Field((4,), "float16", fill=0),
    "buffer": Field((2, 3), "int32", fill=-1),
    "n": Field((), "int32", fill=0),
    "w": Field((2,), "float64", fill=0.5),
    "flag": Field((), "bool", fill=False),
    "u": Field((3,), "uint8", fill=7),
}

KINDS = ["memory", "sqlite", "redis", "redis-cluster"]
SHARED = ["sqlite", "redis", "redis-cluster"]


def _factory(kind, request, tmp_path):
    if kind == "memory":
        return lambda schema: InMemoryStore(schema)
    if kind == "sqlite":
        return lambda schema: SQLiteStore(schema, tmp_path / f"{uuid.uuid4().hex}.db")
    server = request.getfixturevalue("redis_server" if kind == "redis" else "redis_cluster")  # skips without Redis
    from streamml.stores.redis import RedisStore

    return lambda schema: RedisStore(schema, server.client(), prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=KINDS)
def make_store(request, tmp_path):
    return _factory(request.param, request, tmp_path)


@pytest.fixture(params=SHARED)
def make_shared_store(request, tmp_path):
    return _factory(request.param, request, tmp_path)


@pytest.fixture
def store(make_store):
    return make_store(SCHEMA)


def values(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "residual": rng.standard_normal((n, 4)).astype(np.float16),
        "buffer": rng.integers(-1, 100, (n, 2, 3)).astype(np.int32),
        "n": rng.integers(-100, 100, n).astype(np.int32),
        "w": rng.standard_normal((n, 2)),
        "flag": rng.random(n) < 0.5,
        "u": rng.integers(0, 256, (n, 3)).astype(np.uint8),
    }


KEYS = [1, 2**40, -5, "alice", "", "b{r}a:ce", (3, 7), (3, 8, 1), ("bob", 2), (1,), ("bob", "q1"), (7, "q1")]


def test_is_a_store(store):
    assert_conforms(store, Store)
    assert dict(store.schema) == SCHEMA


def test_cold_start_reads_fill_and_stores_nothing(store):
    out = store.get_many(KEYS)
    for name, f in SCHEMA.items():
        assert out[name].shape == (len(KEYS), *f.shape) and out[name].dtype == f.dtype
        assert (out[name] == f.fill).all(), name
    assert len(store) == 0 and all(k not in store for k in KEYS)


def test_round_trip_every_dtype_and_key_kind(store):
    v = values(len(KEYS))
    store.put_many(KEYS, v)
    assert len(store) == len(KEYS) and all(k in store for k in KEYS)
    out = store.get_many(KEYS)
    for name in SCHEMA:
        assert out[name].dtype == SCHEMA[name].dtype
        np.testing.assert_array_equal(out[name], v[name])
    order = [5, 0, 3, 10]
    np.testing.assert_array_equal(store.get_many([KEYS[i] for i in order])["buffer"], v["buffer"][order])
    out["n"][:] = 0  # reads are copies
    np.testing.assert_array_equal(store.get_many(KEYS)["n"], v["n"])


def test_similar_keys_are_distinct(store):
    keys = [1, (1,), "1", (1, 1), ("1", 1), (1, "1"), ((1, 2), 3)]
    store.put_many(keys, {"n": np.arange(len(keys))})
    assert store.get_many(keys)["n"].tolist() == list(range(len(keys)))
    assert store.get_many([np.int64(1), True, (np.int32(1), 1)])["n"].tolist() == [0, 0, 3]


def test_int_arrays_and_python_keys_are_the_same_keys(store):
    store.put_many(np.array([[3, 7], [4, 8]]), {"n": np.array([1, 2])})
    store.put_many(np.array([10, 11]), {"n": np.array([3, 4])})
    assert (3, 7) in store and (np.int64(4), 8) in store and 10 in store and np.int32(11) in store
    np.testing.assert_array_equal(store.get_many([(4, 8), 11, (3, 7), 10])["n"], [2, 4, 1, 3])
    np.testing.assert_array_equal(store.get_many(np.array([[4, 8]]))["n"], [2])


def test_values_are_cast_to_the_field_dtype(store):
    store.put_many([1], {"residual": np.full((1, 4), 0.1, np.float64), "n": np.array([3], np.int64)})
    out = store.get_many([1])
    assert out["residual"].dtype == np.float16 and out["n"].dtype == np.int32
    np.testing.assert_array_equal(out["residual"], np.float16(0.1))


def test_bad_input_is_rejected_and_writes_nothing(store):
    with pytest.raises(TypeError, match="buffer"):
        store.put_many([1], {"buffer": np.full((1, 2, 3), 0.5)})  # float -> int
    with pytest.raises(ValueError, match="expected shape"):
        store.put_many([1, 2], {"n": np.zeros(3, np.int32)})
    with pytest.raises(KeyError, match="nope"):
        store.put_many([1], {"nope": np.zeros(1)})
    with pytest.raises(TypeError):
        store.put_many([[1, 2]], {"n": np.zeros(1, np.int32)})  # a list is not a key
    with pytest.raises(ValueError, match="expected shape"):
        store.update_many([1, 2], lambda s: {"n": np.zeros(1, np.int32)})
    assert len(store) == 0


def test_overwrite_and_partial_put(store):
    store.put_many(KEYS, values(len(KEYS), seed=0))
    v1 = values(2, seed=1)
    store.put_many(KEYS[:2], {"n": v1["n"]})
    out = store.get_many(KEYS)
    np.testing.assert_array_equal(out["n"][:2], v1["n"])
    np.testing.assert_array_equal(out["residual"], values(len(KEYS), seed=0)["residual"])
    store.put_many(["new"], {"n": np.array([9])})  # partial put of a new key: the rest is fill
    out = store.get_many(["new"])
    assert out["n"][0] == 9 and (out["buffer"] == -1).all() and (out["u"] == 7).all() and (out["w"] == 0.5).all()
    assert len(store) == len(KEYS) + 1


def test_delete(store):
    v = values(len(KEYS))
    store.put_many(KEYS, v)
    store.delete_many([KEYS[0], KEYS[6], KEYS[6], "never-stored"])  # repeats and misses are ignored
    assert len(store) == len(KEYS) - 2
    assert KEYS[0] not in store and KEYS[6] not in store and KEYS[1] in store
    out = store.get_many(KEYS)
    assert (out["buffer"][[0, 6]] == -1).all()
    np.testing.assert_array_equal(out["buffer"][1], v["buffer"][1])
    store.put_many([KEYS[0]], {"n": np.array([1])})  # comes back fresh
    assert (store.get_many([KEYS[0]])["buffer"] == -1).all()


def test_repeated_keys_are_rejected_before_writing(store):
    store.put_many([1], {"n": np.array([5])})
    for batch in ([1, 2, 1], [(3, 7), "x", (3, 7)], [1, np.int64(1)], np.array([[1, 2], [1, 2]])):
        with pytest.raises(ValueError, match="more than once"):
            store.put_many(batch, {"n": np.arange(len(batch))})
        with pytest.raises(ValueError, match="more than once"):
            store.update_many(batch, lambda s: {"n": s["n"] + 1})
    assert len(store) == 1 and store.get_many([1])["n"][0] == 5
    np.testing.assert_array_equal(store.get_many([1, 2, 1])["n"], [5, 0, 5])  # fine in a read


def test_update_many_reads_modifies_writes(store):
    store.put_many([(1, "a")], {"n": np.array([5])})
    seen = {}

    def fn(state):
        seen.update(state)
        return {"n": state["n"] + 1, "residual": state["residual"] + 2}

    store.update_many([(1, "a"), (2, "a")], fn)
    assert seen["n"].tolist() == [5, 0]
    out = store.get_many([(1, "a"), (2, "a")])
    assert out["n"].tolist() == [6, 1] and (out["residual"] == 2).all() and (out["buffer"] == -1).all()

    def boom(state):
        raise RuntimeError("fn failed")

    with pytest.raises(RuntimeError, match="fn failed"):
        store.update_many([(1, "a"), (3, "a")], boom)
    assert store.get_many([(1, "a")])["n"].tolist() == [6] and (3, "a") not in store


def test_empty_batches(store):
    assert store.get_many([])["residual"].shape == (0, 4)
    store.put_many([], {"n": np.zeros(0, np.int32)})
    store.update_many([], lambda s: s)
    store.delete_many([])
    assert len(store) == 0


def check_against_a_dict(store, universe: list, batch_sizes) -> None:
    """Random batches of puts and deletes of ``universe``'s keys (one batch per size), the
    store checked against a dict after each; ``store`` has the one field ``v`` (int64, fill -1)."""
    model: dict = {}
    rng = np.random.default_rng(0)
    for size in batch_sizes:
        idx = rng.choice(len(universe), size=min(size, len(universe)), replace=False)
        batch = [universe[i] for i in idx]
        if rng.random() < 0.3:
            store.delete_many(batch)
            for k in batch:
                model.pop(k, None)
        else:
            v = rng.integers(0, 10**9, len(batch))
            store.put_many(batch, {"v": v})
            model.update(zip(batch, v.tolist()))
        assert len(store) == len(model)
    assert store.get_many(universe)["v"].tolist() == [model.get(k, -1) for k in universe]


def test_matches_a_dict_under_random_operations(make_store):
    store = make_store({"v": Field((), "int64", fill=-1)})
    universe = list(range(100)) + [(i, f"q{i % 7}") for i in range(100)] + [f"s{i}" for i in range(30)]
    check_against_a_dict(store, universe, np.random.default_rng(1).integers(1, 60, 40).tolist())


def test_large_batches(make_store):
    """Batches past one SQL statement's variables and one pipeline's usual size."""
    store = make_store({"r": Field((8,), "float16")})
    n = 1500
    keys = [(u, "q") for u in range(n)]
    r = np.arange(n * 8).reshape(n, 8).astype(np.float16)
    store.put_many(keys, {"r": r})
    store.update_many(keys, lambda s: {"r": s["r"] + 1})
    np.testing.assert_array_equal(store.get_many(keys[::-1])["r"], (r + 1)[::-1])
    store.delete_many(keys[:1200])
    assert len(store) == n - 1200


def _increment(store, key, n, barrier):
    barrier.wait()
    for _ in range(n):
        store.update_many([key, ("solo", multiprocessing.current_process().name)],
                          lambda s: {"n": s["n"] + 1, "residual": s["residual"] + 1})


@pytest.mark.slow
def test_update_many_is_atomic_per_key_across_processes(make_shared_store):
    """2 processes x N read-modify-writes of one key: all 2N apply."""
    store = make_shared_store(SCHEMA)
    ctx = multiprocessing.get_context("fork")
    n, barrier = 150, ctx.Barrier(2)
    procs = [ctx.Process(target=_increment, args=(store, ("hot", "q"), n, barrier), name=f"p{i}") for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    out = store.get_many([("hot", "q"), ("solo", "p0"), ("solo", "p1")])
    assert out["n"].tolist() == [2 * n, n, n]
    assert (out["residual"][0] == 2 * n).all()


def test_bind_head_resets_or_refuses_state_of_another_head(make_shared_store):
    store = make_shared_store(SCHEMA)
    assert store.head_fingerprint is None
    assert store.bind_head("head-a") == "bound"
    store.put_many([(1, "q"), 2], {"n": np.array([3, 4])})
    assert store.bind_head("head-a") == "unchanged" and len(store) == 2
    with pytest.raises(HeadMismatch, match="head-a"):
        store.bind_head("head-b", on_mismatch="error")
    assert len(store) == 2 and store.head_fingerprint == "head-a"
    assert store.bind_head("head-b", on_mismatch="keep") == "kept"  # the explicit migration
    assert len(store) == 2 and store.head_fingerprint == "head-b"
    assert store.bind_head("head-c") == "reset"
    assert len(store) == 0 and store.head_fingerprint == "head-c"
    assert store.get_many([(1, "q")])["n"].tolist() == [0]
    with pytest.raises(ValueError, match="on_mismatch"):
        store.bind_head("x", on_mismatch="ignore")


def test_the_online_learner_runs_on_the_store(make_shared_store):
    """The learner's contract with stores: same events, same scores as in memory."""
    from streamml.online import ResidualLearner

    rng = np.random.default_rng(0)
    items = rng.standard_normal((30, 8)).astype(np.float32)
    item_query = np.repeat([0, 1, 2], 10)
    ours = ResidualLearner(items, item_query, store=make_shared_store)
    ref = ResidualLearner(items, item_query)
    users, its = rng.integers(0, 4, 60), rng.integers(0, 30, 60)
    labels = rng.integers(0, 2, 60)
    for learner in (ours, ref):
        learner.learn_many(users, item_query[its], its, labels)
        learner.learn_one("carol", 1, 12, 1)
        learner.forget(3)
    for user, q in [(0, 0), (1, 2), ("carol", 1), (3, 0)]:
        X = items[item_query == q]
        np.testing.assert_allclose(ours.score(user, q, X), ref.score(user, q, X), atol=1e-2)
    assert len(ours.store) == len(ref.store) > 0
