"""The offline contract: per-query learners fitted on labelled rows, then scoring rows.

The neural heads (through ``offline.module``) and the baselines of
:mod:`streamml.offline.baselines` follow it. It is not the online contract
(:class:`streamml.online.contract.OnlineLearner`), whose ``score`` takes a user and a
query and whose learning is one feedback event at a time; the offline verb is
``score_rows`` so that the two never pass for each other.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["OfflineLearner"]


@runtime_checkable
class OfflineLearner(Protocol):
    """One model per group (a query, or a (fold, query) pair), fitted in one call.

    ``fit`` replaces whatever was fitted before; scores are comparable within a group only;
    scoring a group that ``fit`` never saw raises ``ValueError`` naming the group.
    """

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, blocks: np.ndarray | None = None,
            callbacks: list | None = None) -> "OfflineLearner":
        """X (N, D) float, y (N,) 0/1 with 1 = accepted, groups (N,) int.

        ``blocks`` (N,) int marks which groups may share parameters: in cross-validation a
        block is one split, so a learner that shares strength across queries (the multi-task
        head) shares only within a split; ``None`` means one block. ``callbacks`` are
        Lightning callbacks (epoch logging); learners without epochs ignore them.
        """

    def score_rows(self, X: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """(N,) float, higher = more likely accepted."""
