"""The online contract: what every per-user learner offers the simulator and the service.

An online learner ranks a query's candidates for one user and learns from that user's
accept/reject feedback, one event at a time, with state created on first use (river's
``learn_one`` shape). ``ResidualLearner`` and the baselines of
:mod:`streamml.online.baselines` follow it, and ``tests/online/test_contract.py`` runs
one suite over all of them. The offline contract (``fit`` on labelled rows, ``score_rows``) is a
different one: :class:`streamml.offline.contract.OfflineLearner`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["OnlineLearner"]


@runtime_checkable
class OnlineLearner(Protocol):
    """Per-user ranking of catalog items, learned online from feedback events.

    Semantics the contract suite checks:

    - A user without feedback ranks as the learner's prior (the head, if it has one).
    - Feedback of one user (and, per (user, query) key, of one query) changes no other's scores.
    - ``learn_many`` equals ``learn_one`` on each event in order; ``forget`` restores the prior.
    - Bad input (an unknown query, an item of another query, a label not 0/1) raises
      ``ValueError`` / ``IndexError`` / ``TypeError`` naming the value, and changes nothing.
    """

    def score(self, user: Hashable, query: Hashable, X: np.ndarray) -> np.ndarray:
        """(n,) scores of catalog item ids ``X`` of ``query`` for ``user``, higher is better."""

    def rank(self, user: Hashable, query: Hashable, item_ids: np.ndarray) -> np.ndarray:
        """``item_ids`` ordered best first."""

    def learn_one(self, user: Hashable, query: Hashable, item: int, label: int) -> None:
        """``user`` accepted (1) or rejected (0) catalog ``item`` shown for ``query``."""

    def learn_many(self, users, queries, items, labels) -> None:
        """Many events, as ``learn_one`` on each in order."""

    def forget(self, user: Hashable, query: Hashable | None = None) -> None:
        """Drop a user's state for one query, or for all (``query=None``)."""
