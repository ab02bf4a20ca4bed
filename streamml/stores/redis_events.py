"""The event log and the item catalog in Redis or Redis Cluster (the contracts of
:class:`streamml.stores.events.EventLog` and :class:`~streamml.stores.events.Catalog`)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from redis.crc import key_slot

from streamml.stores.codec import encode_key, to_json
from streamml.stores.events import Claim, read_catalog
from streamml.stores.redis_conn import check_prefix, client_of, dumps, guard, ms, slot_tag, user_tag

__all__ = ["RedisEventLog", "RedisItems"]

_EVENT_ID = re.compile(r"[0-9a-f]{32}([0-9a-f]{4})")


class RedisEventLog:
    """Served events, reward claims and client event ids in Redis; the contract of
    :class:`streamml.stores.sqlite.SQLiteEventLog` (expiry by Redis itself).

    Every claim method takes a ``tag``: the hash tag of the claim's key (default: the
    event or client event id's own). Claims are first-wins per tag; the service tags
    them with the user, see :meth:`RedisStore.update_claimed`."""

    def __init__(self, client, prefix: str = "streamml"):
        self.client = client_of(client)
        self.prefix = check_prefix(prefix)

    def new_event_id(self, user: str) -> str:
        """A fresh event id that names the hash slot of ``user``'s keys (32 random hex digits, then the
        slot in 4): the event, its claims and the user's state share a slot, so a reward reads and
        writes one master, found from the id alone, without a scatter over the cluster."""
        return uuid.uuid4().hex + format(key_slot(user_tag(user).encode()), "04x")

    def _tag(self, event_id: str) -> str:
        """The hash tag of an event: its slot's (:meth:`new_event_id`), or for any other id the id itself."""
        m = _EVENT_ID.fullmatch(str(event_id))
        if m and int(m.group(1), 16) < 16384:
            return slot_tag(int(m.group(1), 16))
        return dumps(str(event_id))

    def _key(self, event_id: str) -> str:
        if _EVENT_ID.fullmatch(str(event_id)):
            return f"{self.prefix}:ev:{{{self._tag(event_id)}}}:{dumps(str(event_id))}"
        return f"{self.prefix}:ev:{{{dumps(str(event_id))}}}"  # any other id, as before ids named a slot

    def claim_key(self, claim: Claim, tag: str | None = None) -> str:
        """The key of ``claim`` under the hash tag ``tag``; by default a reward's claim is
        tagged with its event id and a client claim with its user (:func:`user_tag`), so
        client event ids are per user on Redis as on every backend."""
        ident = dumps(str(claim.ident))
        if claim.kind == "event":
            tag = self._tag(claim.ident) if tag is None else tag
            return f"{self.prefix}:claim:{{{tag}}}:e:{ident}:{encode_key(claim.item, 'claim item')}"
        tag = user_tag(claim.user) if tag is None else tag
        return f"{self.prefix}:claim:{{{tag}}}:c:{ident}"

    def ttl_ms(self, event_id: str) -> int:
        """The event's remaining lifetime (ms), which its claims get; KeyError if unknown or expired."""
        with guard("event ttl"):
            ttl = self.client.pttl(self._key(event_id))
        if ttl < 0:
            raise KeyError(f"unknown or expired event {event_id!r}")
        return ttl

    def create(self, event_id: str, record: Mapping, ttl_s: float) -> None:
        ttl_ms = ms(ttl_s)
        with guard("event create"):
            rec = dict(record)
            rec.setdefault("created", time.time())
            text = to_json(rec)
            if not self.client.set(self._key(event_id), text, nx=True, px=ttl_ms):
                raise ValueError(f"event {event_id!r} already exists")

    def get(self, event_id: str) -> dict | None:
        with guard("event get"):
            text = self.client.get(self._key(event_id))
        return None if text is None else json.loads(text)

    def claim(self, event_id: str, item: Hashable, tag: str | None = None) -> bool:
        key = self.claim_key(Claim("event", "", event_id, item), tag)
        ttl_ms = self.ttl_ms(event_id)
        with guard("claim"):
            return bool(self.client.set(key, 1, nx=True, px=ttl_ms))

    def release(self, event_id: str, item: Hashable, tag: str | None = None) -> None:
        with guard("release"):
            self.client.delete(self.claim_key(Claim("event", "", event_id, item), tag))

    def claim_client_event(self, user: str, client_event_id: str, ttl_s: float) -> bool:
        claim = Claim("client", str(user), str(client_event_id), ttl_s=ttl_s)
        with guard("claim_client_event"):
            return bool(self.client.set(self.claim_key(claim), 1, nx=True, px=ms(ttl_s)))

    def release_client_event(self, user: str, client_event_id: str) -> None:
        with guard("release_client_event"):
            self.client.delete(self.claim_key(Claim("client", str(user), str(client_event_id), ttl_s=1.0)))


    def _rejected_key(self, user: str) -> str:
        return f"{self.prefix}:rej:{{{user_tag(user)}}}"  # in the user's slot: down with the user, not with others

    def note_rejected(self, user: str, query: str, item: int, ttl_s: float) -> None:
        """``user`` rejected catalog ``item`` of ``query``: :meth:`rejected` lists it for ``ttl_s``
        seconds. One sorted set per user, scored by expiry (ms)."""
        ttl_ms = ms(ttl_s)
        key, now_ms = self._rejected_key(user), int(time.time() * 1000)
        with guard("note_rejected"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(key, {dumps([str(query), int(item)]): now_ms + ttl_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.pexpire(key, ttl_ms, gt=True)
            pipe.pexpire(key, ttl_ms, nx=True)
            pipe.execute()

    def rejected(self, user: str, query: str) -> set[int]:
        with guard("rejected"):
            members = self.client.zrangebyscore(self._rejected_key(user), f"({int(time.time() * 1000)}", "+inf")
        pairs = (json.loads(m) for m in members)
        return {item for q, item in pairs if q == str(query)}

    def forget_rejected(self, user: str) -> None:
        with guard("forget_rejected"):
            self.client.delete(self._rejected_key(user))


class RedisItems:
    """The item catalog in Redis, one hash per query under one hash tag (one slot);
    the contract of :class:`streamml.stores.sqlite.SQLiteItems`."""

    def __init__(self, client, prefix: str = "streamml"):
        self.client = client_of(client)
        self.prefix = check_prefix(prefix)
        self._meta = f"{self.prefix}:items:{{catalog}}"

    def _qkey(self, query: str) -> str:
        return f"{self._meta}:q:{json.dumps(str(query))}"

    def load_folder(self, folder: str | Path, embedding_dim: int = 384) -> int:
        """Replace the catalog with the query files of ``folder`` (one MULTI/EXEC)."""
        c = read_catalog(folder, embedding_dim)
        with guard("items load_folder"):
            old = self.queries()
            pipe = self.client.pipeline(transaction=True)  # one slot ({catalog}): one MULTI/EXEC, routed by redis-py
            for q in old:
                pipe.delete(self._qkey(q))
            for q in c.query_ids:
                rows = c.of(q)
                pipe.hset(self._qkey(q), mapping={
                    "ids": c.ids[rows].tobytes(),
                    "texts": json.dumps([c.texts[i] for i in rows]),
                    "X": c.X[rows].tobytes(),
                })
            pipe.hset(self._meta, mapping={"queries": json.dumps(c.query_ids),
                                           "fingerprint": c.fingerprint, "embedding_dim": c.X.shape[1]})
            pipe.execute()
        return len(c.ids)

    @property
    def fingerprint(self) -> str | None:
        with guard("items fingerprint"):
            v = self.client.hget(self._meta, "fingerprint")
        return None if v is None else v.decode()

    def queries(self) -> list[str]:
        with guard("items queries"):
            v = self.client.hget(self._meta, "queries")
        return [] if v is None else json.loads(v)

    def items(self, query: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        with guard("items"):
            h = self.client.hgetall(self._qkey(query))
            dim = self.client.hget(self._meta, "embedding_dim")
        if not h:
            raise KeyError(f"unknown query {query!r}; the catalog has {self.queries()}")
        ids = np.frombuffer(h[b"ids"], np.int64).copy()
        return ids, json.loads(h[b"texts"]), np.frombuffer(h[b"X"], np.float32).reshape(len(ids), int(dim)).copy()

    def all(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        parts = [(q, *self.items(q)) for q in self.queries()]
        if not parts:
            return np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32)
        ids = np.concatenate([p[1] for p in parts])
        queries = [p[0] for p in parts for _ in p[1]]
        texts = [t for p in parts for t in p[2]]
        X = np.concatenate([p[3] for p in parts])
        order = np.argsort(ids, kind="stable")
        return ids[order], [queries[i] for i in order], [texts[i] for i in order], X[order]
