"""Retrain the head from the service's logged rewards, through the offline pipeline.

``python -m streamml.loop retrain log=exports/events catalog=data/queries`` (``configs/loop/retrain.yaml``,
which is ``configs/train.yaml`` plus a ``retrain`` block, so every training override works:
``learner=mlp``, ``cv.n_repeats=1`` ...).

1. The export's slates before the held-out slice (:func:`streamml.loop.logs.split_by_time`,
   the same ``holdout`` as ``evaluate``) give their labelled rewards (:func:`streamml.loop.logs.reward_rows`).
2. Each catalog item answered at least ``min_rewards`` times gets an accept rate and a label by
   the replay's rule (:func:`streamml.online.replay.median_labels`: accepted when its rate is at
   or above its query's median), written as a folder of query files with the catalog's texts
   and embeddings.
3. ``streamml.train.train`` cross-validates and fits the configured head on that folder and
   logs the run to MLflow like any other, tagged with the log's fingerprint (``log_fingerprint``)
   and ``data_source=export``; the query files are logged as the run's ``log_queries`` artifact.

**How the labels are debiased, and why this way.** The logging policy decides who sees what:
with the per-user residual it shows an item mostly to the users whose residual favours it, so
an item's raw accept rate over the users it was shown to overstates the rate over all users.
Each answer is weighted by the inverse of its logged propensity (``1 / mu(item at its
position)``, the item-position model of :mod:`streamml.loop.ope`), and the rate is
self-normalised per item, ``sum w*label / sum w``: answers from users who rarely get the item
count for the many who were not shown it. Weights are clipped at ``max_weight`` (a propensity
of 0.01 would otherwise let one answer decide an item). The alternative, keeping only the
exploration slots, is unbiased without weights but throws away the greedy slots, which are
most of the answers (90% with ``epsilon_slots`` at epsilon 0.1); it is ``rule=exploration``.
The item-position propensity stands in for "the item was shown anywhere", which the log does not keep.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from streamml.loop.logs import check_catalog, fingerprint, read_slates, reward_rows, split_by_time

__all__ = ["log_labels", "write_queries", "retrain"]

log = logging.getLogger("streamml.loop.retrain")
RULES = ("ips", "exploration", "naive")


def log_labels(rewards: pd.DataFrame, catalog, rule: str = "ips", min_rewards: int = 2,
               max_weight: float = 50.0, exploration_below: float = 0.5) -> pd.DataFrame:
    """Labels of catalog items from logged rewards: ``item, query, n, rate, label`` (one row per item).

    ``rule``: ``"ips"`` (weights ``min(1/propensity, max_weight)``), ``"exploration"`` (only
    answers on slots whose propensity is below ``exploration_below``: the exploring draws of
    ``epsilon_slots``; greedy slots have propensity near 1), or ``"naive"`` (every answer weighs 1).
    """
    from streamml.online.replay import median_labels

    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    check_catalog(rewards, catalog.queries)
    item_query = np.asarray(catalog.queries, dtype=object)
    if rule == "exploration":
        rewards = rewards[rewards.propensity < exploration_below]
    w = np.minimum(1.0 / rewards.propensity.to_numpy(), max_weight) if rule == "ips" else np.ones(len(rewards))
    counts = rewards.groupby("item").size()
    keep = rewards["item"].map(counts).to_numpy() >= min_rewards
    items, y, rate = median_labels(rewards["item"].to_numpy()[keep], rewards.label.to_numpy()[keep], item_query, w[keep],
                                   with_rate=True)
    return pd.DataFrame({"item": items, "query": item_query[items], "n": counts.loc[items].to_numpy(), "rate": rate, "label": y})


def write_queries(labels: pd.DataFrame, catalog, folder: str | Path) -> list[str]:
    """Write ``labels`` as query files (``{"text","label","embedding"}``) into ``folder``, replacing
    its query files; a query whose items all got one label is left out (a head needs both). Returns
    the queries written."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    written = []
    for query, part in labels.groupby("query", sort=True):
        if part.label.nunique() < 2:
            log.warning(f"query {query!r}: all {len(part)} logged items got label {part.label.iloc[0]}; left out")
            continue
        rows = [{"text": catalog.texts[i], "label": "accepted" if y else "rejected", "embedding": catalog.X[i].tolist()}
                for i, y in zip(part["item"], part["label"])]
        (folder / f"{query}.json").write_text(json.dumps(rows))
        written.append(str(query))
    if not written:
        raise ValueError("no query has both accepted and rejected items in the log: nothing to train on")
    return written


def retrain(cfg: DictConfig) -> dict:
    """Train a head from the log ``cfg.retrain.log``; returns the run's metrics plus ``run_id`` and ``model_uri``."""
    import mlflow

    from streamml.stores.events import read_catalog
    from streamml.train import train

    r = cfg.retrain
    catalog = read_catalog(r.catalog, cfg.data.embedding_dim)
    train_part, _ = split_by_time(read_slates(r.log), r.holdout)
    rewards = reward_rows(train_part, source=str(r.log))
    labels = log_labels(rewards, catalog, r.rule, r.min_rewards, r.max_weight)
    queries = write_queries(labels, catalog, r.out)
    log.info(f"{len(rewards)} labelled rewards of {len(train_part)} slates -> {len(labels)} items of "
             f"{len(queries)} queries (rule {r.rule}), written to {r.out}")
    with open_dict(cfg):
        cfg.data.dir = str(r.out)
        cfg.run_tags = {"log_fingerprint": fingerprint(r.log), "data_source": "export", "log_dir": str(r.log),
                        "retrain_rule": r.rule}
    metrics = train(cfg)
    run = mlflow.last_active_run()
    mlflow.MlflowClient(cfg.logger.tracking_uri).log_artifacts(run.info.run_id, str(r.out), "log_queries")
    uri = f"runs:/{run.info.run_id}/model"
    log.info(f"retrained head: {uri} (evaluate it: python -m streamml.loop evaluate challenger={uri})")
    return {**metrics, "run_id": run.info.run_id, "model_uri": uri}
