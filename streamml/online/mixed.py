"""Per-user random effects over a population model, gated by their own evidence: the mixed learner.

GLMix (linkedin/gdmix) personalises with a global model plus a small regularised model per
entity, each trained with the others' scores as an offset. The mixed learner is that model
made online, with the global part and the random effects' prior learned from a population
(:mod:`streamml.online.population`) rather than tuned on simulated users::

    logit P(user u accepts item i of query q) = o_i + b_k + w_k · v_i,      k = (u, q)
    o_i = slope * z_i + intercept + beta_i        (global: head, then per-item effects)
    (b_k, w_k) ~ N(0, Sigma)                      (Sigma: EM over the population's keys)

**Evidence accumulates.** Each key keeps a Gaussian posterior over ``(b_k, w_k)``: its mean
and full covariance in ``d = 1 + k`` numbers and ``d (d + 1) / 2`` more (the covariance is
stored as its difference from ``Sigma``, so a new key's state is all zeros). Every event takes
one assumed-density-filtering step (the online Laplace update of Bayesian logistic
regression, Chapelle and Li 2011, with the full covariance since ``d`` is small): the
posterior precision only grows, nothing is frozen, and the mean moves to what the key's
events say. Unlike a window of recent events, no departed event keeps a pull of its own.

**No harm by construction.** The key also runs the bias-only model ``o_i + b_k`` (two
numbers), and both models predict each event before learning it. ``gain``, the sum of the
log predictive probabilities of the full model minus the bias-only one, is the log Bayes
factor of "this user departs from the population along the factors" against "this user
only accepts more or less often" (a bias does not change a ranking). Scores are::

    score_i = o_i + sigmoid(gain) * (w_k · v_i)

so a key whose departures do not predict its own answers better keeps the population's
ranking, and one whose departures do gets them in full, in proportion to the evidence.
With no population fit yet the global model is the head alone, the factors are each query's
top ``k`` principal directions of its items' embeddings, and ``Sigma`` is ``prior_var * I``
(``bias_var`` for the bias: in cold start a per-key bias costs ranking quality, so that
scenario sets it to 0, see ``experiments/mixed_sim_tuning.md``).

**A diagonal posterior** (``covariance="diagonal"``) keeps ``d`` variances in place of the
``d (d + 1) / 2`` covariances, in the basis where the prior is diagonal. A query's principal
directions are uncorrelated over its items, so after a few of them the posterior precision is
nearly diagonal there: 48 directions (all of most of our queries) fit in about 400 bytes, where
the full covariance would take over 5 KB.

The update exists as :func:`adf_step`, the readable reference (full or diagonal), and its
compiled kernels ``_events`` (full) and ``_events_diagonal`` that :meth:`MixedLearner.learn_many`
runs; ``tests/online/test_mixed.py`` checks that they agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import replace

import numpy as np
import pandas as pd
from numba import njit

from streamml.online.checks import CatalogChecks, plain
from streamml.online.kernel_support import FASTMATH as _FASTMATH
from streamml.online.kernel_support import in_parts as _in_parts
from streamml.online.kernel_support import my_events as _my_events
from streamml.online.population import Population, embedding_factors, fit_population, standardized_head
from streamml.stores import Field, InMemoryStore, Schema, Store, as_key_list
from streamml.stores.base import store_for

__all__ = ["MixedLearner", "adf_step", "diagonalized"]

_PROBIT = math.pi / 8  # the probit approximation of the logistic-Gaussian integral




@njit(cache=True, nogil=True)
def _log_sigmoid(x):
    """log(1 / (1 + exp(-x))) without overflow: a confident wrong prediction costs a finite, large amount."""
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def adf_step(mean, cov, bias, gain, f, o, label, prior, prior_b) -> float:
    """One event on one key's state, in place (reference). Returns the new gain.

    ``mean`` (d,), ``cov`` (d, d) the *difference* from ``prior`` (d, d), or (d,) the difference
    from its diagonal for a diagonal posterior; ``bias`` (2,) the bias-only model's mean and
    variance difference from ``prior_b``; ``f`` (d,) the item's ``[1, v_i]``; ``o`` its global
    log-odds; ``label`` 1 or 0.
    """
    diagonal = cov.ndim == 1
    S = np.diag(prior) + cov if diagonal else prior + cov
    Sf = S * f if diagonal else S @ f
    mu, s = o + f @ mean, f @ Sf
    mu_b, s_b = o + bias[0], prior_b + bias[1]
    y = float(label)
    sign = 1.0 if y else -1.0  # predictive log-likelihoods, the probit-moderated logits
    gain += _log_sigmoid(sign * mu / math.sqrt(1 + _PROBIT * s)) - _log_sigmoid(sign * mu_b / math.sqrt(1 + _PROBIT * s_b))
    p = 1 / (1 + math.exp(-mu))
    lam = p * (1 - p)
    denom = 1 + lam * s
    mean += Sf * (y - p) / denom
    cov -= (Sf * Sf if diagonal else np.outer(Sf, Sf)) * (lam / denom)
    p_b = 1 / (1 + math.exp(-mu_b))
    lam_b = p_b * (1 - p_b)
    bias[0] += s_b * (y - p_b) / (1 + lam_b * s_b)
    bias[1] -= s_b * s_b * lam_b / (1 + lam_b * s_b)
    return gain


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _gain_and_bias_only(bias, gain, r, o_i, mu, s, y, prior_b):
    """The part both kernels share: key ``r``'s gain takes the event's log predictive of the full
    model (mean ``mu``, variance ``s``) minus the bias-only model's, then the bias-only model
    learns the event. Returns the full model's Laplace step ``(y - p) / denom`` and ``lam / denom``."""
    mu_b = o_i + bias[r, 0]
    s_b = prior_b + bias[r, 1]
    sign = 1.0 if y > 0 else -1.0
    gain[r] += (_log_sigmoid(sign * mu / math.sqrt(1.0 + _PROBIT * s))
                - _log_sigmoid(sign * mu_b / math.sqrt(1.0 + _PROBIT * s_b)))
    p_b = 1.0 / (1.0 + math.exp(-mu_b))
    lam_b = p_b * (1.0 - p_b)
    bias[r, 0] += s_b * (y - p_b) / (1.0 + lam_b * s_b)
    bias[r, 1] -= s_b * s_b * lam_b / (1.0 + lam_b * s_b)
    p = 1.0 / (1.0 + math.exp(-mu))
    lam = p * (1.0 - p)
    denom = 1.0 + lam * s
    return (y - p) / denom, lam / denom


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _events(mean, cov, bias, gain, rows, items, labels, F, PF, o, prior_b, part, parts):
    """The kernel of :func:`adf_step` over events ``(rows[e], items[e], labels[e])`` in order;
    ``cov`` rows hold the packed lower triangle (row-major) of each key's covariance difference
    and ``PF`` is ``F @ prior``, so that ``S f = PF[i] + cov f`` reads the packed rows directly.
    Events whose row falls in part ``part`` of ``parts`` only (a key's events stay in one part)."""
    d = F.shape[1]
    Sf = np.empty(d)
    for e in _my_events(rows, part, parts):
        r, i = rows[e], items[e]
        y = 1.0 if labels[e] else 0.0
        for a in range(d):
            Sf[a] = PF[i, a]
        t = 0
        for a in range(d):  # S f with S = prior + cov, cov packed: each entry (a, b), b <= a, once
            fa = F[i, a]
            acc = 0.0
            for b in range(a):
                c = cov[r, t]
                acc += c * F[i, b]
                Sf[b] += c * fa
                t += 1
            Sf[a] += acc + cov[r, t] * fa
            t += 1
        mu = o[i]
        s = 0.0
        for a in range(d):
            mu += F[i, a] * mean[r, a]
            s += F[i, a] * Sf[a]
        step, shrink = _gain_and_bias_only(bias, gain, r, o[i], mu, s, y, prior_b)
        t = 0
        for a in range(d):
            mean[r, a] += Sf[a] * step
            sa = Sf[a] * shrink
            for b in range(a + 1):
                cov[r, t] -= sa * Sf[b]
                t += 1


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _events_diagonal(mean, cov, bias, gain, rows, items, labels, F, prior, o, prior_b, part, parts):
    """The kernel of :func:`adf_step` for a diagonal posterior: ``cov`` rows hold each key's
    difference from the prior's diagonal ``prior`` (d,); otherwise as :func:`_events`."""
    d = F.shape[1]
    Sf = np.empty(d)
    for e in _my_events(rows, part, parts):
        r, i = rows[e], items[e]
        y = 1.0 if labels[e] else 0.0
        mu = o[i]
        s = 0.0
        for a in range(d):
            Sf[a] = (prior[a] + cov[r, a]) * F[i, a]
            mu += F[i, a] * mean[r, a]
            s += F[i, a] * Sf[a]
        step, shrink = _gain_and_bias_only(bias, gain, r, o[i], mu, s, y, prior_b)
        for a in range(d):
            mean[r, a] += Sf[a] * step
            cov[r, a] -= Sf[a] * Sf[a] * shrink


def diagonalized(pop: Population) -> Population:
    """``pop`` with its factors turned to the eigenbasis of their prior covariance, so that the
    prior is diagonal (a diagonal posterior starts from it). The factor term's prior is the same
    in any basis (``w · v`` does not change), so a learner with a full covariance learns the same
    scores from either. The one approximation: the bias's covariance with the factors is dropped
    (an EM prior can have some; a learner then learns somewhat differently). A population whose
    prior is already diagonal is returned as it is (so turning twice changes nothing)."""
    P = np.asarray(pop.prior_cov, np.float64)
    if np.count_nonzero(P - np.diag(np.diag(P))) == 0:
        return pop
    eigvals, U = np.linalg.eigh(P[1:, 1:])
    prior = np.diag(np.concatenate([[P[0, 0]], np.clip(eigvals, 0.0, None)]))
    return replace(pop, factors=(pop.factors.astype(np.float64) @ U).astype(np.float32), prior_cov=prior)


class MixedLearner(CatalogChecks):
    """Per-(user, query) random effects over a population model, with a no-harm gate.

    Parameters
    ----------
    items, item_query, head_scores
        The catalog, as for :class:`~streamml.online.ResidualLearner`: embeddings (n, D), each
        item's query, the frozen head's raw scores (``None``: no head).
    k
        Number of collaborative factors (the random effect has ``1 + k`` numbers).
    prior_var
        The prior variance used until :meth:`fit_population` estimates the prior.
    gate
        ``True``: the factor term is weighted by ``sigmoid(gain)`` (module doc); ``False``: in full.
    store
        A :class:`~streamml.stores.Store` whose schema is :attr:`schema`, a callable
        ``schema -> Store``, or ``None`` for an in-memory one.
    seed
        Seed of the population fit's factorisation.
    factors
        ``"svd"``, ``"als"`` or ``"embedding"``: how :meth:`fit_population` learns the factors
        (:mod:`~streamml.online.population`).
    trust
        Also a factor for the global model's own log-odds: how far each key follows the population.
    adapt
        ``False``: never learn (the population model alone, an ablation).
    threads
        Threads over which :meth:`learn_many` splits a big batch on an in-memory store (by key).
    covariance
        ``"full"``: the posterior's full covariance (``d (d + 1) / 2`` numbers per key);
        ``"diagonal"``: its diagonal in the factors' basis (``d`` numbers), turned so that the
        prior is diagonal there (:func:`diagonalized`). A query's principal directions are
        uncorrelated over its items, so the diagonal can afford every direction of a small query
        within the state budget (``experiments/mixed_sim_tuning.md``).
    bias_var
        The prior variance of the per-key bias until :meth:`fit_population` estimates it
        (``None``: ``prior_var``; ``0``: no per-key bias).

    Examples
    --------
    >>> X = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]
    >>> learner = MixedLearner(X, item_query=[0, 0, 0, 0, 1, 1], head_scores=[3., 2., 1., 0., 1., 0.], k=3)
    >>> learner.rank("ann", 0, [0, 1, 2, 3])            # no feedback: the global model (the head)
    array([0, 1, 2, 3])
    >>> for _ in range(6):
    ...     learner.learn_one("ann", 0, item=0, label=0)
    ...     learner.learn_one("ann", 0, item=3, label=1)
    >>> learner.rank("ann", 0, [0, 1, 2, 3])            # item 0 leaves the top once her answers predict better
    array([1, 0, 3, 2])
    >>> learner.rank("bob", 0, [0, 1, 2, 3])            # no one else changes
    array([0, 1, 2, 3])
    """

    def __init__(self, items, item_query, head_scores=None, k: int = 8, prior_var: float = 0.3,
                 gate: bool = True, store: Store | Callable[[Schema], Store] | None = None, seed: int = 0,
                 factors: str = "svd", trust: bool = False, adapt: bool = True, threads: int = 1,
                 covariance: str = "full", bias_var: float | None = None):
        X = np.ascontiguousarray(items, np.float32)
        if X.ndim != 2:
            raise ValueError(f"items must be (n_items, D), got shape {X.shape}")
        self.item_query = np.asarray(item_query)
        if self.item_query.shape != (len(X),):
            raise ValueError(f"item_query must have shape ({len(X)},), got {self.item_query.shape}")
        if int(k) < 1 or not prior_var > 0:
            raise ValueError(f"k must be >= 1 and prior_var > 0, got k={k}, prior_var={prior_var}")
        if covariance not in ("full", "diagonal"):
            raise ValueError(f"covariance must be 'full' or 'diagonal', got {covariance!r}")
        bias_var = prior_var if bias_var is None else bias_var
        if not 0 <= bias_var < math.inf:
            raise ValueError(f"bias_var must be finite and >= 0, got {bias_var}")
        self.covariance, self.bias_var = covariance, float(bias_var)
        if factors not in ("svd", "als", "embedding"):
            raise ValueError(f"factors must be 'svd', 'als' or 'embedding', got {factors!r}")
        self.X, self.k, self.gate, self.seed = X, int(k), bool(gate), int(seed)
        self.factors, self.trust, self.adapt = factors, bool(trust), bool(adapt)
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.queries, self._q_code = np.unique(self.item_query, return_inverse=True)
        self._query_index = {q: i for i, q in enumerate(self.queries.tolist())}
        self._item_query_list = self.item_query.tolist()
        self.z = np.zeros(len(X)) if head_scores is None else standardized_head(np.asarray(head_scores), self._q_code)
        if head_scores is not None and np.shape(head_scores) != (len(X),):
            raise ValueError(f"head_scores must have shape ({len(X)},), got {np.shape(head_scores)}")
        V = embedding_factors(X, self._q_code, min(self.k, X.shape[1])).astype(np.float32)
        if self.trust:  # the head's log-odds as the first factor, as fit_population puts the global model's
            V = np.hstack([((self.z - self.z.mean()) / max(self.z.std(), 1e-12))[:, None], V]).astype(np.float32)
        prior = np.diag([self.bias_var] + [float(prior_var)] * V.shape[1])
        self.population = Population(1.0, 0.0, np.zeros(len(X)), V, prior, 0, "none")
        self._set_population(self.population)
        d = 1 + self.population.k
        cov = (d,) if covariance == "diagonal" else (d * (d + 1) // 2,)
        self.schema: dict[str, Field] = {"mean": Field((d,), np.float32), "cov": Field(cov, np.float32),
                                         "bias": Field((2,), np.float32), "gain": Field((), np.float32)}
        self.store = store_for(store, self.schema)

    def __repr__(self) -> str:
        return (f"MixedLearner(k={self.k}, factors={self.factors!r}, trust={self.trust}, gate={self.gate}, "
                f"covariance={self.covariance!r}, "
                f"population={self.population.fingerprint!r}, "
                f"n_items={len(self.X)}, store={type(self.store).__name__})")

    def _set_population(self, pop: Population) -> None:
        if self.covariance == "diagonal":
            pop = diagonalized(pop)
        self.population = pop
        self._offset = pop.offset(self.z).astype(np.float64)
        self._F = np.ascontiguousarray(np.hstack([np.ones((len(self.X), 1)), pop.factors]), np.float64)
        self._prior = np.ascontiguousarray(pop.prior_cov, np.float64)
        self._PF = np.ascontiguousarray(self._F @ self._prior)
        self._prior_diag = np.ascontiguousarray(np.diag(self._prior))

    def fit_population(self, events: pd.DataFrame) -> MixedLearner:
        """Fit the global model, the factors and the prior from ``events`` (columns ``user,
        query, item, label, time``; ``item`` a catalog row of that query) and return ``self``.
        Call it before learning: a key's state is a posterior under the prior it was learned with."""
        missing = {"user", "query", "item", "label"} - set(events.columns)
        if missing:
            raise ValueError(f"events lack column(s) {sorted(missing)}; expected user, query, item, label, time")
        ids = events["item"].to_numpy()
        self._check_items(ids, events["query"].to_numpy())
        self._check_labels(events["label"].to_numpy())
        old_k = self.population.k
        pop = fit_population(events, self.X, self._q_code, self.z, k=self.k, seed=self.seed, factors=self.factors,
                             trust=self.trust)
        if pop.k != old_k:
            raise ValueError(f"the population gives {pop.k} factors where the store holds {old_k}: more factors than the "
                             "population's users or texts; lower k")
        self._set_population(pop)
        return self

    def set_population(self, pop: Population) -> MixedLearner:
        """Use ``pop``, a :meth:`fit_population` result on this catalog stored earlier (the
        service keeps it with its head), instead of fitting again; returns ``self``."""
        n, k = len(self.X), self.population.k
        if pop.factors.shape != (n, k) or np.shape(pop.item_effect) != (n,) or np.shape(pop.prior_cov) != (k + 1, k + 1):
            raise ValueError(f"the population has factors {pop.factors.shape}, item effects {np.shape(pop.item_effect)} "
                             f"and prior {np.shape(pop.prior_cov)}; this learner needs ({n}, {k}), ({n},), ({k + 1}, {k + 1})")
        self._set_population(pop)
        return self

    # ---- checks
    # ---- scoring
    def _state(self, user, query) -> dict[str, np.ndarray]:
        got = self.store.get_many([(plain(user), plain(query))])
        return {name: v[0] for name, v in got.items()}

    def score(self, user: Hashable, query: Hashable, X) -> np.ndarray:
        """(n,) scores of catalog item ids ``X`` of ``query`` for ``user``, higher is better."""
        self._query(query)
        ids = self._check_items(np.asarray(X), plain(query))
        state = self._state(user, query)
        w = state["mean"][1:].astype(np.float64)
        weight = 1 / (1 + math.exp(-float(state["gain"]))) if self.gate else 1.0
        return (self._offset[ids] + weight * (self._F[ids, 1:] @ w)).astype(np.float32)

    def rank(self, user: Hashable, query: Hashable, item_ids) -> np.ndarray:
        """Catalog item ids ordered best first (ties keep the given order)."""
        item_ids = np.asarray(item_ids)
        return item_ids[np.argsort(-self.score(user, query, item_ids), kind="stable")]

    # ---- learning
    def _apply(self, cols, rows, items, labels):
        if not self.adapt:
            return cols
        kernel, prior = (_events_diagonal, self._prior_diag) if self.covariance == "diagonal" else (_events, self._PF)
        _in_parts(kernel, len(rows), self.threads, cols["mean"], cols["cov"], cols["bias"], cols["gain"], rows, items,
                  labels, self._F, prior, self._offset, float(self._prior[0, 0]))
        return cols

    def learn_one(self, user: Hashable, query: Hashable, item: int, label: int) -> None:
        """``user`` accepted (1) or rejected (0) catalog ``item`` shown for ``query``."""
        item = self._check_event(query, item, label)
        key = (plain(user), plain(query))
        items, labels = np.array([item], np.int64), np.array([bool(label)])
        if isinstance(self.store, InMemoryStore):  # one event: no batching, the kernel on the store's row
            self._apply(self.store.columns, np.array([self.store.row_for(key)], np.int64), items, labels)
        else:
            self._update([key], np.zeros(1, np.int64), items, labels)

    def _update(self, keys: list, rows: np.ndarray, items: np.ndarray, labels: np.ndarray) -> None:
        self.store.update_many(keys, lambda state: self._apply(
            {n: np.array(state[n], dtype=f.dtype, order="C") for n, f in self.schema.items()}, rows, items, labels))

    def learn_many(self, users, queries, items, labels) -> None:
        """Many events, as :meth:`learn_one` on each in order."""
        users, queries, items, labels = self._check_batch(users, queries, items, labels)
        if users.dtype.kind in "iu" and queries.dtype.kind in "iu":  # integer keys: no Python tuple per event
            keys = np.stack([users, queries], 1).astype(np.int64)
        else:
            keys = list(zip(users.tolist(), queries.tolist()))
        if isinstance(self.store, InMemoryStore):
            self._apply(self.store.columns, self.store.rows_for(keys), items, labels)
            return
        index: dict = {}
        rows = np.fromiter((index.setdefault(k, len(index)) for k in as_key_list(keys)), np.int64, len(keys))
        self._update(list(index), rows, items, labels)

    def forget(self, user: Hashable, query: Hashable | None = None) -> None:
        """Drop a user's state for one query, or for all (``query=None``)."""
        if query is None:
            self.store.delete_many([(plain(user), q) for q in self.queries.tolist()])
        else:
            self._query(query)
            self.store.delete_many([(plain(user), plain(query))])
