"""Redis specifics: key layout and slots, schema checks, failing fast while Redis is down.

The shared behaviour is in ``test_store_contract.py`` (state) and ``test_events_and_items.py``
(event log, item catalog), which run against a real server and a 3-master cluster.
"""

import time
import uuid
from collections import Counter

import numpy as np
import pytest

from streamml.stores import Field, StoreUnavailable

redis_mod = pytest.importorskip("redis", reason="the redis package is in the serve extra: pip install -e '.[serve]'")
from redis.crc import key_slot  # noqa: E402

from streamml.stores.codec import encode_key  # noqa: E402
from streamml.stores.events import Claim  # noqa: E402
from streamml.stores.redis import RedisEventLog, RedisStore  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

SCHEMA = {"r": Field((4,), "float16"), "n": Field((), "int64")}


def _prefix():
    return f"t{uuid.uuid4().hex[:8]}"


def test_keys_carry_the_user_in_a_hash_tag(redis_server):
    store = RedisStore(SCHEMA, redis_server.client(), prefix="p")
    assert store.rkey(encode_key((7, "q1"))) == 'p:{7}:["q1"]'
    assert store.rkey(encode_key(("bob", 3, "x"))) == 'p:{"bob"}:[3,"x"]'
    assert store.rkey(encode_key(7)) == "p:{7}"
    assert store.rkey(encode_key((7,))) == "p:{[7]}"
    assert RedisStore(SCHEMA, redis_server.client(), prefix="p:").rkey("7") == "p:{7}"  # a trailing ':' is dropped
    for bad in ("a:{b}", "a*", "", ":"):
        with pytest.raises(ValueError, match="prefix"):
            RedisStore(SCHEMA, redis_server.client(), prefix=bad)


def test_a_users_keys_share_a_slot_and_users_spread_over_the_cluster(redis_cluster):
    client = redis_cluster.client()
    store = RedisStore(SCHEMA, client, prefix=_prefix())
    keys = [(u, q) for u in range(40) for q in ("q1", "q2", "q3")] + [f"user{u}" for u in range(10)]
    store.put_many(keys, {"n": np.arange(len(keys))})
    slots = {}
    for u in range(40):
        slots[u] = {client.keyslot(store.rkey(encode_key((u, q)))) for q in ("q1", "q2", "q3")}
        assert len(slots[u]) == 1
    nodes = {client.get_node_from_key(store.rkey(encode_key((u, "q1")))).name for u in range(40)}
    assert len(nodes) == 3  # 40 users land on all three masters
    assert len(store) == len(keys)
    np.testing.assert_array_equal(store.get_many(keys[::-1])["n"], np.arange(len(keys))[::-1])


def test_urls_build_fail_fast_clients(redis_server, redis_cluster):
    store = RedisStore(SCHEMA, f"redis://127.0.0.1:{redis_server.port}/0", prefix=_prefix())
    store.put_many([1], {"n": np.array([3])})
    assert store.client.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    cluster = RedisStore(SCHEMA, f"redis-cluster://127.0.0.1:{redis_cluster.nodes[1].port}", prefix=_prefix())
    cluster.update_many([(1, "q")], lambda s: {"n": s["n"] + 4})
    assert cluster.get_many([(1, "q")])["n"].tolist() == [4]


def test_another_schema_is_refused_unless_reset(redis_server):
    prefix = _prefix()
    RedisStore(SCHEMA, redis_server.client(), prefix=prefix).put_many([1, 2], {"n": np.array([4, 5])})
    other = {"r": Field((8,), "float16"), "n": Field((), "int64")}
    with pytest.raises(ValueError, match="schema"):
        RedisStore(other, redis_server.client(), prefix=prefix)
    assert RedisStore(SCHEMA, redis_server.client(), prefix=prefix).get_many([1])["n"].tolist() == [4]
    store = RedisStore(other, redis_server.client(), prefix=prefix, on_schema_mismatch="reset")
    assert len(store) == 0


def _fails_fast(monkeypatch, call):
    """``call`` raises ``StoreUnavailable`` after at most one socket connect per server.

    What makes a request hang while Redis is down is a retry loop (redis-py's default retries with
    backoff) or a socket without a timeout. The timeouts are checked in the test above; this counts
    the connects, so a retry loop fails the test whatever the machine's speed.
    """
    connects = []
    real = redis_mod.connection.Connection._connect
    with monkeypatch.context() as m:
        m.setattr(redis_mod.connection.Connection, "_connect", lambda self: connects.append(self.port) or real(self))
        with pytest.raises(StoreUnavailable, match="Redis unavailable"):
            call()
    assert connects and max(Counter(connects).values()) == 1, f"connects per port: {dict(Counter(connects))}"


def test_redis_down_fails_fast_writes_nothing_and_recovers(own_redis_server, monkeypatch):
    server = own_redis_server
    url = f"redis://127.0.0.1:{server.port}/0"
    store, log = RedisStore(SCHEMA, url), RedisEventLog(url)
    store.put_many([(1, "q"), (2, "q")], {"n": np.array([10, 20])})
    log.create("e1", {"user": 1}, ttl_s=600)

    # Redis stops between the read and the write of an update: EXEC fails, nothing is written
    def stop_then_compute(state):
        server.stop()
        return {"n": state["n"] + 1}

    with pytest.raises(StoreUnavailable):
        store.update_many([(1, "q"), (2, "q")], stop_then_compute)
    _fails_fast(monkeypatch, lambda: store.get_many([(1, "q")]))
    _fails_fast(monkeypatch, lambda: store.put_many([(3, "q"), (1, "q")], {"n": np.array([30, 31])}))
    _fails_fast(monkeypatch, lambda: store.update_many([(1, "q")], lambda s: {"n": s["n"] + 1}))
    _fails_fast(monkeypatch, lambda: store.delete_many([(1, "q")]))
    _fails_fast(monkeypatch, lambda: (1, "q") in store)
    _fails_fast(monkeypatch, lambda: log.claim("e1", 3))
    _fails_fast(monkeypatch, lambda: log.create("e2", {"user": 1}, ttl_s=60))

    server.start()  # same port, same append-only file; the store objects are reused as they are
    out = store.get_many([(1, "q"), (2, "q"), (3, "q")])
    assert out["n"].tolist() == [10, 20, 0] and len(store) == 2  # no partial write
    store.update_many([(1, "q")], lambda s: {"n": s["n"] + 1})
    assert store.get_many([(1, "q")])["n"].tolist() == [11]
    assert log.claim("e1", 3) and log.get("e2") is None


@pytest.mark.slow
def test_a_cluster_master_down_fails_fast_and_recovers(own_redis_cluster, monkeypatch):
    cluster = own_redis_cluster
    store = RedisStore(SCHEMA, f"redis-cluster://127.0.0.1:{cluster.nodes[0].port}", prefix=_prefix())
    keys = [(u, "q") for u in range(30)]  # on all three masters
    store.put_many(keys, {"n": np.arange(30)})
    cluster.nodes[1].stop()
    _fails_fast(monkeypatch, lambda: store.get_many(keys))
    _fails_fast(monkeypatch, lambda: store.update_many(keys, lambda s: {"n": s["n"] + 1}))
    cluster.nodes[1].start()  # rejoins with its nodes.conf and append-only file
    out = wait_until(lambda: store.get_many(keys), "the cluster to come back", every_s=0.2, retry_on=StoreUnavailable)
    assert out["n"].tolist() == list(range(30))  # the update failed at its read: nothing written
    store.update_many(keys, lambda s: {"n": s["n"] + 1})
    assert store.get_many(keys)["n"].tolist() == list(range(1, 31))


@pytest.mark.parametrize("kind", ["redis", pytest.param("cluster", marks=pytest.mark.slow)])
def test_a_claimed_update_writes_the_claim_and_the_state_together_in_the_users_slot(kind, request):
    client = request.getfixturevalue("redis_server" if kind == "redis" else "redis_cluster").client()
    store = RedisStore(SCHEMA, client, prefix=_prefix())
    log = RedisEventLog(client, prefix=store.prefix)
    log.create("e1", {"user": "bob"}, ttl_s=60)
    keys = [("bob", "q1"), ("bob", "q2")]
    claim = lambda item: Claim("event", "bob", "e1", item)  # noqa: E731
    bump = lambda s: {"n": s["n"] + 1}  # noqa: E731

    assert store.update_claimed(keys, bump, claim(3), log)
    assert not store.update_claimed(keys, bump, claim(3), log)  # already claimed: nothing written
    assert store.get_many(keys)["n"].tolist() == [1, 1]
    key = log.claim_key(Claim("event", "bob", "e1", 3), tag='"bob"')
    assert key == f'{store.prefix}:claim:{{"bob"}}:e:"e1":3'
    assert key_slot(key.encode()) == key_slot(store.rkey(encode_key(("bob", "q1"))).encode())
    assert 0 < client.pttl(key) <= client.pttl(log._key("e1")) + 50  # expires with its event
    assert not log.claim("e1", 3, tag='"bob"')  # the event log sees the same claim

    with pytest.raises(ZeroDivisionError):  # a failed update leaves no claim
        store.update_claimed(keys, lambda s: 1 / 0, claim(4), log)
    assert store.update_claimed(keys, bump, claim(4), log)

    def raced(state, done=[]):  # another client writes a key between the read and the write
        if not done:
            done.append(store.put_many([("bob", "q1")], {"r": np.zeros((1, 4)), "n": np.array([10])}))
        return bump(state)

    assert store.update_claimed(keys, raced, claim(5), log)  # the update is computed again on the fresh value
    assert store.get_many(keys)["n"].tolist() == [11, 3]
    with pytest.raises(ValueError, match="the claim.s user .bob."):
        store.update_claimed([("bob", "q1"), ("ann", "q1")], bump, claim(6), log)
    assert log.claim("e1", 6, tag='"bob"')


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_a_claimed_update_keeps_the_rewards_label_and_time(kind, request):
    """The service's path (``update_claimed``, MULTI/EXEC or the cluster's script) writes the reward
    into the claim, for an event id that names the user's slot and for one that does not."""
    client = request.getfixturevalue("redis_server" if kind == "redis" else "redis_cluster").client()
    store = RedisStore(SCHEMA, client, prefix=_prefix())
    log = RedisEventLog(client, prefix=store.prefix)
    bump = lambda s: {"n": s["n"] + 1}  # noqa: E731
    for event_id in (log.new_event_id("bob"), "e1"):
        log.create(event_id, {"user": "bob", "shown": [4, 3]}, ttl_s=60)
        assert store.update_claimed([("bob", "q1")], bump, Claim("event", "bob", event_id, 3, label=0, time=5.5), log)
        assert store.update_claimed([("bob", "q1")], bump, Claim("event", "bob", event_id, 4, label=1, time=6.0), log)
        assert not store.update_claimed([("bob", "q1")], bump, Claim("event", "bob", event_id, 4, label=0, time=7.0), log)
        assert log.rewards(event_id) == [(4, 1, 6.0), (3, 0, 5.5)]
    assert store.get_many([("bob", "q1")])["n"].tolist() == [4]


def test_the_time_index_drops_the_entries_of_expired_events_and_expires_itself(redis_server):
    client, log = redis_server.client(), RedisEventLog(redis_server.client(), prefix=_prefix())
    now = time.time()
    old, new = log.new_event_id("ann"), log.new_event_id("ann")
    log.create(old, {"user": "ann", "created": now - 100}, ttl_s=60)  # created 100 s ago: older than its TTL
    log.create(new, {"user": "ann", "created": now}, ttl_s=60)
    assert log.index_keys() == [log.index_key(new)] and log.index_key(old) == log.index_key(new)
    assert [e for _, e in log.settled((float("-inf"), ""), now + 1)] == [new]  # the old entry was trimmed
    assert 0 < client.pttl(log.index_key(new)) <= 60_000


def test_an_event_its_claims_and_its_users_state_share_the_users_slot(redis_cluster):
    """A reward touches one master: the one of its user's slot, found from the event id alone."""
    from streamml.stores.redis import user_tag

    client = redis_cluster.client()
    prefix = _prefix()
    store, log = RedisStore(SCHEMA, client, prefix=prefix), RedisEventLog(client, prefix=prefix)
    for user in ["alice", "bob/ü", "7", "x" * 256]:
        event_id = log.new_event_id(user)
        slot = key_slot(store.rkey(encode_key((user, "q"))).encode())
        assert int(event_id[32:], 16) == slot
        log.create(event_id, {"user": user}, ttl_s=60)
        assert key_slot(log._key(event_id).encode()) == slot
        assert key_slot(log.claim_key(Claim("event", user, event_id, 3)).encode()) == slot
        assert key_slot(log.claim_key(Claim("event", user, event_id, 3), user_tag(user)).encode()) == slot
        assert key_slot(log.claim_key(Claim("client", user, "c1", ttl_s=1.0)).encode()) == slot
        assert key_slot(log._rejected_key(user).encode()) == slot
        assert key_slot(log.index_key(event_id).encode()) == slot  # the time index too: a master down takes only its users
        assert log.claim(event_id, 3) and log.get(event_id) == {"user": user, "created": log.get(event_id)["created"]}


def test_a_reward_claimed_through_the_store_is_the_event_logs_claim(redis_cluster):
    """With an event id that names the user's slot, the store's claimed update and the event log
    spell the claim the same way: the log sees it, and a release by the log frees it."""
    client, prefix = redis_cluster.client(), _prefix()
    store, log = RedisStore(SCHEMA, client, prefix=prefix), RedisEventLog(client, prefix=prefix)
    event_id = log.new_event_id("carol")
    log.create(event_id, {"user": "carol"}, ttl_s=60)
    bump = lambda s: {"n": s["n"] + 1}  # noqa: E731
    assert store.update_claimed([("carol", "q")], bump, Claim("event", "carol", event_id, 3), log)
    assert not log.claim(event_id, 3)
    log.release(event_id, 3)
    assert store.update_claimed([("carol", "q")], bump, Claim("event", "carol", event_id, 3), log)
    assert store.get_many([("carol", "q")])["n"].tolist() == [2]
