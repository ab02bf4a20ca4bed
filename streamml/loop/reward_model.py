"""DR's reward model, fitted to the log: a head's scores calibrated per query (Platt scaling).

Why. DR is unbiased whatever its reward model ``rhat``, but its variance, and in a finite log
its interval, lean on ``rhat`` wherever the target puts mass that the logging policy rarely
shows. A head trained with a ranking loss has no calibrated scale, so ``sigmoid(score)`` can be
far from the accept rate. It can even point the wrong way, if the head is confidently wrong.
On the simulator, DR with the logging learner's scores passed through a miscalibrated link
covered the truth in as few as 0.15 of seeds. With the same scores calibrated on the log, it was
back at 0.90-1.00 (``experiments/ope_validation.md``).

The model. ``P(accept | item) = sigmoid(a_q s + b_q)`` on ``s``, a head's score standardised
over the training slates. ``a_q = a + da_q`` and ``b_q = b + db_q``: a global slope and intercept,
and per-query deviations shrunk by an L2 prior 16 times as strong (sklearn's ``LogisticRegression``). A query with
little or no training feedback therefore gets the global link. Fit it on slates that the
estimate does not use: the training slice before a held-out slice in time (:mod:`.evaluate`), or
other users' slates (cross-fitting, ``experiments/ope_validation.py``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

__all__ = ["PlattRewardModel"]

# The per-query deviations' features are scaled by this, so under the same L2 prior a deviation
# costs 1 / _DEVIATION**2 = 16 times what the global link costs: what the queries share goes to the
# global link (which an unseen query gets), and a query departs from it only on its own evidence.
_DEVIATION = 0.25


class PlattRewardModel:
    """Accept probabilities from a head's scores, calibrated per query on logged answers.

    Parameters
    ----------
    C
        Inverse strength of the L2 prior on the global slope and on the per-query deviations of the
        slope and the intercept (sklearn's ``C``; the global intercept is not penalised).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> s = rng.standard_normal(4000)
    >>> y = rng.random(4000) < 1 / (1 + np.exp(-(0.5 - 2 * s)))   # a confidently wrong head: high score, rejected
    >>> model = PlattRewardModel().fit([s], ["q"], [y.astype(float)])
    >>> np.round(model.predict(np.array([-1.0, 0.0, 1.0]), "q"), 2)   # the truth: 0.92, 0.62, 0.18
    array([0.93, 0.63, 0.18])
    """

    def __init__(self, C: float = 10.0):
        if not C > 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.C = float(C)

    def _design(self, s: np.ndarray, q: np.ndarray) -> np.ndarray:
        z = (s - self.center_) / self.scale_
        X = np.zeros((len(z), 1 + 2 * len(self.queries_)))
        X[:, 0] = z
        col = np.array([self.queries_.get(v, -1) for v in q.tolist()], np.int64)
        known = col >= 0
        rows = np.flatnonzero(known)
        X[rows, 1 + 2 * col[known]] = _DEVIATION * z[known]  # the query's slope deviation
        X[rows, 2 + 2 * col[known]] = _DEVIATION  # and its intercept deviation
        return X

    def fit(self, scores: Sequence[np.ndarray], queries: Sequence[Hashable], rewards: Sequence[np.ndarray]) -> PlattRewardModel:
        """``scores[n]`` the head's scores of slate ``n``'s shown items, ``queries[n]`` its query,
        ``rewards[n]`` their answers (1 accepted, 0 not). Returns ``self``."""
        if not (len(scores) == len(queries) == len(rewards)):
            raise ValueError(f"{len(scores)} score arrays, {len(queries)} queries and {len(rewards)} reward arrays")
        s = np.concatenate([np.asarray(x, np.float64).ravel() for x in scores]) if len(scores) else np.zeros(0)
        y = np.concatenate([np.asarray(r, np.float64).ravel() for r in rewards]) if len(rewards) else np.zeros(0)
        if len(s) != len(y):
            raise ValueError(f"{len(s)} scores but {len(y)} rewards: every shown item needs one of each")
        if not np.isfinite(s).all():
            raise ValueError("the head's scores are not all finite")
        labels = set(np.unique(y).tolist())
        if not labels <= {0.0, 1.0}:
            raise ValueError(f"rewards must be 0 or 1, got {sorted(labels - {0.0, 1.0})[:3]}")
        if labels != {0.0, 1.0}:
            raise ValueError(f"the reward model needs accepted and not accepted items to learn from; the "
                             f"{len(y)} shown items of the {len(scores)} training slates are all "
                             f"{'accepted' if labels == {1.0} else 'not accepted' if labels else 'absent'}")
        q = np.repeat(np.asarray(list(queries), object), [np.size(x) for x in scores])
        self.queries_ = {v: i for i, v in enumerate(dict.fromkeys(q.tolist()))}
        self.center_, self.scale_ = float(s.mean()), float(s.std()) or 1.0
        self.model_ = LogisticRegression(C=self.C, max_iter=1000).fit(self._design(s, q), y)
        self.n_items_ = len(y)
        return self

    def predict(self, scores: np.ndarray, query: Hashable) -> np.ndarray:
        """Accept probabilities of items with head scores ``scores`` shown for ``query`` (a query
        the training slates never had gets the global link)."""
        if not hasattr(self, "model_"):
            raise RuntimeError("fit the reward model before predicting")
        s = np.asarray(scores, np.float64)
        return self.model_.predict_proba(self._design(s, np.full(len(s), query, object)))[:, 1]
