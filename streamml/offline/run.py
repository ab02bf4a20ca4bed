"""The offline runner, the default of ``python -m streamml.train`` (``run:`` in ``configs/train.yaml``).

It cross-validates the configured learner on per-query stratified folds, fits it once more
on all the data (unless ``final_fit`` is false, as in searches), records everything in
MLflow, and returns the run's metrics. The query files are read and validated before
Lightning and MLflow are imported, so a malformed file fails in about a second.
"""

from __future__ import annotations

import logging

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from streamml.data import load_queries  # numpy and pandas only

log = logging.getLogger(__name__)


def _fit_callbacks(cfg: DictConfig, label: str, loss_prefix: str = "") -> list:
    from streamml import tracking
    from streamml.offline.module import EpochProgress

    callbacks = [tracking.EpochLoss(loss_prefix)]
    if cfg.get("trainer", {}).get("enable_progress_bar"):
        callbacks.append(EpochProgress(label))
    return callbacks


def _run_name(cfg: DictConfig) -> str:
    if cfg.logger.get("run_name"):
        return cfg.logger.run_name
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return f"{choices.get('learner')}-{choices.get('loss')}"
    return cfg.learner._target_.rsplit(".", 1)[-1]


def run(cfg: DictConfig) -> dict[str, float]:
    """Cross-validate, fit on everything, log to MLflow; returns the metrics."""
    data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    from streamml import tracking
    from streamml.offline.evaluate import evaluate, summarize

    log.info(f"{len(data.query_ids)} queries, {len(data.frame)} unique texts ({data.n_duplicates} duplicates merged) from {cfg.data.dir}")
    tags = {"data_fingerprint": data.fingerprint, "data_dir": str(cfg.data.dir), **cfg.get("run_tags", {})}  # run_tags: the loop's retrain
    cv_learner, final_learner = instantiate(cfg.learner), instantiate(cfg.learner)  # config errors fail before the run
    example = pd.DataFrame({"query_id": [data.query_ids[q] for q in data.query[:2]], "embedding": data.X[:2].tolist()})
    with tracking.start_run(cfg, tags=tags, run_name=_run_name(cfg)) as run:
        log.info(f"MLflow run {run.info.run_name} ({run.info.run_id}) in experiment '{cfg.name}' ({cfg.logger.tracking_uri})")
        table = evaluate(cv_learner, data, **cfg.cv, callbacks=_fit_callbacks(cfg, "cv", "cv_"))
        metrics, per_query = summarize(table)
        tracking.log_results(metrics, per_query, table)
        if cfg.final_fit:
            final = final_learner.fit(data.X, data.y, data.query, callbacks=_fit_callbacks(cfg, "final fit"))
            tracking.log_model(final, data.query_ids, cfg.data.embedding_dim, input_example=example)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        columns = ["query_id", "auc", "auc_std", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5"]
        log.info(f"mean over queries: auc {metrics['auc']:.3f} ± {metrics['auc_std']:.3f} (std over splits)\n"
                 + per_query[columns].to_string(index=False))
        if "tuning_auc" in metrics:
            log.info(f"nested CV: tuning auc (inner folds) {metrics['tuning_auc']:.3f}, held-out auc (outer folds) {metrics['auc']:.3f}")
        if cfg.final_fit:
            uri = f"runs:/{run.info.run_id}/model"
            log.info(f"model: {uri} (serve: mlflow models serve -m {uri} --env-manager local)")
    log.info(f"done: run {run.info.run_name} ({run.info.run_id}) in MLflow experiment '{cfg.name}' at {cfg.logger.tracking_uri} "
             f"(mlflow ui); plot {run.info.artifact_uri}/plots/per_query_auc.png")
    return metrics
