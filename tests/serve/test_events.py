"""streamml.serve.events: A/B buckets, limits, and the claim-then-apply path of every backend."""

from __future__ import annotations

import numpy as np
import pytest

from streamml.serve import events
from streamml.serve.backend import MemoryBackend, SQLiteBackend


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


@pytest.fixture(params=["memory", "sqlite"])
def backend(request, tmp_path):
    return MemoryBackend() if request.param == "memory" else SQLiteBackend(tmp_path / "s.db")


def test_claim_and_apply_applies_once_and_not_at_all_when_the_update_fails(backend):
    from streamml.stores import Field

    store = backend.state({"n": Field((), "int64")}, "head0")
    backend.events.create("e1", {"user": "u"}, ttl_s=60)
    bump = lambda: store.update_many(["u"], lambda s: {"n": s["n"] + 1})  # noqa: E731

    def broken():
        store.update_many(["u"], lambda s: (_ for _ in ()).throw(RuntimeError("backend gone")))

    with pytest.raises(RuntimeError, match="backend gone"):
        backend.claim_and_apply(("event", "e1", 3, None), broken)
    assert backend.claim_and_apply(("event", "e1", 3, None), bump) is True  # the failed attempt left no claim
    assert backend.claim_and_apply(("event", "e1", 3, None), bump) is False
    assert backend.claim_and_apply(("event", "e1", 4, None), bump) is True
    assert backend.claim_and_apply(("client", "c1", None, 60.0), bump) is True
    assert backend.claim_and_apply(("client", "c1", None, 60.0), bump) is False
    assert int(store.get_many(["u"])["n"][0]) == 3
