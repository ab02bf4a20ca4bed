"""Online baselines for the residual learner, behind the same online contract.

The contract (see ``streamml.online.ResidualLearner``)::

    score(user, query, X, head=None) -> (n,)   # X: catalog item ids (n,) or embeddings (n, D)
    rank(user, query, item_ids) -> item ids best first
    learn_one(user, query, item, label)        # a catalog item id; label 1 accepted, 0 rejected
    learn_many(users, queries, items, labels)  # in order per key
    learn_vector(user, query, x, head_score, label)   # feedback on an embedding outside the catalog
    forget(user, query=None)

Each is built over the catalog like the residual learner, ``Baseline(items, item_query,
head_scores)``, so the simulator builds every learner with one factory signature:

* :class:`HeadOnly` never adapts: the frozen head's scores, the "no harm" bar.
* :class:`RiverOnline` learns the proof of concept's river pipeline per (user, query) from
  that key's feedback alone, one event at a time.
* :class:`SklearnRefitOnline` refits a scikit-learn logistic regression per (user, query) on
  all of that key's feedback so far: the "use all the evidence" bar a low-rate step must meet.

The two learners from scratch ignore the head on purpose: they show what the user's own
answers are worth without it.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from streamml.offline.baselines import feature_dicts, river_pipeline

__all__ = ["HeadOnly", "RiverOnline", "SklearnRefitOnline"]


def _plain(value):
    """A numpy scalar as the plain Python value, for error messages."""
    return value.item() if isinstance(value, np.generic) else value


class _CatalogBaseline:
    """Catalog bookkeeping, input checks and per-key state shared by the online baselines.

    Subclasses keep their per-key state in the dicts named by ``_per_key`` (keys are
    ``(user, query)``) and implement ``_learn(key, X, labels)`` and ``_score(key, X)``.
    """

    _per_key: tuple[str, ...] = ()

    def __init__(self, items: np.ndarray, item_query=None, head_scores=None):
        self.items = np.ascontiguousarray(items, np.float32)
        if self.items.ndim != 2:
            raise ValueError(f"items must be (n_items, D), got shape {self.items.shape}")
        n = len(self.items)
        self.item_query = None if item_query is None else np.asarray(item_query)
        if self.item_query is not None and self.item_query.shape != (n,):
            raise ValueError(f"item_query must have shape ({n},), got {self.item_query.shape}")
        self.head_scores = None if head_scores is None else np.asarray(head_scores, np.float64)
        if self.head_scores is not None and self.head_scores.shape != (n,):
            raise ValueError(f"head_scores must have shape ({n},), got {self.head_scores.shape}")
        self._queries = set() if self.item_query is None else set(self.item_query.tolist())
        for name in self._per_key:
            setattr(self, name, {})

    # ---- inputs
    def _check_query(self, query) -> None:
        if self.item_query is not None and query not in self._queries:
            raise ValueError(f"query {_plain(query)!r} is unknown; known queries: {sorted(self._queries, key=str)}")

    def _item_ids(self, items, query) -> np.ndarray:
        self._check_query(query)
        ids = np.asarray(items)
        if ids.size == 0:
            return ids.astype(np.int64).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"item ids must be integers, got {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= len(self.items))]
        if len(bad):
            raise IndexError(f"item {int(bad[0])} is not a catalog id: ids are in [0, {len(self.items)})")
        if self.item_query is not None:
            wrong = np.flatnonzero(self.item_query[ids] != query)
            if len(wrong):
                i = int(ids[wrong[0]])
                raise ValueError(f"item {i} belongs to query {self.item_query[i].item()!r}, not {_plain(query)!r}")
        return ids

    def _rows(self, query, X, head) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings (n, D), raw head scores (n,) or None) of item ids or of embeddings."""
        self._check_query(query)
        X = np.asarray(X)
        if X.ndim == 1 and (X.dtype.kind in "iu" or X.size == 0):
            if head is not None:
                raise ValueError("head is only for embeddings: catalog items use the learner's head_scores")
            ids = self._item_ids(X, query)
            return self.items[ids], None if self.head_scores is None else self.head_scores[ids]
        if X.ndim != 2 or X.shape[1] != self.items.shape[1]:
            raise ValueError(f"X must be item ids (n,) or embeddings (n, {self.items.shape[1]}), got shape {X.shape}")
        if head is not None:
            head = np.asarray(head, np.float64)
            if head.shape != (len(X),):
                raise ValueError(f"head must have shape ({len(X)},), got {head.shape}")
        return X.astype(np.float32), head

    @staticmethod
    def _labels(labels) -> np.ndarray:
        y = np.asarray(labels).reshape(-1)
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 1 (accepted) or 0 (rejected), got {_plain(y[~np.isin(y, (0, 1))][0])!r}")
        return y.astype(np.int64)

    # ---- the online contract
    def score(self, user: Hashable, query: Hashable, X, head=None) -> np.ndarray:
        """(n,) scores, higher is better, of catalog item ids or of (n, D) embeddings."""
        rows, head_rows = self._rows(query, X, head)
        return self._score((user, query), rows, head_rows)

    def rank(self, user: Hashable, query: Hashable, item_ids) -> np.ndarray:
        """Catalog item ids ordered best first (ties keep the given order)."""
        item_ids = np.asarray(item_ids)
        return item_ids[np.argsort(-self.score(user, query, item_ids), kind="stable")]

    def learn_one(self, user: Hashable, query: Hashable, item: int, label: int) -> None:
        self._learn_ids((user, query), self._item_ids(np.array([item]), query), self._labels([label]))

    def _learn_ids(self, key, ids: np.ndarray, labels: np.ndarray) -> None:
        """Learn a key's checked catalog ids; a baseline that needs the ids, not the embeddings, overrides it."""
        self._learn(key, self.items[ids], labels)

    def learn_many(self, users, queries, items, labels) -> None:
        users, queries = np.asarray(users, object), np.asarray(queries, object)
        items, labels = np.asarray(items), self._labels(labels)
        if not (len(users) == len(queries) == len(items) == len(labels)):
            raise ValueError(f"users, queries, items and labels must have one length, got "
                             f"{len(users)}, {len(queries)}, {len(items)}, {len(labels)}")
        keys = list(zip(users.tolist(), queries.tolist()))
        order: dict = {}
        for i, key in enumerate(keys):  # group by key, keeping each key's event order
            order.setdefault(key, []).append(i)
        checked = {key: self._item_ids(items[idx], key[1]) for key, idx in order.items()}  # all, before any learning
        for key, idx in order.items():
            self._learn_ids(key, checked[key], labels[idx])

    def learn_vector(self, user: Hashable, query: Hashable, x, head_score: float, label: int) -> None:
        x = np.asarray(x, np.float32).reshape(1, -1)
        if x.shape[1] != self.items.shape[1]:
            raise ValueError(f"x must have {self.items.shape[1]} floats, got {x.shape[1]}")
        self._learn((user, query), x, self._labels([label]))

    def forget(self, user: Hashable, query: Hashable | None = None) -> None:
        def keep(key):
            return key[0] != user or (query is not None and key[1] != query)

        for name in self._per_key:
            setattr(self, name, {k: v for k, v in getattr(self, name).items() if keep(k)})

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                           if not k.endswith("_") and k not in ("items", "item_query", "head_scores"))
        return f"{type(self).__name__}({params})"


class HeadOnly(_CatalogBaseline):
    """No adaptation: the frozen head's scores, whatever the feedback.

    Embeddings score their given ``head`` (0 without one).

    Examples
    --------
    >>> items = np.eye(3, dtype=np.float32)
    >>> model = HeadOnly(items, head_scores=[0.0, 2.0, 1.0])
    >>> model.learn_one("ann", "q", 0, 1)
    >>> model.rank("ann", "q", [0, 1, 2])
    array([1, 2, 0])
    """

    def _learn(self, key, X, labels) -> None:
        pass

    def _score(self, key, X, head) -> np.ndarray:
        return np.zeros(len(X)) if head is None else np.asarray(head, np.float64)


class RiverOnline(_CatalogBaseline):
    """The proof of concept's river pipeline per (user, query), learning one event at a time.

    An unseen key scores 0.5 everywhere.

    Examples
    --------
    >>> items = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    >>> model = RiverOnline(items)
    >>> model.learn_one("ann", "q", 0, 1); model.learn_one("ann", "q", 1, 0)
    >>> s = model.score("ann", "q", np.array([0, 1]))
    >>> bool(s[0] > s[1])
    True
    """

    _per_key = ("models_",)

    def __init__(self, items, item_query=None, head_scores=None, pa_c: float = 0.01):
        super().__init__(items, item_query, head_scores)
        self.pa_c = pa_c

    def _learn(self, key, X, labels) -> None:
        model = self.models_.get(key)
        if model is None:  # build the pipeline only for a new key, not on every event
            model = self.models_[key] = river_pipeline(self.pa_c)
        for x, label in zip(feature_dicts(X), labels.tolist()):
            model.learn_one(x, bool(label))

    def _score(self, key, X, head) -> np.ndarray:
        model = self.models_.get(key)
        if model is None:
            return np.full(len(X), 0.5)
        return np.array([model.predict_proba_one(x)[True] for x in feature_dicts(X)], np.float64)


class SklearnRefitOnline(_CatalogBaseline):
    """scikit-learn LogisticRegression per (user, query), refit on all of that key's feedback.

    ``learn_many`` refits once per key after appending all its events, which ends in the
    same model as one refit per event. Until a key has seen both labels it scores 0
    everywhere (the decision boundary).

    Examples
    --------
    >>> items = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    >>> model = SklearnRefitOnline(items)
    >>> model.learn_one("ann", "q", 0, 1); model.learn_one("ann", "q", 1, 0)
    >>> s = model.score("ann", "q", np.array([0, 1]))
    >>> bool(s[0] > s[1])
    True
    """

    _per_key = ("models_", "feedback_")

    def __init__(self, items, item_query=None, head_scores=None, C: float = 10.0):
        super().__init__(items, item_query, head_scores)
        self.C = C

    def _learn(self, key, X, labels) -> None:
        from sklearn.linear_model import LogisticRegression

        xs, ys = self.feedback_.setdefault(key, ([], []))
        xs.extend(X), ys.extend(labels.tolist())
        if len(set(ys)) == 2:
            self.models_[key] = LogisticRegression(C=self.C, max_iter=1000).fit(np.stack(xs), ys)

    def _score(self, key, X, head) -> np.ndarray:
        model = self.models_.get(key)
        if model is None:
            return np.zeros(len(X))
        return model.decision_function(X).astype(np.float64)
