"""Cross-validation harness shared by every learner, so comparisons use identical folds.

All splits are packed into one fit: a row of split ``k`` and query ``q`` belongs to group
``k * n_queries + q``. The neural heads then train every fold in one vectorised pass and
the baselines fit one model per group, both seeing exactly the same rows. Each row also
carries its split as a ``block``: a learner may share parameters between the groups of
one block (the queries of one split), never across blocks, so no split sees another
split's test rows through a shared part.

Nested CV (``nested_cross_validate``) packs the inner splits of every outer training part
next to the outer splits, so one fit yields both figures of a run: the tuning figure (mean
inner AUC, which a search optimises) and the held-out figure (outer AUC, which no choice
made on the inner folds has seen).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from streamml.data import QueryData, cv_splits, nested_splits
from streamml.offline.contract import OfflineLearner
from streamml.offline.metrics import ranking_metrics

METRICS = ["auc", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5"]


def cross_validate(learner: OfflineLearner, data: QueryData, splits: list[tuple[np.ndarray, np.ndarray]], **fit_kwargs) -> pd.DataFrame:
    """Fit ``learner`` on every split at once and score each split's held-out rows.

    Returns
    -------
    pandas.DataFrame
        One row per (split, query) with the columns ``split``, ``query_id`` and ``METRICS``.
    """
    n_queries = len(data.query_ids)
    train, train_groups = _pack([tr for tr, _ in splits], data)
    test, test_groups = _pack([te for _, te in splits], data)

    learner.fit(data.X[train], data.y[train], train_groups, blocks=train_groups // n_queries, **fit_kwargs)
    scores = learner.score_rows(data.X[test], test_groups)
    per_group = ranking_metrics(torch.as_tensor(scores), torch.as_tensor(data.y[test]), torch.as_tensor(test_groups))
    groups = per_group.pop("groups").numpy()
    table = pd.DataFrame({name: values.numpy() for name, values in per_group.items()})
    table.insert(0, "query_id", [data.query_ids[g % n_queries] for g in groups])
    table.insert(0, "split", groups // n_queries)
    return table[["split", "query_id", *METRICS]]


def _pack(parts: list[np.ndarray], data: QueryData) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-split row indices and give each row its (split, query) group."""
    rows = np.concatenate(parts)
    split = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    return rows, split * len(data.query_ids) + data.query[rows]


def evaluate(learner: OfflineLearner, data: QueryData, n_folds: int = 5, n_repeats: int = 3, seed: int = 0,
             nested: bool = False, inner_folds: int = 4, **fit_kwargs) -> pd.DataFrame:
    """Cross-validate ``learner`` as the ``cv`` config says: plain, or nested with ``inner_folds``."""
    if nested:
        outer, inner = nested_splits(data, n_folds, n_repeats, inner_folds, seed)
        return nested_cross_validate(learner, data, outer, inner, **fit_kwargs)
    return cross_validate(learner, data, cv_splits(data, n_folds, n_repeats, seed), **fit_kwargs)


def nested_cross_validate(learner: OfflineLearner, data: QueryData, outer: list, inner: list[list], **fit_kwargs) -> pd.DataFrame:
    """`cross_validate` over the outer splits and every inner split, in one fit.

    ``outer`` and ``inner`` come from `streamml.data.nested_splits`.

    Returns
    -------
    pandas.DataFrame
        One row per (split, query) like `cross_validate`, where ``split`` is the outer
        split, plus ``inner``: -1 on the outer (held-out) rows, else the inner fold.
    """
    n_outer = len(outer)
    flat = list(outer) + [split for part in inner for split in part]
    offsets = np.cumsum([n_outer] + [len(part) for part in inner])
    table = cross_validate(learner, data, flat, **fit_kwargs)
    packed = table["split"].to_numpy()
    owner = np.searchsorted(offsets, packed, side="right") - 1  # -1 on outer rows
    table["inner"] = np.where(packed < n_outer, -1, packed - offsets[np.maximum(owner, 0)])
    table["split"] = np.where(packed < n_outer, packed, owner)
    return table[["split", "inner", "query_id", *METRICS]]


def summarize(table: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """Reduce a ``cross_validate`` (or ``nested_cross_validate``) table to run metrics and a per-query table.

    Run metrics are means over queries of each query's mean over splits; ``auc_std`` is
    the std over splits of the split's mean AUC across queries, ``auc.<query_id>`` is each
    query's mean AUC and ``split_auc.<k>`` split ``k``'s mean AUC over queries (so a report
    can pair two runs split by split). A nested table adds the tuning figures:
    ``tuning_auc`` (mean over outer splits of the mean inner AUC), its ``tuning_auc_std``
    over outer splits, and ``split_tuning_auc.<k>``.
    """
    nested = "inner" in table
    held_out = table[table["inner"] < 0] if nested else table
    per_query = held_out.groupby("query_id")[METRICS].agg(["mean", "std"])
    per_query.columns = [m if stat == "mean" else f"{m}_std" for m, stat in per_query.columns]
    metrics = {m: float(per_query[m].mean()) for m in METRICS}
    per_split = held_out.groupby("split")["auc"].mean()
    metrics["auc_std"] = float(per_split.std())
    metrics.update({f"auc.{q}": float(v) for q, v in per_query["auc"].items()})
    metrics.update({f"split_auc.{k}": float(v) for k, v in per_split.items()})
    if nested:
        tuning = table[table["inner"] >= 0].groupby("split")["auc"].mean()
        metrics["tuning_auc"] = float(tuning.mean())
        metrics["tuning_auc_std"] = float(tuning.std())
        metrics.update({f"split_tuning_auc.{k}": float(v) for k, v in tuning.items()})
    return metrics, per_query.reset_index()
