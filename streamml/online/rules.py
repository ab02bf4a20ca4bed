"""Update rules of the residual learner: one feedback event on one key's state.

A rule names its hyperparameters (plain keyword arguments, so Hydra builds it from
``_target_``), the per-key fields it keeps beside the residual (:meth:`fields`), and
one readable numpy :meth:`reference` of what an event does to that state. Each rule has
one compiled twin in :mod:`streamml.online.kernels` and makes the call to it itself
(:meth:`apply`), passing its own fields and hyperparameters: the learner only calls
``rule.apply``, so a new rule is one class with its kernel, and no dispatch elsewhere changes.
``tests/online/test_kernels.py`` checks that reference and kernel agree on random event streams.

Notation: ``x`` is the event's item in the learner's features (see ``ResidualLearner``),
``z`` its standardised head score, ``r`` the key's residual, ``s = z + r·x`` its score
and ``y`` the label (1 accepted, 0 rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from streamml.online import kernels as _k
from streamml.stores import Field

__all__ = ["Catalog", "Rule", "PointwiseSGD", "PairwiseSGD", "DiagonalLaplace", "IsotropicLaplace", "WindowMAP"]


@dataclass(frozen=True)
class Catalog:
    """What the rules read besides the key's state.

    Attributes
    ----------
    embeddings
        (n_items, D) float32 item features, C-contiguous.
    head
        (n_items,) float32 standardised head scores ``z``, zeros with no head.
    """

    embeddings: np.ndarray
    head: np.ndarray


@runtime_checkable
class Rule(Protocol):
    """What the learner needs from an update rule."""

    def fields(self, dim: int) -> dict[str, Field]:
        """Per-key state besides the residual (D,), which the learner keeps."""

    def reference(self, state: dict[str, np.ndarray], x: np.ndarray, z: float, label: bool,
                  cat: Catalog, item: int = -1) -> None:
        """Apply one event to one key's ``state`` in place (``state["residual"]`` float32 (D,)).

        ``item`` is the catalog id of ``x``, or -1 for an embedding outside the catalog.
        """

    def apply(self, cols: dict[str, np.ndarray], rows: np.ndarray, items: np.ndarray, labels: np.ndarray,
              cat: Catalog, threads: int = 1) -> None:
        """Apply events ``(rows[e], items[e], labels[e])`` in order to the state arrays ``cols``
        (field -> (n_rows, ...) array, written in place) with the rule's compiled kernel.

        ``rows`` (int64) index ``cols``; ``items`` (int64) are rows of ``cat``; ``labels`` (bool).
        ``threads`` > 1 splits a big batch by key (:func:`streamml.online.kernel_support.in_parts`).
        """


def _sigmoid(a: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * a))  # no overflow for any finite a


def _cap(r: np.ndarray, max_norm: float) -> None:
    norm = float(np.sqrt(r @ r))
    if norm > max_norm:
        r *= np.float32(max_norm / norm)


class _Hyperparameters:
    """A rule is its hyperparameters: shown and compared by them (``vars``), as Hydra built it."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class _SGD(_Hyperparameters):
    """Shared hyperparameters of the SGD rules: ``r <- cap(shrink r - lr grad)``,
    ``shrink = 1 - decay - lr l2``, ``||r||`` capped at ``max_norm`` after every event."""

    def __init__(self, lr: float, l2: float, decay: float, max_norm: float):
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

    @property
    def shrink(self) -> float:
        return 1.0 - self.decay - self.lr * self.l2

    def fields(self, dim: int) -> dict[str, Field]:
        return {}


class PointwiseSGD(_SGD):
    """Logistic loss on the single event, one SGD step: ``r <- cap(shrink r - lr (sigmoid(s) - y) x)``.

    Parameters
    ----------
    lr
        Step size.
    l2
        Pull towards zero (towards the head), added to the gradient.
    decay
        Forgetting: the residual shrinks by ``(1 - decay)`` on every event.
    max_norm
        Cap on ``||r||``, enforced after every step.

    Examples
    --------
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> state = {"residual": np.zeros(2, np.float32)}
    >>> PointwiseSGD(lr=1.0).reference(state, cat.embeddings[0], 0.0, True, cat, item=0)
    >>> state["residual"]                 # towards the accepted item, by lr * sigmoid(0)
    array([0.5, 0. ], dtype=float32)
    """

    def __init__(self, lr: float = 3.0, l2: float = 0.0, decay: float = 0.0, max_norm: float = 10.0):
        super().__init__(lr, l2, decay, max_norm)

    def reference(self, state, x, z, label, cat, item=-1) -> None:
        r = state["residual"]
        c = np.float32(-self.lr * (_sigmoid(z + float(x @ r)) - float(label)))
        r *= np.float32(self.shrink)
        r += c * x
        _cap(r, self.max_norm)

    def apply(self, cols, rows, items, labels, cat, threads=1) -> None:
        _k.in_parts(_k.pointwise_events, len(rows), threads, _k.SGDState(_k.bits(cols["residual"])),
                    _k.Events(rows, items, labels), _k.Items(cat.embeddings, cat.head),
                    _k.SGDParams(self.lr, self.shrink, self.max_norm))


class PairwiseSGD(_SGD):
    """Pairwise logistic (RankNet) step of the new item against the key's recent opposite feedback.

    A key remembers its last ``m = buffer_size // 2`` rejected and last ``m`` accepted
    catalog items (field ``buffer``, (2, m) int32, row ``y`` for label ``y``, newest
    first, -1 empty). An accepted item ``i`` is pushed above each buffered rejected
    item ``j``, a rejected one below each accepted one::

        loss = mean_j softplus(-sign (s_i - s_j)),   sign = +1 / -1
        r <- cap(shrink r + lr sign sum_j w_j (x_i - x_j)),  w_j = sigmoid(-sign (s_i - s_j)) / n

    Then the item enters its own label's buffer (an embedding outside the catalog,
    ``item=-1``, does not). With no opposite item yet only the shrink acts. Two
    per-label rings, not one ring of recent events, so that the comparison set holds
    opposite items even when feedback is lopsided.

    Parameters
    ----------
    lr, l2, decay, max_norm
        As in :class:`PointwiseSGD`.
    buffer_size
        Item ids remembered per key, half per label. Even, >= 2.

    Examples
    --------
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> state = {"residual": np.zeros(2, np.float32), "buffer": np.array([[-1], [0]], np.int32)}
    >>> PairwiseSGD(lr=1.0, buffer_size=2).reference(state, cat.embeddings[1], 0.0, False, cat, item=1)
    >>> state["residual"], state["buffer"].tolist()   # item 1 rejected: pushed below accepted item 0
    (array([ 0.5, -0.5], dtype=float32), [[1], [0]])
    """

    def __init__(self, lr: float = 10.0, l2: float = 0.0, decay: float = 0.0, max_norm: float = 10.0,
                 buffer_size: int = 8):
        super().__init__(lr, l2, decay, max_norm)
        if buffer_size < 2 or buffer_size % 2:
            raise ValueError(f"buffer_size must be even and >= 2, got {buffer_size}")
        self.buffer_size = int(buffer_size)

    def fields(self, dim: int) -> dict[str, Field]:
        return {"buffer": Field((2, self.buffer_size // 2), "int32", -1)}

    def reference(self, state, x, z, label, cat, item=-1) -> None:
        r, buf = state["residual"], state["buffer"]
        y = int(bool(label))
        opp = [j for j in buf[1 - y].tolist() if j >= 0]
        sign = 1.0 if y else -1.0
        step = np.zeros_like(r)
        if opp:
            s_i = z + float(x @ r)
            for j in opp:
                x_j = cat.embeddings[j]
                w = _sigmoid(-sign * (s_i - (float(cat.head[j]) + float(x_j @ r)))) / len(opp)
                step += np.float32(self.lr * sign * w) * (x - x_j)
        r *= np.float32(self.shrink)
        r += step
        _cap(r, self.max_norm)
        if item >= 0:
            buf[y, 1:] = buf[y, :-1].copy()
            buf[y, 0] = item

    def apply(self, cols, rows, items, labels, cat, threads=1) -> None:
        _k.in_parts(_k.pairwise_events, len(rows), threads, _k.PairwiseState(_k.bits(cols["residual"]), cols["buffer"]),
                    _k.Events(rows, items, labels), _k.Items(cat.embeddings, cat.head),
                    _k.SGDParams(self.lr, self.shrink, self.max_norm))


class DiagonalLaplace(_Hyperparameters):
    """Online Bayesian logistic regression on the residual, with a diagonal Gaussian posterior.

    The prior is ``r ~ N(0, prior_var I)``: the head. The key keeps the posterior mean
    ``m`` (the residual) and the evidence ``a`` (field ``evidence``, (D,)) it has
    gathered per dimension, so the precision is ``q = 1 / prior_var + a``. Each event
    takes the diagonal Laplace step of Chapelle and Li (2011) on the latest event::

        p = sigmoid(z + m·x)
        a <- a + p (1 - p) x²
        m <- m + (y - p) x / q

    The step size per dimension is the key's own posterior variance ``1 / q``: large
    while the key has seen little along that dimension, shrinking as evidence builds.
    :meth:`variance` gives the posterior that the Thompson policy samples from.

    Parameters
    ----------
    prior_var
        Prior variance of each residual coordinate (the first step's size).
    dtype
        Storage dtype of the evidence (``"float16"``: D * 2 bytes).

    Examples
    --------
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> rule = DiagonalLaplace(prior_var=1.0)
    >>> state = {"residual": np.zeros(2, np.float32), "evidence": np.zeros(2, np.float32)}
    >>> rule.reference(state, cat.embeddings[0], 0.0, True, cat)
    >>> state["residual"], state["evidence"]      # q = 1 + 0.25: step 0.5 / 1.25
    (array([0.4, 0. ], dtype=float32), array([0.25, 0.  ], dtype=float32))
    """

    def __init__(self, prior_var: float = 3.0, dtype: str = "float16"):
        if not (0 < prior_var < np.inf):
            raise ValueError(f"prior_var must be finite and > 0, got {prior_var}")
        self.prior_var = float(prior_var)
        self.dtype = str(np.dtype(dtype))
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype}")

    def fields(self, dim: int) -> dict[str, Field]:
        return {"evidence": Field((dim,), self.dtype, 0)}

    def reference(self, state, x, z, label, cat, item=-1) -> None:
        m, a = state["residual"], state["evidence"]
        p = _sigmoid(z + float(x @ m))
        a += np.float32(p * (1.0 - p)) * x * x
        m += np.float32(float(label) - p) * x / (np.float32(1.0 / self.prior_var) + a)

    def apply(self, cols, rows, items, labels, cat, threads=1) -> None:
        _k.in_parts(_k.laplace_events, len(rows), threads, _k.LaplaceState(_k.bits(cols["residual"]), _k.bits(cols["evidence"])),
                    _k.Events(rows, items, labels), _k.Items(cat.embeddings, cat.head), 1.0 / self.prior_var)

    def variance(self, state: dict[str, np.ndarray]) -> np.ndarray:
        """Posterior variance of each residual coordinate, ``1 / q``. (..., D) float32."""
        return 1.0 / (np.float32(1.0 / self.prior_var) + state["evidence"].astype(np.float32))


class IsotropicLaplace(_Hyperparameters):
    """Online Bayesian logistic regression on the residual with an isotropic posterior ``N(m, I / q)``.

    As :class:`DiagonalLaplace`, but the key keeps one precision for all directions
    (field ``evidence``, a float32 scalar: 4 bytes), grown by each event's whole
    curvature ``p (1 - p) ||x||²`` rather than spread over the dimensions::

        p = sigmoid(z + m·x)
        a <- a + p (1 - p) ||x||²
        m <- m + (y - p) x / (1 / prior_var + a)

    In 384 dimensions a key's few events are nearly orthogonal, and along each of them this
    is the precision a Newton step would use; the step then shrinks with the key's total
    evidence, so a key with many answers moves less per answer than a new one.

    Parameters
    ----------
    prior_var
        Prior variance of the residual (the first step's size).

    Examples
    --------
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> rule = IsotropicLaplace(prior_var=1.0)
    >>> state = {"residual": np.zeros(2, np.float32), "evidence": np.float32(0.0)}
    >>> rule.reference(state, cat.embeddings[1], 0.0, False, cat)
    >>> state["residual"], float(state["evidence"])     # q = 1 + 0.25: step -0.5 / 1.25
    (array([ 0. , -0.4], dtype=float32), 0.25)
    """

    def __init__(self, prior_var: float = 30.0):
        if not (0 < prior_var < np.inf):
            raise ValueError(f"prior_var must be finite and > 0, got {prior_var}")
        self.prior_var = float(prior_var)

    def fields(self, dim: int) -> dict[str, Field]:
        return {"evidence": Field((), "float32", 0)}

    def reference(self, state, x, z, label, cat, item=-1) -> None:
        m = state["residual"]
        p = _sigmoid(z + float(x @ m))
        a = np.float32(state["evidence"]) + np.float32(p * (1.0 - p)) * np.float32(x @ x)
        state["evidence"] = a
        m += np.float32(float(label) - p) * x / (np.float32(1.0 / self.prior_var) + a)

    def apply(self, cols, rows, items, labels, cat, threads=1) -> None:
        _k.in_parts(_k.iso_laplace_events, len(rows), threads, _k.LaplaceState(_k.bits(cols["residual"]), cols["evidence"]),
                    _k.Events(rows, items, labels), _k.Items(cat.embeddings, cat.head), 1.0 / self.prior_var)

    def variance(self, state: dict[str, np.ndarray]) -> np.ndarray:
        """Posterior variance of each residual coordinate, ``1 / q``. (..., 1) float32, broadcasting over D."""
        a = np.asarray(state["evidence"], np.float32)[..., None]
        return 1.0 / (np.float32(1.0 / self.prior_var) + a)


class WindowMAP(_Hyperparameters):
    """Bayesian logistic regression on the residual, solved to its maximum over the key's recent events.

    The one-event Laplace steps above see each event once, with the residual of that
    moment. A refit uses every answer at every step; this rule does too, within a window
    of the key's last ``window`` events (catalog ids, field ``window``, oldest first, the
    sign giving the label), with the head as the prior mean. The posterior maximum moves
    only in the span of the window's items, so the key keeps one coefficient per window
    event (``beta``) and the window's Gram matrix (``gram``, packed lower triangle), and
    each event solves for the coefficients of the events now in the window::

        K      = prior_var G + head_var z_w z_wᵀ                    (n x n, n <= window)
        offset = (1 + v) z_w + X_w r - K beta_old                  # the head, the prior and what left the window
        minimise  Σ_j logloss(y_j, offset_j + (K beta)_j) + ½ betaᵀ K beta
        r <- r + prior_var X_wᵀ (beta - beta_old),   v <- v + head_var z_wᵀ (beta - beta_old)

    by ``newton_steps`` Newton steps ``beta <- beta - (I + W K)⁻¹ (p - y + beta)`` from
    ``beta_old``, the new event's coefficient started by a Newton step of its own with the
    others held: a one-event Laplace step, cheap, and close to where the joint solve ends, so
    that few joint steps (each a Cholesky solve) are needed. An event leaving the window keeps its pull in
    ``r``. With ``head_var > 0`` the key also learns a head weight (field ``head_weight``
    ``v``; the score is ``(1 + v) z + r·x``) with prior ``N(0, head_var)``: a user may trust
    the head more or less than the population does. An embedding outside the catalog
    (``item=-1``) has no id to keep: it is solved as a window of its own.

    Parameters
    ----------
    prior_var
        Prior variance of each residual coordinate: how far a key may move from the head.
    window
        Events kept per key, and the size of the per-event solve.
    newton_steps
        Newton steps per event.
    head_var
        Prior variance of the key's head weight; 0 keeps the head's weight at 1 (no field).

    Examples
    --------
    >>> cat = Catalog(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    >>> rule = WindowMAP(prior_var=1.0, window=2)
    >>> state = {"residual": np.zeros(2, np.float32),
    ...          **{name: np.full(f.shape, f.fill, f.dtype) for name, f in rule.fields(2).items()}}
    >>> rule.reference(state, cat.embeddings[0], 0.0, True, cat, item=0)
    >>> state["window"].tolist(), [round(float(v), 3) for v in state["residual"]]   # r_0 solves r = sigmoid(-r)
    ([1, 0], [0.401, 0.0])
    """

    def __init__(self, prior_var: float = 10.0, window: int = 8, newton_steps: int = 1, head_var: float = 0.0):
        if not (0 < prior_var < np.inf):
            raise ValueError(f"prior_var must be finite and > 0, got {prior_var}")
        if not (0 <= head_var < np.inf):
            raise ValueError(f"head_var must be finite and >= 0, got {head_var}")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}")
        if int(newton_steps) != newton_steps or newton_steps < 1:
            raise ValueError(f"newton_steps must be an integer >= 1, got {newton_steps}")
        self.prior_var, self.head_var = float(prior_var), float(head_var)
        self.window, self.newton_steps = int(window), int(newton_steps)

    def fields(self, dim: int) -> dict[str, Field]:
        b = self.window
        out = {"window": Field((b,), "int32", 0), "beta": Field((b,), "float32", 0),
               "gram": Field((b * (b + 1) // 2,), "float32", 0)}
        if self.head_var > 0:
            out["head_weight"] = Field((), "float32", 0)
        return out

    def apply(self, cols, rows, items, labels, cat, threads=1) -> None:
        hw = cols["head_weight"] if self.head_var > 0 else np.zeros(1, np.float32)
        state = _k.WindowState(_k.bits(cols["residual"]), cols["window"], cols["beta"], cols["gram"], hw)
        _k.in_parts(_k.window_events, len(rows), threads, state, _k.Events(rows, items, labels),
                    _k.Items(cat.embeddings, cat.head), _k.WindowParams(self.prior_var, self.head_var, self.newton_steps))

    def reference(self, state, x, z, label, cat, item=-1) -> None:
        r, v = state["residual"], float(state.get("head_weight", 0.0))
        tri = np.tril_indices(self.window)
        n = int(np.count_nonzero(state["window"])) if item >= 0 else 0
        codes, beta_old = state["window"][:n].astype(np.int64), state["beta"][:n].astype(np.float64)
        G = np.zeros((self.window, self.window))
        G[tri] = state["gram"]
        G = G[:n, :n] + np.tril(G[:n, :n], -1).T
        if n == self.window:  # the oldest leaves; its pull stays in r
            codes, beta_old, G, n = codes[1:], beta_old[1:], G[1:, 1:], n - 1
        ids, labels = np.append(np.abs(codes) - 1, item), np.append(codes > 0, bool(label)).astype(np.float64)
        X_w = np.vstack([cat.embeddings[ids[:n]], np.asarray(x)[None]]).astype(np.float64)
        z_w = np.append(cat.head[ids[:n]], z).astype(np.float64)
        g = X_w[:n] @ X_w[n]
        G = np.block([[G, g[:, None]], [g[None], X_w[n] @ X_w[n]]])
        beta_old = np.append(beta_old, 0.0)
        K = self.prior_var * G + self.head_var * np.outer(z_w, z_w)
        offset = (1.0 + v) * z_w + X_w @ r - K @ beta_old
        beta = beta_old.copy()
        p = 0.5 * (1.0 + np.tanh(0.5 * ((1.0 + v) * z_w[n] + X_w[n] @ r)))
        beta[n] = (labels[n] - p) / (1.0 + K[n, n] * p * (1.0 - p))
        for _ in range(self.newton_steps):
            p = 0.5 * (1.0 + np.tanh(0.5 * (offset + K @ beta)))
            beta = beta - np.linalg.solve(np.eye(n + 1) + (p * (1.0 - p))[:, None] * K, p - labels + beta)
        r += (self.prior_var * X_w.T @ (beta - beta_old)).astype(r.dtype)
        if self.head_var > 0:
            state["head_weight"] = np.float32(v + self.head_var * z_w @ (beta - beta_old))
        if item >= 0:
            for name in ("window", "beta", "gram"):
                state[name][:] = 0
            state["window"][: n + 1] = np.where(labels > 0, ids + 1, -(ids + 1))
            state["beta"][: n + 1] = beta
            state["gram"][: (n + 1) * (n + 2) // 2] = G[np.tril_indices(n + 1)]
