"""Per-key state stores behind one batched interface.

A store maps keys (users, or ``(user, query)`` pairs) to a fixed record of
numpy fields described by a :data:`Schema`. Every call is batched
(``get_many`` / ``put_many`` / ``delete_many``) so that a remote store (SQLite,
Redis) pays one round trip per batch, not one per key. A key that was never
written reads back as the fields' fill values: state is created on first use,
as in river's ``reco.BiasedMF``, but only stored once it is put.

Keys are hashable Python values (ints, strings, tuples). A batch of keys is a
sequence of them, or, for integer keys, a numpy integer array: shape ``(B,)``
means ``B`` int keys, shape ``(B, w)`` means ``B`` w-tuples of ints. Both spell
the same keys: row ``[3, 7]`` of an array is the key ``(3, 7)``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import numpy as np

__all__ = ["Field", "Schema", "Store", "Keys", "as_key_list", "occurrences", "store_for"]

_DUPLICATE_MSG = (
    "{} got the same key more than once in one batch; "
    "merge the updates first (which value should win is ambiguous)"
)

Keys = Union[Sequence[Hashable], np.ndarray]


@dataclass(frozen=True)
class Field:
    """One named per-key field: its shape (without the batch dim), dtype and fill value.

    Examples
    --------
    >>> Field((384,), "float16").nbytes
    768
    >>> Field((), "int32", fill=-1).fill
    -1
    """

    shape: tuple[int, ...] = ()
    dtype: np.dtype | str | type = np.float32
    fill: float | int = 0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative dimension in field shape {self.shape}")
        # the fill value must survive a round trip through the dtype
        if np.asarray(self.fill).astype(self.dtype) != self.fill:
            raise ValueError(f"fill {self.fill!r} is not representable as {self.dtype}")
        if self.nbytes == 0:
            raise ValueError("a field must hold at least one element")

    @property
    def nbytes(self) -> int:
        """Bytes one key's value takes in a dense array."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


Schema = Mapping[str, Field]
"""Named fields of the per-key record, e.g. ``{"residual": Field((384,), "float16")}``."""


@runtime_checkable
class Store(Protocol):
    """What the online learner needs from per-key state.

    Semantics every implementation follows (checked by ``tests/stores/test_store_contract.py``):

    - ``get_many(keys)`` returns ``{field: array}`` with leading dim ``len(keys)``
      and the schema's dtype; a key that is not stored reads as the fill values.
      Repeated keys in one ``get_many`` are allowed. The arrays are copies.
    - ``put_many(keys, values)`` writes ``values[field][i]`` for ``keys[i]``.
      ``values`` may hold a subset of the fields: the others keep their stored
      value, or the fill value for a new key. A batch that repeats a key is
      rejected with ``ValueError`` before anything is written, because which
      value should win is ambiguous.
    - ``delete_many(keys)`` removes keys; missing or repeated keys are ignored.
    - ``update_many(keys, fn)`` is a read-modify-write: ``put_many(keys,
      fn(get_many(keys)))``, with repeated keys rejected before ``fn`` runs. A store
      may do it in one pass (the in-memory one locates the keys once; Redis could
      run it in one pipeline). Subclasses of ``Store`` inherit this default.
    """

    schema: Schema

    def get_many(self, keys: Keys) -> dict[str, np.ndarray]: ...

    def put_many(self, keys: Keys, values: Mapping[str, np.ndarray]) -> None: ...

    def update_many(
        self, keys: Keys, fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]
    ) -> None:
        if occurrences(keys).any():
            raise ValueError(_DUPLICATE_MSG.format("update_many"))
        self.put_many(keys, fn(self.get_many(keys)))

    def delete_many(self, keys: Keys) -> None: ...

    def __contains__(self, key: Hashable) -> bool: ...

    def __len__(self) -> int: ...


def as_key_list(keys: Keys) -> list:
    """Turn any accepted key batch into a list of plain Python keys (ints, tuples, ...).

    For stores without a vectorised path (SQLite, Redis).

    >>> as_key_list(np.array([[1, 2], [3, 4]]))
    [(1, 2), (3, 4)]
    >>> as_key_list(["a", (1, "b")])
    ['a', (1, 'b')]
    """
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iub":
        if keys.ndim == 1:
            return keys.astype(np.int64).tolist()
        if keys.ndim == 2:
            return [tuple(row) for row in keys.astype(np.int64).tolist()]
        raise ValueError(f"integer key arrays must be 1-D or 2-D, got shape {keys.shape}")
    if isinstance(keys, np.ndarray):
        return keys.tolist()
    return list(keys)



# --------------------------------------------------------------------------- key hashing
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_M64 = (1 << 64) - 1  # (masks Python ints to 64 bits)
_SEED = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix_np(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wraps mod 2**64)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(_C1)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(_C2)
    return h ^ (h >> np.uint64(31))


def _hash64(k: np.ndarray) -> np.ndarray:
    """(B, w) int64 keys -> (B,) uint64 hashes."""
    h = np.full(len(k), _SEED, np.uint64)
    u = k.view(np.uint64)
    for c in range(k.shape[1]):
        h = _mix_np(h ^ u[:, c])
    return h


def _is_int(v) -> bool:
    return (type(v) is int or isinstance(v, (int, np.integer))) and _INT64_MIN <= v <= _INT64_MAX


def _route_one(key: Hashable) -> tuple[object, object]:
    """``(kind, encoded key)`` of one key; see :func:`_route`."""
    if type(key) is tuple and len(key) == 2 and type(key[0]) is int and type(key[1]) is int:
        if _INT64_MIN <= key[0] <= _INT64_MAX and _INT64_MIN <= key[1] <= _INT64_MAX:
            return 2, key  # the common (user, query) case, fast
    if _is_int(key):
        return 0, (int(key),)
    if type(key) is tuple and key:
        for v in key:
            if not _is_int(v):
                break
        else:
            return len(key), tuple(map(int, key))
    hash(key)  # unhashable keys fail here, with Python's own message
    return None, key


def _route(keys: Keys) -> list[tuple[np.ndarray | None, object, object]]:
    """Split a key batch into parts ``(positions, kind, payload)``.

    ``kind`` is 0 for int keys, w for w-tuples of ints (payload: (n, max(w, 1))
    int64 array; ``1`` and ``(1,)`` are different keys), or ``None`` for other keys (payload: list of keys). ``positions`` is None when the
    part is the whole batch.
    """
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iub":
        if keys.ndim == 1:
            return [(None, 0, keys.astype(np.int64)[:, None])]
        if keys.ndim == 2 and keys.shape[1] >= 1:
            return [(None, keys.shape[1], np.ascontiguousarray(keys, np.int64))]
        raise ValueError(f"integer key arrays must be (B,) or (B, w>=1), got shape {keys.shape}")
    keys = as_key_list(keys)
    groups: dict[object, tuple[list[int], list]] = {}
    for i, key in enumerate(keys):
        kind, enc = _route_one(key)
        pos, payload = groups.setdefault(kind, ([], []))
        pos.append(i)
        payload.append(enc)
    parts = []
    for kind, (pos, payload) in groups.items():
        whole = len(groups) == 1
        p = None if whole else np.array(pos, np.int64)
        if kind is not None:
            payload = np.array(payload, np.int64).reshape(len(payload), max(kind, 1))
        parts.append((p, kind, payload))
    return parts


def occurrences(keys: Keys) -> np.ndarray:
    """How many times each key occurred earlier in the batch, with the stores' key equality.

    A key's ``w``-th event has occurrence ``w``; a batch has no repeats iff all are 0.
    Integer key arrays take one sort, no Python loop.

    >>> occurrences([(1, 2), "a", (1, 2), 5, "a", (1, 2)]).tolist()
    [0, 0, 1, 0, 1, 2]
    """
    n = len(keys)
    occ = np.zeros(n, np.int64)
    if n == 0:
        return occ
    for pos, kind, payload in _route(keys):
        if kind is None:
            seen: dict = {}
            local = np.empty(len(payload), np.int64)
            for i, k in enumerate(payload):
                local[i] = c = seen.get(k, 0)
                seen[k] = c + 1
        else:
            local = _int_occurrences(payload)
        occ[slice(None) if pos is None else pos] = local
    return occ


def _int_occurrences(k: np.ndarray) -> np.ndarray:
    h = _hash64(k)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    new = np.empty(len(k), bool)
    new[0] = True
    np.not_equal(hs[1:], hs[:-1], out=new[1:])
    pos = np.arange(len(k))
    start = np.maximum.accumulate(np.where(new, pos, 0))  # first sorted position of each run
    if not (k[order] == k[order[start]]).all():  # a 64-bit hash collision: do it exactly
        _, inv = np.unique(k, axis=0, return_inverse=True)
        order = np.argsort(inv.reshape(-1), kind="stable")
        inv = inv.reshape(-1)[order]
        new[1:] = inv[1:] != inv[:-1]
        start = np.maximum.accumulate(np.where(new, pos, 0))
    occ = np.empty(len(k), np.int64)
    occ[order] = pos - start
    return occ




def store_for(store, schema: Mapping[str, Field]) -> "Store":
    """The store a learner keeps ``schema``'s state in: ``store`` itself, ``store(schema)`` for a
    factory (a Hydra partial), or a new in-memory one for ``None``; a store built for another
    schema is refused, naming both."""
    if store is None:
        from streamml.stores.memory import InMemoryStore

        store = InMemoryStore(schema)
    elif not isinstance(store, Store) and callable(store):
        store = store(schema)
    if dict(store.schema) != dict(schema):
        raise ValueError(f"store schema {dict(store.schema)} does not match the learner's {dict(schema)}")
    return store
