"""Per-query baseline learners behind the same fit/score_rows contract as the neural heads.

The contract::

    learner.fit(X, y, groups) -> learner    # X (N, D) float, y (N,) 0/1 with 1 = accepted, groups (N,) int
    learner.score_rows(X, groups) -> (N,) float  # higher = more likely accepted

``fit`` trains one independent model per group (a query, or a (fold, query) pair during
cross-validation) and replaces whatever was fitted before. Scores are only comparable
within a group. Edge cases:

* ``score_rows`` on a group that ``fit`` never saw raises a ``ValueError`` naming the group.
* A group whose training labels are all one class has nothing to rank, so every item in it
  scores the learner's neutral value (``SklearnLR``: 0.0, the decision boundary;
  ``RiverStack``: 0.5).

sklearn and river are imported inside the functions that use them: together they take about
two seconds to import, and modules that only need a name from here should not pay that.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SklearnLR", "RiverStack", "river_pipeline", "feature_dicts"]


def feature_dicts(X: np.ndarray) -> list[dict[int, float]]:
    """Turn the rows of ``X`` (N, D) into river feature dicts ``{column: value}``.

    ``tolist`` converts the whole array to Python floats in one C call, which is several
    times faster than building each dict from numpy scalars.

    >>> feature_dicts(np.array([[0.5, -1.0]], dtype=np.float32))
    [{0: 0.5, 1: -1.0}]
    """
    return [dict(enumerate(row)) for row in np.asarray(X).tolist()]


def river_pipeline(pa_c: float = 0.01):
    """A fresh, unfitted copy of the proof of concept's river pipeline.

    Running standardisation followed by a stack of logistic regression and two
    passive-aggressive classifiers, blended by a logistic-regression meta-classifier that also
    sees the scaled features. Nothing in it is random, so its output depends only on the order
    of the ``learn_one`` calls.

    Parameters
    ----------
    pa_c
        Aggressiveness ``C`` of both passive-aggressive classifiers (PA-I and PA-II).

    Examples
    --------
    >>> model = river_pipeline()
    >>> model.learn_one({0: 1.0, 1: 0.0}, True)
    >>> model.learn_one({0: 0.0, 1: 1.0}, False)
    >>> p = model.predict_proba_one({0: 1.0, 1: 0.0})[True]
    >>> bool(0.0 < p < 1.0)
    True
    """
    from river import ensemble, linear_model, preprocessing

    return preprocessing.StandardScaler() | ensemble.StackingClassifier(
        [
            linear_model.LogisticRegression(),
            linear_model.PAClassifier(mode=1, C=pa_c),
            linear_model.PAClassifier(mode=2, C=pa_c),
        ],
        meta_classifier=linear_model.LogisticRegression(),
    )


class _PerGroup:
    """Input checks and the one-model-per-group bookkeeping shared by the baselines.

    Subclasses set ``neutral_score`` and implement ``_fit_group(X, y, group)``, which returns
    a fitted model, and ``_score_group(model, X)``, which returns (n,) scores.
    """

    neutral_score: float

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, blocks=None, callbacks=()):
        """Fit one model per group.

        Groups share nothing, so ``blocks`` (which groups may share) changes nothing; ``callbacks``
        (Lightning's, for epoch logging) have no epochs to see here.
        """
        X, groups = self._check_X_groups(X, groups)
        y = np.asarray(y)
        if y.shape != (len(X),):
            raise ValueError(f"y must have shape ({len(X)},), got {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("y must hold only 0 (rejected) and 1 (accepted)")
        y = y.astype(np.int64)

        self.n_features_in_ = X.shape[1]
        self.models_ = {}  # group id -> fitted model, or None when the group had one class
        for g in np.unique(groups).tolist():
            mask = groups == g
            yg = y[mask]
            two_classes = yg.min() != yg.max()
            self.models_[g] = self._fit_group(X[mask], yg, g) if two_classes else None
        return self

    def score_rows(self, X: np.ndarray, groups: np.ndarray) -> np.ndarray:
        if not hasattr(self, "models_"):
            raise ValueError(f"{type(self).__name__} is not fitted; call fit first")
        X, groups = self._check_X_groups(X, groups)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, fit saw {self.n_features_in_}")

        scores = np.empty(len(X), dtype=np.float64)
        for g in np.unique(groups).tolist():
            if g not in self.models_:
                raise ValueError(f"group {g} was not seen in fit")
            mask = groups == g
            model = self.models_[g]
            scores[mask] = (
                self.neutral_score if model is None else self._score_group(model, X[mask])
            )
        return scores

    @staticmethod
    def _check_X_groups(X, groups):
        X = np.asarray(X, dtype=np.float32)
        groups = np.asarray(groups)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-d (N, D), got shape {X.shape}")
        if groups.shape != (len(X),):
            raise ValueError(f"groups must have shape ({len(X)},), got {groups.shape}")
        if len(X) and not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(f"groups must be integers, got dtype {groups.dtype}")
        return X, groups

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({params})"


class SklearnLR(_PerGroup):
    """One scikit-learn logistic regression per group.

    Parameters
    ----------
    C
        Inverse L2 regularisation strength.
    max_iter
        Iteration cap for the lbfgs solver, which is deterministic, so no seed is needed.

    Attributes
    ----------
    models_ : dict[int, LogisticRegression | None]
        The fitted model of each group, or None for a group that had a single class in fit;
        such a group scores 0.0 everywhere.

    Notes
    -----
    The score is ``decision_function``, the log-odds of acceptance.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = np.array([0, 1] * 10)
    >>> X = (rng.normal(size=(20, 4)) + y[:, None]).astype(np.float32)
    >>> groups = np.repeat([0, 1], 10)
    >>> lr = SklearnLR().fit(X, y, groups)
    >>> s = lr.score_rows(X, groups)
    >>> s.shape
    (20,)
    >>> bool(s[y == 1].mean() > s[y == 0].mean())
    True
    >>> lr.score_rows(X[:1], np.array([7]))
    Traceback (most recent call last):
        ...
    ValueError: group 7 was not seen in fit
    """

    neutral_score = 0.0

    def __init__(self, C: float = 10.0, max_iter: int = 1000):
        self.C = C
        self.max_iter = max_iter

    def _fit_group(self, X, y, group):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter).fit(X, y)

    def _score_group(self, model, X):
        return model.decision_function(X)


class RiverStack(_PerGroup):
    """One river stacking pipeline (see `river_pipeline`) per group, trained online.

    Each group's items are fed to ``learn_one`` in a random order, reshuffled every epoch.
    The order is drawn from a generator seeded by ``(seed, group id)``, so a group's model
    depends on its own rows alone, not on which other groups were fitted alongside it.

    Parameters
    ----------
    pa_c
        Aggressiveness ``C`` of the passive-aggressive base classifiers.
    seed
        Seed of the presentation order.
    epochs
        Passes over each group's items.

    Attributes
    ----------
    models_ : dict[int, river.compose.Pipeline | None]
        The fitted pipeline of each group, or None for a group that had a single class in fit;
        such a group scores 0.5 everywhere.

    Notes
    -----
    The score is ``predict_proba_one(x)[True]``, the probability of acceptance.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = np.array([0, 1] * 10)
    >>> X = (rng.normal(size=(20, 4)) + 2 * y[:, None]).astype(np.float32)
    >>> groups = np.repeat([0, 1], 10)
    >>> stack = RiverStack(epochs=3).fit(X, y, groups)
    >>> s = stack.score_rows(X, groups)
    >>> bool(((s > 0) & (s < 1)).all())
    True
    >>> bool(s[y == 1].mean() > s[y == 0].mean())
    True
    """

    neutral_score = 0.5

    def __init__(self, pa_c: float = 0.01, seed: int = 0, epochs: int = 1):
        self.pa_c = pa_c
        self.seed = seed
        self.epochs = epochs

    def _fit_group(self, X, y, group):
        # SeedSequence entropy must be non-negative; the modulus keeps negative ids distinct.
        rng = np.random.default_rng([self.seed, group % 2**63])
        xs = feature_dicts(X)
        ys = (y == 1).tolist()  # river classifiers expect bool labels
        model = river_pipeline(self.pa_c)
        for _ in range(self.epochs):
            for i in rng.permutation(len(xs)).tolist():
                model.learn_one(xs[i], ys[i])
        return model

    def _score_group(self, model, X):
        return np.array([model.predict_proba_one(x)[True] for x in feature_dicts(X)])
