"""Per-key state, the event log and the item catalog in Redis or Redis Cluster.

- **Layout.** A key's record is one Redis string holding the fields' bytes
  (:mod:`streamml.stores.codec`), at ``prefix:{user}`` or ``prefix:{user}:[query]``.
  The braces are a hash tag: every key of one user lands in one cluster slot, so a
  user's keys can be read and written in one transaction. A string per key costs
  Redis a per-key overhead over the payload; a hash per user with a field per query
  would save it only while the hash stays small (listpack), which one residual
  field already exceeds (``experiments/serve_stores_figures.md``).
- **Atomic updates: WATCH/MULTI with retry.** ``update_many`` WATCHes the keys,
  reads them, applies ``fn`` (numpy, in this process) and writes them in
  MULTI/EXEC; if another client wrote one of them meanwhile, EXEC aborts, nothing
  is written and the batch is read and computed again. A Lua script would need the
  update rule in Lua, and one writer per key would need routing in front of Redis;
  optimistic retries cost nothing when users rarely collide, which is the case
  for per-user state. ``fn`` must therefore be pure (it may run more than once).
  In a cluster a transaction cannot span slots, and a WATCH per slot would cost a
  held connection and three round trips per user of the batch. There each key is
  written by a compare-and-set script (set the new blob only if the key still
  holds the blob that was read), pipelined per node: still atomic per key, two
  round trips per batch, and the keys that changed meanwhile are computed again.
  A cluster batch over several users is therefore not all or nothing if Redis
  fails midway (each key is either old or new).
- **Failures.** Clients from :func:`connect` have short socket timeouts and no
  automatic retries. A connection error or timeout raises :class:`StoreUnavailable`
  from every call, and a failed MULTI/EXEC has written nothing. The client reconnects
  by itself on the next call once Redis is back, so the store object is kept.
- **Durability** is the server's: an acknowledged write survives a Redis restart
  only with ``appendonly yes`` (``appendfsync everysec`` may lose the last second
  on a crash of Redis itself; ``always`` loses nothing). The tests run with ``always``.
- **Event log and claims.** An event is a string set with ``SET NX PX`` (expires
  with the TTL), indexed by time in a sorted set of its slot (for the export). A claim
  (of a reward on an event's item, or of a client event id) is a string key holding the
  reward's label and time, that expires with the event or the id, under a hash tag chosen
  by the caller: the service tags it with the user, so the claim lives in the slot
  of the state it guards and :meth:`RedisStore.update_claimed` writes both in one
  MULTI/EXEC (one Lua script in a cluster). A worker killed between the claim and
  the update would otherwise leave a claim without its update, and the client's
  retry would read as a duplicate: a lost update.

Modules: :mod:`~streamml.stores.redis_conn` (clients, hash tags, readiness), this one (the
state store), :mod:`~streamml.stores.redis_events` (the event log and the catalog).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Iterator, Mapping

import numpy as np
import redis
from redis.crc import key_slot

from streamml.stores.base import Field, Store, as_key_list
from streamml.stores.codec import Keys, RecordCodec, check_unique, encode_key, encode_keys, plain_key
from streamml.stores.errors import HeadMismatch
from streamml.stores.events import Claim
from streamml.stores.redis_conn import (
    CHUNK,
    check_prefix,
    client_of,
    connect,
    dumps,
    guard,
    health,
    is_cluster,
    key_tag,
    ms,
    slot_tag,
    user_tag,
)
from streamml.stores.redis_events import RedisEventLog, RedisItems

__all__ = ["connect", "health", "RedisStore", "RedisEventLog", "RedisItems", "user_tag", "slot_tag", "guard", "ms"]


class RedisStore(Store):
    """Per-key state in Redis (plain or cluster), shared by every process using it.

    Parameters
    ----------
    schema
        Field name -> :class:`~streamml.stores.Field`.
    client
        ``redis.Redis``, ``redis.cluster.RedisCluster`` or a URL for :func:`connect`.
    prefix
        Namespace of every key (several stores can share one server).
    on_schema_mismatch
        ``"error"`` (default) or ``"reset"`` when the prefix holds another schema's records.
    max_attempts
        Optimistic transaction attempts before ``update_many`` gives up (``RuntimeError``).
    """

    def __init__(self, schema: Mapping[str, Field], client, prefix: str = "streamml",
                 on_schema_mismatch: str = "error", max_attempts: int = 100):
        if on_schema_mismatch not in ("error", "reset"):
            raise ValueError(f"on_schema_mismatch must be 'error' or 'reset', got {on_schema_mismatch!r}")
        self.codec = RecordCodec(schema)
        self.schema: dict[str, Field] = self.codec.schema
        self.client = client_of(client)
        self.prefix = check_prefix(prefix)
        self.max_attempts = int(max_attempts)
        self.cluster = is_cluster(self.client)
        self._meta = f"{self.prefix}:meta"
        self._claimed_cas = self.client.register_script(_CLAIMED_CAS)
        with guard("opening the store"):
            stored = self.client.hget(self._meta, "schema")
            if stored is not None and stored.decode() != self.codec.signature:
                if on_schema_mismatch == "error":
                    raise ValueError(
                        f"Redis prefix {prefix!r} holds records of schema {stored.decode()}, not {self.codec.signature}; "
                        "pass on_schema_mismatch='reset' to drop that state, or use another prefix"
                    )
                self.clear()
            self.client.hset(self._meta, "schema", self.codec.signature)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r}, fields={list(self.schema)}, cluster={self.cluster})"

    def rkey(self, encoded: str) -> str:
        """The Redis key of an encoded key: ``prefix:{user}`` or ``prefix:{user}:[rest]``."""
        if encoded.startswith("["):
            return self._rkey_of(json.loads(encoded))
        return f"{self.prefix}:{{{encoded}}}"

    def _rkey_of(self, plain) -> str:
        if type(plain) is list and len(plain) >= 2:
            return f"{self.prefix}:{{{key_tag(plain)}}}:{dumps(plain[1:])}"
        return f"{self.prefix}:{{{key_tag(plain)}}}"

    def _rkeys(self, keys: Keys, op: str, unique: bool = False) -> list[str]:
        p = self.prefix
        if isinstance(keys, np.ndarray) and keys.dtype.kind in "iub" and keys.ndim == 2 and keys.shape[1] == 2:
            rkeys = [f"{p}:{{{u}}}:[{q}]" for u, q in keys.astype(np.int64).tolist()]
        elif isinstance(keys, np.ndarray) and keys.dtype.kind in "iub" and keys.ndim == 1:
            rkeys = [f"{p}:{{{u}}}" for u in keys.astype(np.int64).tolist()]
        elif isinstance(keys, np.ndarray) and keys.dtype.kind in "iub":
            rkeys = [self.rkey(e) for e in encode_keys(keys, op)]
        else:
            rkeys = [self._rkey_of(plain_key(k, op)) for k in as_key_list(keys)]
        if unique:
            check_unique(rkeys, op)
        return rkeys

    # ---- reads
    def _mget(self, client, rkeys: list[str]) -> list[bytes | None]:
        out = []
        for i in range(0, len(rkeys), CHUNK):
            out += client.mget(rkeys[i : i + CHUNK])
        return out

    def get_many(self, keys: Keys) -> dict[str, np.ndarray]:
        rkeys = self._rkeys(keys, "get_many")
        blobs: list[bytes | None] = [None] * len(rkeys)
        with guard("get_many"):
            if self.cluster:
                for i in range(0, len(rkeys), CHUNK):
                    blobs[i : i + CHUNK] = self.client.mget_nonatomic(rkeys[i : i + CHUNK])
            else:
                blobs = self._mget(self.client, rkeys)
        return self.codec.unpack(blobs)

    def __contains__(self, key: Hashable) -> bool:
        with guard("__contains__"):
            return bool(self.client.exists(self.rkey(encode_key(key))))

    def _scan(self) -> Iterator[bytes]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":{*"
        return self.client.scan_iter(match=pattern, count=1000)

    def __len__(self) -> int:
        """Number of stored keys (a SCAN over the prefix: O(keys), for tests and tools)."""
        with guard("__len__"):
            return sum(1 for _ in self._scan())

    # ---- writes
    def _transact(self, rkeys: list[str], compute: Callable[[list[bytes | None]], list[bytes]], op: str,
                  claim: tuple[str, int, str] | None = None) -> bool:
        """Read-modify-write of every key, atomic per key; retried on conflicts.

        Plain Redis: WATCH the keys, read them, ``compute`` the new blobs, MULTI/MSET/EXEC
        (all or nothing); a WatchError redoes the whole batch. Cluster: read, ``compute``,
        then one compare-and-set script per key, pipelined per node; the keys that
        changed meanwhile are re-read and the batch computed again for them.

        ``claim`` is ``(key, ttl_ms, value)``, a key in the slot of ``rkeys``: then nothing is
        written and False returned if it exists, else it is set to ``value`` in the same
        MULTI/EXEC (in a cluster, the same script) as the new blobs."""
        with guard(op):
            if self.cluster:
                return self._cas_claimed(rkeys, compute, op, *claim) if claim else self._cas(rkeys, compute, op)
            watched = rkeys + [claim[0]] if claim else rkeys
            for _ in range(self.max_attempts):
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.watch(*watched)
                    base = self._mget(pipe, watched)
                    if claim and base.pop() is not None:
                        return False
                    blobs = compute(base)
                    pipe.multi()
                    for j in range(0, len(rkeys), CHUNK):
                        pipe.mset(dict(zip(rkeys[j : j + CHUNK], blobs[j : j + CHUNK])))
                    if claim:
                        pipe.set(claim[0], claim[2], px=claim[1])
                    try:
                        pipe.execute()
                        return True
                    except redis.exceptions.WatchError:
                        continue
        raise RuntimeError(f"{op}: gave up after {self.max_attempts} conflicting concurrent writes to the same keys")

    def _cas_claimed(self, rkeys, compute, op, claim_key: str, ttl_ms: int, value: str) -> bool:
        """The cluster's claimed update: one script checks the claim and every key, then writes them all."""
        for _ in range(self.max_attempts):
            base = self.client.mget_nonatomic(rkeys)
            blobs = compute(base)
            expected = [b"" if old is None else b"1" + old for old in base]
            done = self._claimed_cas(keys=[claim_key, *rkeys], args=[ttl_ms, value, *expected, *blobs])
            if done != 0:
                return done == 1
        raise RuntimeError(f"{op}: gave up after {self.max_attempts} conflicting concurrent writes to the same keys")

    def _cas(self, rkeys, compute, op) -> None:
        base: list[bytes | None] = []
        for i in range(0, len(rkeys), CHUNK):
            base += self.client.mget_nonatomic(rkeys[i : i + CHUNK])
        pending = list(range(len(rkeys)))
        for _ in range(self.max_attempts):
            blobs = compute(base)
            pipe = self.client.pipeline()
            for i in pending:
                old = base[i]
                pipe.execute_command("EVAL", _CAS, 1, rkeys[i], b"" if old is None else b"1" + old, blobs[i])
            results = pipe.execute()
            conflicted = [i for i, ok in zip(pending, results) if ok != 1]
            if not conflicted:
                return
            for i, fresh in zip(conflicted, self.client.mget_nonatomic([rkeys[i] for i in conflicted])):
                base[i] = fresh
            pending = conflicted
        raise RuntimeError(f"{op}: gave up after {self.max_attempts} conflicting concurrent writes to the same keys")

    def put_many(self, keys: Keys, values: Mapping[str, np.ndarray]) -> None:
        rkeys = self._rkeys(keys, "put_many", unique=True)
        vals = self.codec.check_values(values, len(rkeys))
        if not rkeys:
            return
        if len(vals) == len(self.schema):  # no stored field survives: blind writes
            blobs = self.codec.pack(vals, len(rkeys))
            with guard("put_many"):
                if self.cluster:  # a SET per key, pipelined per node
                    pipe = self.client.pipeline()
                    for k, b in zip(rkeys, blobs):
                        pipe.set(k, b)
                    pipe.execute()
                else:  # one MULTI/EXEC: all or nothing
                    pipe = self.client.pipeline(transaction=True)
                    for j in range(0, len(rkeys), CHUNK):
                        pipe.mset(dict(zip(rkeys[j : j + CHUNK], blobs[j : j + CHUNK])))
                    pipe.execute()
            return
        self._transact(rkeys, lambda base: self.codec.pack(vals, len(rkeys), base), "put_many")

    def update_many(self, keys: Keys, fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]) -> None:
        """``put_many(keys, fn(get_many(keys)))``, atomic per key (WATCH/MULTI; ``fn``
        runs again on the whole batch if another client changed one of its keys)."""
        rkeys = self._rkeys(keys, "update_many", unique=True)
        n = len(rkeys)

        def compute(base):
            return self.codec.pack(fn(self.codec.unpack(base)), n, base)

        if not n:
            self.codec.check_values(fn(self.codec.unpack([])), 0)
            return
        self._transact(rkeys, compute, "update_many")

    def update_claimed(self, keys: Keys, fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                       claim: Claim, events: RedisEventLog) -> bool:
        """:meth:`update_many` of ``claim.user``'s ``keys`` together with ``claim`` in ``events``: one
        MULTI/EXEC (one script in a cluster), so both commit or neither. The claim's key carries the
        user's hash tag, so it shares the slot of the keys. False, and nothing written, if the claim
        was won before; ``KeyError`` if a reward's event is unknown or expired."""
        plain = [plain_key(k, "update_claimed") for k in as_key_list(keys)]
        tags = {key_tag(k) for k in plain}
        if tags != {user_tag(claim.user)}:
            raise ValueError(f"update_claimed: the keys must be those of the claim's user {claim.user!r} "
                             f"(hash tag {user_tag(claim.user)}), got tags {sorted(tags)}")
        rkeys = [self._rkey_of(k) for k in plain]
        check_unique(rkeys, "update_claimed")
        ttl_ms = events.ttl_ms(claim.ident) if claim.kind == "event" else ms(claim.ttl_s)

        def compute(base):
            return self.codec.pack(fn(self.codec.unpack(base)), len(rkeys), base)

        claim_key = events.claim_key(claim)  # a reward: in its event's slot, which new event ids make the user's
        if key_slot(claim_key.encode()) != key_slot(rkeys[0].encode()):  # an event id that names no slot (older ids)
            claim_key = events.claim_key(claim, tags.pop())
        return self._transact(rkeys, compute, "update_claimed", (claim_key, ttl_ms, events.claim_value(claim)))

    def delete_many(self, keys: Keys) -> None:
        rkeys = list(dict.fromkeys(self._rkeys(keys, "delete_many")))
        with guard("delete_many"):
            for i in range(0, len(rkeys), CHUNK):
                self.client.delete(*rkeys[i : i + CHUNK])

    def clear(self) -> None:
        """Delete every key of this prefix's state (SCAN + DEL: not atomic with writers)."""
        with guard("clear"):
            batch = []
            for k in self._scan():
                batch.append(k)
                if len(batch) == CHUNK:
                    self.client.delete(*batch)
                    batch = []
            if batch:
                self.client.delete(*batch)

    # ---- head fingerprint
    @property
    def head_fingerprint(self) -> str | None:
        with guard("head_fingerprint"):
            v = self.client.hget(self._meta, "head_fingerprint")
        return None if v is None else v.decode()

    def bind_head(self, fingerprint: str, on_mismatch: str = "reset") -> str:
        """See :meth:`streamml.stores.sqlite.SQLiteStore.bind_head` (same contract).
        A reset deletes the state with SCAN + DEL: bind before serving."""
        if on_mismatch not in ("reset", "error", "keep"):
            raise ValueError(f"on_mismatch must be 'reset', 'error' or 'keep', got {on_mismatch!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        old = self.head_fingerprint
        if old == fingerprint:
            return "unchanged"
        if old is not None and on_mismatch == "error":
            raise HeadMismatch(
                f"Redis prefix {self.prefix!r} holds state learned against head {old!r}, not {fingerprint!r}; "
                "bind with on_mismatch='reset' to drop it or 'keep' to migrate it as is"
            )
        if old is not None and on_mismatch == "reset":
            self.clear()
        with guard("bind_head"):
            self.client.hset(self._meta, "head_fingerprint", fingerprint)
        return "bound" if old is None else ("reset" if on_mismatch == "reset" else "kept")


# compare-and-set of one key: ARGV[1] is "" if the key was absent, else "1" + its old value
_CAS = """
local cur = redis.call('get', KEYS[1])
local want = ARGV[1]
if (cur == false and want == '') or (cur ~= false and want == '1' .. cur) then
  redis.call('set', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# a claimed compare-and-set of one slot's keys: KEYS[1] is the claim, KEYS[2..n+1] the state keys;
# ARGV[1] the claim's TTL in ms, ARGV[2] its value, ARGV[3..n+2] the old values as in _CAS, ARGV[n+3..2n+2]
# the new ones. -1: already claimed, 0: a key changed since it was read, 1: written. Every check precedes every write.
_CLAIMED_CAS = """
if redis.call('exists', KEYS[1]) == 1 then return -1 end
local n = #KEYS - 1
for i = 1, n do
  local cur = redis.call('get', KEYS[i + 1])
  local want = ARGV[i + 2]
  if not ((cur == false and want == '') or (cur ~= false and want == '1' .. cur)) then return 0 end
end
for i = 1, n do redis.call('set', KEYS[i + 1], ARGV[n + 2 + i]) end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
"""
