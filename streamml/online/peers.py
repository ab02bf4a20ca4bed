"""Online peers that use the head (and a population), for the replay of real feedback.

Each follows the online contract and is built like every learner, ``Peer(items, item_query,
head_scores)``; those that learn from a population have ``fit_population(events)`` too.

* :class:`VowpalWabbitOnline`: Vowpal Wabbit, logistic loss, the head's standardised score
  as each example's base margin, and per-key quadratic interactions ``-q ue`` (a key
  indicator times the embedding; ``--ignore_linear e`` keeps the embedding's own weights
  out, so one user's answers move only their own weights). With ``population=True`` the base
  margin also holds a second, frozen VW model of per-item effects learned from the
  population's events, the same information the mixed learner's global model has.
* :class:`SklearnRefitHead`: scikit-learn's logistic regression per key, refit on all of the
  key's events with the head's score as one more feature; the head until both labels are seen.
* :class:`ReferenceBayes`: the reference model of issue 17, tuned there on tuning users:
  ``c z + pi * (b + w · v)`` with ``k=4`` SVD factors, ``w ~ N(0, 0.3 I)``, ``b ~ N(0, 1)``,
  solved exactly (Newton MAP) on all of the key's events, ``pi`` the sigmoid of the key's
  prequential log-likelihood gain over the head-only model. It keeps every event, so it is a
  yardstick, not a servable learner.
"""

from __future__ import annotations

import hashlib

import numpy as np

from streamml.online.baselines import _CatalogBaseline
from streamml.online.population import fit_population, standardized_head

__all__ = ["VowpalWabbitOnline", "SklearnRefitHead", "ReferenceBayes"]


def _z(items, item_query, head_scores) -> np.ndarray:
    if head_scores is None:
        return np.zeros(len(items))
    q = np.zeros(len(items), np.int64) if item_query is None else np.unique(np.asarray(item_query), return_inverse=True)[1]
    return standardized_head(np.asarray(head_scores, np.float64), q)


class _HeadPeer(_CatalogBaseline):
    """A baseline that knows each catalog item's id, so it can use the head's (and a population's) per-item values."""

    def __init__(self, items, item_query=None, head_scores=None):
        super().__init__(items, item_query, head_scores)
        self.z_ = _z(self.items, self.item_query, head_scores)

    # These peers need the catalog ids (two items may share a text, hence an embedding): they
    # learn through the base class's _learn_ids and score ids here.
    def score(self, user, query, X, head=None) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 1 or head is not None:
            raise ValueError(f"{type(self).__name__} scores catalog item ids only, not new embeddings")
        return self._score_ids((user, query), self._item_ids(X, query))

    def learn_vector(self, user, query, x, head_score, label) -> None:
        raise ValueError(f"{type(self).__name__} learns catalog items only, not new embeddings")


class VowpalWabbitOnline(_HeadPeer):
    """Vowpal Wabbit with the head as base margin and per-key ``-q ue`` interactions (module doc).

    Examples
    --------
    >>> items = np.eye(3, dtype=np.float32)
    >>> model = VowpalWabbitOnline(items, head_scores=[1.0, 0.0, -1.0])
    >>> model.rank("ann", "q", [0, 1, 2])
    array([0, 1, 2])
    >>> for _ in range(20):
    ...     model.learn_one("ann", "q", 0, 0); model.learn_one("ann", "q", 2, 1)
    >>> int(model.rank("ann", "q", [0, 1, 2])[0])
    2
    """

    _per_key = ("generation_",)

    def __init__(self, items, item_query=None, head_scores=None, bits: int = 22, lr: float = 0.5,
                 population: bool = False, passes: int = 1):
        super().__init__(items, item_query, head_scores)
        self.bits, self.lr, self.population, self.passes = int(bits), float(lr), bool(population), int(passes)
        self.base_ = self.z_.copy()
        self.features_ = [" ".join(f"{j}:{v:.6g}" for j, v in enumerate(row) if v != 0) for row in self.items]
        self.vw_ = self._workspace(f"{self._ARGS} -l {self.lr}")
        self.counter_ = 0

    def _workspace(self, args: str):
        from vowpalwabbit import pyvw

        return pyvw.Workspace(f"--loss_function logistic -b {self.bits} --quiet {args}")

    def fit_population(self, events) -> VowpalWabbitOnline:
        """With ``population=True``: learn per-item effects from ``events`` (``item``, ``label``)
        in their order, in a VW model with the head as base margin; its margins join the base."""
        if not self.population:
            return self
        pop = self._workspace("")
        ids, labels = events["item"].to_numpy(np.int64), events["label"].to_numpy()
        for _ in range(self.passes):
            for i, y in zip(ids.tolist(), labels.tolist()):
                pop.learn(f"{1 if y else -1} 1 {self.z_[i]:.6g} |i i{i}")
        self.base_ = np.array([pop.predict(f"1 1 {self.z_[i]:.6g} |i i{i}") for i in range(len(self.items))])
        pop.finish()
        return self

    def learn_many(self, users, queries, items, labels) -> None:
        """In the given order, not grouped by key: VW's learning rate depends on every example before."""
        users, queries, items, labels = (np.asarray(users, object), np.asarray(queries, object), np.asarray(items),
                                         self._labels(labels))
        if not (len(users) == len(queries) == len(items) == len(labels)):
            raise ValueError(f"users, queries, items and labels must have one length, got "
                             f"{len(users)}, {len(queries)}, {len(items)}, {len(labels)}")
        ids = [self._item_ids(items[e:e + 1], q) for e, q in enumerate(queries.tolist())]  # all, before any learning
        for e, (u, q) in enumerate(zip(users.tolist(), queries.tolist())):
            self._learn_ids((u, q), ids[e], labels[e:e + 1])

    _ARGS = "-q ue --ignore_linear e"

    def __getstate__(self) -> dict:
        """VW's weights travel as the bytes of its saved model (pyvw's Workspace cannot be pickled)."""
        import tempfile

        state = {k: v for k, v in self.__dict__.items() if k != "vw_"}
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/model.vw"
            self.vw_.save(path)
            with open(path, "rb") as fh:
                state["vw_model_"] = fh.read()
        return state

    def __setstate__(self, state: dict) -> None:
        import tempfile

        model = state.pop("vw_model_")
        self.__dict__.update(state)
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/model.vw"
            with open(path, "wb") as fh:
                fh.write(model)
            self.vw_ = self._workspace(f"{self._ARGS} -l {self.lr} -i {path}")

    def __deepcopy__(self, memo):
        import copy

        clone = copy.copy(self)
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def _key_token(self, key) -> str:
        gen = self.generation_.setdefault(key, self.counter_)
        return hashlib.blake2b(repr((key, gen)).encode(), digest_size=8).hexdigest()

    def _example(self, key, i: int, y=None) -> str:
        label = "" if y is None else f"{1 if y else -1} 1 "
        return f"{label or '1 1 '}{self.base_[i]:.6g} |u k{self._key_token(key)} |e {self.features_[i]}"

    def _learn_ids(self, key, ids, labels) -> None:
        for i, y in zip(ids.tolist(), labels.tolist()):
            self.vw_.learn(self._example(key, i, y))

    def _score_ids(self, key, ids) -> np.ndarray:
        if key not in self.generation_:
            return self.base_[ids]
        return np.array([self.vw_.predict(self._example(key, i)) for i in ids.tolist()], np.float64)

    def forget(self, user, query=None) -> None:
        """Later events of the user's keys train fresh hashed weights (a new generation), so the
        key scores as the base again; the old weights stay in VW's table, unused."""
        super().forget(user, query)
        self.counter_ += 1


class SklearnRefitHead(_HeadPeer):
    """Logistic regression per key, refit on all its events, with the head's score as a feature.

    Examples
    --------
    >>> items = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
    >>> model = SklearnRefitHead(items, head_scores=[1.0, -1.0, 0.0])
    >>> model.rank("ann", "q", [0, 1, 2])
    array([0, 2, 1])
    """

    _per_key = ("models_", "feedback_")

    def __init__(self, items, item_query=None, head_scores=None, C: float = 1.0):
        super().__init__(items, item_query, head_scores)
        self.C = float(C)

    def _design(self, ids: np.ndarray) -> np.ndarray:
        return np.hstack([self.items[ids], self.z_[ids, None]])

    def _learn_ids(self, key, new, labels) -> None:
        from sklearn.linear_model import LogisticRegression

        ids, ys = self.feedback_.setdefault(key, ([], []))
        ids.extend(new.tolist()), ys.extend(labels.tolist())
        if len(set(ys)) == 2:
            self.models_[key] = LogisticRegression(C=self.C, max_iter=1000).fit(self._design(np.array(ids)), ys)

    def _score_ids(self, key, ids) -> np.ndarray:
        model = self.models_.get(key)
        return self.z_[ids] if model is None else model.decision_function(self._design(ids)).astype(np.float64)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


class ReferenceBayes(_HeadPeer):
    """The issue's reference model (module doc): exact per-key MAP on all events, a fixed prior, a
    prequential gate. Before :meth:`fit_population` it is the head (no factors).

    Examples
    --------
    >>> items = np.eye(3, dtype=np.float32)
    >>> ReferenceBayes(items, head_scores=[0.0, 2.0, 1.0]).rank("ann", "q", [0, 1, 2])
    array([1, 2, 0])
    """

    _per_key = ("feedback_", "gain_", "w_")

    def __init__(self, items, item_query=None, head_scores=None, k: int = 4, factor_var: float = 0.3,
                 bias_var: float = 1.0):
        super().__init__(items, item_query, head_scores)
        self.k, self.factor_var, self.bias_var = int(k), float(factor_var), float(bias_var)
        self.slope_, self.intercept_ = 1.0, 0.0
        self.factors_ = np.zeros((len(self.items), 0))

    def fit_population(self, events) -> ReferenceBayes:
        q = np.zeros(len(self.items), np.int64) if self.item_query is None else np.unique(self.item_query, return_inverse=True)[1]
        pop = fit_population(events, self.items, q, self.z_, k=self.k, em_iters=0)
        self.slope_, self.intercept_, self.factors_ = pop.slope, pop.intercept, pop.factors.astype(np.float64)
        return self

    def _map(self, ids: np.ndarray, ys: np.ndarray) -> np.ndarray:
        F = np.hstack([np.ones((len(ids), 1)), self.factors_[ids]])
        P = np.diag([1 / self.bias_var] + [1 / self.factor_var] * self.factors_.shape[1])
        off = self.slope_ * self.z_[ids] + self.intercept_
        w = np.zeros(F.shape[1])
        for _ in range(25):
            p = _sigmoid(off + F @ w)
            step = np.linalg.solve(F.T @ (F * (p * (1 - p))[:, None]) + P, F.T @ (ys - p) - P @ w)
            w += step
            if np.abs(step).max() < 1e-8:
                break
        return w

    def _learn_ids(self, key, new, labels) -> None:
        ids, ys = self.feedback_.setdefault(key, ([], []))
        for i, y in zip(new.tolist(), labels.tolist()):
            w = self.w_.get(key, np.zeros(1 + self.factors_.shape[1]))
            base = self.slope_ * self.z_[i] + self.intercept_
            sign = 1.0 if y else -1.0  # log sigmoid(sign * logit), computed without overflow
            adapted = -np.logaddexp(0.0, -sign * (base + w[0] + self.factors_[i] @ w[1:]))
            self.gain_[key] = self.gain_.get(key, 0.0) + adapted + np.logaddexp(0.0, -sign * base)
            ids.append(i), ys.append(y)
            self.w_[key] = self._map(np.array(ids), np.array(ys, np.float64))

    def _score_ids(self, key, ids) -> np.ndarray:
        base = self.slope_ * self.z_[ids]
        if key not in self.w_:
            return base
        return base + _sigmoid(self.gain_[key]) * (self.factors_[ids] @ self.w_[key][1:])
