"""Cross-validation harness shared by every learner, so comparisons use identical folds.

All splits are packed into one fit: a row of split ``k`` and query ``q`` belongs to group
``k * n_queries + q``. The neural heads then train every fold in one vectorised pass and
the baselines fit one model per group, both seeing exactly the same rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from streamml.data import QueryData
from streamml.offline.metrics import ranking_metrics

METRICS = ["auc", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5"]


def cross_validate(learner, data: QueryData, splits: list[tuple[np.ndarray, np.ndarray]], **fit_kwargs) -> pd.DataFrame:
    """Fit ``learner`` on every split at once and score each split's held-out rows.

    Returns
    -------
    pandas.DataFrame
        One row per (split, query) with the columns ``split``, ``query_id`` and ``METRICS``.
    """
    n_queries = len(data.query_ids)
    train, train_groups = _pack([tr for tr, _ in splits], data)
    test, test_groups = _pack([te for _, te in splits], data)

    learner.fit(data.X[train], data.y[train], train_groups, **fit_kwargs)
    scores = learner.score(data.X[test], test_groups)
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


def summarize(table: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """Reduce a ``cross_validate`` table to run metrics and a per-query table.

    Run metrics are means over queries of each query's mean over splits; ``auc_std`` is
    the std over splits of the split's mean AUC across queries, and ``auc.<query_id>``
    is each query's mean AUC.
    """
    per_query = table.groupby("query_id")[METRICS].agg(["mean", "std"])
    per_query.columns = [m if stat == "mean" else f"{m}_std" for m, stat in per_query.columns]
    metrics = {m: float(per_query[m].mean()) for m in METRICS}
    metrics["auc_std"] = float(table.groupby("split")["auc"].mean().std())
    metrics.update({f"auc.{q}": float(v) for q, v in per_query["auc"].items()})
    return metrics, per_query.reset_index()
