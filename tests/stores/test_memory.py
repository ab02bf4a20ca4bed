"""Tests of the in-memory store beyond the shared contract (tests/stores/test_store_contract.py): random
operations in both growth regimes, its in-process fast path
(``rows_for``, ``columns``) and its memory per key.
"""

import pickle

import numpy as np
import pytest

from streamml.stores import Field, InMemoryStore, as_key_list
from tests.stores.test_store_contract import SCHEMA, check_against_a_dict, values

STORES = {
    "memory": lambda schema: InMemoryStore(schema),
    "memory-tiny": lambda schema: InMemoryStore(schema, capacity=1),  # grows on every batch
}


@pytest.fixture(params=sorted(STORES))
def make_store(request):
    return STORES[request.param]


@pytest.fixture
def store(make_store):
    return make_store(SCHEMA)


KEYS = [1, 2**40, -5, "alice", (3, 7), (3, 8, 1), ("bob", 2), (1,)]


def test_matches_a_dict_under_random_operations(make_store):
    """Model-based, as the contract suite's, with more keys and some batches big enough for the vectorised path."""
    store = make_store({"v": Field((), "int64", fill=-1)})
    universe = [int(i) for i in range(300)] + [(int(i), int(i % 7)) for i in range(300)] + [f"s{i}" for i in range(50)]
    sizes = np.random.default_rng(1).integers(1, 40, 200)
    sizes[::10] = 400
    check_against_a_dict(store, universe, sizes.tolist())


def test_pickle_round_trip(store):
    store.put_many(KEYS, values(len(KEYS)))
    clone = pickle.loads(pickle.dumps(store))
    assert len(clone) == len(store)
    np.testing.assert_array_equal(clone.get_many(KEYS)["residual"], store.get_many(KEYS)["residual"])


def test_as_key_list():
    assert as_key_list(np.array([1, 2])) == [1, 2]
    assert as_key_list(np.array([[1, 2]])) == [(1, 2)]


def test_in_memory_store_memory_per_key():
    """1M keys of (fp16 384-d residual + 8 int32 buffer slots) fit in 1 KB per key."""
    schema = {"residual": Field((384,), "float16"), "buffer": Field((2, 4), "int32", -1)}
    store = InMemoryStore(schema)
    n = 1_000_000
    keys = np.stack([np.arange(n) * 7919, np.arange(n) % 97], 1)
    for chunk in np.array_split(keys, 4):
        store.put_many(chunk, {"buffer": np.zeros((len(chunk), 2, 4), np.int32)})
    assert len(store) == n
    assert store.nbytes / n <= 1024
    np.testing.assert_array_equal(store.get_many(keys[-3:])["buffer"], 0)
    np.testing.assert_array_equal(store.get_many(keys[-3:])["residual"], 0)


def test_field_validation():
    with pytest.raises(ValueError):
        Field((4,), "int8", fill=1000)
    with pytest.raises(ValueError):
        InMemoryStore({})


def test_in_memory_rows_for_creates_each_new_key_once():
    store = InMemoryStore(SCHEMA, capacity=1)  # grows during the calls
    store.put_many([1, "gone"], {"n": np.array([5, 6]), "buffer": np.full((2, 2, 3), 8, np.int32)})
    store.delete_many(["gone"])  # its row is reused below: it must come back filled
    batch = [1, (2, 3), "a", (2, 3), 1, "a", (2, 3)]
    rows = store.rows_for(batch)
    assert len(store) == 3
    assert rows[1] == rows[3] == rows[6] and rows[2] == rows[5] and rows[0] == rows[4]
    assert len(set(rows.tolist())) == 3
    cols = store.columns
    assert cols["n"][rows].tolist() == [5, 0, 0, 0, 5, 0, 0]
    assert (cols["buffer"][rows[1:3]] == -1).all() and (cols["residual"][rows[1:3]] == 0).all()
    cols["n"][rows[1]] = 9  # the columns are the store's own arrays
    assert store.get_many([(2, 3)])["n"][0] == 9
    # int arrays, repeats among the new keys, no repeats, and the single-key form agree
    keys = np.array([[7, i % 50] for i in range(300)])
    rows = store.rows_for(keys)
    assert len(store) == 53
    np.testing.assert_array_equal(rows, store.rows_for([tuple(k) for k in keys.tolist()]))
    np.testing.assert_array_equal(store.rows_for(np.array([[8, 0], [8, 1]])), [store.row_for((8, 0)), store.row_for((8, 1))])
    assert store.row_for((7, 3)) == rows[3]
    r = store.row_for("b")
    assert len(store) == 56 and store.columns["n"][r] == 0 and store.get_many(["b"])["n"][0] == 0
    assert store.rows_for([]).shape == (0,)


def test_compiled_lookup_matches_the_python_probe():
    """Batches go through the compiled probe, single keys through lookup_one: same rows and slots."""
    store = InMemoryStore({"v": Field((), "int64", fill=-1)})
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(-(2**62), 2**62, (5000, 2)), axis=0)
    store.put_many(keys, {"v": np.arange(len(keys))})
    store.delete_many(keys[::3])  # tombstones along the probe chains
    table = store._tables[2]
    probe = np.concatenate([keys, rng.integers(0, 100, (500, 2))])  # plus absent keys
    rows, slots = table.lookup(probe)
    expected = [table.lookup_one(tuple(k)) for k in probe.tolist()]
    assert rows.tolist() == [e[0] for e in expected] and slots.tolist() == [e[1] for e in expected]
    assert (rows[: len(keys)][::3] == -1).all() and (rows[: len(keys)][1::3] >= 0).all()
