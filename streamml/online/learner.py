"""Online per-user adaptation of a frozen per-query head: the residual learner.

For a user ``u``, a query ``q`` and an item embedding ``x``::

    score(u, q, x) = z_q(head_q(x)) + r · x

``z_q`` standardises the head's scores with the mean and std of that query's
catalog items, so that a residual step moves rankings equally fast whatever the
head's scale. ``r`` is a residual vector per key (per ``(user, query)``, or per
user), zero at cold start, so a new user ranks exactly as the head does. Each
feedback event (the user accepted or rejected a shown catalog item) takes one
clipped gradient step on ``r``: river's ``reco.BiasedMF`` in miniature, with the
per-key state in a :class:`~streamml.stores.Store`.

The update rules (:class:`PointwiseSGD`, :class:`PairwiseSGD`) are small classes
with plain keyword arguments, so Hydra can build them from ``_target_``. Each has a
numpy ``step`` (any store: batched get, step, put) and a numba kernel that updates an
:class:`~streamml.stores.InMemoryStore`'s arrays in place, one event after the other;
tests check that both compute the same thing.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
import numba
from numba import njit, types
from numba.extending import intrinsic, overload

from streamml.stores.memory import Field, InMemoryStore, Schema, Store, occurrences, prefetch

__all__ = ["Catalog", "PointwiseSGD", "PairwiseSGD", "ResidualLearner", "sampled_dots", "weighted_rows"]

# Gathers of more rows than this run through torch's fused kernels (no (B, k, D)
# temporary, fast float16 casts); smaller ones through numpy (lower per-call cost).
TORCH_MIN_ROWS = 2048
# The built-in rules update an InMemoryStore's arrays in place with their numba kernel;
# False forces the numpy path that every other store takes (tests and benchmarks).
USE_NUMBA = True


# --------------------------------------------------------------------------- kernels
def sampled_dots(X: np.ndarray, idx: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``out[b, j] = X[idx[b, j]] · r[b]``: row-wise dots with catalog rows. (B, k)."""
    B, k = idx.shape
    if B * k < TORCH_MIN_ROWS:
        return np.einsum("bkd,bd->bk", X[idx], r)
    # entries of R @ X.T sampled at (b, idx[b, j]), without gathering the (B, k, D) rows
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        pattern = torch.sparse_csr_tensor(
            torch.arange(0, B * k + 1, k),
            torch.from_numpy(np.ascontiguousarray(idx, np.int64)).reshape(-1),
            torch.zeros(B * k, dtype=torch.from_numpy(X[:0]).dtype),
            size=(B, len(X)),
            check_invariants=False,
        )
    with torch.inference_mode():
        r = torch.from_numpy(np.ascontiguousarray(r, X.dtype))
        out = torch.sparse.sampled_addmm(pattern, r, torch.from_numpy(X).T, beta=0.0)
    return out.values().numpy().reshape(B, k)


def weighted_rows(X: np.ndarray, idx: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``out[b] = sum_j coef[b, j] X[idx[b, j]]``. (B, D)."""
    B, k = idx.shape
    if B * k < TORCH_MIN_ROWS:
        return np.einsum("bk,bkd->bd", coef, X[idx])
    with torch.inference_mode():
        out = F.embedding_bag(
            torch.from_numpy(np.ascontiguousarray(idx, np.int64)),
            torch.from_numpy(X),
            per_sample_weights=torch.from_numpy(np.ascontiguousarray(coef, X.dtype)),
            mode="sum",
        )
    return out.numpy()


def _cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a.astype(dtype)``; float16 <-> float32 of big arrays through torch (F16C, ~10x numpy)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if a.size >= TORCH_MIN_ROWS * 64 and {a.dtype, dtype} == {np.dtype(np.float16), np.dtype(np.float32)}:
        return torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype.name)).numpy()
    return a.astype(dtype)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))  # no overflow for any finite a


def _softplus(a: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, a)


@dataclass(frozen=True)
class Catalog:
    """What the update rules read: item embeddings and the standardised head.

    Attributes
    ----------
    embeddings
        (n_items, D) float32, C-contiguous.
    head
        (n_items,) float32: ``z_q(head_q(x_i))`` for each catalog item, zeros with no head.
    """

    embeddings: np.ndarray
    head: np.ndarray


# --------------------------------------------------------------------------- compiled kernels
# One numba kernel per rule applies a batch of events to an InMemoryStore's arrays in
# place, strictly in event order, so a key's events apply one after the other without
# the wave splitting of the numpy path. The math is that of the rules' ``step`` below
# (tests/test_online.py checks both paths agree). Numba has no float16 on the CPU: a
# float16 residual column is passed as its uint16 bits and converted per element, by the
# CPU's own instructions (F16C on x86, always present on arm64) or else in software.
_FASTMATH = {"reassoc", "contract"}  # vectorised dot products; no change to inf/nan handling


def _native_half() -> bool:
    """Can LLVM lower float16 <-> float32 conversions to instructions on the target CPU?
    (Without them it emits calls to compiler-rt helpers that numba does not link.)"""
    import llvmlite.binding as ll
    from numba.core import config

    if ll.get_process_triple().startswith(("aarch64", "arm64")):
        return True
    if config.CPU_NAME and config.CPU_NAME != "host":  # NUMBA_CPU_NAME pins another target
        return "+f16c" in (config.CPU_FEATURES or "")
    return "+f16c" in ll.get_host_cpu_features().flatten()


NATIVE_HALF = _native_half()


@intrinsic
def _h2f_native(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f2h_native(typingctx, x):
    def codegen(context, builder, sig, args):  # fptrunc rounds to nearest even, as numpy does
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(cache=True)
def _h2f_soft(h):
    """float16 bits -> float32, by arithmetic (exact for all 65536 inputs)."""
    h = np.int32(h)
    e, m = (h >> 10) & 0x1F, h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(2.0**-24)
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m + 1024) * np.float32(2.0) ** np.float32(e - 25)
    return -v if h & 0x8000 else v


@njit(cache=True)
def _f2h_soft(x):
    """float32 -> float16 bits, rounded to nearest even, by arithmetic."""
    sign = 0x8000 if x < 0 or (x == 0 and math.copysign(1.0, x) < 0) else 0
    a = abs(np.float64(x))
    if a != a:
        return np.uint16(0x7E00)
    if a >= 65520.0:  # rounds past the largest float16, 65504
        return np.uint16(sign | 0x7C00)
    if a < 2.0**-14:  # subnormal: the bits are the multiple of 2^-24 (1024 = the smallest normal)
        return np.uint16(sign | int(np.rint(a * 2.0**24)))
    mant, exp = math.frexp(a)  # a = mant 2^exp, mant in [0.5, 1)
    q = int(np.rint(mant * 2048.0))  # 11 significant bits; exact scaling, then round half to even
    return np.uint16(sign | ((exp + 14) << 10) + q - 1024)  # q == 2048 carries into the exponent


def _to_f32(v):  # a stored residual element -> float32 (typed in numba only)
    raise NotImplementedError


def _from_f32(x, dtype):  # float32 -> an element of an array of ``dtype``
    raise NotImplementedError


@overload(_to_f32)
def _to_f32_impl(v):
    if v == types.uint16:
        return (lambda v: _h2f_native(v)) if NATIVE_HALF else (lambda v: _h2f_soft(v))
    return lambda v: np.float32(v)


@overload(_from_f32)
def _from_f32_impl(x, dtype):  # dtype: the array's .dtype, not the array (no refcounting per element)
    if dtype.dtype == types.uint16:
        return (lambda x, dtype: _f2h_native(x)) if NATIVE_HALF else (lambda x, dtype: _f2h_soft(x))
    return lambda x, dtype: x


# Each kernel is one loop over the events with the per-event work written out in it:
# calls to helpers that take arrays are not inlined and cost reference counting. The
# work is a few passes over D, each fusing what it can (the residual row is read once
# and written once, a pass reads up to 5 catalog rows), and the rows of the event
# ``_AHEAD`` places on are prefetched: at 1M keys the residual rows are nowhere in the
# caches, and waiting for them one event at a time cost more than all the arithmetic.
_AHEAD = 4


@njit(cache=True)
def _sigmoid1(a):
    return 0.5 * (1.0 + math.tanh(0.5 * a))


@njit(cache=True, nogil=True, inline="always")
def _prefetch_event(res, X, row, item):
    """Ask for the residual row and the item's embedding of an event a few steps ahead."""
    for off in range(0, X.shape[1] * res.itemsize, 64):
        prefetch(res, row, off)
    for off in range(0, X.shape[1] * X.itemsize, 64):
        prefetch(X, item, off)


@njit(cache=True, nogil=True)
def _my_events(rows, part, parts):
    """Positions of the events of part ``part`` of ``parts``, in order: those whose row is in
    a block of 8 consecutive rows numbered ``part`` mod ``parts``. A key has one row, so
    its events stay in one part, in order; blocks, not single rows, so that two parts
    share a cache line of the arrays only at block edges."""
    if parts == 1:
        return np.arange(rows.shape[0])
    mine = np.empty(rows.shape[0], np.int64)
    n = 0
    for e in range(rows.shape[0]):
        if (rows[e] >> 3) % parts == part:
            mine[n] = e
            n += 1
    return mine[:n]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _pointwise_events(res, rows, items, labels, X, z, lr, shrink, max_norm, part, parts):
    """Pointwise SGD steps of events ``(rows[e], items[e], labels[e])``, in order, in place
    (only the events of ``part`` of ``parts``: see ``_my_events``).

    ``res``: (n_rows, D) residual rows (float32, or float16 bits as uint16); X, z: the catalog.
    """
    mine = _my_events(rows, part, parts)
    n, D = mine.shape[0], X.shape[1]
    r = np.empty(D, np.float32)
    sh, dt = np.float32(shrink), res.dtype
    for t in range(n):
        if t + _AHEAD < n:
            _prefetch_event(res, X, rows[mine[t + _AHEAD]], items[mine[t + _AHEAD]])
        e = mine[t]
        row, i = rows[e], items[e]
        s = np.float32(0.0)
        for d in range(D):  # load r, and x_i · r
            v = _to_f32(res[row, d])
            r[d] = v
            s += X[i, d] * v
        c = np.float32(-lr * (_sigmoid1(s + z[i]) - (1.0 if labels[e] else 0.0)))
        n2 = np.float32(0.0)
        for d in range(D):  # r <- shrink r - lr (sigmoid(s) - y) x_i, stored unscaled
            v = sh * r[d] + c * X[i, d]
            r[d] = v
            n2 += v * v
            res[row, d] = _from_f32(v, dt)
        norm = math.sqrt(n2)
        if norm > max_norm:  # cap ||r||: store again, scaled
            scale = np.float32(max_norm / norm)
            for d in range(D):
                res[row, d] = _from_f32(r[d] * scale, dt)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _pairwise_events(res, buf, rows, items, labels, X, z, lr, shrink, max_norm, part, parts):
    """Pairwise SGD steps of events ``(rows[e], items[e], labels[e])``, in order, in place
    (only the events of ``part`` of ``parts``: see ``_my_events``).

    ``buf``: (n_rows, 2, m) item-id rings, row y for label y, newest first, -1 empty.
    """
    mine = _my_events(rows, part, parts)
    n, D, m = mine.shape[0], X.shape[1], buf.shape[2]
    width = (m + 3) // 4 * 4  # the opposite items, padded to whole groups of 4
    r = np.empty(D, np.float32)
    opp = np.empty(width, np.int64)
    coef = np.zeros(width, np.float32)
    sh, dt = np.float32(shrink), res.dtype
    for t in range(n):
        if t + _AHEAD < n:
            _prefetch_event(res, X, rows[mine[t + _AHEAD]], items[mine[t + _AHEAD]])
            prefetch(buf, rows[mine[min(t + 2 * _AHEAD, n - 1)]], 0)
        e = mine[t]
        row, i = rows[e], items[e]
        y = 1 if labels[e] else 0
        k = 0
        for j in range(m):  # the opposite label's ring
            o = buf[row, 1 - y, j]
            if o >= 0:
                opp[k] = o
                k += 1
        for j in range(k, width):  # padding: the item itself, at weight 0
            opp[j] = i
            coef[j] = 0.0
        s_i = np.float32(0.0)
        for d in range(D):  # load r, and x_i · r
            v = _to_f32(res[row, d])
            r[d] = v
            s_i += X[i, d] * v
        s_i += z[i]
        sign = 1.0 if y else -1.0
        total = 0.0
        for g in range(0, k, 4):  # x_j · r, four at a time; w_j = sigmoid(-sign (s_i - s_j)) / k
            a, b, c, f = opp[g], opp[g + 1], opp[g + 2], opp[g + 3]
            sa = sb = sc = sf = np.float32(0.0)
            for d in range(D):
                v = r[d]
                sa += X[a, d] * v
                sb += X[b, d] * v
                sc += X[c, d] * v
                sf += X[f, d] * v
            for j, s_j in enumerate((sa, sb, sc, sf)):
                if g + j < k:
                    w = _sigmoid1(-sign * (s_i - (s_j + z[opp[g + j]]))) / k
                    total += w
                    coef[g + j] = -lr * sign * w
        # r <- shrink r - lr sign (sum_j w_j x_j - (sum_j w_j) x_i), one group of 4 x_j per pass
        c_i, sh_g = np.float32(lr * sign * total), sh
        n2 = np.float32(0.0)
        for g in range(0, max(k, 1), 4):
            a, b, c, f = opp[g], opp[g + 1], opp[g + 2], opp[g + 3]
            ca, cb, cc, cf = coef[g], coef[g + 1], coef[g + 2], coef[g + 3]
            n2 = np.float32(0.0)
            for d in range(D):
                v = sh_g * r[d] + c_i * X[i, d] + ca * X[a, d] + cb * X[b, d] + cc * X[c, d] + cf * X[f, d]
                r[d] = v
                n2 += v * v
            c_i, sh_g = np.float32(0.0), np.float32(1.0)
        scale = np.float32(1.0)
        norm = math.sqrt(n2)
        if norm > max_norm:
            scale = np.float32(max_norm / norm)
        for d in range(D):
            res[row, d] = _from_f32(r[d] * scale, dt)
        for j in range(m - 1, 0, -1):  # push the item, newest first
            buf[row, y, j] = buf[row, y, j - 1]
        buf[row, y, 0] = i


@njit(cache=True)
def _pointwise_one(res, row, item, label, X, z, lr, shrink, max_norm):
    _pointwise_events(res, np.full(1, row), np.full(1, item), np.full(1, label), X, z, lr, shrink, max_norm, 0, 1)


@njit(cache=True)
def _pairwise_one(res, buf, row, item, label, X, z, lr, shrink, max_norm):
    rows, items, labels = np.full(1, row), np.full(1, item), np.full(1, label)
    _pairwise_events(res, buf, rows, items, labels, X, z, lr, shrink, max_norm, 0, 1)


# Big batches are split over up to THREADS threads, at least PARALLEL_MIN_EVENTS events
# each, every thread applying the events of its part (``_my_events``) with the GIL
# released. Plain Python threads, not numba's parallel=True: GNU OpenMP (numba's usual
# threading layer) kills a forked child that uses it once the parent has.
PARALLEL_MIN_EVENTS = 4096
THREADS = numba.config.NUMBA_NUM_THREADS  # the CPU count, or NUMBA_NUM_THREADS


def _n_parts(n_events: int) -> int:
    return max(1, min(THREADS, n_events // PARALLEL_MIN_EVENTS))


def _in_parts(kernel, n_events: int, *args) -> None:
    """``kernel(*args, part, parts)`` for every part, on as many threads."""
    parts = _n_parts(n_events)
    others = [threading.Thread(target=kernel, args=(*args, p, parts)) for p in range(1, parts)]
    for t in others:
        t.start()
    kernel(*args, 0, parts)
    for t in others:
        t.join()


# --------------------------------------------------------------------------- rules
class _SGDRule:
    """Shared parts of the rules: the step ``r <- cap((1 - decay) r - lr grad)``."""

    def __init__(self, lr: float, l2: float = 0.0, decay: float = 0.0, max_norm: float = 10.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not (0 < max_norm < np.inf):
            raise ValueError(f"max_norm must be finite and > 0, got {max_norm}")
        if decay + lr * l2 >= 1:
            raise ValueError(f"decay + lr * l2 must be < 1 (got {decay + lr * l2}): the shrink would overshoot zero")
        self.lr, self.l2, self.decay, self.max_norm = float(lr), float(l2), float(decay), float(max_norm)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def fields(self) -> dict[str, Field]:
        """Per-key state the rule keeps besides the residual."""
        return {}

    def _grad_parts(self, r, items, labels, state, cat, loss=True):
        """-> (loss (B,) or None, idx (B, k), coef (B, k)): grad = sum_j coef[:, j] X[idx[:, j]] (+ l2 r)."""
        raise NotImplementedError

    def loss(self, r: np.ndarray, items: np.ndarray, labels: np.ndarray, state: Mapping, cat: Catalog) -> np.ndarray:
        """Per-key loss at residuals ``r`` (B, D), including ``l2/2 ||r||^2``. (B,)."""
        return self._grad_parts(r, items, labels, state, cat, loss=True)[0] + 0.5 * self.l2 * np.einsum("bd,bd->b", r, r)

    def grad(self, r: np.ndarray, items: np.ndarray, labels: np.ndarray, state: Mapping, cat: Catalog) -> np.ndarray:
        """Closed-form gradient of :meth:`loss` with respect to ``r``. (B, D)."""
        _, idx, coef = self._grad_parts(r, items, labels, state, cat, loss=False)
        g = weighted_rows(cat.embeddings, idx, coef)
        if self.l2:
            g += self.l2 * r
        return g

    def step(self, r: np.ndarray, items: np.ndarray, labels: np.ndarray, state: Mapping, cat: Catalog):
        """One update for a batch of distinct keys: new residuals (in place) and new fields.

        ``r <- (1 - decay) r - lr (grad_pair + l2 r)``, then ``||r||`` capped at ``max_norm``.
        """
        _, idx, coef = self._grad_parts(r, items, labels, state, cat, loss=False)
        shrink = 1.0 - self.decay - self.lr * self.l2
        if shrink != 1.0:
            r *= shrink
        r -= weighted_rows(cat.embeddings, idx, coef * self.lr)
        # cap ||r|| after every step: no run of feedback can push a score past |head| + max_norm ||x||
        norm = np.sqrt(np.einsum("bd,bd->b", r, r))
        over = norm > self.max_norm
        if over.any():
            r[over] *= (self.max_norm / norm[over])[:, None]
        return r, self._push(items, labels, state)

    def _push(self, items, labels, state) -> dict[str, np.ndarray]:
        return {}

    # The single-event path: the same step on 1-D arrays, in a dozen numpy calls
    # (the batched code above costs ~60 calls, i.e. ~100 us, for one event).
    # tests/test_online.py checks that both agree.
    def step_one(self, r: np.ndarray, item: int, label: bool, state: Mapping, cat: Catalog):
        """:meth:`step` for one event: ``r`` (D,) float32, updated in place; state rows (m,)."""
        step = self._grad_one(r, item, label, state, cat, -self.lr)  # -lr * grad, without the l2 term
        shrink = 1.0 - self.decay - self.lr * self.l2
        if shrink != 1.0:
            r *= shrink
        if step is not None:
            r += step
        norm2 = float(r @ r)
        if norm2 > self.max_norm**2:
            r *= self.max_norm / np.sqrt(norm2)
        return r, self._push_one(item, label, state)

    def _grad_one(self, r, item, label, state, cat, scale) -> np.ndarray | None:
        """``scale *`` the loss gradient without its l2 term, (D,); None if it is zero."""
        raise NotImplementedError

    def _push_one(self, item, label, state) -> dict[str, np.ndarray]:
        return {}

    def _hyper(self) -> tuple[float, float, float]:
        """(lr, shrink, max_norm) for the compiled kernels: ``r <- shrink r - lr grad_pair``."""
        return self.lr, 1.0 - self.decay - self.lr * self.l2, self.max_norm


class PointwiseSGD(_SGDRule):
    """Logistic loss on the single event: ``softplus(-(2y-1) s)``, ``s = z + r·x``.

    Gradient: ``(sigmoid(s) - y) x + l2 r``. Weak as a ranker (each step pushes the
    score towards the label in absolute terms, not relative to the user's other
    items); kept as the baseline.

    Parameters
    ----------
    lr
        Step size. Default 3.0, tuned (prequential AUC, see ``experiments/online_benchmark.md``).
    l2
        Pull towards zero, added to the gradient.
    decay
        Forgetting: the residual shrinks by ``(1 - decay)`` on every event.
    max_norm
        Cap on ``||r||``, enforced after every step.

    Examples
    --------
    >>> rule = PointwiseSGD(lr=1.0)
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> r = np.zeros((1, 2), np.float32)
    >>> r, _ = rule.step(r, np.array([0]), np.array([1]), {}, cat)
    >>> r                              # moved towards the accepted item by lr * sigmoid(0)
    array([[0.5, 0. ]], dtype=float32)
    """

    def __init__(self, lr: float = 3.0, l2: float = 0.0, decay: float = 0.0, max_norm: float = 10.0):
        super().__init__(lr, l2, decay, max_norm)

    def _grad_parts(self, r, items, labels, state, cat, loss=True):
        idx = items[:, None]
        s = sampled_dots(cat.embeddings, idx, r)[:, 0] + cat.head[items]
        coef = (_sigmoid(s) - labels).astype(r.dtype)[:, None]
        return (_softplus(np.where(labels, -s, s)) if loss else None), idx, coef

    def _grad_one(self, r, item, label, state, cat, scale):
        x = cat.embeddings[item]
        s = float(x @ r) + cat.head.item(item)
        return (scale * (0.5 * (1.0 + math.tanh(0.5 * s)) - label)) * x

    def _run_kernel(self, cols, rows, items, labels, cat):
        args = cols["residual"], rows, items, labels, cat.embeddings, cat.head, *self._hyper()
        _in_parts(_pointwise_events, len(rows), *args)

    def _run_kernel_one(self, cols, row, item, label, cat):
        _pointwise_one(cols["residual"], row, item, label, cat.embeddings, cat.head, *self._hyper())


class PairwiseSGD(_SGDRule):
    """Pairwise logistic (RankNet) loss of the new item against recent opposite feedback.

    A key remembers its last ``m = buffer_size // 2`` rejected and last ``m`` accepted
    items: field ``buffer`` of shape (2, m), int32 item ids, row ``y`` for label ``y``,
    newest first, -1 for empty. An accepted item ``i`` is pushed above
    each buffered rejected item ``j`` (and a rejected one below each accepted one)::

        loss = mean_j softplus(-sign (s_i - s_j)) + l2/2 ||r||^2,   sign = +1 / -1
        grad = -(sign / n) sum_j sigmoid(-sign (s_i - s_j)) (x_i - x_j) + l2 r

    with ``s = z + r·x`` (head term included, so the residual only corrects the
    head where it misorders). Then the item enters its own label's buffer. With no
    opposite item yet (a key's first events, or all one label) the pair term is 0:
    only ``l2`` and ``decay`` act. Buffers keep repeats; an item fed back with both
    labels pairs with itself at zero gradient.

    Why two per-label rings and not one ring of recent events: the comparison set
    then always holds ``buffer_size // 2`` opposite items, even when feedback is
    lopsided (mostly rejections). Tuning found 4 per label as good as 8
    (prequential AUC 0.891 either way), so ``buffer_size=8`` (32 bytes of int32)
    keeps a key under 1 KB.

    Parameters
    ----------
    lr
        Step size. Default 10.0, tuned (see ``experiments/online_benchmark.md``).
    l2, decay, max_norm
        As in :class:`PointwiseSGD`.
    buffer_size
        Item ids remembered per key, half per label. Even, >= 2.

    Examples
    --------
    >>> rule = PairwiseSGD(lr=1.0, buffer_size=2)
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> state = {"buffer": np.array([[[-1], [0]]], np.int32)}   # item 0 was accepted
    >>> r, new = rule.step(np.zeros((1, 2), np.float32), np.array([1]), np.array([0]), state, cat)
    >>> r                              # item 1 rejected: pushed below item 0
    array([[ 0.5, -0.5]], dtype=float32)
    >>> new["buffer"]
    array([[[1],
            [0]]], dtype=int32)
    """

    def __init__(
        self, lr: float = 10.0, l2: float = 0.0, decay: float = 0.0, max_norm: float = 10.0, buffer_size: int = 8
    ):
        super().__init__(lr, l2, decay, max_norm)
        if buffer_size < 2 or buffer_size % 2:
            raise ValueError(f"buffer_size must be even and >= 2, got {buffer_size}")
        self.buffer_size = int(buffer_size)

    def fields(self) -> dict[str, Field]:
        m = self.buffer_size // 2
        return {"buffer": Field((2, m), "int32", -1)}

    def _grad_parts(self, r, items, labels, state, cat, loss=True):
        labels = np.asarray(labels, bool)
        opp = state["buffer"][np.arange(len(items)), (~labels).view(np.int8)]  # (B, m) opposite label
        valid = opp >= 0
        # column 0: the new item; empty slots point at it too (x_i - x_i = 0, weight 0)
        idx = np.concatenate([items[:, None], np.where(valid, opp, items[:, None])], 1)  # (B, m+1)
        s = sampled_dots(cat.embeddings, idx, r) + cat.head[idx]  # (B, m+1)
        sign = np.where(labels, 1.0, -1.0).astype(r.dtype)[:, None]
        u = sign * (s[:, :1] - s[:, 1:])  # (B, m) margins, > 0 when ordered right
        n = np.maximum(valid.sum(1, keepdims=True), 1)
        w = (_sigmoid(-u) * valid / n).astype(r.dtype)  # (B, m)
        coef = np.concatenate([-w.sum(1, keepdims=True), w], 1) * sign  # rows: x_i, then x_j
        return ((_softplus(-u) * valid).sum(1) / n[:, 0] if loss else None), idx, coef

    def _push(self, items, labels, state):
        buf = state["buffer"]
        rows, y = np.arange(len(items)), np.asarray(labels, bool).view(np.int8)
        new = buf.copy()
        new[rows, y, 1:] = buf[rows, y, :-1]
        new[rows, y, 0] = items
        return {"buffer": new}

    def _grad_one(self, r, item, label, state, cat, scale):
        idx = [item] + [j for j in state["buffer"][0 if label else 1].tolist() if j >= 0]
        if len(idx) == 1:
            return None
        G = cat.embeddings.take(idx, axis=0)  # (k+1, D): the new item, then the opposite ones
        s = (G @ r).tolist()
        z = cat.head
        sign = 1.0 if label else -1.0
        s_i = s[0] + z.item(item)
        # the scalar work in plain Python: cheaper than numpy calls on k <= buffer_size/2 values
        c = scale * sign / (len(idx) - 1) * 0.5
        w = [c * (1.0 - math.tanh(0.5 * sign * (s_i - s_j - z.item(j)))) for s_j, j in zip(s[1:], idx[1:])]
        return np.array([-sum(w)] + w, np.float32) @ G

    def _push_one(self, item, label, state):
        buf = state["buffer"].copy()
        y = int(label)
        buf[y, 1:] = buf[y, :-1]
        buf[y, 0] = item
        return {"buffer": buf}

    def _run_kernel(self, cols, rows, items, labels, cat):
        args = cols["residual"], cols["buffer"], rows, items, labels, cat.embeddings, cat.head, *self._hyper()
        _in_parts(_pairwise_events, len(rows), *args)

    def _run_kernel_one(self, cols, row, item, label, cat):
        _pairwise_one(cols["residual"], cols["buffer"], row, item, label, cat.embeddings, cat.head, *self._hyper())


# --------------------------------------------------------------------------- learner
def _feature_stats(X: np.ndarray, q_code: np.ndarray, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query mean (Q, D) and scale (Q, D) = std * sqrt(D) of the catalog embeddings."""
    count = np.bincount(q_code, minlength=n_queries)[:, None]
    mean = np.zeros((n_queries, X.shape[1]))
    np.add.at(mean, q_code, X)
    mean /= count
    var = np.zeros_like(mean)
    np.add.at(var, q_code, (X - mean[q_code]) ** 2)
    std = np.sqrt(var / count)
    return mean.astype(np.float32), (np.where(std > 1e-6, std, 1.0) * np.sqrt(X.shape[1])).astype(np.float32)


class ResidualLearner:
    """Per-key residuals over a frozen head, learned from accept/reject feedback.

    Parameters
    ----------
    items
        (n_items, D) catalog embeddings. Feedback events name catalog item ids
        (rows of this array), so that a key's buffer holds int32 ids, not vectors.
    item_query
        (n_items,) the query each catalog item belongs to (ints or strings).
    rule
        Update rule, :class:`PairwiseSGD` (default) or :class:`PointwiseSGD`.
    head_scores
        (n_items,) the frozen head's raw scores of the catalog items; ``None`` means
        no head (the head term is 0).
    store
        Where the per-key state lives: a :class:`~streamml.stores.Store` whose
        schema equals :attr:`schema`, or a callable ``schema -> Store`` (a Hydra
        partial); default an :class:`~streamml.stores.InMemoryStore`.
    key
        ``"user_query"``: one residual per (user, query). ``"user"``: one residual
        (and one feedback buffer) per user, shared by all queries.
    dtype
        Storage dtype of the residual: ``"float16"`` (768 bytes at D=384) or ``"float32"``.
        Updates are computed in float32 and rounded on write.
    standardize
        Standardise head scores per query (mean 0, std 1 over the query's catalog
        items; a query whose head scores are constant gets std 1).
    features
        ``"raw"``: the residual acts on the embeddings as given. ``"standardized"``:
        on embeddings standardised per dimension over the query's catalog items, then
        divided by sqrt(D) to keep unit scale. MiniLM vectors share a large common
        component and vary little per dimension, so raw SGD steps move mostly along a
        few directions; standardising equalises them, as river's StandardScaler does,
        but from the catalog (known before any feedback, and label-free) rather than
        from the stream. Cold-start prequential AUC on the shared queries: 0.883 raw
        vs 0.907 standardised (``experiments/online_results.md``).
    chunk_size
        Events per store round trip in :meth:`learn_many`, for stores other than
        :class:`~streamml.stores.InMemoryStore` (which the compiled kernels update in place).

    Examples
    --------
    >>> X = np.array([[1, 0], [0, 1], [.7, .7], [1, 0]], np.float32)
    >>> learner = ResidualLearner(X, item_query=[0, 0, 0, 1], head_scores=[0., 1., 2., 5.])
    >>> learner.rank(user=7, query=0, item_ids=[0, 1, 2])     # cold start: the head's order
    array([2, 1, 0])
    >>> learner.learn_one(user=7, query=0, item=0, label=1)
    >>> learner.learn_one(user=7, query=0, item=1, label=0)
    >>> learner.rank(user=7, query=0, item_ids=[0, 1, 2])
    array([0, 2, 1])
    >>> learner.rank(user=8, query=0, item_ids=[0, 1, 2])     # other users are untouched
    array([2, 1, 0])
    >>> learner.forget(7)
    >>> learner.rank(user=7, query=0, item_ids=[0, 1, 2])
    array([2, 1, 0])
    """

    def __init__(
        self,
        items: np.ndarray,
        item_query: np.ndarray,
        rule: _SGDRule | None = None,
        head_scores: np.ndarray | None = None,
        store: Store | Callable[[Schema], Store] | None = None,
        key: str = "user_query",
        dtype: str = "float16",
        standardize: bool = True,
        features: str = "raw",
        chunk_size: int = 8192,
    ):
        X = np.ascontiguousarray(items, np.float32)
        if not X.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. np.load mmaps)
            X = X.copy()
        if X.ndim != 2:
            raise ValueError(f"items must be (n_items, D), got shape {X.shape}")
        item_query = np.asarray(item_query)
        if item_query.shape != (len(X),):
            raise ValueError(f"item_query must have shape ({len(X)},), got {item_query.shape}")
        if key not in ("user_query", "user"):
            raise ValueError(f"key must be 'user_query' or 'user', got {key!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise ValueError(f"dtype must be float16 or float32, got {dtype}")
        self.rule = PairwiseSGD() if rule is None else rule
        self.key = key
        self.standardize = standardize
        self.chunk_size = int(chunk_size)
        self.item_query = item_query
        self._item_query_list = item_query.tolist()  # cheap per-event validation
        self.queries, q_code = np.unique(item_query, return_inverse=True)
        self._query_index = {q: i for i, q in enumerate(self.queries.tolist())}
        if features not in ("raw", "standardized"):
            raise ValueError(f"features must be 'raw' or 'standardized', got {features!r}")
        self.features = features
        if features == "standardized":
            self._x_shift, self._x_scale = _feature_stats(X, q_code, len(self.queries))
            X = ((X - self._x_shift[q_code]) / self._x_scale[q_code]).astype(np.float32)
        self._mean = np.zeros(len(self.queries))
        self._std = np.ones(len(self.queries))
        z = np.zeros(len(X), np.float32)
        self.has_head = head_scores is not None
        if head_scores is not None:
            h = np.asarray(head_scores, np.float64)
            if h.shape != (len(X),):
                raise ValueError(f"head_scores must have shape ({len(X)},), got {h.shape}")
            if standardize:
                count = np.bincount(q_code, minlength=len(self.queries))
                self._mean = np.bincount(q_code, h) / count
                var = np.bincount(q_code, (h - self._mean[q_code]) ** 2) / count
                std = np.sqrt(var)
                self._std = np.where(std > 1e-12 * np.maximum(np.abs(self._mean), 1), std, 1.0)
            z = self._standardized(h, q_code).astype(np.float32)
        self.catalog = Catalog(X, z)
        self.schema: dict[str, Field] = {"residual": Field((X.shape[1],), self.dtype, 0), **self.rule.fields()}
        if store is None:
            store = InMemoryStore(self.schema)
        elif not isinstance(store, Store) and callable(store):
            store = store(self.schema)
        if dict(store.schema) != self.schema:
            raise ValueError(f"store schema {dict(store.schema)} does not match the learner's {self.schema}")
        self.store = store

    @property
    def dim(self) -> int:
        return self.catalog.embeddings.shape[1]

    def _standardized(self, h: np.ndarray, q_code) -> np.ndarray:
        return (h - self._mean[q_code]) / self._std[q_code]

    # ---- keys
    def _key(self, user: Hashable, query: Hashable) -> Hashable:
        return user if self.key == "user" else (user, query)

    def _keys(self, users: np.ndarray, queries: np.ndarray):
        ints = users.dtype.kind in "iu" and (self.key == "user" or queries.dtype.kind in "iu")
        if self.key == "user":
            return users.astype(np.int64) if ints else users.tolist()
        if ints:
            return np.stack([users, queries], 1).astype(np.int64)
        return list(zip(users.tolist(), queries.tolist()))

    # ---- scoring
    def _residual(self, user: Hashable, query: Hashable) -> np.ndarray:
        return self.store.get_many([self._key(user, query)])["residual"][0].astype(np.float32)

    def score(self, user: Hashable, query: Hashable, X: np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
        """Scores of catalog items or of arbitrary embeddings for one user and query.

        Parameters
        ----------
        X
            1-D integer array of catalog item ids (of ``query``), or (n, D) float embeddings.
        head
            With embeddings only: their raw head scores, standardised with the
            query's catalog statistics. ``None``: no head term.

        Returns
        -------
        (n,) float32 scores, higher is better.
        """
        X = np.asarray(X)
        r = self._residual(user, query)
        if X.ndim == 1 and X.dtype.kind in "iu":
            ids = self._check_items(X, query)
            if head is not None:
                raise ValueError("head is only for embeddings: catalog items use the learner's head_scores")
            return self.catalog.head[ids] + self.catalog.embeddings[ids] @ r
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"X must be item ids (n,) or embeddings (n, {self.dim}), got shape {X.shape}")
        X = X.astype(np.float32)
        if self.features == "standardized":
            if query not in self._query_index:
                raise ValueError(f"query {query!r} has no catalog items to standardise embeddings with")
            q = self._query_index[query]
            X = (X - self._x_shift[q]) / self._x_scale[q]
        out = X @ r
        if head is not None:
            head = np.asarray(head, np.float64)
            if head.shape != (len(X),):
                raise ValueError(f"head must have shape ({len(X)},), got {head.shape}")
            if self.standardize and not self.has_head:
                raise ValueError("this learner has no head_scores, so no statistics to standardise a head with")
            if query not in self._query_index:
                raise ValueError(f"query {query!r} has no catalog items to standardise its head with")
            out = out + self._standardized(head, self._query_index[query]).astype(np.float32)
        return out

    def rank(self, user: Hashable, query: Hashable, item_ids: np.ndarray) -> np.ndarray:
        """Catalog item ids ordered best first (ties keep the given order)."""
        item_ids = np.asarray(item_ids)
        return item_ids[np.argsort(-self.score(user, query, item_ids), kind="stable")]

    # ---- learning
    def _check_items(self, items: np.ndarray, queries) -> np.ndarray:
        if items.size == 0:
            return items.astype(np.int64)
        if items.dtype.kind not in "iu":
            raise TypeError(f"item ids must be integers, got {items.dtype}")
        if items.min() < 0 or items.max() >= len(self.item_query):
            raise IndexError(f"item ids must be in [0, {len(self.item_query)})")
        wrong = self.item_query[items] != queries
        if np.any(wrong):
            i = int(np.flatnonzero(wrong)[0]) if np.ndim(wrong) else 0
            q = queries if np.ndim(queries) == 0 else np.asarray(queries)[i]
            raise ValueError(f"item {items[i]} belongs to query {self.item_query[items[i]]!r}, not {q!r}")
        return items

    @staticmethod
    def _check_labels(labels) -> np.ndarray:
        y = np.asarray(labels)
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 1 (accepted) or 0 (rejected)")
        return y.astype(bool)

    def _update(self, items: np.ndarray, labels: np.ndarray) -> Callable[[dict], dict]:
        def fn(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            r = _cast(state["residual"], np.float32)  # a copy either way: the store's reads are copies
            r, fields = self.rule.step(r, items, labels, state, self.catalog)
            return {"residual": _cast(r, self.dtype), **fields}

        return fn

    def _compiled(self) -> bool:
        """Update through the rule's numba kernel? Only for the built-in rules (a subclass
        may change the math) and an in-process store, whose arrays the kernel writes."""
        return USE_NUMBA and type(self.rule) in _COMPILED_RULES and isinstance(self.store, InMemoryStore)

    def _columns(self) -> dict[str, np.ndarray]:
        """The store's arrays as the kernels take them: float16 as its uint16 bits. Not
        cached: a reference kept past a store's growth would keep the old arrays alive."""
        cols = self.store.columns
        if self.dtype == np.float16:
            cols["residual"] = cols["residual"].view(np.uint16)
        return cols

    def learn_one(self, user: Hashable, query: Hashable, item: int, label: int) -> None:
        """One feedback event: ``user`` accepted (1) or rejected (0) catalog ``item`` shown for ``query``."""
        if not isinstance(item, (int, np.integer)) or not 0 <= item < len(self._item_query_list):
            raise IndexError(f"item must be an int in [0, {len(self.item_query)}), got {item!r}")
        if self._item_query_list[item] != query:
            raise ValueError(f"item {item} belongs to query {self.item_query[item]!r}, not {query!r}")
        if label not in (0, 1):
            raise ValueError("labels must be 1 (accepted) or 0 (rejected)")
        item, label = int(item), bool(label)
        key = self._key(user, query)
        if self._compiled():
            row = self.store.row_for(key)
            self.rule._run_kernel_one(self._columns(), row, item, label, self.catalog)
            return
        row_views = getattr(self.store, "row_views", None)
        views = row_views(key) if row_views is not None else None
        if views is not None:  # a stored key in an in-process store: update it in place
            r, fields = self.rule.step_one(views["residual"].astype(np.float32), item, label, views, self.catalog)
            views["residual"][...] = r  # rounds to the storage dtype as astype would
            for name, v in fields.items():
                views[name][...] = v
            return

        def fn(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            rows = {name: v[0] for name, v in state.items()}
            r, fields = self.rule.step_one(rows["residual"].astype(np.float32), item, label, rows, self.catalog)
            return {"residual": r.astype(self.dtype)[None], **{k: v[None] for k, v in fields.items()}}

        self.store.update_many([key], fn)

    def learn_many(self, users, queries, items, labels) -> None:
        """Many events at once, equal to calling :meth:`learn_one` on each in order.

        With an :class:`~streamml.stores.InMemoryStore`, the rule's compiled kernel
        applies the events in their order, split by key over up to ``THREADS`` threads
        (``PARALLEL_MIN_EVENTS`` events or more each). With any other store, the events
        are split into waves (wave ``w`` holds the ``w``-th event of every key), so a
        key's events apply in their given order, and each wave runs as chunks of
        distinct keys, one store round trip each.
        """
        users, queries = np.asarray(users), np.asarray(queries)
        items = np.asarray(items)
        if not (users.shape == queries.shape == items.shape == np.shape(labels)) or users.ndim != 1:
            raise ValueError("users, queries, items and labels must be 1-D and of equal length")
        self._check_items(items, queries)
        labels = self._check_labels(labels)
        keys = self._keys(users, queries)
        if self._compiled():
            rows = self.store.rows_for(keys)
            items = np.asarray(items, np.int64)
            self.rule._run_kernel(self._columns(), rows, items, labels, self.catalog)
            return
        for events in _waves(occurrences(keys)):
            for start in range(0, len(events), self.chunk_size):
                ev = events[start : start + self.chunk_size]
                chunk_keys = keys[ev] if isinstance(keys, np.ndarray) else [keys[i] for i in ev.tolist()]
                self.store.update_many(chunk_keys, self._update(items[ev], labels[ev]))

    def forget(self, user: Hashable, query: Hashable | None = None) -> None:
        """Reset a user's state for one query, or (``query=None``) for all queries."""
        if self.key == "user":
            if query is not None:
                raise ValueError("key='user' shares one residual across queries: forget the whole user")
            self.store.delete_many([user])
        elif query is None:
            self.store.delete_many([(user, q) for q in self.queries.tolist()])
        else:
            self.store.delete_many([(user, query)])


_COMPILED_RULES = (PointwiseSGD, PairwiseSGD)


def _waves(occurrence: np.ndarray) -> list[np.ndarray]:
    """Event positions by wave: wave w holds each key's w-th event, in event order."""
    if len(occurrence) == 0:
        return []
    small = occurrence.astype(np.int16) if occurrence.max() < 2**15 else occurrence  # radix sort
    by_wave = np.argsort(small, kind="stable")
    bounds = np.searchsorted(occurrence[by_wave], np.arange(occurrence.max() + 2))
    return [by_wave[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
