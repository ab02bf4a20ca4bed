"""Compiled update kernels: one numba kernel per rule of :mod:`streamml.online.rules`.

Each rule calls its own kernel (``Rule.apply``), so this module knows no rule: a new rule
brings its kernel and its call, and nothing here or in the learner changes. A kernel takes
four typed arguments besides its share of the batch: the rule's state (a NamedTuple of its
fields, as named in its schema, e.g. ``WindowState``), the ``Events``, the catalog ``Items``,
and the rule's hyperparameters; numba reads a NamedTuple's fields at no cost.

A kernel applies a batch of events to per-key state arrays in place, strictly in event
order, so a key's events apply one after the other. The learner runs them on an
:class:`~streamml.stores.InMemoryStore`'s own arrays (``rows`` index them), and on the
arrays a remote store's ``update_many`` hands out (``rows`` index the distinct keys of
the batch). The math is that of the rule's ``reference``; ``tests/online/test_kernels.py``
checks that they agree on random event streams.

Float16 state and the split of a big batch over threads come from
:mod:`streamml.online.kernel_support`. At 1M keys the state rows are nowhere in the caches,
so each kernel prefetches the rows of the event a few places ahead.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from streamml.online.kernel_support import FASTMATH as _FASTMATH
from streamml.online.kernel_support import PARALLEL_MIN_EVENTS, _f2h_soft, _from_f32, _h2f_soft, _to_f32, in_parts  # noqa: F401 (tests)
from streamml.online.kernel_support import my_events as _my_events
from streamml.online.kernel_support import sigmoid1 as _sigmoid1
from streamml.stores.memory import prefetch

__all__ = ["pointwise_events", "pairwise_events", "laplace_events", "iso_laplace_events", "window_events",
           "Events", "Items", "SGDState", "PairwiseState", "LaplaceState", "WindowState", "SGDParams", "WindowParams",
           "bits", "in_parts", "PARALLEL_MIN_EVENTS"]

# Each kernel is one loop over the events with the per-event work written out in it:
# calls to helpers that take arrays are not inlined and cost reference counting. The
# work is a few passes over D, each fusing what it can (the residual row is read once
# and written once, a pass reads up to 5 catalog rows), and the rows of the event
# ``_AHEAD`` places on are prefetched: at 1M keys the residual rows are nowhere in the
# caches, and waiting for them one event at a time cost more than all the arithmetic.
_AHEAD = 4


@njit(cache=True, nogil=True, inline="always")
def _prefetch_event(res, X, row, item):
    """Ask for the residual row and the item's embedding of an event a few steps ahead."""
    for off in range(0, X.shape[1] * res.itemsize, 64):
        prefetch(res, row, off)
    for off in range(0, X.shape[1] * X.itemsize, 64):
        prefetch(X, item, off)


@njit(cache=True, nogil=True, inline="always")
def _prefetch_window_row(res, win, beta, gram, X, row, item):
    """A WindowMAP event's state rows and new item."""
    _prefetch_event(res, X, row, item)
    prefetch(win, row, 0)
    prefetch(beta, row, 0)
    for off in range(0, gram.shape[1] * gram.itemsize, 64):
        prefetch(gram, row, off)


@njit(cache=True, nogil=True, inline="always")
def _prefetch_window_items(win, X, row):
    """The catalog rows of the items in a key's window (its ``win`` row already asked for):
    the window's items are scattered over a catalog that need not fit in the caches."""
    for j in range(win.shape[1]):
        code = win[row, j]
        if code != 0:
            for off in range(0, X.shape[1] * X.itemsize, 64):
                prefetch(X, abs(code) - 1, off)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def pointwise_events(state, events, cat, params, part, parts):
    """Pointwise SGD steps of events ``(rows[e], items[e], labels[e])``, in order, in place
    (only the events of ``part`` of ``parts``: see ``_my_events``).

    ``res``: (n_rows, D) residual rows (float32, or float16 bits as uint16); X, z: the catalog.
    """
    res = state.residual
    rows, items, labels = events.rows, events.items, events.labels
    X, z = cat.X, cat.z
    lr, shrink, max_norm = params.lr, params.shrink, params.max_norm
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
def pairwise_events(state, events, cat, params, part, parts):
    """Pairwise SGD steps of events ``(rows[e], items[e], labels[e])``, in order, in place
    (only the events of ``part`` of ``parts``: see ``_my_events``).

    ``buf``: (n_rows, 2, m) item-id rings, row y for label y, newest first, -1 empty.
    """
    res, buf = state.residual, state.buffer
    rows, items, labels = events.rows, events.items, events.labels
    X, z = cat.X, cat.z
    lr, shrink, max_norm = params.lr, params.shrink, params.max_norm
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




@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def laplace_events(state, events, cat, q0, part, parts):
    """Diagonal Laplace steps of events ``(rows[e], items[e], labels[e])``, in order, in place.

    ``res``: (n_rows, D) posterior means; ``ev``: (n_rows, D) evidence (float32 or float16 bits).
    """
    res, ev = state.residual, state.evidence
    rows, items, labels = events.rows, events.items, events.labels
    X, z = cat.X, cat.z
    mine = _my_events(rows, part, parts)
    n, D = mine.shape[0], X.shape[1]
    dt_r, dt_e, q0 = res.dtype, ev.dtype, np.float32(q0)
    for t in range(n):
        if t + _AHEAD < n:
            _prefetch_event(res, X, rows[mine[t + _AHEAD]], items[mine[t + _AHEAD]])
            _prefetch_event(ev, X, rows[mine[t + _AHEAD]], items[mine[t + _AHEAD]])
        e = mine[t]
        row, i = rows[e], items[e]
        s = np.float32(0.0)
        for d in range(D):
            s += X[i, d] * _to_f32(res[row, d])
        p = np.float32(_sigmoid1(s + z[i]))
        w, g = p * (np.float32(1.0) - p), np.float32(1.0 if labels[e] else 0.0) - p
        for d in range(D):
            x = X[i, d]
            a = _to_f32(ev[row, d]) + w * x * x
            ev[row, d] = _from_f32(a, dt_e)
            res[row, d] = _from_f32(_to_f32(res[row, d]) + g * x / (q0 + a), dt_r)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def iso_laplace_events(state, events, cat, q0, part, parts):
    """Isotropic Laplace steps of events, in order, in place; ``ev``: (n_rows,) float32 evidence."""
    res, ev = state.residual, state.evidence
    rows, items, labels = events.rows, events.items, events.labels
    X, z = cat.X, cat.z
    mine = _my_events(rows, part, parts)
    n, D = mine.shape[0], X.shape[1]
    dt_r, q0 = res.dtype, np.float32(q0)
    for t in range(n):
        if t + _AHEAD < n:
            _prefetch_event(res, X, rows[mine[t + _AHEAD]], items[mine[t + _AHEAD]])
        e = mine[t]
        row, i = rows[e], items[e]
        s = np.float32(0.0)
        xx = np.float32(0.0)
        for d in range(D):
            x = X[i, d]
            s += x * _to_f32(res[row, d])
            xx += x * x
        p = np.float32(_sigmoid1(s + z[i]))
        a = ev[row] + p * (np.float32(1.0) - p) * xx
        ev[row] = a
        g = (np.float32(1.0 if labels[e] else 0.0) - p) / (q0 + a)
        for d in range(D):
            res[row, d] = _from_f32(_to_f32(res[row, d]) + g * X[i, d], dt_r)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def window_events(state, events, cat, params, part, parts):
    """WindowMAP solves of events ``(rows[e], items[e], labels[e])``, in order, in place.

    ``win``: (n_rows, B) int32 codes (item + 1, negated for a rejection, 0 empty, oldest
    first); ``beta``: (n_rows, B) float32; ``gram``: (n_rows, B (B + 1) / 2) float32, the
    packed lower triangle; ``hw``: (n_rows,) float32 head weights, used only if ``hv > 0``.
    Per event the work over D is one pass for the margins and the new Gram row, one for the
    update. The Newton system ``(I + W K) d = g`` is solved in its symmetric form
    ``d = g - S (I + S K S)⁻¹ S K g``, ``S = W^½``, by Cholesky.
    """
    res, win, beta, gram, hw = state.residual, state.window, state.beta, state.gram, state.head_weight
    rows, items, labels = events.rows, events.items, events.labels
    X, z = cat.X, cat.z
    pv, hv, steps = params.prior_var, params.head_var, params.newton_steps
    mine = _my_events(rows, part, parts)
    n_ev, D, B = mine.shape[0], X.shape[1], win.shape[1]
    dt_r = res.dtype
    width = (B + 3) // 4 * 4  # window items in whole groups of 4
    r = np.empty(D, np.float32)
    ids = np.empty(width, np.int64)
    c4 = np.zeros(width, np.float32)
    lab, b0, bt, zw, m = np.empty(B), np.empty(B), np.empty(B), np.empty(B), np.empty(B)
    G, K, L = np.empty((B, B)), np.empty((B, B)), np.empty((B, B))
    off, g, sw, u, inv = np.empty(B), np.empty(B), np.empty(B), np.empty(B), np.empty(B)
    for t in range(n_ev):
        if t + 2 * _AHEAD < n_ev:  # the rows of a later event, then, once its window is in cache, its items
            _prefetch_window_row(res, win, beta, gram, X, rows[mine[t + 2 * _AHEAD]], items[mine[t + 2 * _AHEAD]])
        if t + _AHEAD < n_ev:
            _prefetch_window_items(win, X, rows[mine[t + _AHEAD]])
        e = mine[t]
        row, i = rows[e], items[e]
        v = np.float64(hw[row]) if hv > 0 else 0.0
        n = 0
        for j in range(B):
            if win[row, j] != 0:
                n += 1
        first = 1 if n == B else 0  # a full window's oldest event leaves it; its pull stays in r
        k = 0
        for j in range(first, n):
            code = win[row, j]
            ids[k] = abs(code) - 1
            lab[k] = 1.0 if code > 0 else 0.0
            b0[k] = beta[row, j]
            for c in range(first, j + 1):
                G[k, c - first] = G[c - first, k] = gram[row, j * (j + 1) // 2 + c]
            k += 1
        n = k
        ids[n], lab[n], b0[n] = i, 1.0 if labels[e] else 0.0, 0.0
        n += 1
        s_i, s_ii = np.float32(0.0), np.float32(0.0)
        for d in range(D):
            rd = _to_f32(res[row, d])
            r[d] = rd
            s_i += X[i, d] * rd
            s_ii += X[i, d] * X[i, d]
        m[n - 1], G[n - 1, n - 1] = s_i, s_ii
        for a in range(n - 1, width):  # padding: the new item itself, its results unused
            ids[a] = i
        for a in range(0, n - 1, 4):  # margins x_a·r and the new Gram row x_a·x_i, four items per pass
            i0, i1, i2, i3 = ids[a], ids[a + 1], ids[a + 2], ids[a + 3]
            r0 = r1 = r2 = r3 = x0 = x1 = x2 = x3 = np.float32(0.0)
            for d in range(D):
                rd, xd = r[d], X[i, d]
                v0, v1, v2, v3 = X[i0, d], X[i1, d], X[i2, d], X[i3, d]
                r0 += v0 * rd
                r1 += v1 * rd
                r2 += v2 * rd
                r3 += v3 * rd
                x0 += v0 * xd
                x1 += v1 * xd
                x2 += v2 * xd
                x3 += v3 * xd
            for j, (s_r, s_x) in enumerate(((r0, x0), (r1, x1), (r2, x2), (r3, x3))):
                if a + j < n - 1:
                    m[a + j] = s_r
                    G[n - 1, a + j] = G[a + j, n - 1] = s_x
        for a in range(n):
            zw[a] = z[ids[a]]
        for a in range(n):
            for b in range(n):
                K[a, b] = pv * G[a, b] + hv * zw[a] * zw[b]
        for a in range(n):
            f = (1.0 + v) * zw[a] + m[a]
            for b in range(n):
                f -= K[a, b] * b0[b]
            off[a] = f
            bt[a] = b0[a]
        a = n - 1  # the new event's coefficient by one Newton step of its own, the others held: the joint steps' start
        f = (1.0 + v) * zw[a] + m[a]
        p = 1.0 / (1.0 + math.exp(-min(max(f, -700.0), 700.0)))
        bt[a] = (lab[a] - p) / (1.0 + K[a, a] * p * (1.0 - p))
        for _ in range(steps):
            for a in range(n):
                f = off[a]
                for b in range(n):
                    f += K[a, b] * bt[b]
                h = math.exp(-0.5 * min(max(f, -700.0), 700.0))  # sigmoid(f) = 1 / (1 + h²), and its
                p = 1.0 / (1.0 + h * h)                           # sqrt(p (1 - p)) = h p without a sqrt
                sw[a] = h * p
                g[a] = p - lab[a] + bt[a]
            for a in range(n):  # u = S K g
                f = 0.0
                for b in range(n):
                    f += K[a, b] * g[b]
                u[a] = sw[a] * f
            for a in range(n):  # Cholesky of I + S K S: L (lower), and 1 / L[a, a] in inv
                for b in range(a):
                    f = sw[a] * K[a, b] * sw[b]
                    for c in range(b):
                        f -= L[a, c] * L[b, c]
                    L[a, b] = f * inv[b]
                f = 1.0 + sw[a] * K[a, a] * sw[a]
                for c in range(a):
                    f -= L[a, c] * L[a, c]
                inv[a] = 1.0 / math.sqrt(f)
            for a in range(n):  # u <- (L Lᵀ)⁻¹ u
                f = u[a]
                for c in range(a):
                    f -= L[a, c] * u[c]
                u[a] = f * inv[a]
            for a in range(n - 1, -1, -1):
                f = u[a]
                for c in range(a + 1, n):
                    f -= L[c, a] * u[c]
                u[a] = f * inv[a]
            for a in range(n):
                bt[a] -= g[a] - sw[a] * u[a]
        for a in range(width):  # r += pv X_wᵀ (beta - beta_old), four items per pass, then store r
            c4[a] = np.float32(pv * (bt[a] - b0[a])) if a < n else np.float32(0.0)
            if a < n:
                v += hv * zw[a] * (bt[a] - b0[a])
        ids[n - 1] = i
        for a in range(0, n, 4):
            i0, i1, i2, i3 = ids[a], ids[a + 1], ids[a + 2], ids[a + 3]
            c0, c1, c2, c3 = c4[a], c4[a + 1], c4[a + 2], c4[a + 3]
            for d in range(D):
                r[d] += c0 * X[i0, d] + c1 * X[i1, d] + c2 * X[i2, d] + c3 * X[i3, d]
        for d in range(D):
            res[row, d] = _from_f32(r[d], dt_r)
        for j in range(B):
            if j < n:
                win[row, j] = ids[j] + 1 if lab[j] > 0 else -(ids[j] + 1)
                beta[row, j] = bt[j]
                for c in range(j + 1):
                    gram[row, j * (j + 1) // 2 + c] = G[j, c]
            else:
                win[row, j] = 0
                beta[row, j] = 0.0
                for c in range(j + 1):
                    gram[row, j * (j + 1) // 2 + c] = 0.0
        if hv > 0:
            hw[row] = v


class Events(NamedTuple):
    """A batch of events: ``rows`` (int64) index the state arrays, ``items`` (int64) the catalog's
    rows, ``labels`` (bool) accepted."""

    rows: np.ndarray
    items: np.ndarray
    labels: np.ndarray


class Items(NamedTuple):
    """The catalog as a kernel reads it: ``X`` (n_items, D) float32 features, ``z`` (n_items,)
    float32 standardised head scores."""

    X: np.ndarray
    z: np.ndarray


# Each kernel's typed state: the rule's fields (named as in its schema), float16 ones as their bits.
class SGDState(NamedTuple):
    residual: np.ndarray


class PairwiseState(NamedTuple):
    residual: np.ndarray
    buffer: np.ndarray


class LaplaceState(NamedTuple):
    residual: np.ndarray
    evidence: np.ndarray


class WindowState(NamedTuple):
    residual: np.ndarray
    window: np.ndarray
    beta: np.ndarray
    gram: np.ndarray
    head_weight: np.ndarray  # (1,) zeros when the rule keeps no head weight


class SGDParams(NamedTuple):
    lr: float
    shrink: float
    max_norm: float


class WindowParams(NamedTuple):
    prior_var: float
    head_var: float
    newton_steps: int


_HALF = np.dtype(np.float16)


def bits(a: np.ndarray) -> np.ndarray:
    """A state array as the kernels take it: float16 as its bits (uint16), anything else as it is."""
    return a.view(np.uint16) if a.dtype is _HALF or a.dtype == _HALF else a

