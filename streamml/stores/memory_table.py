"""The in-memory store's index: an open-addressing hash table from int64 tuples to rows, probed
by a compiled loop (:class:`IntTable`, used by :class:`streamml.stores.InMemoryStore`)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from streamml.stores.base import _C1, _C2, _M64, _SEED, _hash64

__all__ = ["IntTable", "prefetch"]

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


class IntTable:
    """Open-addressing (linear probing) hash table from w-tuples of int64 to row ids.

    A batch of keys is probed by a compiled loop (``_lookup_kernel``), one key in pure
    Python (``lookup_one``), a batch of new keys is inserted by numpy ops over the keys
    still unplaced. It needs no Python object per key, so it costs a fraction of a Python
    dict of tuples (``experiments/serve_stores_figures.md``).
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


