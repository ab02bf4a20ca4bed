"""Input checks shared by the online learners that keep their state in a store.

:class:`~streamml.online.ResidualLearner` and :class:`~streamml.online.MixedLearner` take the
same events (a user, a query, a catalog item of that query, a label 0 or 1) and refuse bad
ones with the same messages, which ``tests/online/test_contract.py`` checks on both. A class
that mixes in :class:`CatalogChecks` sets ``queries``, ``_query_index``, ``item_query`` and
``_item_query_list`` from its catalog.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

__all__ = ["CatalogChecks", "plain"]


def plain(v):
    """A numpy scalar as the plain Python value, for keys and error messages."""
    return v.item() if isinstance(v, np.generic) else v


class CatalogChecks:
    """``_query``, ``_check_items``, ``_check_labels``, ``_check_batch`` and ``_check_event`` over a catalog."""

    queries: np.ndarray
    item_query: np.ndarray
    _query_index: dict
    _item_query_list: list

    def _query(self, query: Hashable) -> int:
        """Index of a known query; a clear error for an unknown one."""
        q = self._query_index.get(plain(query))
        if q is None:
            raise ValueError(f"query {plain(query)!r} is unknown; known queries: {self.queries.tolist()}")
        return q

    def _check_items(self, items: np.ndarray, queries) -> np.ndarray:
        """Catalog ids of ``queries`` (one query, or one per item), as int64."""
        items = np.asarray(items)
        if items.dtype.kind not in "iu":
            if items.size == 0:
                return items.astype(np.int64).reshape(-1)
            raise TypeError(f"item ids must be integers, got dtype {items.dtype}")
        if items.size and (items.min() < 0 or items.max() >= len(self.item_query)):
            bad = items[(items < 0) | (items >= len(self.item_query))][0]
            raise IndexError(f"item {int(bad)} is not a catalog id: ids are in [0, {len(self.item_query)})")
        wrong = self.item_query[items] != queries
        if np.any(wrong):
            i = int(np.flatnonzero(wrong)[0])
            q = queries if np.ndim(queries) == 0 else np.asarray(queries)[i]
            self._query(q)  # an unknown query is named as such
            raise ValueError(f"item {int(items[i])} belongs to query {self._item_query_list[int(items[i])]!r}, "
                             f"not {plain(q)!r}")
        return items.astype(np.int64)

    @staticmethod
    def _check_labels(labels) -> np.ndarray:
        y = np.asarray(labels)
        if not np.isin(y, (0, 1)).all():
            bad = y[~np.isin(y, (0, 1))].ravel()[0]
            raise ValueError(f"labels must be 1 (accepted) or 0 (rejected), got {plain(bad)!r}")
        return y.astype(bool)

    def _check_batch(self, users, queries, items, labels):
        """A batch of events as arrays ``(users, queries, items int64, labels bool)``, all checked
        before any is learned, so a bad one changes nothing."""
        users, queries, items = np.asarray(users), np.asarray(queries), np.asarray(items)
        if not (users.shape == queries.shape == items.shape == np.shape(labels)) or users.ndim != 1:
            raise ValueError("users, queries, items and labels must be 1-D and of equal length, got shapes "
                             f"{users.shape}, {queries.shape}, {items.shape}, {np.shape(labels)}")
        for q in np.unique(queries).tolist() if len(queries) else []:
            self._query(q)
        return users, queries, self._check_items(items, queries), self._check_labels(labels)

    def _check_event(self, query: Hashable, item, label) -> int:
        """One event's catalog id, checked in plain Python (cheaper than numpy for one event)."""
        if not isinstance(item, (int, np.integer)) or isinstance(item, bool):
            raise TypeError(f"item must be a catalog id (int), got {item!r}")
        item = int(item)
        if not 0 <= item < len(self._item_query_list):
            raise IndexError(f"item {item} is not a catalog id: ids are in [0, {len(self._item_query_list)})")
        if self._item_query_list[item] != plain(query):
            self._query(query)
            raise ValueError(f"item {item} belongs to query {self._item_query_list[item]!r}, not {plain(query)!r}")
        if label not in (0, 1):
            raise ValueError(f"labels must be 1 (accepted) or 0 (rejected), got {plain(label)!r}")
        return item
