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
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["Field", "Schema", "Store", "InMemoryStore", "as_key_list", "occurrences"]

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

    Semantics every implementation follows (checked by ``tests/test_store.py``):

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


# --------------------------------------------------------------------------- index
_EMPTY, _TOMB = -1, -2
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_M64 = (1 << 64) - 1
_SEED = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SMALL = 8  # batches up to this size are probed in pure Python (numpy's per-call cost dominates)


def _mix_np(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wraps mod 2**64)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(_C1)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(_C2)
    return h ^ (h >> np.uint64(31))


def _mix_py(h: int) -> int:
    h = ((h ^ (h >> 30)) * _C1) & _M64
    h = ((h ^ (h >> 27)) * _C2) & _M64
    return h ^ (h >> 31)


def _hash64(k: np.ndarray) -> np.ndarray:
    """(B, w) int64 keys -> (B,) uint64 hashes."""
    h = np.full(len(k), _SEED, np.uint64)
    u = k.view(np.uint64)
    for c in range(k.shape[1]):
        h = _mix_np(h ^ u[:, c])
    return h


@intrinsic
def prefetch(typingctx, arr, row, offset):
    """Ask the cache for byte ``offset`` of row ``row`` of a C-contiguous array (in numba code)."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        at = builder.add(builder.mul(args[1], builder.extract_value(ary.strides, 0)), args[2])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty=fnty)
        builder.call(fn, [builder.gep(builder.bitcast(ary.data, i8p), [at]), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(arr, types.intp, types.intp), codegen


_AHEAD = 8  # keys hashed and prefetched this far ahead of the probe


@njit(cache=True)
def _lookup_kernel(k, keys, vals, rows, slots):
    """Probe each key of ``k`` (B, w): ``rows[b]`` (-1 if absent) and ``slots[b]``.

    The same hash and probe sequence as ``_IntTable.lookup_one``, compiled: the table
    rows of key ``b + _AHEAD`` are prefetched while key ``b`` is probed, so the cache
    misses of a big table overlap instead of queueing.
    """
    n, w = k.shape
    mask = np.uint64(vals.shape[0] - 1)
    for b in range(n):
        h = np.uint64(_SEED)
        for c in range(w):
            h ^= np.uint64(k[b, c])
            h = (h ^ (h >> np.uint64(30))) * np.uint64(_C1)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(_C2)
            h ^= h >> np.uint64(31)
        slots[b] = np.int64(h & mask)
    for b in range(n):
        if b + _AHEAD < n:
            prefetch(vals, slots[b + _AHEAD], 0)
            prefetch(keys, slots[b + _AHEAD], 0)
        s = slots[b]
        while True:
            v = vals[s]
            if v == _EMPTY:
                rows[b] = -1
                break
            if v >= 0:
                same = True
                for c in range(w):
                    same = same and keys[s, c] == k[b, c]
                if same:
                    rows[b] = v
                    break
            s = (s + 1) & np.int64(mask)
        slots[b] = s


class _IntTable:
    """Open-addressing (linear probing) hash table from w-tuples of int64 to row ids.

    A batch of keys is probed by a compiled loop (``_lookup_kernel``), one key in pure
    Python (``lookup_one``), a batch of new keys is inserted by numpy ops over the keys
    still unplaced. It costs ~24 bytes per slot at load <= 1/2, against ~150 bytes per
    key for a Python dict of tuples, and needs no Python object per key.
    """

    max_load = 0.5

    def __init__(self, width: int, capacity: int = 64):
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self.width = width
        self.keys = np.zeros((cap, width), np.int64)
        self.vals = np.full(cap, _EMPTY, np.int64)
        self.n_live = 0
        self.n_used = 0  # live + tombstones: what limits probe lengths

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes

    def _hash(self, k: np.ndarray) -> np.ndarray:  # (B, w) int64 -> (B,) int64 slots
        return (_hash64(k) & np.uint64(len(self.vals) - 1)).astype(np.int64)

    def _hash_one(self, key: tuple[int, ...]) -> int:
        h = _SEED
        for v in key:  # _mix_py, inlined: this runs once per single-event update
            h ^= v & _M64
            h = ((h ^ (h >> 30)) * _C1) & _M64
            h = ((h ^ (h >> 27)) * _C2) & _M64
            h ^= h >> 31
        return h & (len(self.vals) - 1)

    def lookup(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (-1 if absent) and slots of keys ``k`` (B, w)."""
        n = len(k)
        if n <= _SMALL:
            return self._lookup_small(k)
        rows, slots = np.empty(n, np.int64), np.empty(n, np.int64)
        _lookup_kernel(np.ascontiguousarray(k), self.keys, self.vals, rows, slots)
        return rows, slots

    def _lookup_small(self, k: np.ndarray):
        found = [self.lookup_one(tuple(key)) for key in k.tolist()]
        return np.array([f[0] for f in found], np.int64), np.array([f[1] for f in found], np.int64)

    def lookup_one(self, key: tuple[int, ...]) -> tuple[int, int]:
        """(row or -1, slot) of one key, in pure Python: a single numpy call costs more."""
        mask = len(self.vals) - 1
        s = self._hash_one(key)
        want = list(key)
        vals, keys = self.vals, self.keys
        while True:
            v = vals.item(s)
            if v == _EMPTY:
                return -1, s
            if v >= 0 and keys[s].tolist() == want:
                return v, s
            s = (s + 1) & mask

    def insert_one(self, key: tuple[int, ...], row: int) -> None:
        """Insert one absent key."""
        if self.n_used + 1 > self.max_load * len(self.vals):
            self._rebuild(self.n_live + 1)
        mask = len(self.vals) - 1
        s = self._hash_one(key)
        while self.vals[s] >= 0:
            s = (s + 1) & mask
        self.n_used += int(self.vals[s] == _EMPTY)
        self.n_live += 1
        self.keys[s] = key
        self.vals[s] = row

    def insert(self, k: np.ndarray, rows: np.ndarray) -> None:
        """Insert keys that are absent and pairwise distinct."""
        if self.n_used + len(k) > self.max_load * len(self.vals):
            self._rebuild(self.n_live + len(k))
        mask = len(self.vals) - 1
        slot = self._hash(k)
        pending = np.arange(len(k))
        while pending.size:
            s = slot[pending]
            v = self.vals[s]
            free = v < 0
            cand, cs = pending[free], s[free]
            # several keys may want one free slot: let them all write their tag, and
            # the tag that reads back is the key that got it
            self.vals[cs] = -3 - cand
            won = self.vals[cs] == -3 - cand
            ws, wk = cs[won], cand[won]
            self.n_used += int(np.count_nonzero(v[free][won] == _EMPTY))
            self.keys[ws] = k[wk]
            self.vals[ws] = rows[wk]
            done = np.zeros(len(pending), bool)
            done[np.flatnonzero(free)[won]] = True
            pending = pending[~done]
            slot[pending] = (s[~done] + 1) & mask
        self.n_live += len(k)

    def delete_slots(self, slots: np.ndarray) -> None:
        self.vals[slots] = _TOMB
        self.n_live -= len(slots)

    def _rebuild(self, n_needed: int) -> None:
        live = self.vals >= 0
        k, r = self.keys[live], self.vals[live]
        cap = 1 << max(4, int(np.ceil(n_needed / self.max_load) - 1).bit_length())
        self.keys = np.zeros((cap, self.width), np.int64)
        self.vals = np.full(cap, _EMPTY, np.int64)
        self.n_live = self.n_used = 0
        if len(k):
            self.insert(k, r)


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


# --------------------------------------------------------------------------- store
class InMemoryStore(Store):
    """Columnar in-process store: one preallocated numpy array per field, rows reused.

    Integer keys and tuples of integers are indexed by an open-addressing hash table
    (no Python object per key, ~50 bytes per key); other hashable keys by a dict.
    Keys that are equal as Python values but of different kinds (``3`` and
    ``3.0``) are different keys here.

    Parameters
    ----------
    schema
        Field name -> :class:`Field`.
    capacity
        Rows to preallocate. Arrays double when full (so up to half of the rows can
        be spare right after a doubling: pass the expected number of keys to avoid it).

    Examples
    --------
    >>> store = InMemoryStore({"r": Field((2,), "float32"), "n": Field((), "int32", fill=-1)})
    >>> store.get_many([(7, 1)])["n"]          # never written: fill value
    array([-1], dtype=int32)
    >>> store.put_many([(7, 1), "bob"], {"r": np.ones((2, 2)), "n": np.array([3, 4])})
    >>> store.get_many(np.array([[7, 1]]))["r"]    # same key, as an int array
    array([[1., 1.]], dtype=float32)
    >>> len(store), "bob" in store, (7, 2) in store
    (2, True, False)
    >>> store.delete_many(["bob"]); len(store)
    1
    """

    def __init__(self, schema: Schema, capacity: int = 1024):
        if not schema:
            raise ValueError("schema must have at least one field")
        self.schema: dict[str, Field] = dict(schema)
        for name, f in self.schema.items():
            if not isinstance(f, Field):
                raise TypeError(f"schema[{name!r}] must be a Field, got {type(f).__name__}")
        self._cap = max(1, int(capacity))
        # one extra row at the end always holds the fill values: missing keys read from it
        self._cols = {n: self._new_col(f, self._cap) for n, f in self.schema.items()}
        self._tables: dict[int, _IntTable] = {}
        self._objects: dict[Hashable, int] = {}
        self._n_rows = 0  # high-water mark of rows ever used
        self._free: list[int] = []

    @staticmethod
    def _new_col(f: Field, cap: int) -> np.ndarray:
        col = np.empty((cap + 1, *f.shape), f.dtype)
        col[cap] = f.fill
        return col

    # ---- sizes
    def __len__(self) -> int:
        return sum(t.n_live for t in self._tables.values()) + len(self._objects)

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def nbytes(self) -> int:
        """Bytes held by the field arrays and the integer-key hash tables."""
        return sum(c.nbytes for c in self._cols.values()) + sum(t.nbytes for t in self._tables.values())

    # ---- index
    def _locate(self, keys: Keys):
        """Rows of ``keys`` (-1 where absent), plus per-part details for writers."""
        n = len(keys)
        parts = _route(keys) if n else []
        rows = np.full(n, -1, np.int64)
        located = []
        for pos, kind, payload in parts:
            if kind is None:
                r = np.fromiter((self._objects.get(k, -1) for k in payload), np.int64, len(payload))
                slots = None
            else:
                table = self._tables.get(kind)
                if table is None:
                    r, slots = np.full(len(payload), -1, np.int64), None
                else:
                    r, slots = table.lookup(payload)
            if pos is None:
                rows[:] = r
            else:
                rows[pos] = r
            located.append((pos, kind, payload, r, slots))
        return rows, located

    def _locate_one(self, key: Hashable) -> tuple[int, object, object]:
        """(row or -1, kind, encoded key) of one key, without numpy batch overhead."""
        kind, enc = _route_one(key)
        if kind is None:
            return self._objects.get(enc, -1), kind, enc
        table = self._tables.get(kind)
        return (-1 if table is None else table.lookup_one(enc)[0]), kind, enc

    def _insert_one(self, kind, enc, row: int) -> None:
        if kind is None:
            self._objects[enc] = row
            return
        table = self._tables.get(kind)
        if table is None:
            table = self._tables[kind] = _IntTable(max(kind, 1))
        table.insert_one(enc, row)

    def __contains__(self, key: Hashable) -> bool:
        return self._locate_one(key)[0] >= 0

    def row_views(self, key: Hashable) -> dict[str, np.ndarray] | None:
        """Writable views of one stored key's fields, or ``None`` if it is not stored.

        Not part of the :class:`Store` protocol: an in-process fast path for a
        single-key read-modify-write (the online learner's ``learn_one`` uses it when a
        store has it, ~10 us cheaper than ``update_many``). The views go stale after
        any other write to the store, which may move the arrays: use them at once.
        """
        row = self._locate_one(key)[0]
        if row < 0:
            return None
        return {name: c[row, ...] for name, c in self._cols.items()}  # 0-d views for scalar fields too

    # In-process fast path for compiled updates (not part of the Store protocol): find
    # or create the keys' rows, then write ``columns[field][row]`` directly.
    @property
    def columns(self) -> dict[str, np.ndarray]:
        """The field arrays themselves, ``(capacity + 1, *shape)``; the last row holds the
        fill values and must not be written. They move when the store grows, so fetch them
        after :meth:`rows_for` and use them before the next write."""
        return dict(self._cols)

    def rows_for(self, keys: Keys) -> np.ndarray:
        """Rows of ``keys`` (B,), creating absent keys with the fill values.

        Unlike ``put_many``, repeated keys are allowed: they get the same row.

        >>> store = InMemoryStore({"n": Field((), "int32", fill=-1)})
        >>> rows = store.rows_for([(1, 2), "a", (1, 2)])
        >>> rows.tolist(), len(store), store.columns["n"][rows].tolist()
        ([0, 1, 0], 2, [-1, -1, -1])
        """
        rows, located = self._locate(keys)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            sub = keys[missing] if isinstance(keys, np.ndarray) else [keys[i] for i in missing.tolist()]
            first = np.flatnonzero(occurrences(sub) == 0)
            if len(first) == len(missing):  # no repeats among the new keys: insert them as located
                self._write(rows, located, {})  # fills in their rows
            else:
                self.put_many(sub[first] if isinstance(sub, np.ndarray) else [sub[i] for i in first.tolist()], {})
                rows[missing] = self._locate(sub)[0]
        return rows

    def row_for(self, key: Hashable) -> int:
        """:meth:`rows_for` of one key, without numpy's per-call cost."""
        row, kind, enc = self._locate_one(key)
        if row < 0:
            row = int(self._alloc(1)[0])
            self._insert_one(kind, enc, row)
            for name, f in self.schema.items():
                self._cols[name][row] = f.fill
        return row

    # ---- reads
    def get_many(self, keys: Keys) -> dict[str, np.ndarray]:
        if len(keys) == 1 and not isinstance(keys, np.ndarray):
            row = self._locate_one(keys[0])[0]
            row = self._cap if row < 0 else row
            return {n: c[row : row + 1].copy() for n, c in self._cols.items()}
        rows, _ = self._locate(keys)
        rows[rows < 0] = self._cap  # the fill row
        return self._gather(rows)

    # ---- writes
    def put_many(self, keys: Keys, values: Mapping[str, np.ndarray]) -> None:
        n = len(keys)
        vals = self._check_values(values, n)
        if n == 0:
            return
        rows, located = self._locate(keys)
        self._check_unique(rows, located, "put_many")
        self._write(rows, located, vals)

    def update_many(
        self, keys: Keys, fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]
    ) -> None:
        """``put_many(keys, fn(get_many(keys)))``, locating the keys once."""
        n = len(keys)
        if n == 1 and not isinstance(keys, np.ndarray):  # one event: the latency path
            row, kind, enc = self._locate_one(keys[0])
            read = self._cap if row < 0 else row
            vals = self._check_values(fn({name: c[read : read + 1].copy() for name, c in self._cols.items()}), 1)
            if row < 0:
                row = int(self._alloc(1)[0])
                self._insert_one(kind, enc, row)
                for name, f in self.schema.items():
                    if name not in vals:
                        self._cols[name][row] = f.fill
            for name, v in vals.items():
                self._cols[name][row] = v[0]
            return
        rows, located = self._locate(keys)
        self._check_unique(rows, located, "update_many")
        read = np.where(rows < 0, self._cap, rows)
        vals = self._check_values(fn(self._gather(read)), n)
        if n:
            self._write(rows, located, vals)

    def _write(self, rows: np.ndarray, located, vals: dict[str, np.ndarray]) -> None:
        missing = rows < 0
        n_new = int(np.count_nonzero(missing))
        if n_new:
            new_rows = self._alloc(n_new)
            rows[missing] = new_rows
            for pos, kind, payload, r, _ in located:
                miss = r < 0
                m = int(np.count_nonzero(miss))
                if not m:
                    continue
                # new rows were handed out in batch order; recover each part's share
                part_pos = np.flatnonzero(miss) if pos is None else pos[miss]
                part_rows = rows[part_pos]
                if kind is None:
                    for k, row in zip((k for k, mm in zip(payload, miss) if mm), part_rows.tolist()):
                        self._objects[k] = row
                else:
                    table = self._tables.get(kind)
                    if table is None:
                        table = self._tables[kind] = _IntTable(max(kind, 1), 2 * m)
                    table.insert(payload[miss], part_rows)
            for name, f in self.schema.items():
                if name not in vals:
                    self._cols[name][new_rows] = f.fill
        for name, v in vals.items():
            self._scatter(name, rows, v)

    # Rows are moved as single opaque (void) elements: numpy then copies each row
    # with one memcpy instead of iterating over its elements (40x faster for a
    # 16-byte buffer row, 1.3-2x for a 768-byte residual).
    def _rows_view(self, name: str) -> np.ndarray:
        col = self._cols[name]
        return col.reshape(len(col), -1).view(np.dtype((np.void, self.schema[name].nbytes))).reshape(len(col))

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, f in self.schema.items():
            out[name] = self._rows_view(name).take(rows).view(f.dtype).reshape(len(rows), *f.shape)
        return out

    def _scatter(self, name: str, rows: np.ndarray, v: np.ndarray) -> None:
        f = self.schema[name]
        v = np.ascontiguousarray(v, f.dtype).reshape(len(v), -1)
        self._rows_view(name)[rows] = v.view(np.dtype((np.void, f.nbytes))).reshape(len(v))

    def _check_unique(self, rows: np.ndarray, located, op: str) -> None:
        """Raise if a key occurs twice in the batch, before anything is written."""
        present = rows[rows >= 0]
        dup = False
        if 1 < len(present) < self._cap // 16:  # equal stored keys <=> equal rows
            dup = len(np.unique(present)) != len(present)
        elif len(present) > 1:  # a large batch: scatter positions, see which got overwritten
            tag = np.empty(self._cap, np.int64)
            idx = np.arange(len(present))
            tag[present] = idx
            dup = bool((tag[present] != idx).any())
        for _, kind, payload, r, _ in located:
            if dup:
                break
            miss = r < 0
            if np.count_nonzero(miss) < 2:
                continue
            if kind is None:
                new = [k for k, m in zip(payload, miss) if m]
                dup = len(set(new)) != len(new)
            else:
                new = payload[miss]
                h = np.sort(_hash64(new))
                # equal hashes are either repeats or (rarely) collisions: settle those exactly
                if (h[1:] == h[:-1]).any():
                    dup = len(np.unique(new, axis=0)) != len(new)
        if dup:
            raise ValueError(_DUPLICATE_MSG.format(op))

    def _check_values(self, values: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        out = {}
        for name, v in values.items():
            f = self.schema.get(name)
            if f is None:
                raise KeyError(f"unknown field {name!r}; schema has {sorted(self.schema)}")
            if type(v) is not np.ndarray:
                v = np.asarray(v)
            if v.shape[:1] != (n,) or v.shape[1:] != f.shape:
                raise ValueError(f"field {name!r}: expected shape {(n, *f.shape)}, got {v.shape}")
            if v.dtype != f.dtype and not np.can_cast(v.dtype, f.dtype, "same_kind"):
                raise TypeError(f"field {name!r}: cannot store {v.dtype} values as {f.dtype}")
            out[name] = v
        return out

    def _alloc(self, m: int) -> np.ndarray:
        take = min(m, len(self._free))
        reused = self._free[len(self._free) - take :]
        del self._free[len(self._free) - take :]
        fresh = m - take
        if self._n_rows + fresh > self._cap:
            self._grow(self._n_rows + fresh)
        out = np.empty(m, np.int64)
        out[:take] = reused
        out[take:] = np.arange(self._n_rows, self._n_rows + fresh)
        self._n_rows += fresh
        return out

    def _grow(self, needed: int) -> None:
        cap = self._cap
        while cap < needed:
            cap *= 2
        for name, f in self.schema.items():
            col = self._new_col(f, cap)
            col[: self._n_rows] = self._cols[name][: self._n_rows]
            self._cols[name] = col
        self._cap = cap

    def delete_many(self, keys: Keys) -> None:
        if len(keys) == 0:
            return
        _, located = self._locate(keys)
        freed = []
        for _, kind, payload, r, slots in located:
            hit = r >= 0
            if not hit.any():
                continue
            if kind is None:
                for k, h in zip(payload, hit):
                    if h:
                        freed.append(self._objects.pop(k, -1))
            else:
                # a key repeated in the batch was found twice, at the same slot
                s, first = np.unique(slots[hit], return_index=True)
                self._tables[kind].delete_slots(s)
                freed.extend(r[hit][first].tolist())
        self._free.extend(row for row in freed if row >= 0)
