"""streamml.serve.events: A/B buckets, limits, and the claim-and-apply path of every backend."""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid

import numpy as np
import pytest

from streamml.serve import events
from streamml.serve.backend import MemoryBackend, SQLiteBackend, Update
from streamml.stores import Field
from streamml.stores.events import Claim
from tests.helpers import wait_until


def test_buckets_are_stable_salted_and_follow_the_shares():
    shares = [("a", 0.2), ("b", 0.8)]
    users = [f"user{i}" for i in range(4000)]
    got = [events.bucket_of(u, shares, "s") for u in users]
    assert got == [events.bucket_of(u, shares, "s") for u in users]
    assert abs(got.count("a") / len(got) - 0.2) < 0.03
    assert got != [events.bucket_of(u, shares, "other salt") for u in users]
    assert {events.bucket_of(u, [("only", 1.0)]) for u in users[:50]} == {"only"}


def test_limits_refuse_a_retention_shorter_than_the_window():
    with pytest.raises(ValueError, match="retention_s .* must be >= events.window_s"):
        events.Limits(window_s=600, retention_s=60)


def test_vectors_round_trip_through_the_event_record():
    X = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_array_equal(events._decode(events._encode(X), 5), X)


SCHEMA = {"n": Field((), "int64")}
DURABLE = ["sqlite", "redis", pytest.param("cluster", marks=pytest.mark.slow)]


def _opener(kind: str, request, tmp_path):
    """A function opening the backend: every call a new client of the same storage."""
    if kind == "sqlite":
        return lambda: SQLiteBackend(tmp_path / "s.db")
    from streamml.serve.backend import RedisBackend

    prefix = f"t{uuid.uuid4().hex[:8]}"
    if kind == "cluster":
        port = request.getfixturevalue("redis_cluster").nodes[0].port
        return lambda: RedisBackend(f"redis://127.0.0.1:{port}", cluster=True, prefix=prefix)
    port = request.getfixturevalue("redis_server").port
    return lambda: RedisBackend(f"redis://127.0.0.1:{port}/0", prefix=prefix)


@pytest.fixture(params=["memory", *DURABLE])
def backend(request, tmp_path):
    b = MemoryBackend() if request.param == "memory" else _opener(request.param, request, tmp_path)()
    yield b
    b.close()  # stops the SQLite checkpointer thread, which a later fork must not inherit


@pytest.fixture(params=DURABLE)
def open_backend(request, tmp_path):
    opener, opened = _opener(request.param, request, tmp_path), []

    def open_():
        opened.append(opener())
        return opened[-1]

    yield open_
    for b in opened:
        b.close()


def test_claim_and_apply_applies_once_and_not_at_all_when_the_update_fails(backend):
    store = backend.state(SCHEMA, "head0")
    backend.events.create("e1", {"user": "u"}, ttl_s=60)
    bump = Update(store, ["u"], lambda s: {"n": s["n"] + 1})
    broken = Update(store, ["u"], lambda s: (_ for _ in ()).throw(RuntimeError("backend gone")))

    with pytest.raises(RuntimeError, match="backend gone"):
        backend.claim_and_apply(Claim("event", "u", "e1", 3), broken)
    assert backend.claim_and_apply(Claim("event", "u", "e1", 3), bump) is True  # the failed attempt left no claim
    assert backend.claim_and_apply(Claim("event", "u", "e1", 3), bump) is False
    assert backend.claim_and_apply(Claim("event", "u", "e1", 4), bump) is True
    assert backend.claim_and_apply(Claim("client", "u", "c1", ttl_s=60.0), bump) is True
    assert backend.claim_and_apply(Claim("client", "u", "c1", ttl_s=60.0), bump) is False
    assert int(store.get_many(["u"])["n"][0]) == 3
    bump_v = Update(store, ["v"], lambda s: {"n": s["n"] + 1})
    assert backend.claim_and_apply(Claim("client", "v", "c1", ttl_s=60.0), bump_v) is True  # client ids are per user
    assert backend.claim_and_apply(Claim("client", "v", "c1", ttl_s=60.0), bump_v) is False
    assert store.get_many(["u", "v"])["n"].tolist() == [3, 1]


def _killed_during_update(open_backend, claim) -> None:
    """A worker that claims, then dies by SIGKILL while it computes the update."""
    backend = open_backend()
    store = backend.state(SCHEMA, "head0")
    backend.claim_and_apply(claim, Update(store, ["u"], lambda s: os.kill(os.getpid(), signal.SIGKILL)))


@pytest.mark.slow
@pytest.mark.parametrize("claim", [Claim("event", "u", "e1", 3), Claim("client", "u", "c1", ttl_s=60.0)], ids=["reward", "feedback"])
def test_a_worker_killed_during_its_update_leaves_no_claim_so_the_retry_applies_once(open_backend, claim):
    backend = open_backend()
    backend.events.create("e1", {"user": "u"}, ttl_s=60)
    store = backend.state(SCHEMA, "head0")
    worker = multiprocessing.get_context("fork").Process(target=_killed_during_update, args=(open_backend, claim))
    worker.start()
    worker.join(60)
    assert worker.exitcode == -signal.SIGKILL
    bump = Update(store, ["u"], lambda s: {"n": s["n"] + 1})
    assert backend.claim_and_apply(claim, bump) is True  # the client's retry: the killed attempt left no claim
    assert backend.claim_and_apply(claim, bump) is False
    assert int(store.get_many(["u"])["n"][0]) == 1


@pytest.mark.parametrize("kind", ["redis", pytest.param("cluster", marks=pytest.mark.slow)])
def test_redis_going_away_during_an_update_leaves_no_claim_so_the_retry_applies_once(kind, request):
    from streamml.serve.backend import RedisBackend
    from streamml.stores import StoreUnavailable

    if kind == "redis":
        server = request.getfixturevalue("own_redis_server")
        backend = RedisBackend(f"redis://127.0.0.1:{server.port}/0")
    else:
        nodes = request.getfixturevalue("own_redis_cluster").nodes
        backend = RedisBackend(f"redis://127.0.0.1:{nodes[0].port}", cluster=True)
    backend.events.create("e1", {"user": "u"}, ttl_s=60)
    store = backend.state(SCHEMA, "head0")
    if kind == "cluster":  # the master of the user's slot
        port = backend.client.get_node_from_key(store.rkey('"u"')).port
        server = next(n for n in nodes if n.port == port)

    def stop_then_compute(state):
        server.stop()
        return {"n": state["n"] + 1}

    with pytest.raises(StoreUnavailable):
        backend.claim_and_apply(Claim("event", "u", "e1", 3), Update(store, ["u"], stop_then_compute))
    server.start()  # same port, same append-only file (and nodes.conf)
    out = wait_until(lambda: store.get_many(["u"]), "Redis to come back", every_s=0.2, retry_on=StoreUnavailable)
    assert int(out["n"][0]) == 0  # the failed update wrote nothing
    bump = Update(store, ["u"], lambda s: {"n": s["n"] + 1})
    assert backend.claim_and_apply(Claim("event", "u", "e1", 3), bump) is True  # nor a claim
    assert backend.claim_and_apply(Claim("event", "u", "e1", 3), bump) is False
    assert int(store.get_many(["u"])["n"][0]) == 1


def test_select_without_rejected_items_keeps_the_policys_exact_propensities():
    from streamml.online.policies import EpsilonSlots

    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    rejected = np.array([True, False, False, True, False, False])  # the two best were rejected... one of them
    policy = EpsilonSlots(n_explore=2, slots="random")
    keep = np.flatnonzero(~rejected)
    marginals = policy.marginals(scores[keep], 3)
    for seed in range(50):
        shown, props = events._select_without(policy, scores, scores, 3, np.random.default_rng(seed), rejected)
        assert not rejected[shown].any() and len(shown) == 3
        np.testing.assert_allclose(props, marginals[np.searchsorted(keep, shown), np.arange(3)])
    # fewer candidates left than slots: the rejected fill the last ones, best first, deterministically
    shown, props = events._select_without(policy, scores, scores, 5, np.random.default_rng(0), rejected)
    assert sorted(shown[:4].tolist()) == keep.tolist() and shown[4:].tolist() == [0]
    assert props[4:].tolist() == [1.0]
    nothing = np.zeros(6, bool)  # no rejects: the policy's own slate
    a = events._select_without(policy, scores, scores, 3, np.random.default_rng(1), nothing)
    b = policy.select(scores, 3, np.random.default_rng(1))
    assert a[0].tolist() == b.items.tolist() and a[1].tolist() == b.propensities.tolist()


def test_select_without_rejected_items_ranks_thompson_draws_of_the_rest():
    from streamml.online.policies import Thompson

    draws = np.random.default_rng(0).normal(size=(50, 6))
    rejected = np.array([False, True, False, False, True, False])
    keep = np.flatnonzero(~rejected)
    policy = Thompson(n_samples=50)
    shown, props = events._select_without(policy, draws, draws.mean(0), 3, np.random.default_rng(0), rejected)
    expected = policy.select(draws[:, keep], 3, np.random.default_rng(0))
    assert shown.tolist() == keep[expected.items].tolist() and props.tolist() == expected.propensities.tolist()
