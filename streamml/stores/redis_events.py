"""The event log and the item catalog in Redis or Redis Cluster (the contracts of
:class:`streamml.stores.events.EventLog` and :class:`~streamml.stores.events.Catalog`)."""

from __future__ import annotations

import heapq
import json
import re
import time
import uuid
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path

import numpy as np
from redis.crc import key_slot

from streamml.stores.codec import encode_key, to_json
from streamml.stores.events import Claim, Reward, item_key, read_catalog, shown_rewards
from streamml.stores.redis_conn import check_prefix, client_of, dumps, guard, is_cluster, ms, slot_tag, user_tag

__all__ = ["RedisEventLog", "RedisItems"]

_EVENT_ID = re.compile(r"[0-9a-f]{32}([0-9a-f]{4})")

# an event and its time index entry: KEYS[1] the event, KEYS[2] its slot's index; ARGV: record, TTL (ms),
# created, event id, the oldest created kept (index entries before it belong to expired events). 1: created.
_CREATE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('zadd', KEYS[2], ARGV[3], ARGV[4])
redis.call('zremrangebyscore', KEYS[2], '-inf', '(' .. ARGV[5])
if redis.call('pttl', KEYS[2]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[2], ARGV[2]) end
return 1
"""


class RedisEventLog:
    """Served events, reward claims and client event ids in Redis; the contract of
    :class:`streamml.stores.sqlite.SQLiteEventLog` (expiry by Redis itself).

    Every claim method takes a ``tag``: the hash tag of the claim's key (default: the
    event or client event id's own). Claims are first-wins per tag; the service tags
    them with the user, see :meth:`RedisStore.update_claimed`. A reward's claim holds the
    reward, ``{"label": 1, "time": 1.7e9}`` (:meth:`claim_value`); a client claim holds ``1``.

    **The time index.** ``create`` also adds the event id to a sorted set of its hash slot,
    ``<prefix>:evidx:{<slot tag>}``, scored by ``created``: the export reads events in
    ``(created, event_id)`` order from these (:meth:`index_keys`, :meth:`settled`) instead
    of scanning every key. Being in the event's slot, the index entry lives on the master of
    its user: a master down takes its own users' events and index, no one else's. Entries
    older than the creating event's TTL are dropped on each ``create``, as ``note_rejected``
    drops its own; an entry whose event expired meanwhile is skipped by the readers."""

    def __init__(self, client, prefix: str = "streamml"):
        self.client = client_of(client)
        self.prefix = check_prefix(prefix)
        self._create = self.client.register_script(_CREATE)

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

    def index_key(self, event_id: str) -> str:
        """The time index of the event's slot (class docstring)."""
        return f"{self.prefix}:evidx:{{{self._tag(event_id)}}}"

    def create(self, event_id: str, record: Mapping, ttl_s: float) -> None:
        """``SET NX PX`` of the record and its entry in the time index, in one script (both or neither)."""
        ttl_ms = ms(ttl_s)
        rec = dict(record)
        rec.setdefault("created", time.time())
        text = to_json(rec)
        created = float(rec["created"])
        with guard("event create"):
            done = self._create(keys=[self._key(event_id), self.index_key(event_id)],
                                args=[text, ttl_ms, repr(created), str(event_id), repr(time.time() - ttl_s)])
        if not done:
            raise ValueError(f"event {event_id!r} already exists")

    def get(self, event_id: str) -> dict | None:
        with guard("event get"):
            text = self.client.get(self._key(event_id))
        return None if text is None else json.loads(text)

    @staticmethod
    def claim_value(claim: Claim) -> str:
        """What a claim's key holds: a reward's label and time as JSON, ``1`` for a client claim."""
        return dumps({"label": claim.label, "time": claim.time}) if claim.kind == "event" else "1"

    def claim(self, event_id: str, item: Hashable, label: int | None = None, time: float | None = None,
              tag: str | None = None) -> bool:
        claim = Claim("event", "", event_id, item, label=label, time=time)
        key = self.claim_key(claim, tag)
        ttl_ms = self.ttl_ms(event_id)
        with guard("claim"):
            return bool(self.client.set(key, self.claim_value(claim), nx=True, px=ttl_ms))

    def rewards(self, event_id: str) -> list[Reward]:
        """The claimed rewards of the event's shown items, in display order (one GET, one MGET)."""
        record = self.get(event_id)
        return self.rewards_of([(event_id, record)])[0]

    def _reward_keys(self, event_id: str, record: Mapping) -> dict[str, list[str]]:
        """Encoded shown item -> the keys its claim may have: its event's tag, and for an id that
        names no slot also its user's (:meth:`RedisStore.update_claimed` then tags it so)."""
        tags = [self._tag(event_id)]
        if not _EVENT_ID.fullmatch(str(event_id)) and "user" in record:
            tags.append(user_tag(record["user"]))
        heads = [f"{self.prefix}:claim:{{{t}}}:e:{dumps(str(event_id))}:" for t in tags]  # as claim_key spells them
        return {k: [h + k for h in heads] for k in map(item_key, record.get("shown", []))}

    def rewards_of(self, events: list[tuple[str, Mapping | None]]) -> list[list[Reward]]:
        """:meth:`rewards` of many ``(event_id, record)`` at once: one MGET (per node in a cluster)."""
        wanted = [self._reward_keys(e, rec) if rec is not None else {} for e, rec in events]
        keys = [k for w in wanted for ks in w.values() for k in ks]
        with guard("rewards"):
            values = dict(zip(keys, self.client.mget_nonatomic(keys) if is_cluster(self.client) else
                              self.client.mget(keys))) if keys else {}
        out = []
        for (event_id, rec), w in zip(events, wanted):
            claims = {}
            for item, ks in w.items():
                raw = next((values[k] for k in ks if values[k] is not None), None)
                if raw is not None:
                    v = json.loads(raw)
                    claims[item] = (v.get("label"), v.get("time")) if isinstance(v, dict) else (None, None)  # older: 1
            out.append(shown_rewards(rec, claims))
        return out

    def release(self, event_id: str, item: Hashable, tag: str | None = None) -> None:
        with guard("release"):
            self.client.delete(self.claim_key(Claim("event", "", event_id, item), tag))

    def claim_client_event(self, user: str, client_event_id: str, ttl_s: float) -> bool:
        claim = Claim("client", str(user), str(client_event_id), ttl_s=ttl_s)
        with guard("claim_client_event"):
            return bool(self.client.set(self.claim_key(claim), self.claim_value(claim), nx=True, px=ms(ttl_s)))

    def release_client_event(self, user: str, client_event_id: str) -> None:
        with guard("release_client_event"):
            self.client.delete(self.claim_key(Claim("client", str(user), str(client_event_id), ttl_s=1.0)))


    # ---- reading the log in time order (the export, streamml/loop/export.py)
    def index_keys(self) -> list[str]:
        """Every slot's time index (a SCAN of every primary: O(keys), for batch jobs, not requests)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":evidx:*"
        with guard("event index scan"):
            return sorted({k.decode() if isinstance(k, bytes) else k for k in self.client.scan_iter(match=pattern, count=1000)})

    def _index_entries(self, key: str, after: tuple[float, str], until: float, page: int) -> Iterator[tuple[float, str]]:
        """One index's ``(created, event_id)`` after ``after`` and created <= ``until``, in order, ``page``
        per ZRANGEBYSCORE. Equal scores come in member order, so the id breaks ties as the export's
        cursor does; paging resumes at the last score with an offset past the ones already read."""
        lo, offset = after[0], 0
        while True:
            with guard("event index"):
                rows = self.client.zrangebyscore(key, lo, until, start=offset, num=page, withscores=True)
            for member, score in rows:
                entry = (float(score), member.decode())
                if entry > after:
                    yield entry
            if len(rows) < page:
                return
            last = float(rows[-1][1])
            n_last = sum(1 for _, score in rows if float(score) == last)
            offset, lo = (offset + n_last if last == lo else n_last), last

    def settled(self, after: tuple[float, str], until: float, page: int = 1000) -> Iterator[tuple[float, str]]:
        """Every indexed ``(created, event_id)`` with ``(created, event_id) > after`` and created <= ``until``,
        merged over the slots' indexes in that order. An entry's event may have expired since: read it
        with :meth:`records`."""
        return heapq.merge(*(self._index_entries(k, after, until, page) for k in self.index_keys()))

    def count_settled(self, after: tuple[float, str], until: float) -> int:
        """How many entries :meth:`settled` yields (an upper bound of the events still there)."""
        keys = self.index_keys()
        if not keys or until < after[0]:
            return 0
        with guard("event index count"):
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.zcount(k, f"({after[0]!r}", until)
                pipe.zrangebyscore(k, after[0], after[0])
            out = pipe.execute()
        return sum(out[0::2]) + sum(1 for ties in out[1::2] for m in ties if m.decode() > after[1])

    def records(self, event_ids: list[str]) -> list[dict | None]:
        """The records of ``event_ids`` (None: expired), one MGET (per node in a cluster)."""
        keys = [self._key(e) for e in event_ids]
        if not keys:
            return []
        with guard("event records"):
            texts = self.client.mget_nonatomic(keys) if is_cluster(self.client) else self.client.mget(keys)
        return [None if t is None else json.loads(t) for t in texts]

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
