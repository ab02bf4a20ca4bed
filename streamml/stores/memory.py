"""The in-process store: one preallocated numpy array per field, rows reused.

The online learner's compiled kernels update its arrays in place (:meth:`InMemoryStore.rows_for`,
:meth:`InMemoryStore.columns`); every other caller goes through the :class:`~streamml.stores.Store`
protocol of :mod:`streamml.stores.base`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from streamml.stores.base import (
    _C1, _C2, _DUPLICATE_MSG, _INT64_MAX, _INT64_MIN, _M64, _SEED, Field, Keys, Schema, Store, _hash64, _route,
    _route_one, occurrences,
)

__all__ = ["InMemoryStore"]

_EMPTY, _TOMB = -1, -2
_SMALL = 8  # batches up to this size are probed in pure Python (numpy's per-call cost dominates)


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
        for v in key:  # the splitmix64 mix of _hash64, in pure Python: one key per call
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

    # Rows are moved as single opaque (void) elements, so numpy copies each row with one
    # memcpy instead of iterating over its elements.
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
