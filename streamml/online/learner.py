"""Online per-user adaptation of a frozen per-query head: the residual learner.

For a user ``u``, a query ``q`` and an item embedding ``x``::

    score(u, q, x) = z_q(head_q(x)) + r · x̃

``z_q`` standardises the head's scores with the mean and std of that query's catalog
items, so that a residual step moves rankings equally fast whatever the head's scale.
``x̃`` is ``x`` centered and scaled over the query's catalog (``features``).
``r`` is a residual vector per key (per ``(user, query)``, or per user), zero at cold
start, so a new user ranks exactly as the head does. A rule may also keep a per-key head
weight ``v`` (``WindowMAP`` with ``head_var > 0``); the head term is then ``(1 + v) z_q``.
With ``head_interaction`` the residual also acts on ``z_q x̃``: how far a user trusts the
head then varies over the embedding, as when they disagree with the population on one
kind of item only (a constant ``v`` would distrust the head everywhere, and ``r · x̃``
would push that kind of item down whether the head liked it or not).
Each feedback event updates the
key's state by the learner's rule (:mod:`streamml.online.rules`), through that rule's
compiled kernel (:mod:`streamml.online.kernels`); the state lives in a
:class:`~streamml.stores.Store`, created on first use as in river's ``reco.BiasedMF``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from streamml.online.checks import CatalogChecks, plain
from streamml.online.rules import Catalog, PairwiseSGD, Rule
from streamml.stores import Field, InMemoryStore, Schema, Store, as_key_list
from streamml.stores.base import store_for

__all__ = ["ResidualLearner"]


def _feature_stats(X: np.ndarray, q_code: np.ndarray, n_queries: int, features: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-query mean (Q, D) of the catalog embeddings and their scale: ``"standardized"``,
    (Q, D) = std * sqrt(D) per dimension; ``"centered"``, (Q, 1) = the root mean square norm
    of the centered embeddings."""
    count = np.bincount(q_code, minlength=n_queries)[:, None]
    mean = np.zeros((n_queries, X.shape[1]))
    np.add.at(mean, q_code, X)
    mean /= count
    var = np.zeros_like(mean)
    np.add.at(var, q_code, (X - mean[q_code]) ** 2)
    var /= count
    scale = np.sqrt(var) * np.sqrt(X.shape[1]) if features == "standardized" else np.sqrt(var.sum(1, keepdims=True))
    return mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


def _principal_basis(X: np.ndarray, q_code: np.ndarray, n_queries: int, k: int) -> np.ndarray:
    """(Q, k, D): each query's top ``k`` principal directions of its catalog rows (zero rows
    past the query's rank)."""
    basis = np.zeros((n_queries, k, X.shape[1]), np.float32)
    for q in range(n_queries):
        rows = X[q_code == q].astype(np.float64)
        _, _, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
        basis[q, : min(k, len(vt))] = vt[:k]
    return basis




class ResidualLearner(CatalogChecks):
    """Per-key residuals over a frozen head, learned from accept/reject feedback.

    Parameters
    ----------
    items
        (n_items, D) catalog embeddings. Feedback events name catalog item ids (rows of
        this array); :meth:`learn_vector` takes feedback on other embeddings.
    item_query
        (n_items,) the query each catalog item belongs to (ints or strings).
    rule
        Update rule (:mod:`streamml.online.rules`); default :class:`~streamml.online.rules.PairwiseSGD`.
    head_scores
        (n_items,) the frozen head's raw scores of the catalog items; ``None``: no head.
    store
        Where the per-key state lives: a :class:`~streamml.stores.Store` whose schema
        equals :attr:`schema`, or a callable ``schema -> Store`` (a Hydra partial);
        default an :class:`~streamml.stores.InMemoryStore`.
    key
        ``"user_query"``: one state per (user, query). ``"user"``: one per user, shared by
        all queries.
    dtype
        Storage dtype of the residual, ``"float16"`` (768 bytes at D=384) or ``"float32"``.
        Updates are computed in float32 and rounded on write.
    standardize
        Standardise head scores per query (mean 0, std 1 over the query's catalog items;
        a query whose head scores are constant gets std 1).
    features
        What the residual acts on. ``"standardized"``: embeddings standardised per dimension
        over the query's catalog items, divided by sqrt(D) to keep unit norm (label-free,
        known before any feedback; MiniLM vectors share a large common component, which raw
        steps would mostly move along). ``"centered"``: the same centering, then one scale
        per query (unit root mean square norm), so the embedding's geometry is kept and
        its low-variance dimensions are not blown up. ``"raw"``: the embeddings as given.
    head_interaction
        ``c > 0``: the residual acts on ``[P x̃, c z P x̃]`` rather than on ``x̃``, where ``P``
        projects on the query's top D/2 principal directions of its catalog's ``x̃``; so the
        score is ``(1 + v) z + r₁ · P x̃ + c z r₂ · P x̃``, with the state still D numbers.
        The projection keeps all of a query's catalog with fewer than D/2 items (the residual
        only ever moves in its span) and the catalog's main directions otherwise.
        The learner keeps each query's projection, D²/2 floats (295 KB at D=384).
        Needs ``head_scores`` and ``key="user_query"``. ``0``: the residual acts on ``x̃``.
    threads
        Threads over which :meth:`learn_many` splits a big batch on an in-memory store.
    chunk_size
        Events per store round trip in :meth:`learn_many` on other stores.

    Examples
    --------
    >>> X = np.array([[1, 0], [0, 1], [.7, .7], [1, 0]], np.float32)
    >>> learner = ResidualLearner(X, item_query=[0, 0, 0, 1], head_scores=[0., 1., 2., 5.], features="raw")
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
        rule: Rule | None = None,
        head_scores: np.ndarray | None = None,
        store: Store | Callable[[Schema], Store] | None = None,
        key: str = "user_query",
        dtype: str = "float16",
        standardize: bool = True,
        features: str = "standardized",
        threads: int = 1,
        chunk_size: int = 8192,
        head_interaction: float = 0.0,
    ):
        X = np.ascontiguousarray(items, np.float32)
        if X.ndim != 2:
            raise ValueError(f"items must be (n_items, D), got shape {X.shape}")
        item_query = np.asarray(item_query)
        if item_query.shape != (len(X),):
            raise ValueError(f"item_query must have shape ({len(X)},), got {item_query.shape}")
        if key not in ("user_query", "user"):
            raise ValueError(f"key must be 'user_query' or 'user', got {key!r}")
        if features not in ("raw", "standardized", "centered"):
            raise ValueError(f"features must be 'raw', 'standardized' or 'centered', got {features!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise ValueError(f"dtype must be float16 or float32, got {dtype}")
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if not (0 <= head_interaction < np.inf):
            raise ValueError(f"head_interaction must be finite and >= 0, got {head_interaction}")
        if head_interaction > 0 and head_scores is None:
            raise ValueError("head_interaction > 0 needs head_scores: the interaction is with the head's score")
        if head_interaction > 0 and key == "user":
            raise ValueError("head_interaction > 0 projects each query on its own principal directions, so a residual "
                             "shared across queries (key='user') would mix their coordinates: use key='user_query'")
        self.rule = PairwiseSGD() if rule is None else rule
        if not isinstance(self.rule, Rule):
            missing = [m for m in ("fields", "reference", "apply") if not callable(getattr(self.rule, m, None))]
            raise TypeError(f"rule {type(self.rule).__name__} lacks {', '.join(missing)}: a rule needs fields, "
                            "reference and apply (streamml.online.rules.Rule)")
        owner = {m: next(c for c in type(self.rule).__mro__ if m in vars(c)) for m in ("reference", "apply")}
        if owner["reference"] is not owner["apply"]:  # its kernel would not be its reference's twin
            raise TypeError(f"rule {type(self.rule).__name__} defines its own reference but runs "
                            f"{owner['apply'].__name__}'s kernel: give it an apply of its own")
        self.key, self.standardize, self.features = key, standardize, features
        self.threads, self.chunk_size = int(threads), int(chunk_size)
        self.head_interaction = float(head_interaction)
        self._dim = X.shape[1]
        self.item_query = item_query
        self._item_query_list = item_query.tolist()  # plain values: cheap per-event checks, clean messages
        self.queries, q_code = np.unique(item_query, return_inverse=True)
        self._item_query_code = q_code.astype(np.uint16 if len(self.queries) <= 1 << 16 else np.int64)  # uint16: radix sort
        self._query_index = {q: i for i, q in enumerate(self.queries.tolist())}
        if features != "raw":
            self._x_shift, self._x_scale = _feature_stats(X, q_code, len(self.queries), features)
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
                std = np.sqrt(np.bincount(q_code, (h - self._mean[q_code]) ** 2) / count)
                self._std = np.where(std > 1e-12 * np.maximum(np.abs(self._mean), 1), std, 1.0)
            z = ((h - self._mean[q_code]) / self._std[q_code]).astype(np.float32)
        if self.head_interaction > 0:
            self._basis = _principal_basis(X, q_code, len(self.queries), X.shape[1] // 2)
            P = np.empty((len(X), X.shape[1] // 2), np.float32)
            for q in range(len(self.queries)):
                rows = q_code == q
                P[rows] = X[rows] @ self._basis[q].T
            X = self._interact(P, z)
        self.catalog = Catalog(X, z)
        self.schema: dict[str, Field] = {"residual": Field((X.shape[1],), self.dtype, 0), **self.rule.fields(X.shape[1])}
        self.store = store_for(store, self.schema)

    def __repr__(self) -> str:
        interaction = f", head_interaction={self.head_interaction}" if self.head_interaction else ""
        return (f"ResidualLearner(rule={self.rule!r}, key={self.key!r}, dtype={self.dtype.name!r}, "
                f"features={self.features!r}{interaction}, n_items={len(self.item_query)}, store={type(self.store).__name__})")

    @property
    def dim(self) -> int:
        """The embeddings' dimension (the residual has as many numbers, or one fewer if it is odd
        and ``head_interaction > 0``)."""
        return self._dim

    # ---- checks and keys
    def _key(self, user: Hashable, query: Hashable) -> Hashable:
        return plain(user) if self.key == "user" else (plain(user), plain(query))

    def _keys(self, users: np.ndarray, queries: np.ndarray):
        ints = users.dtype.kind in "iu" and (self.key == "user" or queries.dtype.kind in "iu")
        if self.key == "user":
            return users.astype(np.int64) if ints else users.tolist()
        if ints:
            return np.stack([users, queries], 1).astype(np.int64)
        return list(zip(users.tolist(), queries.tolist()))

    # ---- scoring
    def _state(self, user: Hashable, query: Hashable) -> dict[str, np.ndarray]:
        """The key's state as float32 rows (fills for a new key)."""
        got = self.store.get_many([self._key(user, query)])
        return {name: v[0].astype(np.float32) if v.dtype.kind == "f" else v[0] for name, v in got.items()}

    def _interact(self, P: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.hstack([P, self.head_interaction * z[:, None] * P]).astype(np.float32)

    def _features(self, X: np.ndarray, q: int, z: np.ndarray) -> np.ndarray:
        """What the residual acts on, for embeddings ``X`` (n, D) of query ``q`` with standardised head ``z``."""
        X = X.astype(np.float32)
        if self.features != "raw":
            X = (X - self._x_shift[q]) / self._x_scale[q]
        return self._interact(X @ self._basis[q].T, z) if self.head_interaction > 0 else X

    def _head(self, head, n: int, q: int) -> np.ndarray:
        head = np.asarray(head, np.float64)
        if head.shape != (n,):
            raise ValueError(f"head must have shape ({n},), got {head.shape}")
        if self.standardize and not self.has_head:
            raise ValueError("this learner has no head_scores, so no statistics to standardise a head with")
        return ((head - self._mean[q]) / self._std[q]).astype(np.float32)

    def _inputs(self, query, X, head) -> tuple[np.ndarray, np.ndarray]:
        """Features (n, D) and standardised head (n,) of item ids or raw embeddings."""
        q = self._query(query)
        X = np.asarray(X)
        if X.ndim == 1 and (X.dtype.kind in "iu" or X.size == 0):
            ids = self._check_items(X, query)
            if head is not None:
                raise ValueError("head is only for embeddings: catalog items use the learner's head_scores")
            return self.catalog.embeddings[ids], self.catalog.head[ids]
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"X must be item ids (n,) or embeddings (n, {self.dim}), got shape {X.shape}")
        z = np.zeros(len(X), np.float32) if head is None else self._head(head, len(X), q)
        return self._features(X, q, z), z

    def score(self, user: Hashable, query: Hashable, X: np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
        """Scores of catalog items or of raw embeddings for one user and query.

        Parameters
        ----------
        X
            1-D integer array of catalog item ids (of ``query``), or (n, D) float embeddings.
        head
            With embeddings only: their raw head scores, standardised with the query's
            catalog statistics. ``None``: no head term.

        Returns
        -------
        (n,) float32 scores, higher is better.
        """
        F, z = self._inputs(query, X, head)
        state = self._state(user, query)
        weight = 1.0 + state["head_weight"] if "head_weight" in state else 1.0  # WindowMAP(head_var > 0) learns it
        return weight * z + F @ state["residual"]

    def rank(self, user: Hashable, query: Hashable, item_ids: np.ndarray) -> np.ndarray:
        """Catalog item ids ordered best first (ties keep the given order)."""
        item_ids = np.asarray(item_ids)
        return item_ids[np.argsort(-self.score(user, query, item_ids), kind="stable")]

    @property
    def has_posterior(self) -> bool:
        """Does the rule keep a posterior that :meth:`sample_scores` can draw from?"""
        return hasattr(self.rule, "variance")

    def sample_scores(self, user: Hashable, query: Hashable, X: np.ndarray, n_samples: int,
                      rng=None, head: np.ndarray | None = None) -> np.ndarray:
        """Scores under residuals drawn from the key's posterior ``N(m, diag(variance))``.

        For the Thompson policy; needs a rule with a posterior (``rule.variance``).
        Returns (n_samples, n) float32.
        """
        if not self.has_posterior:
            raise TypeError(f"rule {type(self.rule).__name__} keeps no posterior to sample from; use DiagonalLaplace")
        F, z = self._inputs(query, X, head)
        state = self._state(user, query)
        eps = np.random.default_rng(rng).standard_normal((int(n_samples), self.catalog.embeddings.shape[1])).astype(np.float32)
        r = state["residual"] + eps * np.sqrt(self.rule.variance(state))  # (S, D)
        return z + r @ F.T

    # ---- learning
    def _in_memory(self) -> bool:
        return isinstance(self.store, InMemoryStore)

    def learn_one(self, user: Hashable, query: Hashable, item: int, label: int) -> None:
        """One feedback event: ``user`` accepted (1) or rejected (0) catalog ``item`` shown for ``query``."""
        item = self._check_event(query, item, label)
        key = self._key(user, query)
        items, labels = np.array([item], np.int64), np.array([bool(label)])
        if self._in_memory():
            rows = np.array([self.store.row_for(key)], np.int64)
            self._apply(self.store.columns, rows, items, labels)
        else:
            rows = np.zeros(1, np.int64)
            self.store.update_many([key], lambda state: self._apply(self._writable(state), rows, items, labels))

    def _writable(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A store's read as the kernels need it: C-contiguous, writable, in the schema's dtypes."""
        return {name: np.array(state[name], dtype=f.dtype, order="C") for name, f in self.schema.items()}

    def _apply(self, cols: dict[str, np.ndarray], rows, items, labels) -> dict[str, np.ndarray]:
        self.rule.apply(cols, rows, items, labels, self.catalog, self.threads)
        return cols

    def learn_many(self, users, queries, items, labels) -> None:
        """Many events at once, equal to calling :meth:`learn_one` on each in order.

        On an :class:`~streamml.stores.InMemoryStore` the rule's kernel updates the
        store's arrays in place (split by key over ``threads``). With ``key="user_query"``
        the events go to it grouped by query, stably, so each key's stay in order: a
        query's catalog rows are then read by consecutive events and stay in cache, where a
        big catalog would not. On any other store the
        events go in chunks of ``chunk_size``: one ``update_many`` of a chunk's distinct
        keys, inside which the kernel applies the chunk's events in order.
        """
        users, queries, items, labels = self._check_batch(users, queries, items, labels)
        keys = self._keys(users, queries)
        if self._in_memory():
            rows = self.store.rows_for(keys)
            if self.key == "user_query":
                order = np.argsort(self._item_query_code[items], kind="stable")
                rows, items, labels = rows[order], items[order], labels[order]
            self._apply(self.store.columns, rows, items, labels)
            return
        keys = as_key_list(keys)
        for start in range(0, len(keys), self.chunk_size):
            chunk = keys[start : start + self.chunk_size]
            index: dict = {}
            rows = np.fromiter((index.setdefault(k, len(index)) for k in chunk), np.int64, len(chunk))
            ev = slice(start, start + len(chunk))
            self.store.update_many(list(index), lambda state: self._apply(self._writable(state), rows, items[ev], labels[ev]))

    def learn_vector(self, user: Hashable, query: Hashable, x: np.ndarray, head_score: float | None,
                     label: int) -> None:
        """Feedback on a raw embedding ``x`` (D,) that is not in the catalog.

        ``head_score`` is the head's raw score of ``x`` (standardised like the catalog's),
        or ``None`` for a learner without a head. The rule's step is the one
        :meth:`learn_one` takes on a catalog item with this vector and head score,
        except that ``x`` has no id to enter a pairwise buffer.
        """
        q = self._query(query)
        x = np.asarray(x)
        if x.shape != (self.dim,) or x.dtype.kind not in "fiu":
            raise ValueError(f"x must be one embedding of shape ({self.dim},), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        if label not in (0, 1):
            raise ValueError(f"labels must be 1 (accepted) or 0 (rejected), got {plain(label)!r}")
        z = np.zeros(1, np.float32) if head_score is None else self._head([head_score], 1, q)
        f = self._features(x[None], q, z)[0]
        z = float(z[0])

        def step(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            row = {name: v[0].astype(np.float32) if v.dtype.kind == "f" else v[0].copy() for name, v in state.items()}
            self.rule.reference(row, f, z, bool(label), self.catalog, item=-1)
            return {name: v[None].astype(self.schema[name].dtype) for name, v in row.items()}

        self.store.update_many([self._key(user, query)], step)

    def forget(self, user: Hashable, query: Hashable | None = None) -> None:
        """Reset a user's state for one query, or (``query=None``) for all queries."""
        if self.key == "user":
            if query is not None:
                raise ValueError("key='user' shares one state across queries: forget the whole user")
            self.store.delete_many([plain(user)])
        elif query is None:
            self.store.delete_many([(plain(user), q) for q in self.queries.tolist()])
        else:
            self._query(query)
            self.store.delete_many([(plain(user), plain(query))])
