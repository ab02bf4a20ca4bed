"""Contract of the event log and the item catalog, for memory, SQLite and Redis (plain and cluster)."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import numpy as np
import pytest

from streamml.data import load_queries
from streamml.stores import SQLiteEventLog, SQLiteItems
from streamml.stores.events import Catalog, Claim, EventLog, MemoryCatalog, MemoryEventLog
from tests.helpers import wait_until
from tests.stores.conformance import assert_conforms

KINDS = ["memory", "sqlite", "redis", "redis-cluster"]


@pytest.fixture(params=KINDS)
def backend(request, tmp_path):
    """``(event log, item catalog)`` of one backend, empty."""
    if request.param == "memory":
        return MemoryEventLog(clock=Clock()), MemoryCatalog()
    if request.param == "sqlite":
        path = tmp_path / "state.db"
        return SQLiteEventLog(path, clock=Clock()), SQLiteItems(path)
    server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")  # skips without Redis
    from streamml.stores.redis import RedisEventLog, RedisItems

    prefix = f"t{uuid.uuid4().hex[:8]}"
    return RedisEventLog(server.client(), prefix=prefix), RedisItems(server.client(), prefix=prefix)


class Clock:
    """The memory and SQLite logs' injected clock: a test moves it on instead of waiting for a TTL."""

    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def after_the_short_ttls(log, condition, what: str) -> None:
    """Time passes beyond the tests' short TTLs (0.3 s), not their long ones (60 s); then ``condition`` holds.

    The memory and SQLite logs read an injected clock: it moves on by 1 s, and the condition
    must hold at once. Redis expires keys by its own clock: wait for the condition, with a deadline.
    """
    if isinstance(getattr(log, "clock", None), Clock):
        log.clock.now += 1.0
        assert condition(), f"{what}: not after 1 s"
    else:
        wait_until(condition, what, every_s=0.02)


RECORD = {"user": 7, "query": "q1", "items": [3, 5, 9], "propensities": [0.9, 0.05, 0.05],
          "model_version": "run-1", "bucket": "A"}


def test_create_get(backend):
    log, _ = backend
    before = time.time()
    log.create("e1", {**RECORD, "scores": np.array([1.5, 0.5]), "k": np.int64(3)}, ttl_s=60)
    got = log.get("e1")
    assert {k: got[k] for k in RECORD} == RECORD
    assert got["scores"] == [1.5, 0.5] and got["k"] == 3
    assert before - 1 <= got["created"] <= time.time() + 1
    assert log.get("e2") is None
    with pytest.raises(ValueError, match="already exists"):
        log.create("e1", RECORD, ttl_s=60)
    with pytest.raises(TypeError, match="JSON"):
        log.create("e3", {"x": object()}, ttl_s=60)
    assert log.get("e3") is None


def test_claim_is_first_wins_per_item(backend):
    log, _ = backend
    log.create("e1", RECORD, ttl_s=60)
    assert [log.claim("e1", 3), log.claim("e1", 3), log.claim("e1", 5), log.claim("e1", "3")] == [True, False, True, True]
    with pytest.raises(KeyError, match="e2"):
        log.claim("e2", 3)
    log.release("e1", 3)  # its update failed: the next reward of item 3 counts
    assert log.claim("e1", 3) and not log.claim("e1", 5)


def test_events_and_claims_expire(backend):
    log, _ = backend
    log.create("e1", RECORD, ttl_s=0.3)
    assert log.claim("e1", 3)
    after_the_short_ttls(log, lambda: log.get("e1") is None, "the event to expire")
    with pytest.raises(KeyError):
        log.claim("e1", 3)
    log.create("e1", RECORD, ttl_s=60)  # an expired id can be reused, with fresh claims
    assert log.claim("e1", 3)


def test_is_an_event_log_and_a_catalog(backend):
    log, items = backend
    assert_conforms(log, EventLog)
    assert_conforms(items, Catalog)


def test_client_event_ids_are_idempotent_per_user_until_they_expire(backend):
    log, _ = backend
    assert log.claim_client_event("alice", "c1", ttl_s=0.3)
    assert not log.claim_client_event("alice", "c1", ttl_s=0.3)
    assert log.claim_client_event("bob", "c1", ttl_s=60)  # another user's id: bob's feedback counts
    assert not log.claim_client_event("bob", "c1", ttl_s=60)
    log.release_client_event("alice", "c1")
    assert log.claim_client_event("alice", "c1", ttl_s=0.3)
    assert not log.claim_client_event("bob", "c1", ttl_s=60)  # releasing alice's left bob's
    assert log.claim_client_event("alice", "c2", ttl_s=60)
    assert log.claim_client_event("a", "lice/c2", ttl_s=60)  # no spelling of (user, id) collides with another
    after_the_short_ttls(log, lambda: log.claim_client_event("alice", "c1", ttl_s=60), "alice's c1 to expire")
    assert not log.claim_client_event("alice", "c2", ttl_s=60)


def _spec(log) -> tuple:
    """How a racer opens the same log in a fresh process: SQLite by its path, Redis by its URL and prefix."""
    if isinstance(log, SQLiteEventLog):
        return ("sqlite", str(log.db.path))
    from redis.cluster import RedisCluster

    if isinstance(log.client, RedisCluster):
        return ("redis", f"redis-cluster://127.0.0.1:{log.client.get_default_node().port}", log.prefix)
    return ("redis", f"redis://127.0.0.1:{log.client.connection_pool.connection_kwargs['port']}/0", log.prefix)


def _claim_all(spec, n, barrier, out):
    """One racer, in a spawned process with its own connection (nothing of the parent's threads or
    sockets crosses into it), sending back its claims or its error, so the test fails with the cause."""
    try:
        if spec[0] == "sqlite":
            log = SQLiteEventLog(spec[1])
        else:
            from streamml.stores.redis import RedisEventLog

            log = RedisEventLog(spec[1], prefix=spec[2])
        barrier.wait()
        out.put([log.claim("e1", i) for i in range(n)])
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        out.put(repr(err))


@pytest.mark.slow
def test_concurrent_claims_have_one_winner(backend):
    log, _ = backend
    if isinstance(log, MemoryEventLog):
        pytest.skip("the memory event log lives in one process: there is no other process to race")
    log.create("e1", RECORD, ttl_s=60)
    # spawn, not fork: a forked child of this multi-threaded process (the SQLite log's checkpointer,
    # numba's and torch's threads) can inherit a lock held by a thread that is not there to release it
    ctx = multiprocessing.get_context("spawn")
    n, barrier, out = 100, ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(_spec(log), n, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        wins = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert not [w for w in wins if isinstance(w, str)], wins  # a racer failed: its error
    assert (np.array(wins).sum(0) == 1).all()  # each item claimed exactly once


def test_item_catalog(backend, query_dir):
    _, items = backend
    assert items.queries() == []
    assert items.load_folder(query_dir) == 48
    data = load_queries(query_dir, min_per_class=0)
    assert items.queries() == data.query_ids and items.fingerprint == data.fingerprint
    ids, texts, X = items.items("topic_1")
    rows = np.flatnonzero(data.frame["query_id"] == "topic_1")
    np.testing.assert_array_equal(ids, rows)
    assert texts == data.frame["text"].iloc[rows].tolist()
    assert X.dtype == np.float32 and X.shape == (16, 384)
    np.testing.assert_array_equal(X, data.X[rows])
    all_ids, queries, all_texts, all_X = items.all()
    np.testing.assert_array_equal(all_ids, np.arange(48))
    assert queries == data.frame["query_id"].tolist() and all_texts == data.frame["text"].tolist()
    np.testing.assert_array_equal(all_X, data.X)
    with pytest.raises(KeyError, match="topic_9"):
        items.items("topic_9")
    assert items.load_folder(query_dir) == 48  # reloading replaces, never duplicates
    assert len(items.all()[0]) == 48


def test_rejected_items_are_listed_per_user_and_query_until_they_expire(backend):
    log, _ = backend
    assert log.rejected("alice", "q1") == set()
    log.note_rejected("alice", "q1", 3, ttl_s=0.3)
    log.note_rejected("alice", "q1", 5, ttl_s=60)
    log.note_rejected("alice", "q2", 7, ttl_s=60)
    log.note_rejected("bob", "q1", 9, ttl_s=60)
    assert log.rejected("alice", "q1") == {3, 5} and log.rejected("alice", "q2") == {7} and log.rejected("bob", "q1") == {9}
    after_the_short_ttls(log, lambda: log.rejected("alice", "q1") == {5}, "the reject of item 3 to expire")
    log.forget_rejected("alice")
    assert log.rejected("alice", "q1") == set() and log.rejected("alice", "q2") == set() and log.rejected("bob", "q1") == {9}


def test_new_event_ids_are_fresh_and_usable(backend):
    log, _ = backend
    ids = {log.new_event_id("alice") for _ in range(100)} | {log.new_event_id("bob")}
    assert len(ids) == 101 and all(len(i) >= 32 and int(i, 16) >= 0 for i in ids)
    event_id = log.new_event_id("alice/ü")
    log.create(event_id, RECORD, ttl_s=60)
    assert log.get(event_id)["items"] == RECORD["items"] and log.claim(event_id, 3) and not log.claim(event_id, 3)


def test_a_rewards_label_and_time_are_kept_with_its_claim(backend):
    log, _ = backend
    log.create("e1", {**RECORD, "shown": [3, 5, 9]}, ttl_s=60)
    assert log.rewards("e1") == []
    assert log.claim("e1", 9, label=0, time=100.25) and log.claim("e1", 3, label=1, time=101.5)
    assert not log.claim("e1", 3, label=0, time=102.0)  # a duplicate changes nothing: first wins
    assert log.rewards("e1") == [(3, 1, 101.5), (9, 0, 100.25)]  # in display order
    log.release("e1", 9)
    assert log.rewards("e1") == [(3, 1, 101.5)]
    assert log.claim("e1", 5)  # a claim without its reward (an older caller's) reads as None
    assert log.rewards("e1") == [(3, 1, 101.5), (5, None, None)]
    assert log.rewards("e2") == []  # unknown event: no rewards
    with pytest.raises(ValueError, match="label is 1 .accepted., 0 .rejected. or None"):
        Claim("event", "7", "e1", 5, label=2)
